"""The results table (one CSV row per run) and the per-run directory writers.

Many processes (sweep workers, single runs) append to one CSV, so each append holds
an exclusive file lock and lands as a single ``O_APPEND`` write of a complete line;
a file whose header is not ``CSV_COLUMNS`` is never touched. Files in a run
directory are written atomically (temp file in the same directory + ``os.replace``)
so readers never see a half-written file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from filelock import FileLock

from lora_sweep.config import config_keys
from lora_sweep.sweep.durable import drop_torn_tail
from lora_sweep.sweep.faults import torn_write

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "COLUMN_DOCS",
    "COLUMN_DTYPES",
    "CSV_COLUMNS",
    "RESULTS_FILENAME",
    "STEP_LOG_COLUMNS",
    "ResultsError",
    "append_row",
    "check_appendable",
    "check_header",
    "format_cell",
    "read_rows",
    "results_csv_path",
    "write_json",
    "write_rows",
    "write_step_log",
    "write_text",
]

RESULTS_FILENAME = "lora_tuning_results.csv"
# Key of a sweep job's recorded result naming its CSV, so a sweep that finishes the trial
# after a crash can write a row that is missing (see lora_sweep.sweep.runner).
PAYLOAD_CSV_KEY = "results_csv"
LOCK_TIMEOUT_S = 60.0

# (column, type, doc) of the columns that are not config values: who ran, and what came out.
_RUN_COLUMNS: tuple[tuple[str, type, str], ...] = (
    ("timestamp_utc", str, "UTC time the row was written, ISO 8601"),
    ("run_id", str, "unique id of the run (also the name of its run directory)"),
    ("study_name", str, "Optuna study name (empty for a single run)"),
    ("trial_number", int, "Optuna trial number (empty for a single run)"),
    ("state", str, "Optuna trial state: COMPLETE, PRUNED or FAIL (empty for a single run)"),
    ("status", str, "run outcome: success, diverged, failed or pruned"),
    ("reason", str, "why the run did not succeed, in one line (empty on success)"),
    ("model", str, "model.path, or the model option name for the embedded checkpoint"),
    ("data", str, "data.path, or the data option name for the embedded samples"),
)
_OUTCOME_COLUMNS: tuple[tuple[str, type, str], ...] = (
    ("steps_completed", int, "optimizer steps actually run"),
    ("avg_loss", float, "mean training loss over all steps"),
    ("initial_loss", float, "training loss at step 1"),
    ("final_loss", float, "mean training loss over the last 10% of steps"),
    ("loss_slope", float, "OLS slope of ln(loss) against run fraction t/T (negative = learning)"),
    ("grad_mean", float, "mean pre-clip grad norm after warm-up"),
    ("grad_std", float, "population std of the pre-clip grad norm after warm-up"),
    ("drawup", float, "max rebound of ln(loss) above its running minimum"),
    ("spike_rate", float, "fraction of post-warm-up steps that are loss spikes (> 1.5x recent median)"),
    ("grad_volatility", float, "std of step-to-step changes of ln(grad norm) after warm-up"),
    ("stability_index", float, "exp(-drawup)(1-spike_rate)/(1+grad_volatility), 0 if diverged; in [0, 1]"),
    ("quality", float, "max(0, ln(initial_loss/final_loss)) * stability_index (objective, maximize)"),
    ("improvement", float, "1 - final_loss/initial_loss (training loss)"),
    ("eval_loss", float, "held-out loss at the last evaluation (the final step unless pruned or stopped)"),
    ("eval_loss_base", float, "held-out loss of the base model (step 0; the same in every trial of a sweep)"),
    ("eval_improvement", float, "1 - eval_loss/eval_loss_base"),
    ("best_eval_loss", float, "lowest held-out loss of any evaluation"),
    ("best_eval_step", int, "step of best_eval_loss (0: the base model was best)"),
    ("generalization_gap", float, "eval_loss - final_loss (held-out minus training loss at the end)"),
    ("eval_seconds", float, "seconds spent on held-out evaluation"),
    ("sample_seconds", float, "seconds spent answering the sample prompts (samples.jsonl; 0: none)"),
    ("learned", bool, "eval_improvement >= train.min_improvement (true/false)"),
    ("divergence_step", int, "step at which the run was judged diverged (empty if not)"),
    ("duration_s", float, "wall-clock seconds of the whole trial (loading, self-check, training)"),
    ("tokens_per_s", float, "real (non-padding) tokens trained per second of the training loop"),
    ("real_tokens", int, "non-padding tokens trained on"),
    ("peak_mem_mb", float, "the trial's own peak memory in MiB: CUDA max allocated, or peak RSS on the CPU"),
    ("trainable_params", int, "number of trainable (LoRA) parameters"),
    ("adapted_modules", str, "comma-separated modules LoRA adapted (what lora.target_modules resolved to)"),
    ("precision", str, "precision the run trained in: fp32 or bf16"),
    ("attn_implementation", str, "attention kernel the run used: sdpa or eager (model.attn_implementation resolved)"),
    ("device", str, "device the run used, e.g. cuda:0 or cpu"),
    ("run_dir", str, "path of the run's directory (config, metrics, step log)"),
    (
        "adapter_dir",
        str,
        "the run's saved adapter (run_dir/adapter) when its row was written; empty: none saved, or not among "
        "a sweep's best train.keep_adapters",
    ),
)
_COLUMNS = _RUN_COLUMNS + tuple((key.key, key.type, key.doc) for key in config_keys()) + _OUTCOME_COLUMNS

COLUMN_DOCS: dict[str, str] = {name: doc for name, _, doc in _COLUMNS}
"""What each column means, in column order: the run's identity, every config value (one
column per field of `lora_sweep.config.SECTIONS`, documented there), then the outcome."""

CSV_COLUMNS: tuple[str, ...] = tuple(COLUMN_DOCS)
"""The stable results schema, in column order (the keys of ``COLUMN_DOCS``)."""

_PANDAS_DTYPES = {str: "str", int: "Int64", bool: "boolean", float: "float64"}
COLUMN_DTYPES: dict[str, str] = {name: _PANDAS_DTYPES[kind] for name, kind, _ in _COLUMNS}
"""The pandas dtype of each column (``read_rows``): text ``str``, integers nullable
``Int64``, flags nullable ``boolean``, other numbers ``float64``."""

STEP_LOG_COLUMNS: tuple[str, ...] = (
    "step",
    "loss",
    "grad_norm",
    "lr",
    "tokens",
    "real_tokens",
    "elapsed_s",
)
"""Usual step-log columns; the header of an empty step log."""


class ResultsError(Exception):
    """The results CSV cannot be appended to safely (foreign schema, bad row)."""


def results_csv_path(results_dir: str | os.PathLike[str]) -> Path:
    """Where the results table of ``results_dir`` lives."""
    return Path(results_dir) / RESULTS_FILENAME


# ---------------------------------------------------------------------- formatting


def format_cell(value: object) -> str:
    """Deterministic text for one cell: floats via repr (exact round trip), NaN as
    'nan', None as '', bools as 'true'/'false', sequences comma-joined."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        number = float(value)
        return "nan" if math.isnan(number) else repr(number)  # repr(inf) == 'inf'
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, (set, frozenset)):  # no inherent order: sort for determinism
        return ",".join(sorted(format_cell(item) for item in value))
    if isinstance(value, Iterable) and not isinstance(value, Mapping):
        return ",".join(format_cell(item) for item in value)
    return str(value)


