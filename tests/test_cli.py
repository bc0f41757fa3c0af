"""End-to-end: `python -m lora_sweep` in a subprocess, as a user runs it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lora_sweep.results import CSV_COLUMNS, read_rows
from tests.conftest import SHARED_DATA, TINY, run_cli

pytestmark = pytest.mark.slow


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_issue_command_writes_a_row_with_exactly_those_values(tmp_path: Path) -> None:
    proc = run_cli("lora.r=16", "train.lr=3e-3", "data.max_length=128", "train.max_steps=50", f"results_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    rows = read_rows(tmp_path / "lora_tuning_results.csv")
    assert list(rows.columns) == list(CSV_COLUMNS) and len(rows) == 1
    row = rows.iloc[0]
    assert (row["lora.r"], row["train.lr"], row["data.max_length"], row["train.max_steps"]) == (16, 0.003, 128, 50)
    assert row["status"] == "success" and row["steps_completed"] == 50 and row["model"] == "tiny_llama"
    assert 0.0 < row["stability_index"] <= 1.0 and row["final_loss"] < row["initial_loss"]
    run_dir = Path(row["run_dir"])
    assert run_dir.parent == tmp_path / "runs" and (run_dir / "result.json").is_file()
    assert (run_dir / "steps.csv").is_file() and (run_dir / "config.yaml").is_file()
    assert "self-check passed" in proc.stderr + proc.stdout


@pytest.fixture(scope="module")
def results_with_one_row(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A results dir holding one real row, written by a local checkpoint given as model.path."""
    results = tmp_path_factory.mktemp("results")
    proc = run_cli("model=local", f"model.path={tiny_ckpt}", f"results_dir={results}", *TINY)
    assert proc.returncode == 0, proc.stderr
    assert len(read_rows(results / "lora_tuning_results.csv")) == 1
    return results


def _bad_files(tmp: Path) -> dict[str, Path]:
    files = {
        "malformed.json": '[{"instruction": "x", "output": "y"',
        "empty.json": "[]",
        "no_output.json": '[{"instruction": "x", "input": ""}]',
    }
    for name, text in files.items():
        (tmp / name).write_text(text)
    return {name: tmp / name for name in files}


BAD_INPUTS = [
    (["data=alpaca", "data.path={tmp}/malformed.json"], "is not valid JSON"),
    (["data=alpaca", "data.path={tmp}/empty.json"], "holds no records"),
    (["data=alpaca", "data.path={tmp}/no_output.json"], "missing the field 'output'"),
    (["model.path={tmp}/no_such_checkpoint"], "is not a directory"),
    (["model.path={tmp}"], "is not a Hugging Face checkpoint"),
    (["lora.r=0"], "lora.r must be an integer >= 1"),
    (["train.lr=-1"], "train.lr must be a number > 0"),
    (["lora=unknown_option"], "Could not find 'lora/unknown_option'"),
    (["model=local"], "model.path is required"),
]


@pytest.mark.parametrize("overrides,message", BAD_INPUTS)
def test_bad_input_one_line_nonzero_exit_csv_untouched(
    results_with_one_row: Path, tiny_ckpt: Path, tmp_path: Path, overrides: list[str], message: str
) -> None:
    _bad_files(tmp_path)
    csv_path = results_with_one_row / "lora_tuning_results.csv"
    before, runs_before = _digest(csv_path), sorted((results_with_one_row / "runs").iterdir())
    base = [] if any(o.startswith(("model", "lora=unknown")) for o in overrides) else ["model=local", f"model.path={tiny_ckpt}"]
    args = [o.format(tmp=tmp_path) for o in overrides]
    if any(a.startswith("model.path=") for a in args) and "model=local" not in args:
        args.insert(0, "model=local")
    proc = run_cli(*base, *args, f"results_dir={results_with_one_row}", *TINY)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(error_lines) == 1 and error_lines[0].startswith("lora_sweep: error: "), proc.stderr
    assert message in error_lines[0]
    assert _digest(csv_path) == before
    assert sorted((results_with_one_row / "runs").iterdir()) == runs_before  # no stray run directory


def test_failed_run_writes_its_row_and_exits_nonzero(nan_ckpt: Path, tmp_path: Path) -> None:
    proc = run_cli("model=local", f"model.path={nan_ckpt}", f"results_dir={tmp_path}", *TINY)
    assert proc.returncode == 1
    row = read_rows(tmp_path / "lora_tuning_results.csv").iloc[0]
    assert row["status"] == "failed" and "self-check" in row["reason"]
    assert json.loads((Path(row["run_dir"]) / "result.json").read_text())["status"] == "failed"


def test_alpaca_file_end_to_end(tmp_path: Path) -> None:
    proc = run_cli("data=alpaca", f"data.path={SHARED_DATA}", f"results_dir={tmp_path}", *TINY)
    assert proc.returncode == 0, proc.stderr
    row = read_rows(tmp_path / "lora_tuning_results.csv").iloc[0]
    assert row["data"] == str(SHARED_DATA) and row["status"] in ("success", "diverged")
    assert row["steps_completed"] == 6 and row["real_tokens"] > 0
