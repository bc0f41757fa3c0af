"""Tidy pandas views of a sweep's results, for notebooks and scripts.

A results directory (``results_dir`` of a run or sweep) holds the results CSV
(``lora_tuning_results.csv``, one row per run), the Optuna study (by default the
journal file ``optuna_journal.log``) and one run directory per trial
(``sweeps/<study>/<trial number>/`` with ``steps.csv``). This module turns them into
DataFrames and never plots:

* :func:`load_trials` - one row per trial, flat columns: ``trial_number``, ``state``,
  ``status``, ``reason``, the parameters (``lora.r``, ``lora.alpha``, ``train.lr``,
  ``data.max_length``, ...), every metric of the CSV schema, ``run_dir``; with the study
  also ``feasible``, ``value`` (objective) and study-only parameters
  (``lora.alpha_per_r``).
* :func:`load_curves` - per-step curves in long form (``trial_number``, ``state``,
  ``status``, ``step``, ``loss``, ``grad_norm``, ``lr``, ...); :func:`intermediate_values`
  - the objective reported per step, as the pruner and the dashboard see it.
* :func:`by_state`, :func:`best_trials`, :func:`pareto_front`, :func:`varied_params`.
* :func:`param_importances` - Optuna's own importance evaluators on any metric.
* :func:`load_samples`, :func:`compare_answers` - the sample prompts' answers of each trial
  and of the base model (``samples.jsonl``), the base model against the best trial.

Penalty records (infeasible stand-ins the sweeper adds for failed configurations, user
attr ``penalty_for_trial``) are never trials here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from lora_sweep.results import (
    COLUMN_DTYPES,
    CSV_COLUMNS,
    RESULTS_FILENAME,
    STEP_LOG_COLUMNS,
    read_rows,
)
from lora_sweep.sweep.context import recorded
from lora_sweep.sweep.study import ATTR_PENALTY_FOR, JOURNAL_NAME, normalize_storage, open_storage
from lora_sweep.sweep_hooks import LEARNED_SHARE, learner_bar

if TYPE_CHECKING:
    import optuna

__all__ = [
    "DEFAULT_STUDY",
    "METRIC_DIRECTIONS",
    "STATES",
    "NotEnoughTrialsError",
    "best_trials",
    "by_state",
    "compare_answers",
    "intermediate_values",
    "load_curves",
    "load_samples",
    "load_study",
    "load_trials",
    "param_importances",
    "pareto_front",
    "trials_from_csv",
    "trials_from_study",
    "varied_params",
]

DEFAULT_STUDY = "lora_sweep"
"""Study name of the default sweep (``hydra.sweeper.study_name``)."""

STATES: tuple[str, ...] = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")
"""Optuna trial states as they appear in the ``state`` column."""

METRIC_DIRECTIONS: dict[str, str] = {
    "stability_index": "maximize",
    "quality": "maximize",
    "improvement": "maximize",
    "tokens_per_s": "maximize",
    "final_loss": "minimize",
    "avg_loss": "minimize",
    "loss_slope": "minimize",
    "drawup": "minimize",
    "spike_rate": "minimize",
    "grad_volatility": "minimize",
    "duration_s": "minimize",
    "peak_mem_mb": "minimize",
    "eval_loss": "minimize",
    "best_eval_loss": "minimize",
    "eval_improvement": "maximize",
    "generalization_gap": "minimize",
}
"""Which way is better for the metrics the helpers rank by."""

_FIRST = ("trial_number", "state", "status", "reason")
_INTERNAL_ATTRS = frozenset({"job_result"})  # the job's raw return value, kept for recovery
_CONFIG_PREFIXES = ("model.", "data.", "lora.", "train.")


class NotEnoughTrialsError(ValueError):
    """Too few usable trials for the requested analysis (e.g. parameter importances)."""


# ------------------------------------------------------------------------- loading


def _storage_for(results_dir: str | os.PathLike[str], storage: str | None) -> str:
    if storage is not None:
        return normalize_storage(storage)
    return normalize_storage(str(Path(results_dir) / JOURNAL_NAME))


def _storage_exists(storage: str) -> bool:
    if storage.startswith("sqlite:///"):
        return Path(storage[len("sqlite:///") :]).is_file()
    if "://" in storage:
        return True  # a database server: let Optuna say whether it is there
    return Path(storage).is_file()


def load_study(
    results_dir: str | os.PathLike[str] = "results",
    study_name: str = DEFAULT_STUDY,
    *,
    storage: str | None = None,
) -> optuna.Study:
    """Loads a sweep's Optuna study.

    Args:
        results_dir: The sweep's ``results_dir``; its ``optuna_journal.log`` is the storage.
        study_name: Name of the study (``hydra.sweeper.study_name``).
        storage: Explicit storage URL or journal path (``hydra.sweeper.storage``); overrides
            ``results_dir``.

    Returns:
        The study (reading it does not modify it).

    Raises:
        FileNotFoundError: The journal or SQLite file does not exist.
        KeyError: The storage has no study of that name.
    """
    import optuna

    resolved = _storage_for(results_dir, storage)
    if not _storage_exists(resolved):
        raise FileNotFoundError(f"no Optuna storage at {resolved}; run a sweep first (python -m lora_sweep -m)")
    backend = open_storage(resolved)
    names = [s.study_name for s in optuna.get_all_study_summaries(backend, include_best_trial=False)]
    if study_name not in names:
        raise KeyError(f"study {study_name!r} not in {resolved}; studies there: {names}")
    return optuna.load_study(study_name=study_name, storage=backend)


def _coerce(frame: pd.DataFrame) -> pd.DataFrame:
    """Sets the results schema's dtypes on known columns (as ``read_rows`` does)."""
    for column in frame.columns:
        dtype = COLUMN_DTYPES.get(column, "float64" if column in ("value", "constraint") else None)
        if dtype == "str":
            frame[column] = frame[column].map(_to_text).astype("str")
        elif dtype == "Int64":
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("Int64")
        elif dtype == "boolean":
            frame[column] = frame[column].map(_to_bool).astype("boolean")
        elif dtype == "float64":
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    return frame


