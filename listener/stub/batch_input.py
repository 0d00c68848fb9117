"""A batch's input file read as OpenAI's validation reads it, and the answer to each of its
lines worked out in advance (a pure function of the file, run off the event loop).

Validation errors are the batch's `errors.data[]` (it goes `failed`); a line that passes
validation but is not a chat request the stub can answer gets a 400 body in the error file,
as the real API answers it.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

from listener.stub.answer import BadChatRequest, completion_body, error_body, read_chat_request
from listener.stub.text import BATCH_400_MARKER, BATCH_ERROR_MARKER

CHAT_ENDPOINT = "/v1/chat/completions"
MAX_REPORTED_ERRORS = 100  # a file of 50,000 bad lines needs no 50,000 errors to be fixed

_SERVER_ERROR = "The server had an error while processing your request."


@dataclass(frozen=True)
class BatchError:
    """One entry of a failed batch's `errors.data`."""

    code: str
    message: str
    line: int | None = None
    param: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "line": self.line, "param": self.param}


@dataclass(frozen=True)
class LineAnswer:
    """One request's outcome: its output line (JSON text) and the tokens it used."""

    custom_id: str
    ok: bool  # status 200: the output file; otherwise the error file
    line: str
    enqueued_tokens: int  # the request's prompt estimate, whatever its outcome
    prompt_tokens: int  # used: 0 unless it succeeded
    completion_tokens: int


@dataclass(frozen=True)
class BatchInput:
    """A validated input file: its model, errors (none when valid) and answers in file order."""

    model: str | None
    errors: list[BatchError]
    answers: list[LineAnswer] = field(default_factory=list)
    prompt_tokens: int = 0  # the estimate the enqueued-token limit counts
    # Running sums over the answers in file order: [k] is the sum over the first k.
    ok_before: list[int] = field(default_factory=lambda: [0])
    prompt_before: list[int] = field(default_factory=lambda: [0])
    completion_before: list[int] = field(default_factory=lambda: [0])


def _request_line(number: int, text: str, endpoint: str) -> tuple[Any, BatchError | None]:
    """The line's JSON object, or the first thing validation finds wrong with it."""
    try:
        line = json.loads(text)
    except ValueError:
        line = None
    if not isinstance(line, dict):
        return None, BatchError(
            "invalid_json_line", "This line is not parseable as valid JSON.", number
        )
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return None, _missing(number, "custom_id")
    if line.get("method") != "POST":
        message = "The method for this request must be POST."
        return None, BatchError("invalid_method", message, number, "method")
    if line.get("url") != endpoint:
        message = "The URL provided for this request does not match the batch endpoint."
        return None, BatchError("invalid_url", message, number, "url")
    body = line.get("body")
    if not isinstance(body, dict):
        return None, _missing(number, "body")
    if not isinstance(body.get("model"), str) or not body["model"]:
        return None, _missing(number, "body.model")
    return line, None


def _missing(number: int, param: str) -> BatchError:
    message = f"This request is missing the required parameter '{param}'."
    return BatchError("missing_required_parameter", message, number, param)


def read_batch_input(
    content: bytes,
    *,
    endpoint: str,
    max_requests: int,
    max_bytes: int,
    error_rate: float,
    rng: random.Random,
    created: int,
) -> BatchInput:
    """Validate `content` and, when it is valid, answer each of its lines."""
    if len(content) > max_bytes:
        message = f"The input file is {len(content)} bytes; at most {max_bytes} are allowed."
        return BatchInput(None, [BatchError("file_too_large", message)])
    texts = [
        (number, text)
        for number, text in enumerate(content.decode("utf-8", "replace").splitlines(), 1)
        if text.strip()
    ]
    if not texts:
        return BatchInput(None, [BatchError("empty_file", "The input file has no requests.")])
    if len(texts) > max_requests:
        message = f"The input file has {len(texts)} requests; at most {max_requests} are allowed."
        return BatchInput(None, [BatchError("too_many_requests", message)])
    errors: list[BatchError] = []
    requests: list[dict[str, Any]] = []
    seen: set[str] = set()
    model: str | None = None
    for number, text in texts:
        line, error = _request_line(number, text, endpoint)
        if error is None:
            if line["custom_id"] in seen:
                message = "The custom_id for this request is a duplicate of another request."
                error = BatchError("duplicate_custom_id", message, number, "custom_id")
            elif model is not None and line["body"]["model"] != model:
                message = (
                    f"The provided model '{line['body']['model']}' does not match the model "
                    f"'{model}' of the batch's other requests: one model per batch."
                )
                error = BatchError("mismatched_model", message, number, "body.model")
        if error is not None:
            errors.append(error)
            continue
        seen.add(line["custom_id"])
        model = model or line["body"]["model"]
        requests.append(line)
    if errors:
        return BatchInput(model, errors[:MAX_REPORTED_ERRORS])
    answers = [_answer(r, error_rate, rng, created) for r in requests]
    return BatchInput(
        model,
        [],
        answers,
        prompt_tokens=sum(a.enqueued_tokens for a in answers),
        ok_before=list(accumulate((int(a.ok) for a in answers), initial=0)),
        prompt_before=list(accumulate((a.prompt_tokens for a in answers), initial=0)),
        completion_before=list(accumulate((a.completion_tokens for a in answers), initial=0)),
    )


def _answer(
    request: dict[str, Any], error_rate: float, rng: random.Random, created: int
) -> LineAnswer:
    custom_id = request["custom_id"]
    # Drawn for every line, so that which lines fail depends only on the seed and the file.
    unlucky = rng.random() < error_rate
    try:
        chat = read_chat_request(request["body"])
    except BadChatRequest as exc:
        bad = error_body(str(exc), "invalid_request_error", None)
        return LineAnswer(custom_id, False, output_line(custom_id, 400, bad), 0, 0, 0)
    estimate = chat.prompt_tokens
    if BATCH_400_MARKER in chat.last_user:
        bad = error_body("Invalid request (STUB:BATCH_400).", "invalid_request_error", None)
        return LineAnswer(custom_id, False, output_line(custom_id, 400, bad), estimate, 0, 0)
    if unlucky or BATCH_ERROR_MARKER in chat.last_user:
        failed = error_body(_SERVER_ERROR, "server_error", None)
        return LineAnswer(custom_id, False, output_line(custom_id, 500, failed), estimate, 0, 0)
    body = completion_body(chat, created)
    usage = body["usage"]
    line = output_line(custom_id, 200, body)
    used = usage["prompt_tokens"], usage["completion_tokens"]
    return LineAnswer(custom_id, True, line, estimate, *used)


def output_line(custom_id: str, status_code: int, body: Any) -> str:
    """A line of an output or error file for a request that got a response."""
    response = {"status_code": status_code, "request_id": f"req_{uuid.uuid4().hex}", "body": body}
    return _line(custom_id, response, None)


def unfinished_line(custom_id: str, code: str, message: str) -> str:
    """A line of the error file for a request the batch never ran (expired, cancelled)."""
    return _line(custom_id, None, {"code": code, "message": message})


def _line(custom_id: str, response: Any, error: Any) -> str:
    line = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id}
    return json.dumps({**line, "response": response, "error": error}, ensure_ascii=False)
