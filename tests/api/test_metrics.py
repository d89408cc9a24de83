"""GET /metrics from a real server, read with prometheus_client's own exposition-format parser."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Server, moons_spec, start_server, stop_server
from trainserve.client import TrainserveClient

API_KEY = "metrics-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(server: Server) -> Samples:
    response = httpx.get(f"{server.url}/metrics", headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("metrics"), env={"TRAINSERVE_API_KEY": API_KEY})
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def idle_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """No worker: jobs stay queued, so the queue figures can be checked exactly."""
    running = start_server(tmp_path_factory.mktemp("metrics-idle"), workers=0)
    yield running
    stop_server(running)


def test_metrics_need_the_api_key_when_one_is_set(keyed_server: Server) -> None:
    refused = httpx.get(f"{keyed_server.url}/metrics", timeout=30)
    assert refused.status_code == 401
    assert "Authorization" in refused.json()["detail"]
    wrong = httpx.get(f"{keyed_server.url}/metrics", headers={"Authorization": "Bearer wrong-key-0123456789"})
    assert wrong.status_code == 401
    samples = scrape(keyed_server)
    assert value(samples, "trainserve_http_requests_total", method="GET", route="/metrics", status="401") == 2


def test_requests_are_counted_by_route_template_and_status(keyed_server: Server) -> None:
    before = scrape(keyed_server)
    for n in range(3):
        response = httpx.get(f"{keyed_server.url}/jobs/no-such-job-{n}", headers=AUTH)
        assert response.status_code == 404
    assert httpx.get(f"{keyed_server.url}/wp-admin/setup.php", headers=AUTH).status_code == 404
    assert httpx.delete(f"{keyed_server.url}/healthz").status_code == 405
    after = scrape(keyed_server)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    labels = {"method": "GET", "route": "/jobs/{job_id}"}
    assert delta("trainserve_http_requests_total", **labels, status="404") == 3
    assert delta("trainserve_http_request_duration_seconds_count", **labels) == 3
    assert delta("trainserve_http_request_duration_seconds_bucket", **labels, le="+Inf") == 3
    assert delta("trainserve_http_request_duration_seconds_sum", **labels) > 0
    # Buckets are cumulative: each holds at most what the next one holds.
    buckets = sorted(
        (float(dict(key[1])["le"]), count)
        for key, count in after.items()
        if key[0] == "trainserve_http_request_duration_seconds_bucket" and ("route", "/jobs/{job_id}") in key[1]
    )
    assert all(a[1] <= b[1] for a, b in itertools.pairwise(buckets))
    # A path no route knows is one label, whatever the path, so scanners cannot add series.
    assert delta("trainserve_http_requests_total", method="GET", route="<unmatched>", status="404") == 1
    assert not any("wp-admin" in str(key) or "no-such-job" in str(key) for key in after)
    assert delta("trainserve_http_requests_total", method="DELETE", route="/healthz", status="405") == 1


def test_job_figures_come_from_the_database(keyed_server: Server, moons: tuple[bytes, int]) -> None:
    csv, n_rows = moons
    with TrainserveClient(keyed_server.url, api_key=API_KEY, timeout=60) as ts:
        dataset = ts.upload_dataset(csv, "moons.csv")
        spec = moons_spec(dataset.id, epochs=6, validation_split=0.25)
        job = ts.wait(ts.train(spec).id, timeout=240)
        assert job.status == "succeeded", job.error
        assert job.model_id is not None
        model = ts.get_model(job.model_id)
        before_predict = scrape(keyed_server)
        ts.predict(model.id, [[0.0, 0.5]])
    after_predict = scrape(keyed_server)

    assert value(before_predict, "trainserve_jobs", status="succeeded") == 1
    assert value(before_predict, "trainserve_jobs", status="queued") == 0
    assert value(before_predict, "trainserve_queue_depth") == 0
    assert value(before_predict, "trainserve_models") == 1
    # Throughput is the engine's own time for the work done: rows trained on x epochs.
    training_rows = n_rows - math.floor(n_rows * 0.25)
    assert value(before_predict, "trainserve_training_throughput_jobs") == 1
    assert value(before_predict, "trainserve_training_samples_per_second") == pytest.approx(
        training_rows * job.epoch / model.train_seconds, rel=1e-9
    )
    assert value(before_predict, "trainserve_training_epochs_per_second") == pytest.approx(
        job.epoch / model.train_seconds, rel=1e-9
    )
    # The prediction loaded the model into this API process's cache.
    assert value(before_predict, "trainserve_models_loaded") == 0
    assert value(after_predict, "trainserve_models_loaded") == 1
    assert value(after_predict, "trainserve_model_cache_capacity") == 32
    assert value(after_predict, "trainserve_http_requests_total", method="POST", route="/predict", status="200") == 1
    assert value(after_predict, "trainserve_http_requests_total", method="POST", route="/train", status="202") == 1


def test_queue_depth_counts_jobs_waiting_for_a_worker(idle_server: Server, moons: tuple[bytes, int]) -> None:
    with TrainserveClient(idle_server.url, timeout=60) as ts:
        dataset = ts.upload_dataset(moons[0], "moons.csv")
        first, _second = (ts.train(moons_spec(dataset.id)) for _ in range(2))
        waiting = scrape(idle_server)
        ts.cancel_job(first.id)
    after_cancel = scrape(idle_server)

    assert value(waiting, "trainserve_jobs", status="queued") == 2
    assert value(waiting, "trainserve_queue_depth") == 2
    assert value(waiting, "trainserve_queue_oldest_age_seconds") > 0
    assert value(after_cancel, "trainserve_queue_depth") == 1
    assert value(after_cancel, "trainserve_jobs", status="cancelled") == 1
    assert value(after_cancel, "trainserve_training_throughput_jobs") == 0
    assert value(after_cancel, "trainserve_training_samples_per_second") == 0


def test_an_event_stream_is_timed_to_its_first_byte(idle_server: Server, moons: tuple[bytes, int]) -> None:
    """A stream lasts as long as its client watches: its latency is how fast it started."""
    with TrainserveClient(idle_server.url, timeout=60) as ts:
        dataset = ts.upload_dataset(moons[0], "moons.csv")
        job = ts.train(moons_spec(dataset.id))  # no worker: it stays queued, the stream stays open
    opened = time.monotonic()
    with httpx.stream("GET", f"{idle_server.url}/jobs/{job.id}/events", timeout=30) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.iter_lines()
        assert any(line.startswith("event: status") for line in lines)
        time.sleep(3)
    held = time.monotonic() - opened

    labels = {"method": "GET", "route": "/jobs/{job_id}/events"}
    deadline = time.monotonic() + 30
    samples = scrape(idle_server)
    while not value(samples, "trainserve_http_request_duration_seconds_count", **labels):
        assert time.monotonic() < deadline, "the closed stream was never counted"
        time.sleep(0.2)  # the server notices the client left at its next poll
        samples = scrape(idle_server)
    assert value(samples, "trainserve_http_requests_total", **labels, status="200") == 1
    assert value(samples, "trainserve_http_request_duration_seconds_sum", **labels) < held / 2
