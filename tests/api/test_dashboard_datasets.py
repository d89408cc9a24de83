"""The dashboard's Datasets card in a real headless Chromium: a real table's profile."""

from __future__ import annotations

from playwright.sync_api import Page

from tests.api.test_dashboard import (  # noqa: F401 (fixtures)
    API_KEY,
    browser,
    enter_key,
    page,
    playwright,
    ui_server,
)
from tests.conftest import Server
from trainserve.client import TrainserveClient


def test_dashboard_shows_each_columns_profile_and_warnings(page: Page, ui_server: Server) -> None:  # noqa: F811 (fixtures)
    rows = "".join(f"{i};{i % 5},5;{'' if i % 4 == 0 else 'Dream'};id{i}\n" for i in range(24))
    with TrainserveClient(ui_server.url, api_key=API_KEY, timeout=60) as ts:
        dataset = ts.upload_dataset(("n;length;island;tag\n" + rows).encode(), "<b>pen&guins.csv")
    enter_key(page)
    page.wait_for_selector(f'#dataset-profile[data-dataset-id="{dataset.id}"]')
    assert page.locator("#dataset-select option").count() >= 1
    assert "<b>pen&guins.csv · 24 rows · 4 columns" in page.inner_text("#dataset-caption")  # text, not HTML
    length = page.locator('#profile-rows tr[data-column="length"]').inner_text()
    assert "number" in length
    assert "0.5 … 4.5" in length
    island = page.locator('#profile-rows tr[data-column="island"]')
    assert "category" in island.inner_text()
    assert "6 (25.0%)" in island.inner_text()
    assert "Dream ×18" in island.inner_text()
    tag = page.locator('#profile-rows tr[data-column="tag"]')
    assert "looks like an id" in tag.inner_text()
    assert "warned" in (tag.get_attribute("class") or "")
