"""The model store on an object store (S3 or S3-compatible, or any fsspec filesystem), for
nodes that share no folder.

The layout under the URL is the local store's: ``datasets/<id>.npz`` and
``weights/<id>.safetensors``. An object store shows an object whole or not at all (S3's
PutObject, or CompleteMultipartUpload for a large file), so no reader ever sees a partial
file. Whatever is stored is immutable once written and named by a server-generated id, so
each node keeps local copies, checked against their sha256, under its own folder and never
has to invalidate them: a deleted object is deleted from the copies of the node that
deletes it, and any other node's copy is unreachable because its database row is gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from fsspec.core import url_to_fs

from trainserve.datasets.tables import Table, read_table, write_table
from trainserve.errors import ChecksumMismatch
from trainserve.storage.base import Kind, Store, named_by_id
from trainserve.storage.local import LocalStore, load_safetensors, open_checked, save_safetensors

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class ObjectStore(Store):
    """A ``Store`` whose objects live at an fsspec URL; ``cache``, a ``LocalStore`` in the
    same layout, holds this node's copies, half-written files and checkpoints in progress."""

    def __init__(self, url: str, cache: LocalStore, options: dict[str, Any]) -> None:
        self.cache = cache
        self.url = url
        self.fs, root = url_to_fs(url, **options)
        self.remote_root = root.rstrip("/")

    @contextmanager
    def temp_path(self, suffix: str = "") -> Iterator[Path]:
        with self.cache.temp_path(suffix) as path:
            yield path

    def _remote(self, local: Path) -> str:
        """Where a file of the local layout (``datasets/<id>.npz``...) lives remotely."""
        return f"{self.remote_root}/{local.parent.name}/{local.name}"

    @property
    def _marker(self) -> str:
        # Object stores have no folders: an empty prefix cannot be told from a missing one,
        # so the store marks its root with a small object that readiness checks look for.
        return f"{self.remote_root}/trainserve-store"

    def ensure(self) -> None:
        self.cache.ensure()
        if not self.fs.exists(self._marker):
            self.fs.pipe_file(self._marker, b"a trainserve model store: datasets/ and weights/, named by id\n")

    def check(self) -> None:
        self.fs.invalidate_cache(self.remote_root)  # ask the server, not fsspec's listing cache
        self.fs.info(self._marker)

    def _open_copy(self, path: Path, expected_sha256: str, what: str) -> BinaryIO:
        """This node's copy of a stored file, open and checked against its sha256 (see
        ``open_checked``): downloaded on first use, and again if the copy here was damaged,
        since the store's object is the one that counts."""
        try:
            return open_checked(path, expected_sha256, what)
        except FileNotFoundError:
            pass
        except ChecksumMismatch:
            log.warning("%s on this node is damaged; fetching it again from the store", what)
        with self.cache.temp_path(path.suffix) as tmp:
            self.fs.get_file(self._remote(path), str(tmp))
            handle = open_checked(tmp, expected_sha256, f"{what} in the store")
            os.replace(tmp, path)  # the open handle follows the file
        return handle

    def _remove(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._remote(path))
        path.unlink(missing_ok=True)

    # -- crash debris ---------------------------------------------------------------------

    def sweep_tmp(self, *, older_than_s: float) -> list[str]:
        return self.cache.sweep_tmp(older_than_s=older_than_s)

    def sweep_orphans(self, kind: Kind, *, older_than_s: float, owned: Callable[[list[str]], set[str]]) -> list[str]:
        """This node's orphan copies, then the store's orphan objects, by the time the store
        lists for them; an object listed with no time is kept. With an object, this node's
        copy of it goes too, however young."""
        removed = self.cache.sweep_orphans(kind, older_than_s=older_than_s, owned=owned)
        folder = self.cache.folder(kind)
        prefix = f"{self.remote_root}/{kind}"
        self.fs.invalidate_cache(prefix)  # list what the server holds now
        try:
            listing: list[dict[str, Any]] = self.fs.ls(prefix, detail=True)
        except FileNotFoundError:  # nothing ever stored there
            return removed
        cutoff = time.time() - older_than_s
        names = [entry["name"] for entry in listing if entry.get("type") == "file" and _listed_before(entry, cutoff)]
        aged = dict(named_by_id(names))
        kept = owned(sorted(set(aged.values()))) if aged else set()
        for name, object_id in aged.items():
            if object_id not in kept:
                self._remove(folder / name.rsplit("/", 1)[-1])
                removed.append(f"{self.url.rstrip('/')}/{kind}/{name.rsplit('/', 1)[-1]}")
        return removed

    # -- datasets -------------------------------------------------------------------------

    def save_dataset(self, dataset_id: str, table: Table) -> str:
        path = self.cache.dataset_path(dataset_id)
        with self.cache.temp_path(".npz") as tmp:
            with open(tmp, "wb") as handle:
                file_sha256 = write_table(table, handle)
            self.fs.put_file(str(tmp), self._remote(path))
            os.replace(tmp, path)  # the uploading node keeps its copy: its workers may be local
        return file_sha256

    def load_dataset(self, dataset_id: str, expected_sha256: str) -> Table:
        path = self.cache.dataset_path(dataset_id)
        self._open_copy(path, expected_sha256, f"the file of dataset {dataset_id}").close()
        return read_table(path)

    def delete_dataset(self, dataset_id: str) -> None:
        self._remove(self.cache.dataset_path(dataset_id))

    # -- weights --------------------------------------------------------------------------

    def save_weights(
        self, model_id: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
    ) -> tuple[str, int]:
        payload = save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata)
        self.fs.pipe_file(self._remote(self.cache.weights_path(model_id)), payload)
        return hashlib.sha256(payload).hexdigest(), len(payload)

    def load_weights(self, model_id: str, expected_sha256: str) -> dict[str, torch.Tensor]:
        payload: bytes = self.fs.cat_file(self._remote(self.cache.weights_path(model_id)))
        if hashlib.sha256(payload).hexdigest() != expected_sha256:
            raise ChecksumMismatch(f"the weights of model {model_id} in the store do not match their recorded sha256")
        tensors: dict[str, torch.Tensor] = load_safetensors(payload)
        return tensors

    def open_weights(self, model_id: str, expected_sha256: str) -> BinaryIO:
        return self._open_copy(
            self.cache.weights_path(model_id), expected_sha256, f"the weights file of model {model_id}"
        )

    def delete_weights(self, model_id: str) -> None:
        self._remove(self.cache.weights_path(model_id))

    # -- training checkpoints -------------------------------------------------------------
    # Unlike datasets and weights, a job's checkpoint is replaced as training goes on, and a
    # re-queued job may resume on another machine: the store's copy is the one that counts.

    def save_checkpoint(
        self,
        job_id: str,
        tensors: dict[str, torch.Tensor],
        meta: dict[str, Any],
        *,
        publish_if: Callable[[], bool] = lambda: True,
    ) -> bool:
        if not self.cache.save_checkpoint(job_id, tensors, meta, publish_if=publish_if):
            return False
        path = self.cache.checkpoint_path(job_id)
        self.fs.put_file(str(path), self._remote(path))
        return True

    def load_checkpoint(self, job_id: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        path = self.cache.checkpoint_path(job_id)
        with self.cache.temp_path(".ckpt") as tmp:
            try:
                self.fs.get_file(self._remote(path), str(tmp))
            except FileNotFoundError:
                path.unlink(missing_ok=True)  # a copy from an earlier attempt here is stale
                return None
            os.replace(tmp, path)
        return self.cache.load_checkpoint(job_id)

    def delete_checkpoint(self, job_id: str) -> None:
        self._remove(self.cache.checkpoint_path(job_id))


def _listed_before(entry: dict[str, Any], cutoff: float) -> bool:
    """Whether fsspec lists the object as last written before ``cutoff`` (a Unix time).
    Filesystems name that time differently (s3fs ``LastModified``, others ``last_modified``
    or ``mtime``); an object listed with no time is never taken for old. S3 lists whole
    seconds, so a second is added to every time."""
    for key in ("LastModified", "last_modified", "mtime"):
        value = entry.get(key)
        if isinstance(value, datetime):
            value = value.timestamp()  # an aware datetime, or the local time, as fsspec gives it
        if isinstance(value, int | float):
            return value + 1 < cutoff
    return False
