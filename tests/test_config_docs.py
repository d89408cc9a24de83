"""docs/configuration.md is generated from ``Settings`` and documents every setting."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import REPO
from trainserve.config import Settings

SCRIPT = REPO / "scripts" / "config_docs.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("config_docs", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_setting_has_a_description() -> None:
    missing = [name for name, field in Settings.model_fields.items() if not (field.description or "").strip()]
    assert not missing, f"give these settings a Field(description=...) in trainserve/config.py: {missing}"


def test_the_configuration_reference_is_up_to_date() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--check"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    page = (REPO / "docs" / "configuration.md").read_text()
    for name, field in Settings.model_fields.items():
        assert f"`TRAINSERVE_{name.upper()}`" in page
        assert (field.description or "").replace("|", "\\|") in page


def test_the_check_fails_on_a_stale_page_and_on_an_undocumented_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config_docs = load_script()
    page = tmp_path / "docs" / "configuration.md"
    page.parent.mkdir()
    monkeypatch.setattr(config_docs, "REPO", tmp_path)
    monkeypatch.setattr(config_docs, "PAGE", page)
    page.write_text(config_docs.render().replace("TRAINSERVE_MAX_EPOCHS", "TRAINSERVE_MAX_EPOCH"))
    assert config_docs.main(["--check"]) == 1
    assert "configuration.md is stale" in capsys.readouterr().err
    assert config_docs.main(["--write"]) == 0
    assert config_docs.main(["--check"]) == 0

    field = Settings.model_fields["max_epochs"]
    monkeypatch.setattr(field, "description", None)
    assert config_docs.main(["--check"]) == 1
    assert "max_epochs" in capsys.readouterr().err
