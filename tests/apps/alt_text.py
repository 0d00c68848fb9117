"""A user's app as `listener worker --app tests.apps.alt_text:app` loads it: a kind of its own
that calls no metered API, and one drawing from a budget it declares."""

from __future__ import annotations

from listener import App, FailItem, Item, Result, RetryItem

app = App()
app.budget("images", rpm=6000)


@app.kind("alt_text", budget=None, max_attempts=2, options=["language"])
async def alt_text(item: Item) -> Result:
    url = item.payload.get("image_url") if isinstance(item.payload, dict) else None
    if not url:
        raise FailItem("payload has no image_url")
    if "flaky" in url and item.attempt == 1:
        raise RetryItem("the image server hiccuped", after=0.0)
    language = item.options.get("language", "en")
    return Result({"alt": f"[{language}] a photo of {item.payload.get('name', 'a product')}"})


@app.kind("thumbnail", budget="images", estimate=1)
async def thumbnail(item: Item) -> dict[str, str]:
    return {"thumbnail": f"{item.payload['image_url']}?w=200"}


broken = App()
broken.kind("uses_missing_budget", budget="nowhere")(alt_text)
