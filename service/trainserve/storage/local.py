"""The store as a folder (the embedded default, or a shared mount): uploaded datasets,
trained weights and checkpoints, written atomically, checked by sha256.

Every path is built from a server-generated id (checked against ``ID_PATTERN`` here as
well), never from a string a client sent. Writes go to ``tmp/`` and are renamed into
place, so a crash mid-write leaves no partial file where a reader would look.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from safetensors import SafetensorError, safe_open

from trainserve.datasets.tables import Table, read_table, write_table
from trainserve.errors import ChecksumMismatch
from trainserve.storage.base import ID_PATTERN, KINDS, Kind, Store, named_by_id, new_id

if TYPE_CHECKING:
    import torch


# safetensors' torch half imports torch: at the first model written or read, not when the
# API process opens its store (it answers before it has loaded torch).
def save_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata)


def load_safetensors(payload: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(payload)


_CHUNK = 1024 * 1024


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def open_checked(path: Path, expected_sha256: str, what: str) -> BinaryIO:
    """``path`` open for reading at its start, once its bytes are found to match ``expected_sha256``."""
    handle = open(path, "rb")  # noqa: SIM115 -- handed to the caller, who closes it
    try:
        digest = hashlib.sha256()
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
        if digest.hexdigest() != expected_sha256:
            raise ChecksumMismatch(f"{what} does not match its recorded sha256")
        handle.seek(0)
    except BaseException:
        handle.close()
        raise
    return handle


def _checked(object_id: str) -> str:
    if not ID_PATTERN.match(object_id):
        raise ValueError(f"not a store id: {object_id!r}")
    return object_id


class LocalStore(Store):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"

    def folder(self, kind: Kind) -> Path:
        return self.root / kind

    def ensure(self) -> None:
        for folder in (self.tmp, *map(self.folder, KINDS)):
            folder.mkdir(parents=True, exist_ok=True)

    # -- writing --------------------------------------------------------------------------

    @contextmanager
    def temp_path(self, suffix: str = "") -> Iterator[Path]:
        """A fresh path under tmp/, removed afterwards unless it was moved away."""
        path = self.tmp / f"{new_id()}{suffix}.part"
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)

    def _publish(self, tmp: Path, final: Path) -> None:
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- datasets -------------------------------------------------------------------------

    def dataset_path(self, dataset_id: str) -> Path:
        return self.folder("datasets") / f"{_checked(dataset_id)}.npz"

    def save_dataset(self, dataset_id: str, table: Table) -> str:
        """Write the parsed table; returns the stored file's sha256."""
        with self.temp_path(".npz") as tmp:
            with open(tmp, "wb") as handle:
                file_sha256 = write_table(table, handle)
            self._publish(tmp, self.dataset_path(dataset_id))
        return file_sha256

    def share_dataset(self, source_id: str, dataset_id: str) -> bool:
        """A hard link: one file on disk under both names, kept until the last name goes."""
        with self.temp_path(".npz") as tmp:
            try:
                os.link(self.dataset_path(source_id), tmp)
            except OSError:  # gone meanwhile, or a file system without links
                return False
            self._publish(tmp, self.dataset_path(dataset_id))
        return True

    def load_dataset(self, dataset_id: str, expected_sha256: str) -> Table:
        path = self.dataset_path(dataset_id)
        open_checked(path, expected_sha256, f"the file of dataset {dataset_id}").close()
        return read_table(path)

    def delete_dataset(self, dataset_id: str) -> None:
        self.dataset_path(dataset_id).unlink(missing_ok=True)

    # -- weights --------------------------------------------------------------------------

    def weights_path(self, model_id: str) -> Path:
        return self.folder("weights") / f"{_checked(model_id)}.safetensors"

    def save_weights(
        self, model_id: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
    ) -> tuple[str, int]:
        """Write safetensors atomically; returns (sha256, size in bytes)."""
        payload = save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata)
        with self.temp_path(".safetensors") as tmp:
            tmp.write_bytes(payload)
            self._publish(tmp, self.weights_path(model_id))
        return hashlib.sha256(payload).hexdigest(), len(payload)

    def load_weights(self, model_id: str, expected_sha256: str) -> dict[str, torch.Tensor]:
        payload = self.weights_path(model_id).read_bytes()
        if hashlib.sha256(payload).hexdigest() != expected_sha256:
            raise ChecksumMismatch(f"weights of model {model_id} do not match their recorded sha256")
        return load_safetensors(payload)

    def open_weights(self, model_id: str, expected_sha256: str) -> BinaryIO:
        """The weights file, open at its start, to send as it is: read through once and
        checked against ``expected_sha256`` first, so that a damaged file is never sent
        (ChecksumMismatch). FileNotFoundError once deleted. Sending from this handle sends
        what was checked, even if the file is deleted or replaced meanwhile."""
        return open_checked(self.weights_path(model_id), expected_sha256, f"the weights file of model {model_id}")

    def delete_weights(self, model_id: str) -> None:
        self.weights_path(model_id).unlink(missing_ok=True)

    # -- health ---------------------------------------------------------------------------

    def check(self) -> None:
        """Raise if the store cannot be reached (for readiness checks)."""
        if not self.folder("weights").is_dir():
            raise FileNotFoundError(f"store folder {self.folder('weights')} is missing")

    # -- training checkpoints -------------------------------------------------------------

    def checkpoint_path(self, job_id: str) -> Path:
        return self.folder("checkpoints") / f"{_checked(job_id)}.safetensors"

    def save_checkpoint(
        self,
        job_id: str,
        tensors: dict[str, torch.Tensor],
        meta: dict[str, Any],
        *,
        publish_if: Callable[[], bool] = lambda: True,
    ) -> bool:
        """Replace the job's checkpoint atomically: tensors as safetensors, ``meta`` as JSON
        inside the file's metadata (no pickle), with a sha256 of both. ``publish_if`` is
        asked once the file is written, just before it replaces the old one; False discards
        it. Returns whether it was published."""
        cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta_json = json.dumps(meta)
        payload = save_safetensors(cpu, {_META_KEY: meta_json, _DIGEST_KEY: _checkpoint_digest(meta_json, cpu)})
        with self.temp_path(".ckpt") as tmp:
            tmp.write_bytes(payload)
            if not publish_if():
                return False
            self._publish(tmp, self.checkpoint_path(job_id))
        return True

    def load_checkpoint(self, job_id: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The job's last checkpoint, or None when it has none. ChecksumMismatch when it cannot
        be read or no longer matches its sha256: resuming from it would bake the damage into
        the model, whose weights are then recorded, and served, as sound."""
        path = self.checkpoint_path(job_id)
        try:
            with safe_open(str(path), framework="pt") as handle:
                stored = handle.metadata() or {}
                meta_json = stored[_META_KEY]
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
            meta = json.loads(meta_json)
        except FileNotFoundError:  # none (or deleted meanwhile)
            return None
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            raise ChecksumMismatch(f"the checkpoint of job {job_id} cannot be read: {exc}") from None
        # Checkpoints written before they carried a digest are taken as they are.
        if _DIGEST_KEY in stored and stored[_DIGEST_KEY] != _checkpoint_digest(meta_json, tensors):
            raise ChecksumMismatch(f"the checkpoint of job {job_id} does not match its recorded sha256")
        return tensors, meta

    def delete_checkpoint(self, job_id: str) -> None:
        self.checkpoint_path(job_id).unlink(missing_ok=True)

    # -- crash debris ---------------------------------------------------------------------

    def sweep_orphans(self, kind: Kind, *, older_than_s: float, owned: Callable[[list[str]], set[str]]) -> list[str]:
        folder = self.folder(kind)
        cutoff = time.time() - older_than_s
        aged = {path: object_id for path, object_id in named_by_id(folder.glob("*")) if _modified_before(path, cutoff)}
        kept = owned(sorted(set(aged.values()))) if aged else set()
        removed = []
        for path, object_id in aged.items():
            if object_id not in kept:
                path.unlink(missing_ok=True)
                removed.append(f"{folder.name}/{path.name}")
        return removed

    def sweep_tmp(self, *, older_than_s: float) -> list[str]:
        """Delete half-written files that a crash left in tmp/; younger ones may still be written."""
        cutoff = time.time() - older_than_s
        removed = []
        for path in self.tmp.glob("*"):
            if path.is_file() and _modified_before(path, cutoff):
                path.unlink(missing_ok=True)
                removed.append(f"tmp/{path.name}")
        return removed


_META_KEY = "trainserve_checkpoint"
_DIGEST_KEY = "trainserve_checkpoint_sha256"


def _checkpoint_digest(meta_json: str, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over a checkpoint's metadata and each tensor's name, dtype, shape and bytes."""
    import torch  # a checkpoint is written or read by a worker, which has loaded torch already

    digest = hashlib.sha256(meta_json.encode())
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"\0{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)  # as bytes: bfloat16 too
    return digest.hexdigest()


def _modified_before(path: Path, cutoff: float) -> bool:
    try:
        return path.stat().st_mtime < cutoff
    except FileNotFoundError:  # removed meanwhile
        return False
