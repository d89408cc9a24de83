"""trainserve: train PyTorch models described in JSON, serve their predictions over HTTP.

``from trainserve import TrainserveClient`` is the Python client; the server's rooms
(``api``, ``jobs``, ``training``, ``serving``, ``storage``, ``datasets``) are imported by
the processes that run them. The client is imported on first use, so that a worker or a
script importing ``trainserve.training`` does not pay for httpx.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from trainserve.client import ApiError, AsyncTrainserveClient, TrainserveClient

__all__ = ["ApiError", "AsyncTrainserveClient", "TrainserveClient", "__version__"]


def __getattr__(name: str) -> Any:
    if name in {"ApiError", "AsyncTrainserveClient", "TrainserveClient"}:
        from trainserve import client

        return getattr(client, name)
    raise AttributeError(f"module 'trainserve' has no attribute {name!r}")