def _to_text(value: Any) -> str:
    """A user attribute as the CSV writes it: None empty, a list comma-joined."""
    if value is None or value is pd.NA:
        return ""
    return ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def _to_bool(value: Any) -> Any:
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return pd.NA


def _order(frame: pd.DataFrame) -> pd.DataFrame:
    first = [c for c in _FIRST if c in frame.columns]
    schema = [c for c in CSV_COLUMNS if c in frame.columns and c not in first]
    rest = [c for c in frame.columns if c not in first and c not in schema]
    frame = frame[first + schema + rest]
    if "trial_number" in frame.columns:
        frame = frame.sort_values("trial_number", kind="stable")
    return frame.reset_index(drop=True)


def trials_from_study(study: optuna.Study) -> pd.DataFrame:
    """One row per trial of a study (penalty records excluded).

    Args:
        study: A sweep's study (see :func:`load_study`).

    Returns:
        Columns ``trial_number``, ``state``, ``status``, ``reason``, every parameter, every
        user attribute (the job's metrics, run directory, worker, overrides), every config
        value of the job's recorded result, ``value`` (first objective;
        NaN unless COMPLETE) and ``values_<objective>`` for multi-objective studies,
        ``constraint`` (max over the trial's constraints) and ``feasible`` (all constraints
        <= 0; NA without constraints), ``datetime_start``, ``datetime_complete``.
        Known schema columns get the results CSV's dtypes.
    """
    objective = study.user_attrs.get("sweep.objective") or {}
    names = list(objective) if len(objective) == len(study.directions) else []
    rows = []
    for trial in study.get_trials(deepcopy=False):
        if ATTR_PENALTY_FOR in trial.user_attrs:
            continue
        row: dict[str, Any] = dict(trial.params)
        # the config values every trial shares are in the recorded result, not in user attrs
        row.update((k, v) for k, v in recorded(trial).items() if k.startswith(_CONFIG_PREFIXES))
        row.update((k, v) for k, v in trial.user_attrs.items() if k not in _INTERNAL_ATTRS)
        row["trial_number"] = trial.number
        row["state"] = trial.state.name
        values = trial.values if trial.values is not None else [math.nan] * len(study.directions)
        row["value"] = values[0]
        if len(values) > 1:
            for i, v in enumerate(values):
                row[f"values_{names[i] if names else i}"] = v
        constraints = list(trial.constraints.values())
        if constraints:
            row["constraint"] = float(max(constraints))
            row["feasible"] = bool(all(c <= 0.0 for c in constraints))
        else:
            row["constraint"] = math.nan
            row["feasible"] = pd.NA
        row["datetime_start"] = trial.datetime_start
        row["datetime_complete"] = trial.datetime_complete
        rows.append(row)
    frame = pd.DataFrame(rows, columns=None if rows else list(_FIRST))
    if "study_name" not in frame.columns or frame.empty:
        frame["study_name"] = study.study_name
    frame = _coerce(frame)
    if "feasible" in frame.columns:
        frame["feasible"] = frame["feasible"].astype("boolean")
    for column in ("status", "reason"):
        if column not in frame.columns:
            frame[column] = ""
    return _order(frame)


