"""A `multipart/form-data` body read into its fields: what the `openai` client sends to upload
a file. Starlette's own form parser needs the python-multipart package, which the stub, a
test and demo tool, does not justify; this reads the whole body, which is in memory anyway.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
_PARAM = re.compile(r'(\w+)="([^"]*)"')


class BadMultipart(ValueError):
    """The body is not the multipart form its content type says."""


@dataclass(frozen=True)
class FormField:
    name: str
    filename: str | None  # set for a file part
    content: bytes


def boundary_of(content_type: str) -> bytes:
    if not content_type.lower().startswith("multipart/form-data"):
        raise BadMultipart("expected a multipart/form-data body")
    if (match := _BOUNDARY.search(content_type)) is None:
        raise BadMultipart("the multipart content type has no boundary")
    return match.group(1).encode("latin-1")


def parse_form(body: bytes, content_type: str) -> dict[str, FormField]:
    """The form's fields by name (a repeated name: the last one)."""
    delimiter = b"--" + boundary_of(content_type)
    chunks = body.split(delimiter)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise BadMultipart("the multipart body is not closed by its boundary")
    fields: dict[str, FormField] = {}
    for chunk in chunks[1:-1]:
        # Each part is CRLF, headers, CRLF CRLF, content, CRLF (the one before the delimiter).
        if not chunk.startswith(b"\r\n") or not chunk.endswith(b"\r\n"):
            raise BadMultipart("a multipart part is not delimited by CRLF")
        head, separator, content = chunk[2:-2].partition(b"\r\n\r\n")
        if not separator:
            raise BadMultipart("a multipart part has no header end")
        disposition = ""
        for line in head.decode("utf-8", "replace").split("\r\n"):
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-disposition":
                disposition = value
        params = dict(_PARAM.findall(disposition))
        if "name" not in params:
            raise BadMultipart("a multipart part has no name")
        fields[params["name"]] = FormField(params["name"], params.get("filename"), content)
    return fields
