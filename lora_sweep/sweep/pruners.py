"""Pruners for intermediate values that are not learning curves.

Optuna's MedianPruner and PercentilePruner compare a trial's *best value so far* with the
other trials, which suits curves that improve with training. A run's stability index computed
on its first t steps starts at 1.0 (one step cannot spike) and falls as the run reveals
drawups and spikes, so its best value is always its first one and those pruners never prune.
`StepPercentilePruner` compares like with like: the trial's value at this step against the
completed trials' values at the same step.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from optuna.pruners import BasePruner
from optuna.study import StudyDirection
from optuna.trial import TrialState

from lora_sweep.sweep.study import ATTR_PENALTY_FOR


class StepPercentilePruner(BasePruner):
    """Prune when the value at the current step is outside the top `percentile` % of the completed
    trials' values at that step.

    Args:
        percentile: Kept share, 0-100 (50 = median: prune the worse half).
        n_startup_trials: No pruning until this many trials completed.
        n_warmup_steps: No pruning before this step.
        interval_steps: Check every this many steps after the warm-up.
        n_min_trials: Completed trials that must have reported this step.
    """

    def __init__(
        self,
        percentile: float = 50.0,
        n_startup_trials: int = 5,
        n_warmup_steps: int = 0,
        interval_steps: int = 1,
        n_min_trials: int = 1,
    ) -> None:
        if not 0.0 <= percentile <= 100.0:
            raise ValueError(f"percentile must be between 0 and 100, got {percentile}")
        if n_startup_trials < 0 or n_warmup_steps < 0 or interval_steps < 1 or n_min_trials < 1:
            raise ValueError(
                "need n_startup_trials >= 0, n_warmup_steps >= 0, interval_steps >= 1 and n_min_trials >= 1"
            )
        self.percentile = percentile
        self.n_startup_trials = n_startup_trials
        self.n_warmup_steps = n_warmup_steps
        self.interval_steps = interval_steps
        self.n_min_trials = n_min_trials

    def prune(self, study: Any, trial: Any) -> bool:
        step = trial.last_step
        if step is None or step < self.n_warmup_steps or (step - self.n_warmup_steps) % self.interval_steps:
            return False
        completed = [
            t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if ATTR_PENALTY_FOR not in t.user_attrs  # penalty records carry no curve
        ]
        if len(completed) < self.n_startup_trials:
            return False
        others = [t.intermediate_values[step] for t in completed if step in t.intermediate_values]
        others = [v for v in others if math.isfinite(v)]
        if len(others) < self.n_min_trials:
            return False
        value = trial.intermediate_values[step]
        if not math.isfinite(value):
            return True
        if study.direction == StudyDirection.MAXIMIZE:
            return value < float(np.percentile(others, 100.0 - self.percentile))
        return value > float(np.percentile(others, self.percentile))
