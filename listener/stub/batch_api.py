"""The stub's Files and Batches API over HTTP, in the shapes the `openai` client parses:
/v1/files (upload, list, retrieve, content, delete), /v1/batches (create, list, retrieve,
cancel), and POST /stub/batches/advance, which moves the batch clock forward.
"""

from __future__ import annotations

import functools
import random
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from listener.stub.answer import error_body
from listener.stub.batch_input import CHAT_ENDPOINT, read_batch_input
from listener.stub.batches import Batch, CannotCancel, Timing, new_batch_id
from listener.stub.files import UPLOAD_PURPOSES
from listener.stub.multipart import BadMultipart, parse_form
from listener.stub.state import StubState

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MAX_PAGE = 100
DEFAULT_PAGE = 20


def _invalid(message: str, param: str | None = None, status: int = 400) -> JSONResponse:
    return JSONResponse(
        error_body(message, "invalid_request_error", None, param), status_code=status
    )


def _not_found(kind: str, object_id: str) -> JSONResponse:
    return _invalid(f"No such {kind} object: {object_id}", "id", 404)


def _unauthorized(state: StubState, request: Request) -> JSONResponse | None:
    key = state.config.required_api_key
    if key is None or request.headers.get("authorization") == f"Bearer {key}":
        return None
    state.unauthorized_total += 1
    body = error_body("Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
    return JSONResponse(body, status_code=401)


def _metadata_error(metadata: Any) -> str | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        return "metadata must be an object of string keys and values."
    if len(metadata) > MAX_METADATA_PAIRS:
        return f"metadata has {len(metadata)} pairs; at most {MAX_METADATA_PAIRS} are allowed."
    for key, value in metadata.items():
        if not isinstance(value, str):
            return f"metadata value of '{key}' must be a string."
        if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
            return (
                f"metadata keys are at most {MAX_METADATA_KEY} characters, values at most "
                f"{MAX_METADATA_VALUE}: '{key[:64]}' is longer."
            )
    return None


def _page_limit(request: Request) -> int | None:
    raw = request.query_params.get("limit", str(DEFAULT_PAGE))
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_PAGE:
        return None
    return int(raw)


def batch_routes(state: StubState) -> list[Route]:
    files = state.files
    batches = state.batches

    async def upload(request: Request) -> Response:
        if (refused := _unauthorized(state, request)) is not None:
            return refused
        body = await request.body()
        content_type = request.headers.get("content-type", "")
        try:
            form = await anyio.to_thread.run_sync(parse_form, body, content_type)
        except BadMultipart as exc:
            return _invalid(f"Invalid multipart upload: {exc}.")
        upload = form.get("file")
        if upload is None or upload.filename is None:
            return _invalid("Missing the required parameter 'file'.", "file")
        purpose = form["purpose"].content.decode() if "purpose" in form else ""
        if purpose not in UPLOAD_PURPOSES:
            return _invalid(f"Invalid purpose '{purpose}'.", "purpose")
        stored = files.add(upload.filename, purpose, upload.content, int(batches.now()))
        return JSONResponse(stored.as_json())

    async def list_files(request: Request) -> Response:
        if (refused := _unauthorized(state, request)) is not None:
            return refused
        batches.settle()
        found = files.newest_first(request.query_params.get("purpose"))
        return JSONResponse(_page_json([f.as_json() for f in found], has_more=False))

    async def file_object(request: Request) -> Response:
        if (refused := _unauthorized(state, request)) is not None:
            return refused
        file_id = request.path_params["file_id"]
        if request.method == "DELETE":
            if not files.delete(file_id):
                return _not_found("File", file_id)
            return JSONResponse({"id": file_id, "object": "file", "deleted": True})
        batches.settle()
        stored = files.get(file_id)
        if stored is None:
            return _not_found("File", file_id)
        return JSONResponse(stored.as_json())

    async def file_content(request: Request) -> Response:
        if (refused := _unauthorized(state, request)) is not None:
            return refused
        batches.settle()
        stored = files.get(request.path_params["file_id"])
        if stored is None:
            return _not_found("File", request.path_params["file_id"])
        return Response(stored.content, media_type="application/octet-stream")

    async def create_batch(request: Request) -> Response:
        if (refused := _unauthorized(state, request)) is not None:
            return refused
        try:
            params = await request.json()
            if not isinstance(params, dict):
                raise ValueError("not an object")
        except ValueError:
            return _invalid("Invalid request body: expected a JSON object.")
        if params.get("endpoint") != CHAT_ENDPOINT:
            return _invalid(f"The stub serves batches for {CHAT_ENDPOINT} only.", "endpoint")
        if params.get("completion_window") != "24h":
            return _invalid("completion_window must be '24h'.", "completion_window")
        if (problem := _metadata_error(params.get("metadata"))) is not None:
            return _invalid(problem, "metadata")
        file_id = params.get("input_file_id")
        stored = files.get(file_id) if isinstance(file_id, str) else None
        if stored is None:
            return _invalid(f"No such File object: {file_id}", "input_file_id")
        if stored.purpose != "batch":
            return _invalid(
                "The input file must be uploaded with purpose 'batch'.", "input_file_id"
            )
        cfg = state.config
        created = batches.now()
        rng = random.Random(f"{cfg.seed}:{batches.next_number()}")
        read = functools.partial(
            read_batch_input,
            stored.content,
            endpoint=CHAT_ENDPOINT,
            max_requests=cfg.batch_max_requests,
            max_bytes=cfg.batch_max_bytes,
            error_rate=cfg.batch_error_rate,
            rng=rng,
            created=int(created),
        )
        # Off the loop: 50,000 lines take a while to read and answer.
        batch_input = await anyio.to_thread.run_sync(read)
        timing = Timing(
            cfg.batch_validating_seconds,
            cfg.batch_processing_seconds,
            cfg.batch_finalizing_seconds,
            cfg.batch_cancelling_seconds,
            cfg.batch_completion_window_seconds,
        )
        batch = Batch(
            new_batch_id(),
            stored.id,
            CHAT_ENDPOINT,
            "24h",
            params.get("metadata"),
            created,
            timing,
            batch_input,
            rng,
        )
        batches.add(batch, cfg.batch_enqueued_token_limit)
        return JSONResponse(batches.as_json(batch))

    async def list_batches(request: Request) -> Response:
        if (refused := _unauthorized(state, request)) is not None:
            return refused
        limit = _page_limit(request)
        if limit is None:
            return _invalid(f"limit must be an integer from 1 to {MAX_PAGE}.", "limit")
        found, has_more = batches.page(limit, request.query_params.get("after"))
        now = batches.settle()
        return JSONResponse(_page_json([b.as_json(now) for b in found], has_more))

    async def batch_object(request: Request) -> Response:
        if (refused := _unauthorized(state, request)) is not None:
            return refused
        batch = batches.get(request.path_params["batch_id"])
        if batch is None:
            return _not_found("Batch", request.path_params["batch_id"])
        return JSONResponse(batches.as_json(batch))

    async def cancel_batch(request: Request) -> Response:
        if (refused := _unauthorized(state, request)) is not None:
            return refused
        try:
            batch = batches.cancel(request.path_params["batch_id"])
        except CannotCancel as exc:
            return _invalid(str(exc), status=409)
        if batch is None:
            return _not_found("Batch", request.path_params["batch_id"])
        return JSONResponse(batches.as_json(batch))

    async def advance(request: Request) -> Response:
        try:
            seconds = float((await request.json())["seconds"])
            if not 0 <= seconds < float("inf"):
                raise ValueError("seconds must be a finite number >= 0")
        except (ValueError, KeyError, TypeError) as exc:
            return _invalid(f'expected {{"seconds": <number >= 0>}}: {exc}')
        batches.advance(seconds)
        return JSONResponse({"now": batches.now(), "offset": batches.offset})

    return [
        Route("/v1/files", upload, methods=["POST"]),
        Route("/v1/files", list_files, methods=["GET"]),
        Route("/v1/files/{file_id}", file_object, methods=["GET", "DELETE"]),
        Route("/v1/files/{file_id}/content", file_content, methods=["GET"]),
        Route("/v1/batches", create_batch, methods=["POST"]),
        Route("/v1/batches", list_batches, methods=["GET"]),
        Route("/v1/batches/{batch_id}", batch_object, methods=["GET"]),
        Route("/v1/batches/{batch_id}/cancel", cancel_batch, methods=["POST"]),
        Route("/stub/batches/advance", advance, methods=["POST"]),
    ]


def _page_json(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
