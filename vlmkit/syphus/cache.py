"""A content-addressed cache of LLM calls: sha256(backend identity + messages) -> the answer.

Every answer is written (atomically) the moment it arrives, so a killed run resumes without asking
again, and a rerun with the same backend settings asks nothing."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from vlmkit.llm_backends.base import Completion

__all__ = ["CallCache", "call_key"]


def call_key(identity: dict[str, Any], messages: list[dict[str, str]]) -> str:
    blob = json.dumps({"backend": identity, "messages": messages}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class CallCache:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> Completion | None:
        path = self._path(key)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return Completion(data["text"], int(data["prompt_tokens"]), int(data["completion_tokens"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):  # a damaged entry (e.g. a disk filled mid-write): ask again
            return None

    def put(self, key: str, completion: Completion) -> None:
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        data = {"text": completion.text, "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False)
        os.replace(tmp, path)