def _csv_line(cells: Iterable[str]) -> str:
    """One CSV record terminated by '\\n' (quoting only where needed)."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(cells)
    return buffer.getvalue()


_HEADER_LINE = _csv_line(CSV_COLUMNS)


# ---------------------------------------------------------------------- results CSV


def _row_cells(row: Mapping[str, object]) -> list[str]:
    """Cells in schema order; unknown keys are an error, missing keys are empty."""
    unknown = [key for key in row if key not in COLUMN_DOCS]
    if unknown:
        raise ResultsError(
            f"unknown result column(s) {', '.join(map(repr, unknown))}; allowed columns are results.CSV_COLUMNS"
        )
    return [_one_line(format_cell(row.get(column))) for column in CSV_COLUMNS]


def _one_line(cell: str) -> str:
    """Newlines become spaces so every record is one physical line: that keeps the
    torn-write check (last byte) sound and the file friendly to line tools."""
    return " ".join(cell.splitlines()) if ("\n" in cell or "\r" in cell) else cell


def check_header(csv_path: Path) -> tuple[bool, bool]:
    """(has_content, ends_with_newline) of the results CSV (``(False, True)`` when absent or
    empty); raises ResultsError when its header is not CSV_COLUMNS. Writes nothing."""
    try:
        size = csv_path.stat().st_size
    except FileNotFoundError:
        return False, True
    if size == 0:
        return False, True
    with open(csv_path, "rb") as handle:
        first = handle.readline()
        handle.seek(-1, os.SEEK_END)
        ends_with_newline = handle.read(1) == b"\n"
    header = next(csv.reader([first.decode("utf-8", errors="replace")]), [])
    if tuple(header) != CSV_COLUMNS:
        raise ResultsError(
            f"{csv_path} has a different header than this version's results schema; "
            "move it aside or choose another results_dir"
        )
    return True, ends_with_newline


def _append_bytes(csv_path: Path, payload: bytes) -> None:
    """One O_APPEND write (looped only if the OS returns a short write), then fsync."""
    fd = os.open(csv_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        torn_write("csv_write", lambda data: os.write(fd, data), payload)  # tests only
        written = os.write(fd, payload)
        while written < len(payload):  # never expected for regular files
            written += os.write(fd, payload[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


def _has_trial_row(csv_path: Path, cells: Sequence[str]) -> bool:
    """Whether the CSV already holds a row of the same study and trial as ``cells``."""
    s_idx, t_idx = CSV_COLUMNS.index("study_name"), CSV_COLUMNS.index("trial_number")
    key = (cells[s_idx], cells[t_idx])
    if not key[0] or not key[1]:
        return False
    with open(csv_path, newline="", encoding="utf-8", errors="replace") as handle:
        return any(len(r) == len(CSV_COLUMNS) and (r[s_idx], r[t_idx]) == key for r in csv.reader(handle))


def check_appendable(results_dir: Path) -> None:
    """Whether a run could append its row under ``results_dir``, checked without writing:
    the directory (or its nearest existing parent) is writable, and an existing CSV is
    writable and has this version's header. Raises ResultsError naming the fix."""
    csv_path = results_csv_path(results_dir)
    existing = Path(results_dir)
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "is not a directory" if not existing.is_dir() else "is not writable"
        raise ResultsError(f"results_dir={results_dir}: {existing} {what}; choose a writable results_dir")
    if csv_path.exists() and not os.access(csv_path, os.W_OK):
        raise ResultsError(
            f"the results CSV {csv_path} is not writable; fix its permissions or choose another results_dir"
        )
    try:
        with open(csv_path, "rb") as handle:
            complete_header = handle.readline().endswith(b"\n")  # else torn: the next append repairs it
    except FileNotFoundError:
        return
    if complete_header:
        check_header(csv_path)