def trials_from_csv(csv_path: str | os.PathLike[str], study_name: str | None = DEFAULT_STUDY) -> pd.DataFrame:
    """One row per trial from a results CSV.

    Args:
        csv_path: The results CSV (``<results_dir>/lora_tuning_results.csv``).
        study_name: Keep only this study's rows; ``None`` keeps every row, single runs
            (no trial number) included.

    Returns:
        The CSV's columns with ``read_rows`` dtypes, trial rows first by trial number; when a
        trial number appears twice, the last row written wins.
    """
    frame = read_rows(csv_path)
    if study_name is not None:
        frame = frame[(frame["study_name"] == study_name) & frame["trial_number"].notna()]
        frame = frame.drop_duplicates("trial_number", keep="last")
    return _order(frame)


def load_trials(
    results_dir: str | os.PathLike[str] = "results",
    study_name: str = DEFAULT_STUDY,
    *,
    source: str = "auto",
    storage: str | None = None,
) -> pd.DataFrame:
    """One row per trial of a sweep, from its CSV, its study, or both.

    Args:
        results_dir: The sweep's ``results_dir``.
        study_name: The study (``hydra.sweeper.study_name``).
        source: ``"csv"`` (the results CSV only), ``"study"`` (the Optuna storage only) or
            ``"auto"`` (both when present: CSV values with the study's state - the
            authority, e.g. for trials still RUNNING - plus study-only columns such as
            ``feasible``, ``value`` and ``lora.alpha_per_r``, and trials missing from the
            CSV; CSV rows of trials the study does not have are dropped; either one alone
            when the other is absent).
        storage: Explicit storage (``hydra.sweeper.storage``), instead of the journal in
            ``results_dir``.

    Returns:
        A DataFrame sorted by ``trial_number``; see :func:`trials_from_study` and
        :func:`trials_from_csv` for the columns. When the study is not read, ``feasible``
        is the CSV's ``learned`` flag (the sweep's default constraint).

    Raises:
        FileNotFoundError: Neither the CSV nor the storage exists (or the one asked for).
        ValueError: Unknown ``source``.
    """
    if source not in ("auto", "csv", "study"):
        raise ValueError(f"source must be 'auto', 'csv' or 'study', got {source!r}")
    csv_path = Path(results_dir) / RESULTS_FILENAME
    resolved = _storage_for(results_dir, storage)
    has_csv = csv_path.is_file()
    has_study = _storage_exists(resolved)
    if source == "csv" or (source == "auto" and not has_study):
        if not has_csv:
            raise FileNotFoundError(f"no results CSV at {csv_path}; run a sweep first (python -m lora_sweep -m)")
        frame = trials_from_csv(csv_path, study_name)
        frame["feasible"] = frame["learned"].astype("boolean")
        return frame
    from_study = trials_from_study(load_study(results_dir, study_name, storage=storage))
    if source == "study" or not has_csv:
        return from_study
    from_csv = trials_from_csv(csv_path, study_name)
    return _merge(from_csv, from_study)


def _merge(from_csv: pd.DataFrame, from_study: pd.DataFrame) -> pd.DataFrame:
    """CSV rows (typed as written) + study-only columns + trials only in the study."""
    study_idx = from_study.set_index("trial_number")
    csv_idx = from_csv.set_index("trial_number")
    csv_idx = csv_idx[csv_idx.index.isin(study_idx.index)]
    extra = [c for c in study_idx.columns if c not in csv_idx.columns]
    merged = csv_idx.join(study_idx[extra], how="left")
    merged["state"] = study_idx.loc[merged.index, "state"]
    missing = study_idx[~study_idx.index.isin(merged.index)]
    if len(missing):
        merged = pd.concat([merged, missing[[c for c in merged.columns if c in missing.columns]]])
    return _order(merged.reset_index())


