"""The README documents what users read: every CSV column, and the command CI runs."""

from __future__ import annotations

from lora_sweep.results import CSV_COLUMNS
from tests.conftest import REPO


def test_readme_documents_every_csv_column() -> None:
    readme = (REPO / "README.md").read_text()
    missing = [c for c in CSV_COLUMNS if f"| `{c}` |" not in readme]
    assert not missing


def test_ci_runs_the_readme_test_command() -> None:
    readme = (REPO / "README.md").read_text()
    assert "make test " in readme and "make run " in readme
    assert "make test" in (REPO / ".ci" / "run").read_text()
    assert "-m lora_sweep -m" in (REPO / "Makefile").read_text()  # the main job is the default sweep