def append_row(csv_path: Path, row: Mapping[str, object], *, once: bool = False) -> None:
    """Append one run's row to the results CSV, safely across processes.

    Writes the header when the file is absent or empty, refuses a file with a
    foreign header or a row with unknown keys (ResultsError, file untouched), and
    first drops a torn last line left by a killed writer (kept in ``<csv>.torn``).
    With ``once``, a sweep row is skipped when the file already has a row for the
    same ``study_name`` and ``trial_number`` (a trial finished again after a crash).
    """
    csv_path = Path(csv_path)
    cells = _row_cells(row)
    line = _csv_line(cells)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(csv_path) + ".lock", timeout=LOCK_TIMEOUT_S):
        if csv_path.exists():  # a torn row can neither stay corrupt nor duplicate its rewrite
            drop_torn_tail(csv_path, keep_torn=Path(str(csv_path) + ".torn"))
        has_content, _ = check_header(csv_path)
        if once and has_content and _has_trial_row(csv_path, cells):
            return
        payload = line if has_content else (_HEADER_LINE + line)
        _append_bytes(csv_path, payload.encode("utf-8"))


def write_rows(csv_path: str | os.PathLike[str], rows: Iterable[Mapping[str, object]]) -> None:
    """Write a whole results CSV atomically (header + rows, formatted as ``append_row`` does),
    e.g. when rebuilding it from a study."""
    lines = [_HEADER_LINE] + [_csv_line(_row_cells(row)) for row in rows]
    _atomic_write(csv_path, "".join(lines))


def read_rows(csv_path: str | os.PathLike[str]) -> pd.DataFrame:
    """The results CSV as a DataFrame: text columns keep '' for empty cells, integer
    columns are nullable Int64, flags nullable boolean, everything else float64
    (parsed exactly, so values round-trip)."""
    import pandas as pd

    with open(csv_path, newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle), [])
    dtypes = {column: COLUMN_DTYPES.get(column, "str") for column in header}
    na_values = {column: ["", "nan", "NaN"] for column, dtype in dtypes.items() if dtype != "str"}
    # pandas 3 parses floats exactly by default (and deprecates the option); 2.x needs it.
    exact = {"float_precision": "round_trip"} if int(pd.__version__.split(".")[0]) < 3 else {}
    return pd.read_csv(csv_path, dtype=dtypes, keep_default_na=False, na_values=na_values, **exact)


# ------------------------------------------------------------- run-directory files


def _atomic_write(path: str | os.PathLike[str], data: str) -> None:
    """Write to a temp file beside ``path``, fsync, then os.replace: all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(value: object) -> object:
    """numpy scalars/arrays and paths, which json cannot encode by itself."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def write_json(path: str | os.PathLike[str], obj: object) -> None:
    """Atomically write ``obj`` as indented JSON (NaN/Infinity as Python's json does)."""
    _atomic_write(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Atomically write ``text``."""
    _atomic_write(path, text)


def write_step_log(
    path: str | os.PathLike[str], rows: Sequence[Mapping[str, float]], *, empty_header: Sequence[str] = STEP_LOG_COLUMNS
) -> None:
    """Atomically write a per-step log (``steps.csv``, ``evals.csv``) as CSV.

    Columns follow the first row's key order (any keys first seen later are
    appended; missing cells are empty); an empty log gets ``empty_header`` only.
    """
    columns: list[str] = list(rows[0]) if rows else list(empty_header)
    for row in rows[1:]:
        columns.extend(key for key in row if key not in columns)
    lines = [_csv_line(columns)]
    lines.extend(_csv_line(format_cell(row.get(key)) for key in columns) for row in rows)
    _atomic_write(path, "".join(lines))
