"""Rebuild a results CSV from a study: one row per trial, from the trials' user attrs.

Columns: ``lora_sweep.results.CSV_COLUMNS`` when that module is importable (the project's
results schema; user attrs outside it are dropped so the file stays appendable by
``results.append_row``), otherwise the union of all user-attr keys after ``study_name``,
``trial_number``, ``state``. ``trial_number``, ``state`` and ``study_name`` come from the
trial itself; parameters fill same-named columns (``lora.r``, ``train.lr``, ...) that the
job did not report. Penalty records (see :mod:`lora_sweep.sweep.study`) are skipped. The
file is written to a temp file in the same directory and moved into place atomically.
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lora_sweep.sweep.study import ATTR_PENALTY_FOR, normalize_storage, open_storage

_BOOKKEEPING = ("study_name", "trial_number", "state")


def _schema() -> tuple[str, ...] | None:
    try:
        from lora_sweep.results import CSV_COLUMNS
    except ImportError:
        return None
    return tuple(CSV_COLUMNS)


def _cell(value: Any) -> str:
    try:
        from lora_sweep.results import format_cell
    except ImportError:
        format_cell = None
    if format_cell is not None:
        return str(format_cell(value))
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return str(value)


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """One dict per (non-penalty) trial: user attrs + params + bookkeeping, by number."""
    rows = []
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if ATTR_PENALTY_FOR in trial.user_attrs:
            continue
        row: dict[str, Any] = {}
        for key, value in trial.params.items():
            row[key] = value
        row.update(trial.user_attrs)
        row["study_name"] = study.study_name
        row["trial_number"] = trial.number
        row["state"] = trial.state.name
        rows.append(row)
    return rows


def export_csv(
    storage: str,
    study_name: str,
    csv_path: Path,
    columns: Sequence[str] | None = None,
) -> int:
    """Writes ``csv_path`` with one row per trial of the study.

    Args:
        storage: Optuna storage URL or journal file path.
        study_name: Study to export.
        csv_path: Output file (replaced atomically).
        columns: Explicit column order; default: the results schema or the attr union.

    Returns:
        The number of rows written.
    """
    import optuna

    study = optuna.load_study(study_name=study_name, storage=open_storage(normalize_storage(storage)))
    rows = trial_rows(study)
    if columns is None:
        columns = _schema()
    if columns is None:
        seen: dict[str, None] = dict.fromkeys(_BOOKKEEPING)
        for row in rows:
            seen.update(dict.fromkeys(row))
        columns = list(seen)
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=csv_path.name, suffix=".tmp", dir=csv_path.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(columns)
            for row in rows:
                writer.writerow(
                    [" ".join(_cell(row.get(c)).splitlines()) for c in columns]
                )
        os.replace(tmp, csv_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(rows)
