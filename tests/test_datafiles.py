"""Data files of every accepted format: JSON, JSONL, Parquet and `save_to_disk` directories."""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lora_sweep import data as d
from lora_sweep.cache import TrialCache, fingerprint
from lora_sweep.datafiles import check_data_file, read_records
from lora_sweep.errors import DataError
from lora_sweep.results import read_rows
from tests.conftest import TINY, AlpacaFiles, run_cli

CHATS = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2 + 2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3 + 3?"},
            {"role": "assistant", "content": "6"},
        ]
    },
]


def write_parquet(records: list[dict[str, Any]], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def save_to_disk(records: list[dict[str, Any]], path: Path) -> Path:
    import datasets

    datasets.Dataset.from_list(records).save_to_disk(str(path))
    return path


@dataclass(frozen=True)
class ColumnarFiles:
    """The `alpaca_files` records as a Parquet file and a `save_to_disk` directory."""

    parquet: Path
    saved: Path


@pytest.fixture(scope="module")
def columnar(alpaca_files: AlpacaFiles, tmp_path_factory: pytest.TempPathFactory) -> ColumnarFiles:
    out = tmp_path_factory.mktemp("columnar")
    return ColumnarFiles(
        parquet=write_parquet(alpaca_files.records, out / "alpaca.parquet"),
        saved=save_to_disk(alpaca_files.records, out / "alpaca_saved"),
    )


def test_every_format_gives_the_same_records(alpaca_files: AlpacaFiles, columnar: ColumnarFiles) -> None:
    paths = [alpaca_files.json_path, alpaca_files.jsonl_path, columnar.parquet, columnar.saved]
    for path in paths:
        assert d.load_records(path) == alpaca_files.records, path
        raw = read_records(path)
        assert type(raw) is list and all(type(r) is dict for r in raw), path


def test_parquet_is_known_by_its_magic_bytes_and_none_is_an_empty_input(
    alpaca_files: AlpacaFiles, tmp_path: Path
) -> None:
    # columnar writers store a missing optional field as a null; any name will do
    with_nulls = [{**r, "input": r["input"] or None} for r in alpaca_files.records]
    path = write_parquet(with_nulls, tmp_path / "records.data")
    assert any(r["input"] is None for r in read_records(path))
    assert d.load_records(path) == alpaca_files.records


@pytest.mark.parametrize("fmt", ["parquet", "saved"])
def test_chat_records_come_back_as_plain_lists_of_dicts(tmp_path: Path, fmt: str) -> None:
    write = write_parquet if fmt == "parquet" else save_to_disk
    records = read_records(write(CHATS, tmp_path / f"chats.{fmt}"))
    assert records == CHATS
    messages = records[1]["messages"]
    assert type(messages) is list and all(type(m) is dict for m in messages)


def test_save_to_disk_directory_is_checked_fingerprinted_and_cached(alpaca_files: AlpacaFiles, tmp_path: Path) -> None:
    saved = save_to_disk(alpaca_files.records, tmp_path / "saved")
    check_data_file(saved)  # a directory is a data path now
    key = fingerprint(saved)
    assert any(name.endswith(".arrow") for name, *_ in key[1:])  # the data shard is in the fingerprint
    cache = TrialCache()
    first_key, first = cache.records(saved)
    second_key, second = cache.records(saved)
    assert second is first and second_key == first_key  # read once
    shutil.rmtree(saved)
    save_to_disk(alpaca_files.records[:10], saved)  # rewritten in place: a new fingerprint, read again
    third_key, third = cache.records(saved)
    assert third_key != first_key and len(third) == 10


def bad_inputs(tmp: Path) -> dict[str, Path]:
    """One path per bad input of the formats read by pyarrow and datasets, by name (also
    used by the bad-input battery)."""
    import datasets

    write_parquet([{"instruction": "x", "output": "y"}] * 50, tmp / "whole.parquet")
    (tmp / "truncated.parquet").write_bytes((tmp / "whole.parquet").read_bytes()[:100])  # PAR1, no footer
    (tmp / "text.parquet").write_text('[{"instruction": "x", "output": "y"}]')
    (tmp / "plain_dir").mkdir()
    (tmp / "plain_dir" / "notes.txt").write_text("not a dataset")
    one = datasets.Dataset.from_list([{"instruction": "x", "output": "y"}])
    datasets.DatasetDict(train=one, validation=one).save_to_disk(str(tmp / "dict"))
    write_parquet([], tmp / "empty.parquet")
    datasets.Dataset.from_dict({"instruction": [], "output": []}).save_to_disk(str(tmp / "empty_saved"))
    save_to_disk([{"instruction": "x", "output": "y"}], tmp / "corrupt_saved")
    for shard in (tmp / "corrupt_saved").glob("*.arrow"):
        shard.write_bytes(b"garbage")
    return {p.name: p for p in tmp.iterdir() if p.name != "whole.parquet"}


BAD = [
    ("truncated.parquet", "truncated.parquet is not a readable Parquet file (Could not open Parquet input source"),
    ("text.parquet", "text.parquet is not a readable Parquet file"),
    ("plain_dir", "plain_dir is a directory but not a saved dataset: it should be what datasets' Dataset.save_to_disk"),
    ("dict", "dict is a DatasetDict with the splits train, validation; set data.path to one split's directory, e.g."),
    ("empty.parquet", "empty.parquet holds no records"),
    ("empty_saved", "empty_saved holds no records"),
    ("corrupt_saved", "cannot read the saved dataset"),
]


@pytest.mark.parametrize("name,message", BAD)
def test_bad_input_gives_one_line(tmp_path: Path, name: str, message: str) -> None:
    path = bad_inputs(tmp_path)[name]
    with pytest.raises(DataError) as info:
        d.load_records(path)
    assert message in str(info.value) and "\n" not in str(info.value)
    if name == "dict":
        assert f"data.path={path / 'train'} (and data.val_path={path / 'validation'}" in str(info.value)


def test_empty_records_are_returned_for_the_caller_to_judge(tmp_path: Path) -> None:
    """`read_records` is format-agnostic: what an empty file lacks is the validator's to say."""
    bad = bad_inputs(tmp_path)
    assert read_records(bad["empty.parquet"]) == [] and read_records(bad["empty_saved"]) == []


@pytest.mark.slow
def test_single_trials_on_parquet_and_a_saved_dataset(columnar: ColumnarFiles, tmp_path: Path) -> None:
    """Through the real CLI composition: both train on the same records, so on the same tokens
    with the same losses."""
    per_step = {}
    for path in (columnar.parquet, columnar.saved):
        results = tmp_path / path.name
        proc = run_cli("data=alpaca", f"data.path={path}", f"results_dir={results}", *TINY, "train.max_steps=3")
        assert proc.returncode == 0, proc.stderr[-3000:]
        row = read_rows(results / "lora_tuning_results.csv").iloc[0]
        assert row["data"] == str(path) and row["status"] in ("success", "diverged") and row["steps_completed"] == 3
        with open(Path(row["run_dir"]) / "steps.csv", newline="") as handle:
            per_step[path] = [(r["real_tokens"], r["loss"]) for r in csv.DictReader(handle)]
    assert per_step[columnar.parquet] == per_step[columnar.saved]
