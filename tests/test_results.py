"""Tests for lora_sweep.results: schema, safe concurrent appends, atomic writers."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import multiprocessing
import random
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from lora_sweep.config import SECTIONS
from lora_sweep.results import (
    COLUMN_DOCS,
    COLUMN_DTYPES,
    CSV_COLUMNS,
    ResultsError,
    append_row,
    format_cell,
    read_rows,
    results_csv_path,
    write_json,
    write_rows,
    write_step_log,
    write_text,
)

# The schema, spelled out: a change to it is a change to every reader of the CSV.
SPEC_COLUMNS = (
    "timestamp_utc, run_id, study_name, trial_number, state, status, reason, model, data, "
    "model.name, model.path, model.attn_implementation, model.dtype, model.trust_remote_code, model.self_check, "
    "data.name, data.path, data.template, data.max_length, data.mask_prompt, data.train_on, "
    "data.padding, data.group_by_length, data.packing, "
    "data.val_size, data.val_path, data.val_seed, data.eval_max_length, "
    "lora.r, lora.alpha, lora.dropout, lora.target_modules, lora.use_rslora, lora.use_dora, lora.init, "
    "train.lr, train.max_steps, train.batch_size, train.grad_accum_steps, train.seed, "
    "train.warmup_steps, train.lr_scheduler, "
    "train.weight_decay, train.loraplus_lr_ratio, train.max_grad_norm, "
    "train.min_improvement, train.eval_every, train.prune_on, "
    "train.device, train.log_every, "
    "train.precision, train.save_adapter, train.keep_adapters, train.sample_prompts, train.sample_max_new_tokens, "
    "steps_completed, avg_loss, "
    "initial_loss, final_loss, loss_slope, grad_mean, grad_std, drawup, spike_rate, "
    "grad_volatility, stability_index, quality, improvement, "
    "eval_loss, eval_loss_base, eval_improvement, best_eval_loss, best_eval_step, generalization_gap, "
    "eval_seconds, sample_seconds, "
    "learned, divergence_step, "
    "duration_s, tokens_per_s, real_tokens, peak_mem_mb, trainable_params, adapted_modules, precision, "
    "attn_implementation, device, run_dir, adapter_dir"
).split(", ")


@pytest.fixture
def csv_path(tmp_path: Path) -> Path:
    return results_csv_path(tmp_path / "results")


def records(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


# -------------------------------------------------------------------------- schema


def test_schema_matches_spec_and_is_documented() -> None:
    assert list(CSV_COLUMNS) == SPEC_COLUMNS
    assert list(COLUMN_DOCS) == list(CSV_COLUMNS) == list(COLUMN_DTYPES)
    for column, doc in COLUMN_DOCS.items():
        assert doc.strip() and "\n" not in doc, column


def test_every_config_field_is_a_documented_typed_column() -> None:
    """A config value that changes the numbers can never be missing from the rows: each field
    of each section is a column, documented by the field, typed by its annotation."""
    for section, schema in SECTIONS.items():
        for item in fields(schema):
            key = f"{section}.{item.name}"
            assert key in CSV_COLUMNS and COLUMN_DOCS[key] == item.metadata["doc"], key
    types = {
        "data.mask_prompt": "boolean",
        "data.max_length": "Int64",
        "model.dtype": "str",
        "model.path": "str",
        "lora.alpha": "float64",
        "lora.target_modules": "str",
        "train.precision": "str",
        "trial_number": "Int64",
        "learned": "boolean",
        "avg_loss": "float64",
    }
    assert {key: COLUMN_DTYPES[key] for key in types} == types


def test_header_written_once_across_appends(csv_path: Path) -> None:
    for i in range(20):
        append_row(csv_path, {"run_id": f"run-{i}", "steps_completed": i})
    rows = records(csv_path)
    assert rows[0] == list(CSV_COLUMNS)
    assert sum(row == list(CSV_COLUMNS) for row in rows) == 1
    assert [row[1] for row in rows[1:]] == [f"run-{i}" for i in range(20)]
    assert all(len(row) == len(CSV_COLUMNS) for row in rows)
    assert (csv_path.parent).is_dir()


def test_empty_existing_file_gets_header(csv_path: Path) -> None:
    csv_path.parent.mkdir(parents=True)
    csv_path.touch()
    append_row(csv_path, {"run_id": "a"})
    assert records(csv_path)[0] == list(CSV_COLUMNS)


def test_foreign_header_is_refused_and_untouched(csv_path: Path) -> None:
    csv_path.parent.mkdir(parents=True)
    original = b"run_id,loss\nx,1.0\n"
    csv_path.write_bytes(original)
    with pytest.raises(ResultsError) as err:
        append_row(csv_path, {"run_id": "a"})
    message = str(err.value)
    assert str(csv_path) in message and "move it aside" in message and "\n" not in message
    assert csv_path.read_bytes() == original


def test_older_schema_prefix_is_refused(csv_path: Path) -> None:
    csv_path.parent.mkdir(parents=True)
    original = (",".join(CSV_COLUMNS[:-1]) + "\n").encode()
    csv_path.write_bytes(original)
    with pytest.raises(ResultsError):
        append_row(csv_path, {"run_id": "a"})
    assert csv_path.read_bytes() == original


def test_unknown_key_is_refused_and_untouched(csv_path: Path) -> None:
    append_row(csv_path, {"run_id": "a"})
    before = csv_path.read_bytes()
    with pytest.raises(ResultsError, match="bogus_col"):
        append_row(csv_path, {"run_id": "b", "bogus_col": 1})
    assert csv_path.read_bytes() == before


def test_unknown_key_on_fresh_path_creates_nothing(csv_path: Path) -> None:
    with pytest.raises(ResultsError):
        append_row(csv_path, {"nope": 1})
    assert not csv_path.exists()


# ---------------------------------------------------------------------- formatting


def test_format_cell() -> None:
    assert format_cell(None) == ""
    assert format_cell(True) == "true" and format_cell(np.bool_(False)) == "false"
    assert format_cell(7) == "7" and format_cell(np.int64(7)) == "7"
    assert format_cell(0.003) == "0.003" and format_cell(3e-3) == "0.003"
    assert format_cell(1e-05) == "1e-05"
    assert format_cell(np.float64(0.003)) == "0.003"
    assert format_cell(np.float32(0.5)) == "0.5"
    assert format_cell(float("nan")) == "nan"
    assert format_cell(float("inf")) == "inf"
    assert format_cell(["q_proj", "v_proj"]) == "q_proj,v_proj"
    assert format_cell(("a",)) == "a"
    assert format_cell({"v_proj", "q_proj"}) == "q_proj,v_proj"
    assert format_cell(Path("/x/y")) == "/x/y"


def test_list_is_one_quoted_cell(csv_path: Path) -> None:
    append_row(csv_path, {"run_id": "a", "lora.target_modules": ["q_proj", "v_proj"]})
    assert '"q_proj,v_proj"' in csv_path.read_text()
    row = dict(zip(CSV_COLUMNS, records(csv_path)[1], strict=False))
    assert row["lora.target_modules"] == "q_proj,v_proj"
    assert read_rows(csv_path)["lora.target_modules"].iloc[0] == "q_proj,v_proj"


def test_float_round_trip_through_pandas(csv_path: Path) -> None:
    values = [0.003, 3e-3, 1e-05, 0.1 + 0.2, 1 / 3, 123456.789e-300, float("nan")]
    for value in values:
        append_row(csv_path, {"run_id": repr(value), "train.lr": value})
    text = csv_path.read_text()
    assert ",0.003," in text and ",1e-05," in text and ",nan," in text
    frame = read_rows(csv_path)
    for got, want in zip(frame["train.lr"], values, strict=False):
        assert (math.isnan(got) and math.isnan(want)) or got == want


def test_read_rows_dtypes_and_empty_cells(csv_path: Path) -> None:
    append_row(
        csv_path,
        {
            "run_id": "a",
            "trial_number": 3,
            "learned": True,
            "lora.use_rslora": False,
            "avg_loss": 1.5,
            "divergence_step": None,
            "reason": "",
        },
    )
    frame = read_rows(csv_path)
    row = frame.iloc[0]
    assert row["trial_number"] == 3 and str(frame["trial_number"].dtype) == "Int64"
    assert bool(row["learned"]) is True and bool(row["lora.use_rslora"]) is False
    assert row["avg_loss"] == 1.5
    assert frame["divergence_step"].isna().all()
    assert row["reason"] == "" and row["study_name"] == ""


def test_missing_keys_are_empty_and_newlines_flattened(csv_path: Path) -> None:
    append_row(csv_path, {"run_id": "a", "reason": "line one\nline two"})
    lines = csv_path.read_text().splitlines()
    assert len(lines) == 2
    row = dict(zip(CSV_COLUMNS, records(csv_path)[1], strict=False))
    assert row["reason"] == "line one line two"
    assert all(value == "" for key, value in row.items() if key not in ("run_id", "reason"))


def test_torn_last_line_is_dropped_and_kept_aside(csv_path: Path) -> None:
    append_row(csv_path, {"run_id": "first"})
    with open(csv_path, "ab") as handle:
        handle.write(b",torn-run,,,,ok,partial")  # a write that died mid-line
    append_row(csv_path, {"run_id": "after", "status": "ok"})
    text = csv_path.read_text()
    assert text.endswith("\n")
    rows = records(csv_path)
    assert rows[-1][1] == "after" and len(rows[-1]) == len(CSV_COLUMNS)
    assert read_rows(csv_path)["run_id"].tolist() == ["first", "after"]  # no corrupt row remains
    assert Path(str(csv_path) + ".torn").read_bytes() == b",torn-run,,,,ok,partial\n"


# --------------------------------------------------------------------- concurrency

WORKERS, APPENDS, PAD = 8, 25, 6000


def _append_many(csv_path: str, worker: int) -> None:
    rng = random.Random(worker)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 ,\"'"
    for i in range(APPENDS):
        payload = "".join(rng.choices(alphabet, k=PAD))
        digest = hashlib.sha256(payload.encode()).hexdigest()
        append_row(
            Path(csv_path),
            {
                "run_id": f"w{worker}-{i}",
                "reason": f"{digest}:{payload}",
                "trial_number": i,
                "train.lr": 1e-4 * (worker + 1),
            },
        )


def test_concurrent_appends_are_intact(csv_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_append_many, args=(str(csv_path), w)) for w in range(WORKERS)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    rows = records(csv_path)
    assert rows[0] == list(CSV_COLUMNS)
    body = rows[1:]
    assert len(body) == WORKERS * APPENDS
    for row in body:
        assert len(row) == len(CSV_COLUMNS)
        digest, payload = dict(zip(CSV_COLUMNS, row, strict=False))["reason"].split(":", 1)
        assert len(payload) == PAD
        assert hashlib.sha256(payload.encode()).hexdigest() == digest
    ids = {row[1] for row in body}
    assert ids == {f"w{w}-{i}" for w in range(WORKERS) for i in range(APPENDS)}
    assert len(read_rows(csv_path)) == WORKERS * APPENDS


# ------------------------------------------------------------------ atomic writers


def test_write_json_atomic_and_clean(tmp_path: Path) -> None:
    path = tmp_path / "run" / "metrics.json"
    obj = {"a": np.float64(0.003), "b": [1, 2], "c": Path("/x"), "d": np.int64(4)}
    write_json(path, obj)
    assert json.loads(path.read_text()) == {"a": 0.003, "b": [1, 2], "c": "/x", "d": 4}
    write_json(path, {"a": 1})  # overwrite
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    write_json(path, {"ok": True})
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_write_text(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    write_text(path, "hello\nworld\n")
    write_text(path, "bye\n")
    assert path.read_text() == "bye\n"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_write_step_log(tmp_path: Path) -> None:
    path = tmp_path / "steps.csv"
    rows = [
        {"step": 1, "loss": 2.5, "grad_norm": 0.1, "lr": 3e-4, "tokens": 512, "real_tokens": 400, "elapsed_s": 0.25},
        {
            "step": 2,
            "loss": 2.25,
            "grad_norm": float("nan"),
            "lr": 1e-05,
            "tokens": 1024,
            "real_tokens": 800,
            "elapsed_s": 0.5,
        },
    ]
    write_step_log(path, rows)
    got = records(path)
    assert got[0] == ["step", "loss", "grad_norm", "lr", "tokens", "real_tokens", "elapsed_s"]
    assert got[1] == ["1", "2.5", "0.1", "0.0003", "512", "400", "0.25"]
    assert got[2][3] == "1e-05" and got[2][2] == "nan"
    assert [p.name for p in tmp_path.iterdir()] == ["steps.csv"]


def test_write_step_log_key_order_and_empty(tmp_path: Path) -> None:
    path = tmp_path / "steps.csv"
    write_step_log(path, [{"loss": 1.0, "step": 1}, {"step": 2, "loss": 0.5, "extra": 7}])
    assert records(path) == [["loss", "step", "extra"], ["1.0", "1", ""], ["0.5", "2", "7"]]
    write_step_log(path, [])
    assert records(path) == [["step", "loss", "grad_norm", "lr", "tokens", "real_tokens", "elapsed_s"]]


def test_write_rows_matches_append_row_and_stays_appendable(tmp_path: Path) -> None:
    rows = [{"run_id": "a", "train.lr": 0.003, "learned": True}, {"run_id": "b", "lora.r": 8}]
    appended, written = tmp_path / "appended.csv", tmp_path / "written.csv"
    for row in rows:
        append_row(appended, row)
    write_rows(written, rows)
    assert written.read_bytes() == appended.read_bytes()
    append_row(written, {"run_id": "c"})
    assert list(read_rows(written)["run_id"]) == ["a", "b", "c"]
    with pytest.raises(ResultsError, match="unknown result column"):
        write_rows(written, [{"nope": 1}])
    assert list(read_rows(written)["run_id"]) == ["a", "b", "c"]  # untouched