# --------------------------------------------------------------------------- curves


def _run_dir(row: pd.Series, results_dir: Path | None, study_name: str, *, marker: str = "steps.csv") -> Path | None:
    """The row's run directory holding `marker`: where it was recorded, else (moved results) its
    trial's directory under `results_dir`."""
    recorded = row.get("run_dir")
    if isinstance(recorded, str) and recorded and (Path(recorded) / marker).is_file():
        return Path(recorded)
    number = row.get("trial_number")
    if results_dir is not None and number is not None and not pd.isna(number):
        study = row.get("study_name") or study_name
        candidate = results_dir / "sweeps" / str(study) / str(int(number))
        if (candidate / marker).is_file():
            return candidate
    return None


def _with_evals(steps: pd.DataFrame, evals_path: Path) -> pd.DataFrame:
    """The step log with an ``eval_loss`` column from the run's ``evals.csv`` (if any)."""
    evals = pd.read_csv(evals_path) if evals_path.is_file() else pd.DataFrame(columns=["step", "loss"])
    evals = evals[["step", "loss"]].rename(columns={"loss": "eval_loss"})
    return steps.merge(evals, on="step", how="outer")


def load_curves(
    trials: pd.DataFrame,
    *,
    results_dir: str | os.PathLike[str] | None = None,
    study_name: str = DEFAULT_STUDY,
) -> pd.DataFrame:
    """Per-step curves of the given trials, in long form.

    Each trial's ``steps.csv`` is read from its ``run_dir``; when that path no longer
    exists (a moved results directory) ``<results_dir>/sweeps/<study>/<trial_number>`` is
    tried. Trials without a step log (failed before the first step) contribute no rows.

    Args:
        trials: Rows of :func:`load_trials` (any subset).
        results_dir: Where to look for run directories that moved.
        study_name: Study name used for that fallback when a row has none.

    Returns:
        Columns ``trial_number``, ``state``, ``status`` followed by the step log's columns
        (``step``, ``loss``, ``grad_norm``, ``lr``, ``tokens``, ``real_tokens``,
        ``elapsed_s``) and ``eval_loss``, the held-out loss at the steps it was measured
        (``evals.csv``; NaN elsewhere; a row at step 0 holds the base model's, with NaN
        training columns), sorted by trial and step. Non-finite losses (a diverged step) are
        kept as NaN/inf.
    """
    base = Path(results_dir) if results_dir is not None else None
    frames = []
    for _, row in trials.iterrows():
        run_dir = _run_dir(row, base, study_name)
        if run_dir is None:
            continue
        steps = pd.read_csv(run_dir / "steps.csv")
        if steps.empty:
            continue
        steps = _with_evals(steps, run_dir / "evals.csv")
        steps.insert(0, "status", row.get("status", ""))
        steps.insert(0, "state", row.get("state", ""))
        steps.insert(0, "trial_number", row.get("trial_number"))
        frames.append(steps)
    columns = ["trial_number", "state", "status", *STEP_LOG_COLUMNS, "eval_loss"]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype="float64") for c in columns})
    curves = pd.concat(frames, ignore_index=True)
    curves["trial_number"] = curves["trial_number"].astype("Int64")
    for column in ("loss", "grad_norm", "lr", "elapsed_s", "eval_loss"):
        if column in curves.columns:
            curves[column] = pd.to_numeric(curves[column], errors="coerce").astype("float64")
    return curves.sort_values(["trial_number", "step"], kind="stable").reset_index(drop=True)


def intermediate_values(study: optuna.Study) -> pd.DataFrame:
    """The objective each trial reported per step (what the pruner and the dashboard see).

    Args:
        study: A sweep's study.

    Returns:
        Long form: ``trial_number``, ``state``, ``step``, ``value``; penalty records excluded.
    """
    rows = [
        {"trial_number": t.number, "state": t.state.name, "step": step, "value": value}
        for t in study.get_trials(deepcopy=False)
        if ATTR_PENALTY_FOR not in t.user_attrs
        for step, value in sorted(t.intermediate_values.items())
    ]
    frame = pd.DataFrame(rows, columns=["trial_number", "state", "step", "value"])
    return frame.astype({"trial_number": "int64", "step": "int64", "value": "float64"})


# -------------------------------------------------------------------------- filters


