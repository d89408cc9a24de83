"""The model store on an S3-compatible server (moto's, over HTTP on loopback: the one
boundary emulated here), used directly and by two API nodes that share no folder."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import s3fs
import torch
from botocore.exceptions import EndpointConnectionError

from tests.backends import S3Server, s3_server, unique_name
from tests.conftest import free_port, moons_spec, start_server, stop_server
from tests.test_stops import drain_with_a_checkpoint
from trainserve.client import ApiError, TrainserveClient
from trainserve.config import Settings
from trainserve.datasets.tables import Table
from trainserve.db import DatasetRecord, make_engine, make_session_factory
from trainserve.errors import ChecksumMismatch
from trainserve.storage.base import new_id
from trainserve.storage.factory import open_store
from trainserve.storage.local import LocalStore
from trainserve.storage.objects import ObjectStore
from trainserve.storage.sweep import sweep


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with s3_server(free_port(), tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


@pytest.fixture
def bucket(s3: S3Server) -> str:
    name = unique_name("trainserve").replace("_", "-")
    filesystem(s3).mkdir(name)
    return name


def filesystem(s3: S3Server) -> s3fs.S3FileSystem:
    """An independent client of the server, to look at (and tamper with) what was stored."""
    return s3fs.S3FileSystem(
        key=S3Server.env["AWS_ACCESS_KEY_ID"],
        secret=S3Server.env["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=s3.endpoint_url,
        skip_instance_cache=True,
    )


def object_store(s3: S3Server, bucket: str, cache: Path) -> ObjectStore:
    settings = Settings(
        store_url=f"s3://{bucket}/models",
        store_endpoint_url=s3.endpoint_url,
        store_options={"key": "testing", "secret": "testing"},
        store_dir=cache,
    )
    store = open_store(settings)
    assert isinstance(store, ObjectStore)
    store.ensure()
    return store


def test_settings_pick_a_local_folder_or_an_object_store(s3: S3Server, bucket: str, tmp_path: Path) -> None:
    assert type(open_store(Settings(store_dir=tmp_path / "a"))) is LocalStore
    local = open_store(Settings(store_url=f"file://{tmp_path / 'b'}"))
    assert type(local) is LocalStore
    assert local.root == tmp_path / "b"
    assert isinstance(object_store(s3, bucket, tmp_path / "cache"), ObjectStore)


def test_weights_and_datasets_round_trip_and_are_checked(s3: S3Server, bucket: str, tmp_path: Path) -> None:
    writer = object_store(s3, bucket, tmp_path / "node-a")
    reader = object_store(s3, bucket, tmp_path / "node-b")  # another machine: its own cache
    model_id, dataset_id = new_id(), new_id()
    tensors = {"net.0.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    sha, size = writer.save_weights(model_id, tensors, {"trainserve_model_id": model_id})
    table = Table(["x", "y"], [np.arange(5, dtype=np.float64), np.arange(5, dtype=np.int64)])
    table_sha = writer.save_dataset(dataset_id, table)

    remote = filesystem(s3)
    assert remote.size(f"{bucket}/models/weights/{model_id}.safetensors") == size
    assert remote.exists(f"{bucket}/models/datasets/{dataset_id}.npz")
    assert torch.equal(reader.load_weights(model_id, sha)["net.0.weight"], tensors["net.0.weight"])
    loaded = reader.load_dataset(dataset_id, table_sha)
    assert loaded.names == ["x", "y"]
    assert np.array_equal(loaded.columns[1], table.columns[1])
    with reader.open_weights(model_id, sha) as sent:  # a checked local copy, to send as it is
        assert sent.read() == remote.cat_file(f"{bucket}/models/weights/{model_id}.safetensors")
    download = reader.cache.weights_path(model_id)
    assert download.is_relative_to(tmp_path / "node-b")
    assert os.path.getsize(download) == size
    assert list(writer.cache.tmp.iterdir()) == []  # nothing staged is left behind

    # A damaged copy on a node is fetched again from the store, whose object counts.
    download.write_bytes(b"damaged on this node")
    with reader.open_weights(model_id, sha) as sent:
        assert hashlib.sha256(sent.read()).hexdigest() == sha
    assert os.path.getsize(download) == size
    dataset_copy = reader.cache.dataset_path(dataset_id)
    dataset_copy.write_bytes(dataset_copy.read_bytes()[:-10])
    assert reader.load_dataset(dataset_id, table_sha).names == ["x", "y"]

    # A changed object is refused, not served.
    remote.pipe_file(f"{bucket}/models/weights/{model_id}.safetensors", b"tampered")
    with pytest.raises(ChecksumMismatch):
        reader.load_weights(model_id, sha)
    node_c = object_store(s3, bucket, tmp_path / "node-c")
    with pytest.raises(ChecksumMismatch):
        node_c.open_weights(model_id, sha)
    assert not node_c.cache.weights_path(model_id).exists()  # no copy of what was refused
    assert list(node_c.cache.tmp.iterdir()) == []

    # A checkpoint is replaced as training goes on; any node resumes from the latest one.
    job_id = new_id()
    for epoch in (1, 2):
        assert writer.save_checkpoint(job_id, {"w": torch.full((2,), float(epoch))}, {"epoch": epoch})
        tensors, meta = reader.load_checkpoint(job_id) or ({}, {})
        assert meta == {"epoch": epoch}
        assert torch.equal(tensors["w"], torch.full((2,), float(epoch)))
    assert not writer.save_checkpoint(job_id, {"w": torch.zeros(2)}, {"epoch": 3}, publish_if=lambda: False)
    assert (reader.load_checkpoint(job_id) or ({}, {}))[1] == {"epoch": 2}
    # A damaged checkpoint is refused, not resumed from: a changed byte, a file cut short.
    stored = remote.cat_file(f"{bucket}/models/checkpoints/{job_id}.safetensors")
    for damaged in (stored[:-1] + bytes([stored[-1] ^ 0xFF]), stored[: len(stored) // 2]):
        remote.pipe_file(f"{bucket}/models/checkpoints/{job_id}.safetensors", damaged)
        with pytest.raises(ChecksumMismatch, match=job_id):
            reader.load_checkpoint(job_id)
    writer.delete_checkpoint(job_id)
    assert reader.load_checkpoint(job_id) is None
    assert not remote.exists(f"{bucket}/models/checkpoints/{job_id}.safetensors")

    reader.delete_weights(model_id)
    reader.delete_dataset(dataset_id)
    assert not remote.exists(f"{bucket}/models/weights/{model_id}.safetensors")
    assert not download.exists()
    with pytest.raises(FileNotFoundError):
        writer.load_weights(model_id, sha)


def test_unreachable_store_fails_its_check(tmp_path: Path) -> None:
    dead = Settings(
        store_url="s3://nowhere/models",
        store_endpoint_url=f"http://127.0.0.1:{free_port()}",
        store_options={"key": "testing", "secret": "testing", "config_kwargs": {"retries": {"max_attempts": 1}}},
        store_dir=tmp_path,
    )
    with pytest.raises(EndpointConnectionError):
        open_store(dead).check()


def test_two_api_nodes_share_models_through_s3(
    s3: S3Server, bucket: str, tmp_path: Path, moons: tuple[bytes, int]
) -> None:
    """Node A trains; node B, with no folder in common with A, serves and deletes A's model."""
    shared = {
        **S3Server.env,
        "TRAINSERVE_STORE_URL": f"s3://{bucket}/store",
        "TRAINSERVE_STORE_ENDPOINT_URL": s3.endpoint_url,
        "TRAINSERVE_DATABASE_URL": f"sqlite:///{tmp_path / 'shared.db'}",
        "TRAINSERVE_QUEUE_URL": f"sqlite:///{tmp_path / 'shared-queue.db'}",
    }
    node_a = start_server(tmp_path / "a", workers=1, env=shared)
    node_b = start_server(tmp_path / "b", workers=0, env=shared)
    try:
        with TrainserveClient(node_a.url, timeout=60) as a, TrainserveClient(node_b.url, timeout=60) as b:
            dataset = a.upload_dataset(moons[0], "moons.csv")
            job = a.wait(a.train(moons_spec(dataset.id, epochs=5)).id, timeout=120)
            assert job.status == "succeeded", job.error
            model_id = job.model_id or ""
            remote = filesystem(s3)
            assert remote.exists(f"{bucket}/store/weights/{model_id}.safetensors")
            assert not (node_b.store_dir / "weights" / f"{model_id}.safetensors").exists()

            inputs = [[0.0, 1.0], [1.0, -0.5]]
            assert b.predict(model_id, inputs).predictions == a.predict(model_id, inputs).predictions
            weights = b.download_weights(model_id)
            assert weights == remote.cat_file(f"{bucket}/store/weights/{model_id}.safetensors")
            assert b.http.get("/readyz").json()["checks"]["store"] == "ok"

            b.delete_model(model_id)
            assert not remote.exists(f"{bucket}/store/weights/{model_id}.safetensors")
            # Every node sees the row gone. (A node's /predict answers a model it has cached
            # without asking the database, so it is the model's metadata that is checked here.)
            for node in (a, b):
                with pytest.raises(ApiError) as gone:
                    node.get_model(model_id)
                assert gone.value.status_code == 404
            with pytest.raises(ApiError) as gone:
                b.predict(model_id, inputs)
            assert gone.value.status_code == 404
    finally:
        stop_server(node_b)
        stop_server(node_a)


