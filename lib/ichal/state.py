"""Small durable JSON stores shared by the server and its training/scoring subprocesses.

Every write is atomic (temp file + rename) under an inter-process file lock, so a crash or a
concurrent writer never leaves a half-written or lost record (DESIGN.md, Serving).
"""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock

from ichal.io import atomic_write_bytes


class StateError(ValueError):
    """A state file exists but cannot be read; it is left untouched for inspection."""


class JsonStore:
    """One JSON document on disk, read and updated under a lock.

    `update(fn)` reads the current document, applies `fn` to it (in place or returning a new one)
    and writes it back atomically, all while holding the lock: read-modify-write with no lost updates.
    """

    def __init__(self, path: str | Path, default: Callable[[], Any]):
        self.path = Path(path)
        self._default = default
        self._thread_lock = threading.RLock()
        self._file_lock = FileLock(str(self.path) + ".lock")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._thread_lock, self._file_lock:
            yield

    def _read_unlocked(self) -> Any:
        if not self.path.exists():
            return self._default()
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise StateError(f"state file {self.path} is unreadable ({error}); move it aside to start afresh") from error

    def read(self) -> Any:
        with self._locked():
            return self._read_unlocked()

    def update(self, fn: Callable[[Any], Any]) -> Any:
        with self._locked():
            document = self._read_unlocked()
            result = fn(document)
            document = document if result is None else result
            atomic_write_bytes(self.path, json.dumps(document, indent=1, sort_keys=True).encode())
            return document