def by_state(trials: pd.DataFrame, *states: str) -> pd.DataFrame:
    """Rows whose ``state`` is one of ``states`` (case-insensitive, e.g. ``"complete"``).

    Args:
        trials: Rows of :func:`load_trials`.
        *states: Optuna state names (see :data:`STATES`).

    Returns:
        The matching rows, index reset.

    Raises:
        ValueError: No state given, or an unknown state name.
    """
    if not states:
        raise ValueError(f"give at least one state of {STATES}")
    wanted = {s.upper() for s in states}
    unknown = wanted - set(STATES)
    if unknown:
        raise ValueError(f"unknown state(s) {sorted(unknown)}; states are {STATES}")
    return trials[trials["state"].isin(wanted)].reset_index(drop=True)


def _direction(metric: str, direction: str | None) -> str:
    direction = direction or METRIC_DIRECTIONS.get(metric)
    if direction not in ("maximize", "minimize"):
        raise ValueError(f"say direction='maximize' or 'minimize' for metric {metric!r}")
    return direction


def _feasible_mask(trials: pd.DataFrame) -> pd.Series:
    if "feasible" in trials.columns and trials["feasible"].notna().any():
        flags = trials["feasible"]
    elif "learned" in trials.columns:
        flags = trials["learned"]
    else:
        return pd.Series(True, index=trials.index)
    return flags.astype("boolean").fillna(False).astype(bool)


def best_trials(
    trials: pd.DataFrame,
    n: int = 5,
    *,
    metric: str = "stability_index",
    direction: str | None = None,
    feasible_only: bool = True,
    learned_share: float | None = LEARNED_SHARE,
) -> pd.DataFrame:
    """The best COMPLETE trials by a metric, chosen as the sweep's summary chooses its best.

    Args:
        trials: Rows of :func:`load_trials`.
        n: How many to return (fewer when fewer qualify).
        metric: Column to rank by.
        direction: ``"maximize"`` or ``"minimize"``; default from :data:`METRIC_DIRECTIONS`.
        feasible_only: Drop infeasible trials (``feasible`` from the study's constraints, or
            the CSV's ``learned`` flag) and, with ``learned_share``, those whose
            ``eval_improvement`` is below that share of the largest of the COMPLETE trials.
        learned_share: See ``feasible_only``; None ranks every feasible trial.

    Returns:
        Up to ``n`` rows, best first, index reset.
    """
    ascending = _direction(metric, direction) == "minimize"
    pool = trials[trials["state"] == "COMPLETE"]
    if feasible_only:
        pool = pool[_feasible_mask(pool)]
        if learned_share is not None and "eval_improvement" in trials.columns:
            gains = pd.to_numeric(trials.loc[trials["state"] == "COMPLETE", "eval_improvement"], errors="coerce")
            bar = learner_bar(gains.tolist(), share=learned_share)
            if bar is not None:
                pool = pool[pd.to_numeric(pool["eval_improvement"], errors="coerce") >= bar]
    pool = pool[np.isfinite(pool[metric].astype("float64"))]
    return pool.sort_values(metric, ascending=ascending, kind="stable").head(n).reset_index(drop=True)


def pareto_front(
    trials: pd.DataFrame,
    *,
    x: str = "final_loss",
    y: str = "stability_index",
    x_direction: str | None = None,
    y_direction: str | None = None,
    states: Sequence[str] = ("COMPLETE",),
    feasible_only: bool = False,
) -> pd.DataFrame:
    """Trials no other trial beats on both ``x`` and ``y`` (default: lower final loss,
    higher stability_index).

    A trial is dominated when another is at least as good on both metrics and strictly
    better on one. Trials with a non-finite value on either metric are ignored.

    Args:
        trials: Rows of :func:`load_trials`.
        x: First metric (default ``final_loss``, minimized).
        y: Second metric (default ``stability_index``, maximized).
        x_direction: Direction of ``x``; default from :data:`METRIC_DIRECTIONS`.
        y_direction: Direction of ``y``; default from :data:`METRIC_DIRECTIONS`.
        states: Trial states that compete (pruned trials' metrics cover fewer steps).
        feasible_only: Only feasible trials compete.

    Returns:
        The non-dominated rows sorted by ``x`` (best first), index reset.
    """
    sx = 1.0 if _direction(x, x_direction) == "minimize" else -1.0
    sy = 1.0 if _direction(y, y_direction) == "minimize" else -1.0
    pool = by_state(trials, *states) if states else trials
    if feasible_only:
        pool = pool[_feasible_mask(pool)]
    xs = pool[x].astype("float64").to_numpy() * sx
    ys = pool[y].astype("float64").to_numpy() * sy
    finite = np.isfinite(xs) & np.isfinite(ys)
    pool, xs, ys = pool[finite], xs[finite], ys[finite]
    keep = [not np.any((xs <= xs[i]) & (ys <= ys[i]) & ((xs < xs[i]) | (ys < ys[i]))) for i in range(len(pool))]
    front = pool[np.asarray(keep, dtype=bool)]
    return front.sort_values(x, ascending=sx > 0, kind="stable").reset_index(drop=True)


