"""Property-based fuzzing of the whole API from its own OpenAPI schema (schemathesis),
against a real server: no 5xx, and every response conforms to the schema (status code,
content type, headers, body), for data that fits the schema and for data that does not
(which must then be refused with a 4xx).

Bounded and reproducible: a fixed number of examples per operation and mode, drawn under a
seed that differs from run to run (so that runs together explore more than one run could),
is printed, and is named in a failure; TRAINSERVE_FUZZ_SEED=N replays a run.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from schemathesis import GenerationMode
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import Server, moons_spec, start_server, stop_server
from trainserve.client import TrainserveClient

EXAMPLES = 15  # per operation and generation mode
SEED = int(os.environ.get("TRAINSERVE_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
CHECKS = [
    schemathesis.checks.not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def fuzzed(
    tmp_path_factory: pytest.TempPathFactory, moons: tuple[bytes, int]
) -> Iterator[tuple[Server, dict[str, str]]]:
    # Small limits keep generated bodies small; a low epoch limit keeps any spec the fuzzer
    # manages to make valid from training for long.
    env = {
        "TRAINSERVE_MAX_UPLOAD_BYTES": str(64 * 1024),
        "TRAINSERVE_MAX_BODY_BYTES": str(64 * 1024),
        "TRAINSERVE_MAX_EPOCHS": "5",
    }
    running = start_server(tmp_path_factory.mktemp("fuzz"), env=env)
    try:
        with TrainserveClient(running.url, timeout=60) as ts:
            dataset = ts.upload_dataset(moons[0], "moons.csv")
            job = ts.wait(ts.train(moons_spec(dataset.id, epochs=2)).id)
            assert job.status == "succeeded", job.error
        yield running, {"dataset_id": dataset.id, "job_id": job.id, "model_id": job.model_id or ""}
    finally:
        stop_server(running)


def _fuzz(operation: Any, base_url: str, mode: GenerationMode, path_parameters: dict[str, str] | None) -> int:
    # schemathesis' own pytest plugin (from_fixture) fails on pytest 9, so each operation
    # gets a plain hypothesis test here, run on the spot. Returns the number of calls.
    calls = 0

    @seed(SEED)
    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        nonlocal calls
        calls += 1
        case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=30)

    run()
    return calls


def test_api_conforms_to_its_schema_and_never_fails_with_5xx(fuzzed: tuple[Server, dict[str, str]]) -> None:
    server, ids = fuzzed
    print(f"fuzzing with TRAINSERVE_FUZZ_SEED={SEED}", file=sys.stderr)
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    # Deletions last, so the real ids stay valid for the reads before them.
    loaded = list(schema.get_all_operations())
    assert all(isinstance(result, Ok) for result in loaded), loaded  # the schema must load whole
    operations = sorted(
        (result.ok() for result in loaded if isinstance(result, Ok)), key=lambda op: op.method == "delete"
    )
    assert len(operations) >= 12
    failures, calls = [], 0
    for operation in operations:
        names = {p.name for p in operation.path_parameters}
        real = {name: ids[name] for name in names if name in ids}
        runs: list[tuple[GenerationMode, dict[str, str] | None]] = [(GenerationMode.POSITIVE, None)]
        if len(operation.query) or len(operation.body):  # a free-form string id has no invalid value
            runs.append((GenerationMode.NEGATIVE, None))
        if real and operation.method != "delete":
            runs.append((GenerationMode.POSITIVE, real))  # ids that exist: 200 bodies get checked too
        for mode, path_parameters in runs:
            try:
                calls += _fuzz(operation, server.url, mode, path_parameters)
            except Exception as exc:
                failures.append(f"{operation.label} ({mode.value}, real ids: {bool(path_parameters)}): {exc}")
    assert not failures, f"reproduce with TRAINSERVE_FUZZ_SEED={SEED}:\n\n" + "\n\n".join(failures)
    print(f"{calls} calls over {len(operations)} operations")
    assert calls > 15 * len(operations)
