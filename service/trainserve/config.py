"""Settings, read from ``TRAINSERVE_*`` environment variables (and an optional ``.env``)."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEVICE_PATTERN = re.compile(r"^(cpu|cuda|cuda:[0-9]+|mps)$")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRAINSERVE_", env_file=".env", extra="ignore")

    # Everything the embedded default writes lives under one folder: the working directory.
    data_dir: Path = Path(".")
    # SQLite by default; ``postgresql+psycopg://...`` for a database shared by many nodes.
    database_url: str = ""
    # SQLite file by default; ``redis://...`` or ``postgresql://...`` for a shared queue.
    queue_url: str = ""
    # Several deployments (or test runs) can share one Redis or Postgres under distinct names.
    queue_name: str = Field(default="trainserve", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_]+$")
    store_dir: Path | None = None
    # An fsspec URL (``s3://bucket/prefix``) for a model store shared by machines that do not
    # share a folder; ``store_dir`` then only holds this node's verified local copies.
    store_url: str = ""
    # For S3-compatible stores (MinIO, Ceph, R2, ...): their endpoint instead of AWS's.
    store_endpoint_url: str | None = None
    # Any other fsspec storage options, as JSON (e.g. ``{"anon": false, "key": ...}``).
    store_options: dict[str, Any] = Field(default_factory=dict)
    # Set by ``trainserve worker --device``: where specs with device "auto" train on this worker.
    worker_device: str | None = None

    api_key: str | None = None

    # Limits that keep one request or one job from taking the machine down.
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, gt=0)
    # Every body that is not a multipart upload (JSON specs, prediction requests).
    max_body_bytes: int = Field(default=32 * 1024 * 1024, gt=0)
    max_predict_rows: int = Field(default=100_000, gt=0)
    max_epochs: int = Field(default=100_000, gt=0)
    max_parameters: int = Field(default=50_000_000, gt=0)
    max_layer_width: int = Field(default=65_536, gt=0)
    max_train_memory_bytes: int = Field(default=8 * 1024**3, gt=0)
    model_cache_size: int = Field(default=32, gt=0)
    # A cached model is re-checked in the database once it is this old, so that a delete in
    # another API process stops it answering here too (a delete in this process is at once).
    model_cache_revalidate_s: float = Field(default=1.0, ge=0)

    # torch's intra-op threads in a worker process; unset, torch's default (one per core).
    # Small models train faster on one thread, and on a shared machine a step split over
    # threads waits for each of them to be scheduled (36x slower measured at load 9.5).
    train_threads: int | None = Field(default=None, ge=1)
    # torch's intra-op threads in the API process; unset, torch's default (one per core).
    # Only large requests split (small ones, and the row-wise pass, run on one thread): on
    # 2 cores a 65,536-row forward pass took 2.4 ms on two threads against 6.5 ms on one,
    # and 9 against 12.6 ms beside a worker training at its lower priority. Set 1 where
    # other programs at the API's priority keep every core busy: a split pass then waits
    # for its second thread to be scheduled (20x slower, measured on a shared machine).
    predict_threads: int | None = Field(default=None, ge=1)

    # Micro-batching of concurrent small /predict requests (see trainserve.serving.batching).
    predict_batching: bool = True
    predict_batch_wait_ms: float = Field(default=2.0, ge=0, le=1000)
    predict_batch_max_rows: int = Field(default=256, ge=2)

    # How often a running job writes progress and looks for a cancel request.
    progress_interval_s: float = Field(default=0.5, gt=0)
    worker_threads: int = Field(default=1, ge=1)
    # Scheduling priority a worker process gives itself (os.nice): a training job that
    # saturates the CPU then yields it to the API answering /predict on the same machine.
    worker_nice: int = Field(default=10, ge=0, le=19)
    # An idle worker polls the SQLite queue this often at most (Huey's own default backs
    # off to 10 s, which made an idle server take seconds to pick up a new job).
    queue_poll_max_s: float = Field(default=0.25, gt=0)

    # Crash recovery. A worker holds a lease on its running job and renews it every
    # lease/3 seconds; a job whose lease lapsed lost its worker (killed, machine gone) and
    # is re-queued by the rescuer, which every worker and every `serve` process runs, up
    # to max_attempts claims in all.
    lease_seconds: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    rescue_interval_seconds: float = Field(default=5.0, gt=0)
    # The rescuer also enqueues again a job that has been `queued` this long with no entry
    # on the queue (its worker died between taking the entry and claiming the job, or the
    # queue lost data). Younger jobs may have an entry on its way, or a claim in progress.
    lost_entry_grace_seconds: float = Field(default=60.0, gt=0)
    # A running job saves a checkpoint this often, so a re-queued job resumes near where
    # its last worker stopped instead of from epoch 0.
    checkpoint_seconds: float = Field(default=60.0, gt=0)
    # No job trains longer than this (a spec may ask for less with max_seconds).
    max_job_seconds: float = Field(default=72 * 3600.0, gt=0)
    # Files under the store's tmp/, and datasets/weights/checkpoints that no row owns
    # (local files, or objects in the object store by the time it lists), older than this
    # are debris of a crash; younger ones may be a write in progress, here or on another node.
    orphan_grace_seconds: float = Field(default=3600.0, ge=0)
    # How long `serve` waits for its workers to checkpoint and hand back their jobs on stop.
    drain_timeout_seconds: float = Field(default=30.0, gt=0)

    # The native path (trainserve.training.native, docs/native.md).
    native: bool = Field(
        default=True,
        description="Generated C for small CPU training steps and the row-wise serving pass; "
        "false: eager PyTorch everywhere, and no row-wise pass (nor micro-batching) in serving.",
    )
    native_cache_dir: Path | None = Field(
        default=None,
        description="Where compiled native code is kept (created 0700; a folder that is not the process's "
        "own, or that group or others can write, is refused). Default: $XDG_CACHE_HOME/trainserve/native "
        "or ~/.cache/trainserve/native.",
    )
    native_compiler: str | None = Field(
        default=None,
        description="The C compiler for the native path, a name on PATH or a path. "
        "Default: $CC, else cc, gcc or clang.",
    )

    @field_validator("api_key")
    @classmethod
    def _refuse_weak_key(cls, value: str | None) -> str | None:
        if value is not None and value != "" and len(value) < 16:
            raise ValueError("TRAINSERVE_API_KEY must be at least 16 characters")
        return value or None

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'trainserve.db').resolve()}"

    @property
    def resolved_queue_url(self) -> str:
        return self.queue_url or f"sqlite:///{(self.data_dir / 'trainserve-queue.db').resolve()}"

    @field_validator("worker_device")
    @classmethod
    def _known_device(cls, value: str | None) -> str | None:
        if value is not None and not DEVICE_PATTERN.match(value):
            raise ValueError("worker device must be cpu, cuda, cuda:N or mps")
        return value or None

    @property
    def resolved_store_dir(self) -> Path:
        return (self.store_dir or self.data_dir / "models_store").resolve()


@lru_cache
def get_settings() -> Settings:
    return Settings()