def varied_params(trials: pd.DataFrame, study: optuna.Study | None = None) -> list[str]:
    """The hyperparameters that take more than one value across the trials.

    Args:
        trials: Rows of :func:`load_trials`.
        study: When given, its searched parameter names are candidates too (e.g.
            ``lora.alpha_per_r``), besides the config columns ``lora.*``, ``train.*``,
            ``data.*``, ``model.*``.

    Returns:
        Column names in table order.
    """
    names: list[str] = [c for c in trials.columns if c.startswith(_CONFIG_PREFIXES)]
    if study is not None:
        searched = {p for t in study.get_trials(deepcopy=False) for p in t.params}
        names += [c for c in trials.columns if c in searched and c not in names]
    return [c for c in names if trials[c].dropna().nunique() > 1]


# ---------------------------------------------------------------------- importances


def param_importances(
    study: optuna.Study,
    *,
    target: str = "stability_index",
    direction: str | None = None,
    evaluator: Any = None,
    params: Iterable[str] | None = None,
    include_failed: bool = True,
    min_trials: int = 4,
) -> pd.Series:
    """Parameter importances for a metric, from ``optuna.importance.get_param_importances``.

    The trials evaluated are the study's COMPLETE trials (penalty records excluded) and,
    with ``include_failed``, FAIL trials that recorded the metric (a diverged run has
    stability_index 0 - exactly what makes the learning rate matter). Pruned trials are left
    out: their metrics cover only the steps they ran.

    Args:
        study: A sweep's study (see :func:`load_study`).
        target: Metric (a trial user attribute, e.g. ``stability_index``, ``final_loss``).
        direction: Which way is better; default from :data:`METRIC_DIRECTIONS`. Optuna's
            default evaluator (PED-ANOVA) assumes lower is better, so a maximized metric is
            negated for it.
        evaluator: Any ``optuna.importance`` evaluator, e.g.
            ``optuna.importance.PedAnovaImportanceEvaluator(target_quantile=0.2)`` (fANOVA and
            mean-decrease-impurity need scikit-learn); default PED-ANOVA.
        params: Parameters to assess; default all searched ones.
        include_failed: Count FAIL trials that recorded ``target``.
        min_trials: Fewest usable trials to compute anything from.

    Returns:
        Importance per parameter (sums to 1), most important first, named ``importance``.

    Raises:
        NotEnoughTrialsError: Fewer than ``min_trials`` usable trials, or no parameter that
            took two values (Optuna itself would silently return equal importances).
    """
    import optuna
    from optuna.trial import TrialState

    sign = -1.0 if _direction(target, direction) == "maximize" else 1.0
    usable = []
    for trial in study.get_trials(deepcopy=False):
        if ATTR_PENALTY_FOR in trial.user_attrs or not trial.params:
            continue
        if trial.state == TrialState.COMPLETE or (include_failed and trial.state == TrialState.FAIL):
            value = _finite(trial.user_attrs.get(target))
            if value is None:
                continue
            usable.append(
                optuna.trial.create_trial(
                    params=trial.params,
                    distributions=trial.distributions,
                    value=sign * value,
                    user_attrs={target: value},
                )
            )
    if len(usable) < min_trials:
        raise NotEnoughTrialsError(
            f"parameter importances need at least {min_trials} finished trials with "
            f"{target!r}; study {study.study_name!r} has {len(usable)}. Run more trials "
            "(python -m lora_sweep -m hydra.sweeper.n_trials=N continues the study)."
        )
    wanted = list(params) if params is not None else None
    names = wanted or sorted({p for t in usable for p in t.params})
    varied = [p for p in names if len({repr(t.params.get(p)) for t in usable if p in t.params}) > 1]
    if not varied:
        raise NotEnoughTrialsError(
            f"no parameter took two different values over the {len(usable)} usable trials; importances are undefined"
        )
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created" line
    try:
        proxy = optuna.create_study(direction="minimize")
    finally:
        optuna.logging.set_verbosity(verbosity)
    proxy.add_trials(usable)
    scores = optuna.importance.get_param_importances(proxy, evaluator=evaluator, params=wanted)
    series = pd.Series(scores, name="importance", dtype="float64")
    series.index.name = "param"
    return series.sort_values(ascending=False, kind="stable")


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


