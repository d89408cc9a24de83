"""Domain errors, each carrying the HTTP status it maps to.

    TrainserveError (500)
    ├── NotFound (404)             a dataset, job or model id that does not exist
    ├── InvalidInput (422)         a spec, upload or prediction request that cannot be used
    ├── Conflict (409)             a request that clashes with the resource's state
    ├── PayloadTooLarge (413)      an upload or prediction batch over the configured limit
    ├── UnsupportedMediaType (415) a body in a Content-Type the endpoint does not take
    ├── Unauthorized (401)         a missing or wrong API key
    ├── ChecksumMismatch (500)     a stored file no longer matches the sha256 recorded for it
    ├── NativeUnavailable (500)    the generated-C path cannot run here; callers fall back to torch
    └── TrainingFailed (500)       a job's training cannot go on: the job fails with this message
        ├── TrainingDiverged       the loss or the metrics stopped being finite
        ├── DeviceUnavailable      the spec's device is not on this worker
        └── CheckpointMismatch     a checkpoint taken for another spec or dataset shape

The API renders every one of them, in one place, as ``{"type", "detail", "errors"}``;
nothing below the API knows about HTTP beyond the status number carried here. Stopping a
training run on purpose (cancel, preemption) is not an error: ``training.loop`` signals it
with its own ``TrainingCancelled`` and ``TrainingPreempted``.
"""

from __future__ import annotations

from typing import Any


class TrainserveError(Exception):
    status_code = 500
    error_type = "internal_error"

    def __init__(self, detail: str, *, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or []


class NotFound(TrainserveError):
    status_code = 404
    error_type = "not_found"


class InvalidInput(TrainserveError):
    status_code = 422
    error_type = "invalid_input"


class Conflict(TrainserveError):
    status_code = 409
    error_type = "conflict"


class PayloadTooLarge(TrainserveError):
    status_code = 413
    error_type = "payload_too_large"


class UnsupportedMediaType(TrainserveError):
    status_code = 415
    error_type = "unsupported_media_type"


class Unauthorized(TrainserveError):
    status_code = 401
    error_type = "unauthorized"


class ChecksumMismatch(TrainserveError):
    error_type = "integrity_error"


class NativeUnavailable(TrainserveError):
    error_type = "native_unavailable"


class TrainingFailed(TrainserveError):
    error_type = "training_failed"


class TrainingDiverged(TrainingFailed):
    error_type = "training_diverged"


class DeviceUnavailable(TrainingFailed):
    error_type = "device_unavailable"


class CheckpointMismatch(TrainingFailed):
    error_type = "checkpoint_mismatch"