def test_start_up_sweep_removes_old_orphan_objects_and_keeps_owned_and_young_ones(
    s3: S3Server, bucket: str, tmp_path: Path, moons: tuple[bytes, int]
) -> None:
    grace = 5.0  # the sweep below must run within it of the young uploads, on a busy machine too
    env = {
        **S3Server.env,
        "TRAINSERVE_STORE_URL": f"s3://{bucket}/store",
        "TRAINSERVE_STORE_ENDPOINT_URL": s3.endpoint_url,
        "TRAINSERVE_ORPHAN_GRACE_SECONDS": str(grace),
    }
    node = start_server(tmp_path / "node", env=env)
    try:
        with TrainserveClient(node.url, timeout=60) as ts:
            dataset = ts.upload_dataset(moons[0], "moons.csv")
            model = ts.get_model(ts.wait(ts.train(moons_spec(dataset.id, epochs=2)).id).model_id or "")
            weights = ts.download_weights(model.id)  # leaves this node a copy
            unfinished = ts.train(moons_spec(dataset.id, epochs=100_000)).id  # handed back, still queued, on stop
    finally:
        stop_server(node)

    remote, root = filesystem(s3), f"{bucket}/store"
    owned = [
        f"{root}/weights/{model.id}.safetensors",
        f"{root}/datasets/{dataset.id}.npz",
        f"{root}/checkpoints/{unfinished}.safetensors",  # a job that may still resume needs it
    ]
    remote.pipe_file(owned[-1], b"a checkpoint")
    orphan_weights = new_id()
    old_orphans = [
        f"{root}/weights/{orphan_weights}.safetensors",  # weights whose model row never committed
        f"{root}/datasets/{new_id()}.npz",  # a table whose dataset row never committed
        f"{root}/checkpoints/{new_id()}.safetensors",  # a checkpoint of no job
        f"{root}/checkpoints/{model.job_id}.safetensors",  # a checkpoint of a finished job
    ]
    not_ours = [f"{root}/weights/notes.txt", f"{root}/trainserve-store"]
    for name in old_orphans + not_ours:
        remote.pipe_file(name, b"debris")
    time.sleep(grace + 2.5)  # S3 lists whole seconds
    young_orphans = [f"{root}/weights/{new_id()}.safetensors", f"{root}/datasets/{new_id()}.npz"]
    for name in young_orphans:  # what another node may be uploading right now, its row to come
        remote.pipe_file(name, b"in progress")
    cache = node.store_dir
    stale_copy = cache / "weights" / f"{orphan_weights}.safetensors"  # this node's copy of an orphan
    stale_copy.write_bytes(b"debris")

    settings = Settings(
        data_dir=node.data_dir,
        store_url=env["TRAINSERVE_STORE_URL"],
        store_endpoint_url=s3.endpoint_url,
        store_options={"key": "testing", "secret": "testing"},
    )
    store = open_store(settings)
    sessions = make_session_factory(make_engine(settings.resolved_database_url))
    removed = sweep(sessions, store, grace_seconds=grace)  # what `serve` and `worker` do on start

    remote.invalidate_cache()
    assert sorted(removed) == sorted(f"s3://{name}" for name in old_orphans)
    assert not [name for name in old_orphans if remote.exists(name)]
    assert all(remote.exists(name) for name in owned + young_orphans + not_ours)
    assert not stale_copy.exists()
    assert (cache / "weights" / f"{model.id}.safetensors").exists()  # an owned copy stays
    with store.open_weights(model.id, model.weights_sha256) as sent:
        assert sent.read() == weights
    with sessions() as session:
        record = session.get(DatasetRecord, dataset.id)
        assert record is not None
        assert store.load_dataset(dataset.id, record.file_sha256).names == ["x0", "x1", "label"]