# -------------------------------------------------------------------------- samples


def _samples_path(row: pd.Series, results_dir: Path, study_name: str) -> Path | None:
    from lora_sweep.samples import SAMPLES_FILENAME

    run_dir = _run_dir(row, results_dir, study_name, marker=SAMPLES_FILENAME)
    return run_dir / SAMPLES_FILENAME if run_dir is not None else None


def load_samples(
    results_dir: str | os.PathLike[str] = "results",
    trial: int | None = None,
    *,
    study_name: str = DEFAULT_STUDY,
    trials: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The sample answers of a sweep's trials (each run directory's ``samples.jsonl``).

    Args:
        results_dir: The sweep's ``results_dir``.
        trial: One trial number; None: every trial that has samples (COMPLETE ones).
        study_name: The study (``hydra.sweeper.study_name``).
        trials: Rows of :func:`load_trials` to look in (default: all of ``results_dir``).

    Returns:
        Long form: ``trial_number`` and the fields of ``lora_sweep.samples.SAMPLE_FIELDS``
        (``index``, ``prompt``, ``reference``, ``answer``, ``tokens``, ``finished``,
        ``base_answer``, ``base_tokens``), by trial and prompt.
    """
    from lora_sweep.samples import SAMPLE_FIELDS, read_samples

    base = Path(results_dir)
    rows = trials if trials is not None else load_trials(base, study_name)
    if trial is not None:
        rows = rows[rows["trial_number"] == trial]
    records = []
    for _, row in rows.iterrows():
        path = _samples_path(row, base, study_name)
        if path is not None:
            records += [{"trial_number": row["trial_number"], **line} for line in read_samples(path)]
    frame = pd.DataFrame(records, columns=["trial_number", *SAMPLE_FIELDS])
    return frame.astype({"trial_number": "Int64"}).sort_values(["trial_number", "index"]).reset_index(drop=True)


def compare_answers(
    results_dir: str | os.PathLike[str] = "results",
    trial: int | None = None,
    *,
    study_name: str = DEFAULT_STUDY,
    metric: str = "stability_index",
) -> pd.DataFrame:
    """The base model's answers and one trial's, side by side, on the sweep's sample prompts.

    Args:
        results_dir: The sweep's ``results_dir``.
        trial: The trial to show; None: the best by ``metric`` (:func:`best_trials`, as the
            sweep's summary chooses) that has samples (else the best of any that has them).
        study_name: The study (``hydra.sweeper.study_name``).
        metric: The ranking metric when ``trial`` is None.

    Returns:
        One row per prompt: ``trial_number``, ``prompt``, ``reference``, ``base_answer``,
        ``answer`` (the trial's).

    Raises:
        NotEnoughTrialsError: No trial (or not the one asked for) has samples.
    """
    trials = load_trials(results_dir, study_name)
    samples = load_samples(results_dir, trial, study_name=study_name, trials=trials)
    if samples.empty:
        which = f"trial {trial} has" if trial is not None else "no trial has"
        raise NotEnoughTrialsError(f"{which} no samples in {results_dir} (train.sample_prompts=0, or none completed)")
    if trial is None:  # the sweep's best that has samples, else the best of any that has them
        with_samples = set(samples["trial_number"])
        for feasible_only in (True, False):
            ranked = best_trials(trials, n=len(trials), metric=metric, feasible_only=feasible_only)
            numbers = [n for n in ranked["trial_number"] if n in with_samples]
            if numbers:
                trial = int(numbers[0])
                break
        else:
            trial = int(samples["trial_number"].iloc[0])
    chosen = samples[samples["trial_number"] == trial]
    return chosen[["trial_number", "prompt", "reference", "base_answer", "answer"]].reset_index(drop=True)
