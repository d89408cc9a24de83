"""Settings, read from ``TRAINSERVE_*`` environment variables (and an optional ``.env``)."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEVICE_PATTERN = re.compile(r"^(cpu|cuda|cuda:[0-9]+|mps)$")
# The name TRAINSERVE_API_KEY goes by in the alias history, beside TRAINSERVE_API_KEYS's.
DEFAULT_KEY_NAME = "default"
MIN_KEY_LENGTH = 16
KEY_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
# The settings whose values no error message repeats (startup.describe_settings_error).
SECRET_SETTINGS = frozenset({"api_key", "api_keys"})


def parse_api_keys(text: str) -> dict[str, str]:
    """``name:key`` pairs, separated by commas or whitespace, as {name: key}; a ValueError that
    names the bad pair by its position only: a pair written backwards (key:name) would
    otherwise put the key into a start-up error, and so into logs."""
    keys: dict[str, str] = {}
    positions: dict[str, int] = {}
    for position, pair in enumerate(re.split(r"[,\s]+", text.strip()), start=1):
        name, colon, key = pair.partition(":")
        where = f"TRAINSERVE_API_KEYS pair {position}"
        if not colon:
            raise ValueError(f"{where} is not name:key")
        if not KEY_NAME_PATTERN.fullmatch(name):
            raise ValueError(f"{where}: a key's name is 1-64 letters, digits, '_', '.', '@' or '-'")
        if name in keys:
            raise ValueError(f"{where}: its name is pair {positions[name]}'s too; each key needs a name of its own")
        if len(key) < MIN_KEY_LENGTH:
            raise ValueError(f"{where}: the key (after the name and ':') must be at least {MIN_KEY_LENGTH} characters")
        keys[name] = key
        positions[name] = position
    return keys


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRAINSERVE_", env_file=".env", extra="ignore")

    # Everything the embedded default writes lives under one folder: the working directory.
    data_dir: Path = Field(
        default=Path("."),
        description="Folder where the default SQLite database, the SQLite queue and `models_store/` live; relative to"
        " the directory the process starts in.",
    )
    # SQLite by default; ``postgresql+psycopg://...`` for a database shared by many nodes.
    database_url: str = Field(
        default="",
        description="SQLAlchemy URL of the database of jobs, datasets and models. Empty: "
        "`sqlite:///<data_dir>/trainserve.db`. For a database shared by several nodes: "
        "`postgresql+psycopg://user:password@host:5432/trainserve` (needs the `[postgres]` extra).",
    )
    # SQLite file by default; ``redis://...`` or ``postgresql://...`` for a shared queue.
    queue_url: str = Field(
        default="",
        description="URL of the job queue. Empty: Huey's `SqliteHuey` on `<data_dir>/trainserve-queue.db`. Shared: "
        "`redis://host:6379/0` (Huey's `RedisHuey`, `[redis]` extra) or "
        "`postgresql://user:password@host/db` (Huey's `PostgresHuey`, tables `huey_*` in that database).",
    )
    # Several deployments (or test runs) can share one Redis or Postgres under distinct names.
    queue_name: str = Field(
        default="trainserve",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_]+$",
        description="Name of the queue, so that several deployments (or test runs) can share one Redis or PostgreSQL.",
    )
    store_dir: Path | None = Field(
        default=None,
        description="The model store as a folder (datasets, weights, checkpoints). Unset: `<data_dir>/models_store`. "
        "On several machines, the same network mount on each; with `store_url` set, this node's verified "
        "local copies.",
    )
    # An fsspec URL (``s3://bucket/prefix``) for a model store shared by machines that do not
    # share a folder; ``store_dir`` then only holds this node's verified local copies.
    store_url: str = Field(
        default="",
        description="An fsspec URL for an object store shared by machines that do not share a folder, e.g. "
        "`s3://bucket/prefix` (needs the `[s3]` extra). Empty: the folder `store_dir` is the store.",
    )
    # For S3-compatible stores (MinIO, Ceph, R2, ...): their endpoint instead of AWS's.
    store_endpoint_url: str | None = Field(
        default=None,
        description="An S3-compatible server (MinIO, Ceph, R2, ...) instead of AWS; credentials come from the usual "
        "`AWS_*` variables or `~/.aws`.",
    )
    # Any other fsspec storage options, as JSON (e.g. ``{"anon": false, "key": ...}``).
    store_options: dict[str, Any] = Field(
        default_factory=dict,
        description='Any other fsspec storage options for `store_url`, as JSON, e.g. `{"anon": false}`.',
    )
    # Set by ``trainserve worker --device``: where specs with device "auto" train on this worker.
    worker_device: str | None = Field(
        default=None,
        description='Where specs with `"device": "auto"` train on this worker: `cpu`, `cuda`, `cuda:N` or `mps`; what'
        " `trainserve worker --device` sets. Unset: CUDA when present, else the CPU.",
    )

    # Secrets are SecretStr so that no repr, log line or error message shows them.
    api_key: SecretStr | None = Field(
        default=None,
        description="When set (16 characters at least), every endpoint but `/healthz`, `/readyz`, the docs and the "
        "`/ui` page needs `Authorization: Bearer <key>`. The client and the CLI send `TRAINSERVE_API_KEY`"
        f" too. It is the key named `{DEFAULT_KEY_NAME}` (see `api_keys`). Unset, with `api_keys` unset too: no key,"
        " and alias moves record no one (`who` null).",
    )
    api_keys: SecretStr | None = Field(
        default=None,
        description="Named API keys, so that the alias history says who moved what: `name:key` pairs separated by "
        "commas or whitespace, e.g. `alice:<key>,deploy-bot:<key>`. A name is 1-64 letters, digits, `_`, `.`, `@` "
        "or `-`; a key 16 characters at least without commas or spaces (`openssl rand -hex 24`); names and keys "
        "unique. Any of them (and `api_key`) opens the API; the name of the one a request used is recorded as "
        "`who` in the alias history.",
    )

    # Limits that keep one request or one job from taking the machine down.
    max_upload_bytes: int = Field(
        default=512 * 1024 * 1024,
        gt=0,
        description="Largest uploaded file (multipart `POST /datasets`, `POST /train`, CSV predictions), in bytes; "
        "bigger ones get 413 before they are stored.",
    )
    # Every body that is not a multipart upload (JSON specs, prediction requests).
    max_body_bytes: int = Field(
        default=32 * 1024 * 1024,
        gt=0,
        description="Largest body of any other request (JSON specs, prediction requests), in bytes.",
    )
    max_predict_rows: int = Field(
        default=100_000, gt=0, description="Most rows one prediction request may hold; more get 413."
    )
    max_epochs: int = Field(default=100_000, gt=0, description="Most epochs a spec may ask for.")
    max_parameters: int = Field(
        default=50_000_000, gt=0, description="Most parameters (weights and biases) a spec's model may have."
    )
    max_layer_width: int = Field(
        default=65_536, gt=0, description="Widest layer (`out_features`, normalised shapes) a spec may ask for."
    )
    max_train_memory_bytes: int = Field(
        default=8 * 1024**3,
        gt=0,
        description="Largest estimated memory of one training job (data, weights, optimizer state, activations), in "
        "bytes; specs over it are refused at submit.",
    )
    model_cache_size: int = Field(
        default=32,
        gt=0,
        description="How many loaded models each API process keeps in memory for predictions (least recently used "
        "first out).",
    )
    # A cached model is re-checked in the database once it is this old, so that a delete in
    # another API process stops it answering here too (a delete in this process is at once).
    model_cache_revalidate_s: float = Field(
        default=1.0,
        ge=0,
        description="Seconds after which a cached model is re-checked in the database, so that a model deleted "
        "through another API process stops answering here too.",
    )

    # torch's intra-op threads in a worker process; unset, torch's default (one per core).
    # Small models train faster on one thread, and on a shared machine a step split over
    # threads waits for each of them to be scheduled (36x slower measured at load 9.5).
    train_threads: int | None = Field(
        default=None,
        ge=1,
        description="torch's intra-op threads in a worker process. Unset: torch's default (one per core); `1` is "
        "fastest for small models and on shared machines.",
    )
    # torch's intra-op threads in the API process; unset, torch's default (one per core).
    # Only large requests split (small ones, and the row-wise pass, run on one thread): on
    # 2 cores a 65,536-row forward pass took 2.4 ms on two threads against 6.5 ms on one,
    # and 9 against 12.6 ms beside a worker training at its lower priority. Set 1 where
    # other programs at the API's priority keep every core busy: a split pass then waits
    # for its second thread to be scheduled (20x slower, measured on a shared machine).
    predict_threads: int | None = Field(
        default=None,
        ge=1,
        description="torch's intra-op threads in the API process. Unset: torch's default (one per core); only large "
        "requests split over them. Set `1` where other programs keep every core busy.",
    )

    # Micro-batching of concurrent small /predict requests (see trainserve.serving.batching).
    predict_batching: bool = Field(
        default=True,
        description="Micro-batch concurrent small `/predict` requests for the same model into one row-wise pass "
        "(answers are unchanged, to the last bit); `false` turns it off.",
    )
    predict_batch_wait_ms: float = Field(
        default=2.0,
        ge=0,
        le=1000,
        description="Longest a `/predict` request waits for others already part-way through the route to share its "
        "pass, in milliseconds (never when it is alone).",
    )
    predict_batch_max_rows: int = Field(default=256, ge=2, description="A micro-batch closes at this many rows.")

    # The prediction log (trainserve.serving.predlog): a sampled share of /predict requests
    # recorded with their answers, off the request's path, for inspection and drift.
    prediction_log_sample: float = Field(
        default=0.01,
        ge=0,
        le=1,
        description="Share of /predict requests recorded with their answers (0 turns the log off)",
    )
    prediction_log_buffer: int = Field(
        default=10_000,
        gt=0,
        description="Entries waiting to be written; when full, new ones are dropped and counted, never waited for",
    )
    prediction_log_max_rows: int = Field(
        default=100_000, gt=0, description="Logged requests kept per model; older ones are deleted"
    )
    prediction_log_max_age_s: float = Field(
        default=7 * 86400.0, gt=0, description="Logged requests older than this many seconds are deleted"
    )
    prediction_log_prune_interval_s: float = Field(
        default=60.0, gt=0, description="How often the log's writer enforces the two limits above"
    )

    drift_threshold: float = Field(
        default=0.2,
        gt=0,
        description="Population stability index above which a feature is marked drifted (0.2: a shift worth a look)",
    )
    drift_window: int = Field(
        default=5_000, gt=0, description="Drift compares the newest this many logged input rows with the training split"
    )
    drift_metrics_max_models: int = Field(
        default=20, gt=0, description="/metrics reports drift for at most this many model names (bounded labels)"
    )

    # How often a running job writes progress and looks for a cancel request.
    progress_interval_s: float = Field(
        default=0.5,
        gt=0,
        description="How often a running job writes its progress and looks for a cancel request, in seconds.",
    )
    worker_threads: int = Field(
        default=1,
        ge=1,
        description="Huey worker threads in each worker process (jobs one worker process runs at once).",
    )
    # Scheduling priority a worker process gives itself (os.nice): a training job that
    # saturates the CPU then yields it to the API answering /predict on the same machine.
    # 5, from measurement on 2 shared cores at load 14 (docs/performance-16.md): a
    # 1-thread epoch took 5.9 s at nice 0, 7.9 s at 5 and 65 s at 10 (10 starves it beside
    # other users' programs), while a foreground process's p99 latency was 4.1 ms beside
    # nice 0 and 0.3 ms beside both 5 and 10.
    worker_nice: int = Field(
        default=5,
        ge=0,
        le=19,
        description="The niceness a worker process gives itself (os.nice), so that training yields the CPU to the API"
        " on the same machine.",
    )
    # An idle worker polls the SQLite queue this often at most (Huey's own default backs
    # off to 10 s, which made an idle server take seconds to pick up a new job). 0.1 s:
    # at 0.25 s the wait for the next look was about a sixth of a medium job's end-to-end
    # overhead, and polling more often did not measurably raise an idle worker's CPU use
    # (docs/performance-16.md). Redis and PostgreSQL queues wake the worker at once.
    queue_poll_max_s: float = Field(
        default=0.1, gt=0, description="Longest pause between an idle worker's looks at the queue, in seconds."
    )

    # Crash recovery. A worker holds a lease on its running job and renews it every
    # lease/3 seconds; a job whose lease lapsed lost its worker (killed, machine gone) and
    # is re-queued by the rescuer, which every worker and every `serve` process runs, up
    # to max_attempts claims in all.
    lease_seconds: float = Field(
        default=30.0,
        gt=0,
        description="A running job goes back to the queue this long after its worker's last lease renewal (the worker"
        " renews every third of it), in seconds.",
    )
    max_attempts: int = Field(
        default=3, ge=1, description="Claims a job may use before it is failed (a drain on shutdown costs none)."
    )
    rescue_interval_seconds: float = Field(
        default=5.0,
        gt=0,
        description="How often each API process and worker looks for expired leases and lost queue entries, in "
        "seconds.",
    )
    # The rescuer also enqueues again a job that has been `queued` this long with no entry
    # on the queue (its worker died between taking the entry and claiming the job, or the
    # queue lost data). Younger jobs may have an entry on its way, or a claim in progress.
    lost_entry_grace_seconds: float = Field(
        default=60.0,
        gt=0,
        description="A job `queued` this long with no entry on the queue (its worker died taking it, or the queue "
        "lost data) is enqueued again by the rescuer, in seconds.",
    )
    # A running job saves a checkpoint this often, so a re-queued job resumes near where
    # its last worker stopped instead of from epoch 0.
    checkpoint_seconds: float = Field(
        default=60.0, gt=0, description="How often a running job saves a checkpoint to the store, in seconds."
    )
    # No job trains longer than this (a spec may ask for less with max_seconds).
    max_job_seconds: float = Field(
        default=72 * 3600.0,
        gt=0,
        description="The most training time a job may use, across resumed attempts, in seconds (default 72 h); a "
        "spec's `max_seconds` may ask for less.",
    )
    # Files under the store's tmp/, and datasets/weights/checkpoints that no row owns
    # (local files, or objects in the object store by the time it lists), older than this
    # are debris of a crash; younger ones may be a write in progress, here or on another node.
    orphan_grace_seconds: float = Field(
        default=3600.0,
        ge=0,
        description="Files in the store older than this that no row owns are crash debris, swept at start; younger "
        "ones may be a write in progress, in seconds.",
    )
    # How long `serve` waits for its workers to checkpoint and hand back their jobs on stop.
    drain_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="How long `serve` waits on stop for its workers to checkpoint and hand back their jobs before "
        "killing them, in seconds.",
    )

    # Uploads (datasets/tables.py keeps the same default as DEFAULT_NA_VALUES for direct callers).
    na_values: list[str] = Field(
        default=["", "NA", "N/A", "NaN", "null", "None", "-"],
        description="Cells read as missing in uploaded CSV files (after trimming spaces), unless the upload's "
        "'na_values' form field names others. The empty cell is always missing. "
        'As an environment variable, a JSON list: TRAINSERVE_NA_VALUES=\'["", "NA", "?"]\'.',
    )
    category_limit: int = Field(
        default=1000,
        gt=1,
        description="A text column with more distinct values than this is flagged 'very high cardinality' "
        "in the dataset's profile, and refused as a category feature by POST /train.",
    )

    # Sweeps (trainserve.sweeps): what one POST /sweeps may ask for.
    max_sweep_trials: int = Field(
        default=1000, ge=1, description="The most trials one sweep may ask for (its `trials`)."
    )
    max_sweep_parallel: int = Field(
        default=16, ge=1, description="The most trials of one sweep queued or running at once (its `parallel`)."
    )

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
    native_choice: Literal["measure", "native", "eager"] = Field(
        default="measure",
        description="How a training job that the native loop can run picks its loop. measure: the faster on "
        "this machine, timed once per shape and kept beside the compiled code (docs/native.md); native: "
        "the native loop wherever it can run; eager: eager PyTorch always (the row-wise serving pass stays).",
    )
    native_compiler: str | None = Field(
        default=None,
        description="The C compiler for the native path, a name on PATH or a path. "
        "Default: $CC, else cc, gcc or clang.",
    )

    @field_validator("api_key")
    @classmethod
    def _refuse_weak_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        if len(value.get_secret_value()) < MIN_KEY_LENGTH:
            raise ValueError(f"TRAINSERVE_API_KEY must be at least {MIN_KEY_LENGTH} characters")
        return value

    @field_validator("api_keys")
    @classmethod
    def _named_keys_parse(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        parse_api_keys(value.get_secret_value())
        return value

    @model_validator(mode="after")
    def _keys_distinct(self) -> Settings:
        self.keys_by_name()
        return self

    def keys_by_name(self) -> dict[str, str]:
        """Every API key by its name: ``api_keys``, and ``api_key`` as ``default``. Empty: no key."""
        named = parse_api_keys(self.api_keys.get_secret_value()) if self.api_keys else {}
        if self.api_key is not None:
            if DEFAULT_KEY_NAME in named:
                raise ValueError(
                    f"TRAINSERVE_API_KEYS names a key {DEFAULT_KEY_NAME!r}, the name TRAINSERVE_API_KEY has: "
                    "rename one, or move TRAINSERVE_API_KEY into TRAINSERVE_API_KEYS"
                )
            named = {DEFAULT_KEY_NAME: self.api_key.get_secret_value(), **named}
        if len(set(named.values())) < len(named):
            raise ValueError("two API keys are the same: each name needs its own key (TRAINSERVE_API_KEY(S))")
        return named

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
