"""End-to-end: `python -m lora_sweep` in a subprocess, as a user runs it."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest

from lora_sweep import data as d
from lora_sweep.results import CSV_COLUMNS, read_rows
from tests.conftest import TINY, AlpacaFiles, run_cli, seed_tasks_path

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
    own_model = any(o.startswith(("model", "lora=unknown")) for o in overrides)
    base = [] if own_model else ["model=local", f"model.path={tiny_ckpt}"]
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


# Long enough that no record of the alpaca fixture is truncated (its alpaca prompts have 67-250
# tokens), so each batch's token count shows which records and which template it holds.
UNTRUNCATED = [o for o in TINY if not o.startswith("data.max_length=")] + ["data.max_length=256"]


def _real_tokens_per_step(
    records: list[dict[str, str]], template: str, overrides: list[str], seed: int = 0
) -> list[int]:
    """The real tokens of each step's batch that a run with `overrides` draws from `records`
    under `template`: the same validation split (the default `data.val_size` of 10 %), the same
    tokenization, seeded shuffle and per-batch padding as a trial."""
    from transformers import AutoTokenizer

    from lora_sweep.embedded import TINY_LLAMA_DIR
    from lora_sweep.split import split_records

    tokenizer = AutoTokenizer.from_pretrained(str(TINY_LLAMA_DIR), local_files_only=True)
    values = dict(o.split("=", 1) for o in overrides)
    train, _ = split_records(records, val_size=0.1, seed=0)
    examples = d.tokenize_records(
        train, tokenizer, template=template, max_length=int(values["data.max_length"]), mask_prompt=False
    )
    loader = d.make_dataloader(
        d.SanityDataset(examples),
        d.Collator(tokenizer.pad_token_id),
        batch_size=int(values["train.batch_size"]),
        seed=seed,
        packing=True,  # the default
    )
    batches = d.infinite_batches(loader)
    return [d.real_token_count(next(batches)) for _ in range(int(values["train.max_steps"]))]


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_alpaca_file_end_to_end(alpaca_files: AlpacaFiles, tmp_path: Path, fmt: str) -> None:
    path = alpaca_files.json_path if fmt == "json" else alpaca_files.jsonl_path
    proc = run_cli("data=alpaca", f"data.path={path}", f"results_dir={tmp_path}", *UNTRUNCATED)
    assert proc.returncode == 0, proc.stderr
    rows = read_rows(tmp_path / "lora_tuning_results.csv")
    assert len(rows) == 1
    row = rows.iloc[0]
    assert row["data"] == str(path) and row["status"] in ("success", "diverged")
    assert row["steps_completed"] == 6
    # every step trained on exactly the batches the alpaca template makes of these 40 records:
    # the per-step token counts depend on the record count (seeded shuffle) and on the template
    with open(Path(row["run_dir"]) / "steps.csv", newline="") as handle:
        per_step = [int(r["real_tokens"]) for r in csv.DictReader(handle)]
    expected = _real_tokens_per_step(alpaca_files.records, "alpaca", UNTRUNCATED)
    assert per_step == expected and row["real_tokens"] == sum(expected)
    # the check tells the templates apart, and a record more or less
    assert expected != _real_tokens_per_step(alpaca_files.records, "plain", UNTRUNCATED)
    assert expected != _real_tokens_per_step(alpaca_files.records[:-1], "alpaca", UNTRUNCATED)


def test_seed_tasks_real_data(tmp_path: Path) -> None:
    """The one test on real, human-written data (`$LORA_SWEEP_SEED_TASKS`, set by .ci/run):
    Stanford Alpaca's 175 seed tasks load, and one tiny trial trains on them."""
    seed_tasks = seed_tasks_path()
    records = d.load_records(seed_tasks)
    assert len(records) == 175
    proc = run_cli("data=alpaca", f"data.path={seed_tasks}", f"results_dir={tmp_path}", *TINY)
    assert proc.returncode == 0, proc.stderr
    row = read_rows(tmp_path / "lora_tuning_results.csv").iloc[0]
    assert row["data"] == str(seed_tasks) and row["status"] in ("success", "diverged")
    assert row["steps_completed"] == 6 and row["real_tokens"] == sum(_real_tokens_per_step(records, "alpaca", TINY))
