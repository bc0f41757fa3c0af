"""Rebuild a results CSV from a study: one row per finished trial, from its user attrs.

Rows follow the project's results schema (`lora_sweep.results.CSV_COLUMNS`; user attrs
outside it are dropped), so the file stays appendable by `results.append_row`. Exported are
the trials that count towards `n_trials`, the same ones whose jobs appended a row: penalty
records and stale trials (killed mid-run and re-queued under a new number) are not.
Parameters fill same-named columns the job did not report. The file is replaced atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_sweep.results import COLUMN_DOCS, write_rows
from lora_sweep.sweep.study import ATTR_PENALTY_FOR, ATTR_STALE, normalize_storage, open_storage

_FINISHED = ("COMPLETE", "PRUNED", "FAIL")


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """One results row per finished, counted trial, ordered by trial number."""
    rows = []
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        attrs = trial.user_attrs
        if trial.state.name not in _FINISHED or ATTR_PENALTY_FOR in attrs or attrs.get(ATTR_STALE):
            continue
        row = {key: value for key, value in {**trial.params, **attrs}.items() if key in COLUMN_DOCS}
        row.update(study_name=study.study_name, trial_number=trial.number, state=trial.state.name)
        rows.append(row)
    return rows


def export_csv(storage: str, study_name: str, csv_path: Path) -> int:
    """Write `csv_path` with one row per finished trial of the study; returns the row count."""
    import optuna

    study = optuna.load_study(study_name=study_name, storage=open_storage(normalize_storage(storage)))
    rows = trial_rows(study)
    write_rows(csv_path, rows)
    return len(rows)
