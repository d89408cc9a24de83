"""The typed HTTP client (sync and async) and the CLI's verbs that drive a server."""

from trainserve.client.http import ApiError, AsyncTrainserveClient, TrainserveClient

__all__ = ["ApiError", "AsyncTrainserveClient", "TrainserveClient"]
