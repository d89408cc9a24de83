"""The /ui dashboard on an aged server (1,000 jobs, 200 models), in the real headless
Chromium: it fetches one page of each list and draws no plot it does not show, so it
loads as a new server's does (issue #16, target 5). Structural, never timed."""

from __future__ import annotations

from playwright.sync_api import Page, Request

from bench.pages import age
from tests.api.test_dashboard import (  # noqa: F401 - fixtures used by name
    API_KEY,
    browser,
    enter_key,
    page,
    playwright,
    ui_server,
)
from tests.conftest import Server, moons_spec
from trainserve.client import TrainserveClient

JOBS, MODELS = 1_000, 200
JOB_PAGE, MODEL_PAGE = 50, 12  # static/ui/paging.js


def test_an_aged_server_s_dashboard_loads_one_page_of_each_list(
    page: Page,  # noqa: F811
    ui_server: Server,  # noqa: F811
    moons: tuple[bytes, int],
) -> None:
    with TrainserveClient(ui_server.url, api_key=API_KEY, timeout=60) as ts:
        dataset = ts.upload_dataset(moons[0], "moons.csv")
        job = ts.wait(ts.train(moons_spec(dataset.id, epochs=2)).id)
        assert job.model_id is not None
        # The worker set the job's threads and said so in its notes (the test servers set
        # TRAINSERVE_TRAIN_THREADS=1; the policy itself: tests/training/test_threads.py).
        assert "intra-op threads: 1 (set by TRAINSERVE_TRAIN_THREADS)" in job.notes
        # Copies of the job and model, older than them, straight into the database (with
        # the weights): 1,000 trained jobs would take an hour on this machine.
        age(ui_server.data_dir, job.id, job.model_id, JOBS, MODELS)
        assert len(ts.list_jobs(limit=1000)) == JOBS
        assert len(ts.list_models(limit=1000)) == MODELS

    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    enter_key(page)
    page.wait_for_function(f"document.querySelectorAll('tr[data-job-id]').length === {JOB_PAGE}")
    page.wait_for_function(f"document.querySelectorAll('.model[data-model-id]').length === {MODEL_PAGE}")
    page.wait_for_selector("img[data-testid=model-plot]")  # the one real model's plot
    lists = {url.split("?")[1] for url in requests if "/jobs?" in url or "/models?" in url}
    assert lists == {f"limit={JOB_PAGE}&offset=0", f"limit={MODEL_PAGE}&offset=0"}
    plots = {url for url in requests if url.endswith("/plot.png")}
    assert len(plots) == MODEL_PAGE  # one per card shown, none for the other 188
    assert page.is_disabled("[data-testid=models-newer]")

    # The next page of models: the following twelve, and their plots only.
    with page.expect_request(lambda r: _is_models_page(r, MODEL_PAGE)):
        page.click("[data-testid=models-older]")
    page.wait_for_selector("[data-testid=models-pager] span:text('13–24')")
    assert not page.is_disabled("[data-testid=models-newer]")
    assert len({url for url in requests if url.endswith("/plot.png")}) <= 2 * MODEL_PAGE


def _is_models_page(request: Request, offset: int) -> bool:
    return request.url.endswith(f"/models?limit={MODEL_PAGE}&offset={offset}")
