"""Rendered model plots kept on disk: a model's plot never changes, so it is drawn once.

A model's weights and training data are fixed under its id, and so is its plot at one
size; drawing one took 0.3-0.7 s (24 plots: 16.6 s for a dashboard, issue #16). Files
live in one folder, named by model id, size and kind; the folder holds at most
``capacity`` files, the least recently used going first. The ETag is the PNG's sha256, so
a browser that has it gets 304 without the file being read again.

Knows files; no HTTP, no SQL. Writes go through a temporary file and a rename, so a
reader never sees half a PNG, and two processes drawing the same plot both succeed.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

_NAME = re.compile(r"^(?P<model>[0-9a-f]{32})-(?P<w>\d+)x(?P<h>\d+)-(?P<kind>[a-z-]+)-(?P<etag>[0-9a-f]{16})\.png$")


@dataclass(frozen=True)
class CachedPlot:
    kind: str
    etag: str  # quoted, as the header carries it
    path: Path

    def read(self) -> bytes:
        return self.path.read_bytes()


class PlotCache:
    def __init__(self, folder: Path, capacity: int = 512) -> None:
        self.folder, self.capacity = folder, capacity
        self._lock = threading.Lock()

    def get(self, model_id: str, size: tuple[int, int]) -> CachedPlot | None:
        prefix = f"{model_id}-{size[0]}x{size[1]}-"
        try:
            names = [p for p in self.folder.iterdir() if p.name.startswith(prefix)]
        except FileNotFoundError:
            return None
        for path in names:
            match = _NAME.match(path.name)
            if match is None:
                continue
            try:
                os.utime(path)  # recently used: the last to go
            except FileNotFoundError:  # evicted meanwhile
                return None
            return CachedPlot(match["kind"], f'"{match["etag"]}"', path)
        return None

    def put(self, model_id: str, size: tuple[int, int], kind: str, png: bytes) -> CachedPlot:
        etag = hashlib.sha256(png).hexdigest()[:16]
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{model_id}-{size[0]}x{size[1]}-{kind}-{etag}.png"
        handle, temporary = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as f:
                f.write(png)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        self._evict()
        return CachedPlot(kind, f'"{etag}"', path)

    def forget(self, model_id: str) -> None:
        """Remove a deleted model's plots."""
        for path in self.folder.glob(f"{model_id}-*.png"):
            path.unlink(missing_ok=True)

    def _evict(self) -> None:
        with self._lock:
            files = []
            for path in self.folder.glob("*.png"):
                try:
                    files.append((path.stat().st_mtime, path))
                except FileNotFoundError:
                    continue
            if len(files) <= self.capacity:
                return
            files.sort()
            for _, path in files[: len(files) - self.capacity]:
                path.unlink(missing_ok=True)
