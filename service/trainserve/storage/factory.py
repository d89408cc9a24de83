"""The store the settings name: a folder by default, or an object store (the [s3] extra)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from trainserve.config import Settings
from trainserve.storage.base import Store
from trainserve.storage.local import LocalStore


def open_store(settings: Settings) -> Store:
    """A local (or shared, mounted) folder by default, or an fsspec URL (``s3://bucket/prefix``)
    with ``store_dir`` holding this node's copies."""
    scheme = urlparse(settings.store_url).scheme
    if scheme in ("", "file"):
        local = urlparse(settings.store_url).path if settings.store_url else None
        return LocalStore(Path(local).resolve() if local else settings.resolved_store_dir)
    from trainserve.storage.objects import ObjectStore  # fsspec is the [s3] extra: imported only when asked for

    options = dict(settings.store_options)
    if settings.store_endpoint_url:
        options["endpoint_url"] = settings.store_endpoint_url
    return ObjectStore(settings.store_url, LocalStore(settings.resolved_store_dir), options)
