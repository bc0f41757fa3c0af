"""Data files -> raw records: a data path read into plain Python values, whatever its format.

One job, format-agnostic: what a record must hold is checked by the caller (`data.load_records`
for instruction records, `chat.load_conversations` for conversations). Accepted:

- a JSON list of records, or JSONL (one JSON record per line), told apart by the first
  character, whatever the file is called;
- a Parquet file (a `.parquet` name or Parquet's magic bytes), read with pyarrow;
- a directory written by `datasets.Dataset.save_to_disk`, read with `datasets.load_from_disk`
  (memory-mapped in place: nothing is written, no Hugging Face cache is used). A
  `DatasetDict`'s directory is refused with its splits: `data.path` names one of them.

Parquet and Arrow rows come back as `to_pylist` makes them: dicts, lists and scalars, with
None where a row has no value (a missing optional field), and a chat `messages` column as a
list of `{role, content}` dicts. A bad path, an unreadable file or a wrong directory raises
`DataError` with one line naming the path and the fix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lora_sweep.errors import DataError, first_line

ACCEPTED = "a readable JSON, JSONL or Parquet file, or a directory written by datasets' save_to_disk"
PARQUET_MAGIC = b"PAR1"  # the first (and last) four bytes of every Parquet file


def check_data_file(path: Path) -> None:
    """Refuse a data path that is neither a readable file nor a readable directory (before
    anything stats or reads it). What a directory holds is checked when it is read."""
    path = Path(path)
    if not path.exists():
        problem = "data file not found"
    elif path.is_dir():
        if os.access(path, os.R_OK | os.X_OK):
            return
        problem = "data directory is not readable"
    elif not path.is_file():
        problem = "data path is neither a file nor a directory"
    elif not os.access(path, os.R_OK):
        problem = "data file is not readable"
    else:
        return
    raise DataError(f"{problem}: {path} (set data.path to {ACCEPTED})")


def read_records(path: Path) -> list[Any]:
    """The raw records of a data file or `save_to_disk` directory, as plain Python values.

    May be empty (an empty JSON list, a Parquet file without rows): the caller says what a
    record should look like. Raises `DataError` when the path cannot be read as any format.
    """
    path = Path(path)
    check_data_file(path)
    if path.is_dir():
        return _read_saved_dataset(path)
    try:
        with path.open("rb") as handle:
            head = handle.read(len(PARQUET_MAGIC))
    except OSError as err:
        raise DataError(f"cannot read the data file {path}: {err.strerror} (set data.path to a readable file)") from err
    if path.suffix.lower() == ".parquet" or head == PARQUET_MAGIC:
        return _read_parquet(path)
    return _read_json(path)


def _read_json(path: Path) -> list[Any]:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise DataError(f"cannot read the data file {path}: {err.strerror} (set data.path to a readable file)") from err
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (bad byte at offset {err.start}); re-encode it as UTF-8") from err
    stripped = text.lstrip("\ufeff \t\r\n")
    if not stripped:
        raise DataError(f"{path} is empty; it must hold a JSON list of records or one JSON record per line")
    return _parse_json_list(path, stripped) if stripped[0] == "[" else _parse_jsonl(path, text)


def _parse_json_list(path: Path, text: str) -> list[Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from err
    if not isinstance(data, list):
        raise DataError(f"{path} must hold a JSON list of records, found a {type(data).__name__}")
    return data


def _parse_jsonl(path: Path, text: str) -> list[Any]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path} line {lineno} is not valid JSON ({err.msg}); the file must be a JSON list "
                "or hold one JSON record per line"
            ) from err
    return records


def _read_parquet(path: Path) -> list[Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:  # pyarrow's ArrowInvalid is also a ValueError
        raise DataError(
            f"{path} is not a readable Parquet file ({first_line(err).rstrip('.')}); write it again, or set data.path "
            "to a JSON or JSONL file"
        ) from err
    return table.to_pylist()


def _read_saved_dataset(path: Path) -> list[Any]:
    import datasets
    import pyarrow as pa
    from datasets import config

    state = path / config.DATASET_STATE_JSON_FILENAME
    if (path / config.DATASETDICT_JSON_FILENAME).is_file() and not state.is_file():
        listed = _saved_json(path / config.DATASETDICT_JSON_FILENAME).get("splits")
        splits = [str(split) for split in listed] if isinstance(listed, list) else []
        train = "train" if "train" in splits else (splits[0] if splits else "train")
        others = [split for split in splits if split != train]
        val_hint = f" (and data.val_path={path / others[0]} for a held-out split)" if others else ""
        raise DataError(
            f"{path} is a DatasetDict with the splits {', '.join(splits) or 'none'}; set data.path to one "
            f"split's directory, e.g. data.path={path / train}{val_hint}"
        )
    if not (state.is_file() and (path / config.DATASET_INFO_FILENAME).is_file()):
        raise DataError(
            f"{path} is a directory but not a saved dataset: it should be what datasets' Dataset.save_to_disk "
            f"writes ({config.DATASET_INFO_FILENAME}, {config.DATASET_STATE_JSON_FILENAME}, data-*.arrow); set "
            "data.path to one, or to a JSON, JSONL or Parquet file"
        )
    if _saved_json(state).get("_data_files") == []:
        return []  # save_to_disk writes an empty dataset without shards, and load_from_disk cannot read that
    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as err:
        raise DataError(
            f"cannot read the saved dataset {path}: {first_line(err).rstrip('.')} "
            "(write it again with Dataset.save_to_disk)"
        ) from err
    return loaded.to_list()


def _saved_json(path: Path) -> dict[str, Any]:
    """One of the JSON files save_to_disk writes beside the data."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(
            f"cannot read the saved dataset's {path.name} in {path.parent}: {first_line(err).rstrip('.')} "
            "(write it again with Dataset.save_to_disk)"
        ) from err
    if not isinstance(data, dict):
        raise DataError(f"{path} must hold a JSON object (write the dataset again with Dataset.save_to_disk)")
    return data
