"""trainserve: train PyTorch models described in JSON, serve their predictions over HTTP."""

__version__ = "0.1.0"