def test_objects_listed_without_a_time_are_never_taken_for_orphans(tmp_path: Path) -> None:
    # fsspec's in-memory filesystem lists no modification time: a store there cannot tell
    # an orphan from an upload in progress, so the sweep leaves its objects alone.
    store = ObjectStore(f"memory://{unique_name('trainserve')}/store", LocalStore(tmp_path), {})
    store.ensure()
    orphan = f"{store.remote_root}/weights/{new_id()}.safetensors"
    store.fs.pipe_file(orphan, b"debris")
    assert store.sweep_orphans("weights", older_than_s=0, owned=lambda ids: set()) == []
    assert store.fs.exists(orphan)


def test_cancelling_a_handed_back_job_deletes_its_checkpoint_from_the_object_store(
    s3: S3Server, bucket: str, tmp_path: Path, moons: tuple[bytes, int]
) -> None:
    env = {
        **S3Server.env,
        "TRAINSERVE_STORE_URL": f"s3://{bucket}/store",
        "TRAINSERVE_STORE_ENDPOINT_URL": s3.endpoint_url,
    }
    server = start_server(tmp_path / "node", env=env)
    try:
        with TrainserveClient(server.url, timeout=60) as ts:
            dataset = ts.upload_dataset(moons[0], "moons.csv")
        job = drain_with_a_checkpoint(server, dataset.id)
    finally:
        stop_server(server)
    remote = filesystem(s3)
    checkpoint = f"{bucket}/store/checkpoints/{job.id}.safetensors"
    assert remote.exists(checkpoint)

    again = start_server(tmp_path / "node", workers=0, env=env)  # no worker: the job stays queued
    try:
        with TrainserveClient(again.url, timeout=60) as ts:
            assert ts.cancel_job(job.id).status == "cancelled"
        assert not remote.exists(checkpoint)
        assert again.files("checkpoints") == []  # nor this node's copy
    finally:
        stop_server(again)
