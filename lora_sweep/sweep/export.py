"""A study as table rows: one per finished trial, from its params and user attrs.

Exported are the trials that count towards ``n_trials``, the same ones whose jobs ran to the
end: penalty records, stale trials (killed mid-run and re-queued under a new number) and
interrupted ones (re-queued too) are not. What a row holds beyond its params is whatever the
job returned (its recorded result, and its user attrs over it); an app keeps only its own
columns (``columns``).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from lora_sweep.sweep.context import ATTR_JOB_RESULT, recorded
from lora_sweep.sweep.study import is_counted

_FINISHED = ("COMPLETE", "PRUNED", "FAIL")


def trial_rows(study: Any, columns: Collection[str] | None = None) -> list[dict[str, Any]]:
    """One row per finished, counted trial, ordered by trial number.

    Args:
        study: The Optuna study.
        columns: Keep only these keys (None: every param and user attr). ``study_name``,
            ``trial_number`` and ``state`` are always set.
    """
    rows = []
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if trial.state.name not in _FINISHED or not is_counted(trial):
            continue
        merged = {**recorded(trial), **trial.params, **trial.user_attrs}  # user attrs may hold less
        merged.pop(ATTR_JOB_RESULT, None)
        row = {key: value for key, value in merged.items() if columns is None or key in columns}
        row.update(study_name=study.study_name, trial_number=trial.number, state=trial.state.name)
        rows.append(row)
    return rows
