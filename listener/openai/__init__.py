"""The OpenAI handler, the first client of the handler seam (`listener.handler`): the kinds in
`kinds.toml` (a product description, SEO metadata, a translation), and those of the app's own
OPENAI_KINDS_FILE, each served by one chat completion per item.
"""

from __future__ import annotations

from listener.handler import App, Kind
from listener.openai import prices
from listener.openai.chat import ChatHandler, make_client
from listener.openai.spec import KindSpec, load_built_in, load_file
from listener.settings import Settings


def kind_specs(settings: Settings) -> dict[str, KindSpec]:
    """The built-in kinds, with the kinds file's over them (a name in both: the file's)."""
    specs = load_built_in()
    if settings.openai_kinds_file:
        specs.update(load_file(settings.openai_kinds_file))
    return specs


def openai_app(settings: Settings) -> App:
    """An App serving every OpenAI kind through one HTTP client (closed with the app)."""
    # Read now, though only reports price usage: a broken OPENAI_PRICES_FILE stops the worker
    # at start with one line, not the first `store show` or dashboard that needs it.
    prices.load(settings.openai_prices_file)
    client = make_client(settings)
    app = App()
    closed = False

    async def close() -> None:
        nonlocal closed
        if not closed:
            closed = True
            await client.close()

    handlers: dict[str, ChatHandler] = {}
    for spec in kind_specs(settings).values():
        handler = handlers[spec.name] = ChatHandler(spec, settings, client)
        app.add(
            Kind(
                spec.name,
                handler,
                budget=spec.budget,
                max_attempts=spec.max_attempts,
                estimate=handler.estimate_tokens(),
                options=spec.options,
                required_options=spec.required_options,
                aclose=close,
                tier=spec.tier,
                # Its request body is a batch line's (ChatHandler.request), its answers are
                # checked alike: the batch path (listener/batches/) serves its batch tier.
                batch=True,
            )
        )
    # Imported here: listener.batches builds on this package's modules.
    from listener.batches.runner import BatchRunner

    app.services.append(BatchRunner(settings, client, handlers))
    return app


__all__ = ["ChatHandler", "KindSpec", "kind_specs", "openai_app"]
