"""The stub's Files API storage: uploaded batch input files and the output and error files its
batches write, kept in memory (the stub is a test and demo tool: a restart forgets them).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

# The purposes the `openai` client's FileObject knows; uploads may name the first ones.
UPLOAD_PURPOSES = frozenset({"assistants", "batch", "fine-tune", "vision", "user_data", "evals"})
BATCH_FILE_TTL_SECONDS = 30 * 24 * 3600  # OpenAI's default expiry of purpose=batch files


@dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    created_at: int
    content: bytes

    def as_json(self) -> dict[str, Any]:
        """The File object the `openai` client parses (FileObject)."""
        expires = self.purpose in ("batch", "batch_output")
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": self.created_at + BATCH_FILE_TTL_SECONDS if expires else None,
            "status_details": None,
        }


class FileStore:
    """Files by id, newest last; loop-confined, so every method runs without awaiting."""

    def __init__(self) -> None:
        self._files: dict[str, StoredFile] = {}

    def add(self, filename: str, purpose: str, content: bytes, created_at: int) -> StoredFile:
        stored = StoredFile(f"file-{uuid.uuid4().hex[:24]}", filename, purpose, created_at, content)
        self._files[stored.id] = stored
        return stored

    def get(self, file_id: str) -> StoredFile | None:
        return self._files.get(file_id)

    def delete(self, file_id: str) -> bool:
        return self._files.pop(file_id, None) is not None

    def newest_first(self, purpose: str | None = None) -> list[StoredFile]:
        return [f for f in reversed(self._files.values()) if purpose in (None, f.purpose)]

    def __len__(self) -> int:
        return len(self._files)
