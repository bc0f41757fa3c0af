"""What lora_sweep plugs into its (app-agnostic) sweeper: ``hydra.sweeper.hooks``."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lora_sweep.results import CSV_COLUMNS, PAYLOAD_CSV_KEY, append_row
from lora_sweep.sweep.hooks import SweepHooks
from lora_sweep.sweep.study import is_counted

# The metrics a trial returns that can be a sweep's objective, with their directions.
OBJECTIVES: dict[str, str] = {
    "stability_index": "maximize",
    "quality": "maximize",
    "final_loss": "minimize",
    "eval_loss": "minimize",
    "best_eval_loss": "minimize",
    "eval_improvement": "maximize",
}
LEARNED_SHARE = 0.5
"""The summary's best trial learned at least this share of the largest held-out improvement
of any completed trial (see `LoraSweepHooks.best_trials`)."""


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _feasible(trial: Any) -> bool:
    return all(value <= 0 for value in (trial.constraints or {}).values())


def _completed(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if is_counted(t) and t.values is not None
    ]


def learner_bar(gains: Iterable[float | None], share: float = LEARNED_SHARE) -> float | None:
    """The held-out improvement a trial needs to count among the learners: `share` of the largest
    finite one in `gains` (the completed trials'); None (no bar) when none is positive."""
    finite = [g for g in gains if g is not None and math.isfinite(g)]
    top = max(finite, default=None)
    return share * top if top is not None and top > 0 else None


def learners(study: Any) -> list[Any]:
    """Completed, feasible trials whose held-out improvement clears `learner_bar` (all feasible
    ones when no trial reports one)."""
    completed = _completed(study)
    bar = learner_bar(_number(t.user_attrs.get("eval_improvement")) for t in completed)
    chosen = []
    for trial in completed:
        gain = _number(trial.user_attrs.get("eval_improvement"))
        if _feasible(trial) and (bar is None or (gain is not None and gain >= bar)):
            chosen.append(trial)
    return chosen


def _by_objective(study: Any, trials: list[Any]) -> Any:
    from optuna.study import StudyDirection

    sign = 1.0 if study.direction == StudyDirection.MAXIMIZE else -1.0
    return max(trials, key=lambda t: (sign * t.values[0], -t.number))


def _describe(study: Any, trial: Any) -> str:
    attrs = trial.user_attrs
    parts = [f"trial {trial.number}"]
    for key in ("stability_index", "eval_loss", "eval_improvement"):
        value = _number(attrs.get(key))
        if value is not None:
            parts.append(f"{key}={value:.4g}")
    return " ".join(parts)


class LoraSweepHooks(SweepHooks):
    """Objectives of a LoRA trial, the study beside the results, and the CSV row of a trial
    finished after its sweep died."""

    objectives = OBJECTIVES

    def storage_dir(self, app_cfg: Any) -> str | None:
        """The study lives beside the results CSV: ``<results_dir>/optuna_journal.log``."""
        try:
            results_dir = app_cfg.get("results_dir")
        except Exception:  # noqa: BLE001 - an interpolation that does not resolve outside a job
            return None
        return str(results_dir) if results_dir else None

    def best_trials(self, study: Any) -> list[Any] | None:
        """The best by the objective among the trials that learned: feasible (held-out loss at
        least `train.min_improvement` below the base model's) AND at least `LEARNED_SHARE` of the
        largest held-out improvement of the sweep. A stability objective alone rewards a run
        that barely moved; this keeps "best" to runs that learned about as much as the best
        learner. Multi-objective studies keep Optuna's Pareto front (None)."""
        if len(study.directions) > 1:
            return None
        chosen = learners(study)
        return [_by_objective(study, chosen)] if chosen else []

    def summary_lines(self, study: Any) -> list[str]:
        """How the best was chosen, and the lowest-held-out-loss trial when it is another one."""
        if len(study.directions) > 1:
            return []
        best = self.best_trials(study) or []
        lowest = [t for t in _completed(study) if _feasible(t) and _number(t.user_attrs.get("eval_loss")) is not None]
        lines = []
        if best:
            metric = study.metric_names[0] if study.metric_names else "objective"
            lines.append(
                f"best by {metric} among the trials that learned (held-out improvement >= "
                f"{LEARNED_SHARE:g} x the sweep's largest): {_describe(study, best[0])}"
            )
        if lowest:
            low = min(lowest, key=lambda t: (float(t.user_attrs["eval_loss"]), t.number))
            if not best or low.number != best[0].number:
                lines.append(f"lowest held-out loss: {_describe(study, low)}")
        return lines

    def on_recovered(self, recorded: Mapping[str, Any]) -> None:
        """Append the trial's results row unless its job wrote it before the sweep died (the
        job records the CSV path with its result)."""
        csv_path = recorded.get(PAYLOAD_CSV_KEY)
        if csv_path:
            append_row(Path(str(csv_path)), {k: recorded.get(k) for k in CSV_COLUMNS}, once=True)


HOOKS = LoraSweepHooks()
