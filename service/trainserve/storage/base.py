"""The model store's interface: uploaded tables, trained weights and training checkpoints,
each named by a server-generated id and checked by sha256 whenever it is read.

Two implementations: ``LocalStore`` (a folder, the embedded default, or a shared mount)
and ``ObjectStore`` (S3 or any fsspec URL, with a ``LocalStore`` as this node's cache);
``factory.open_store`` picks one from the settings. Callers see only this interface.
"""

from __future__ import annotations

import abc
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, TypeVar

from trainserve.datasets.tables import Table

if TYPE_CHECKING:  # the API process opens its store before it has loaded torch
    import torch

ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
# The store's three kinds of object, each in a folder (or under a prefix) of its own.
Kind = Literal["datasets", "weights", "checkpoints"]
KINDS: tuple[Kind, ...] = ("datasets", "weights", "checkpoints")
_Named = TypeVar("_Named", Path, str)


def new_id() -> str:
    return uuid.uuid4().hex


def named_by_id(paths: Iterable[_Named]) -> Iterator[tuple[_Named, str]]:
    """The paths (local, or remote as strings) whose file name is a store id, and that id."""
    for path in paths:
        object_id = str(path).rsplit("/", 1)[-1].split(".", 1)[0]
        if ID_PATTERN.match(object_id):
            yield path, object_id


class Store(abc.ABC):
    """Where datasets, weights and checkpoints live. Every write is atomic (a reader sees a
    whole file or none), every read of a dataset or weights checks the sha256 recorded when
    it was written (``ChecksumMismatch``), and ids are checked against ``ID_PATTERN``."""

    @abc.abstractmethod
    def ensure(self) -> None:
        """Create what the store needs (folders, a marker); idempotent."""

    @abc.abstractmethod
    def check(self) -> None:
        """Raise if the store cannot be reached (for readiness checks)."""

    @abc.abstractmethod
    def temp_path(self, suffix: str = "") -> AbstractContextManager[Path]:
        """A fresh local path for a file being received, removed afterwards."""

    # -- datasets
    @abc.abstractmethod
    def save_dataset(self, dataset_id: str, table: Table) -> str:
        """Write the parsed table; returns the stored file's sha256."""

    def share_dataset(self, source_id: str, dataset_id: str) -> bool:
        """Make ``dataset_id`` name the stored table of ``source_id`` with no second copy
        (the same upload read the same way); False where this store cannot, and the caller
        saves its own. Deleting either name must leave the other's table readable."""
        return False

    @abc.abstractmethod
    def load_dataset(self, dataset_id: str, expected_sha256: str) -> Table: ...

    @abc.abstractmethod
    def delete_dataset(self, dataset_id: str) -> None: ...

    # -- weights
    @abc.abstractmethod
    def save_weights(
        self, model_id: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
    ) -> tuple[str, int]:
        """Write the tensors as safetensors; returns (sha256, size in bytes)."""

    @abc.abstractmethod
    def load_weights(self, model_id: str, expected_sha256: str) -> dict[str, torch.Tensor]: ...

    @abc.abstractmethod
    def open_weights(self, model_id: str, expected_sha256: str) -> BinaryIO:
        """The weights file open at its start, checked against ``expected_sha256`` first,
        so that a damaged file is never sent. FileNotFoundError once deleted."""

    @abc.abstractmethod
    def delete_weights(self, model_id: str) -> None: ...

    # -- training checkpoints
    @abc.abstractmethod
    def save_checkpoint(
        self,
        job_id: str,
        tensors: dict[str, torch.Tensor],
        meta: dict[str, Any],
        *,
        publish_if: Callable[[], bool] = lambda: True,
    ) -> bool:
        """Replace the job's checkpoint. ``publish_if`` is asked once the new one is written,
        just before it replaces the old one; False discards it. Returns whether it was published."""

    @abc.abstractmethod
    def load_checkpoint(self, job_id: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The job's last checkpoint, or None when it has none; ``ChecksumMismatch`` when damaged."""

    @abc.abstractmethod
    def delete_checkpoint(self, job_id: str) -> None: ...

    # -- crash debris (see ``storage.sweep``)
    @abc.abstractmethod
    def sweep_tmp(self, *, older_than_s: float) -> list[str]:
        """Delete half-written files a crash left behind; returns their names."""

    @abc.abstractmethod
    def sweep_orphans(self, kind: Kind, *, older_than_s: float, owned: Callable[[list[str]], set[str]]) -> list[str]:
        """Delete the objects of ``kind`` unmodified for ``older_than_s`` whose id ``owned``
        does not return; returns their names. ``owned`` is asked about the aged ids only,
        after they are listed, so an object whose row commits meanwhile is kept."""
