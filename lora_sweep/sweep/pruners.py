"""Pruners for intermediate values that are not learning curves.

Optuna's MedianPruner and PercentilePruner compare a trial's *best value so far* with the
other trials, which suits curves that improve with training. A run's stability index computed
on its first t steps starts at 1.0 (one step cannot spike) and falls as the run reveals
drawups and spikes, so its best value is always its first one and those pruners never prune.
`StepPercentilePruner` compares like with like: the trial's value at this step against the
completed trials' values at the same step, with two refinements (both on by default, both
generic):

* ``compare_final``: such curves fall over a run, and not all alike: a high learning rate
  looks stable early and shows its drawups late, while a slow, steady run is mid-field at
  step 10 and ends on top. Compared only at the same step, the steady run is pruned although
  it already beats what most completed trials *finished* with. So the threshold is the more
  lenient of the same-step percentile and the percentile of the completed trials' last
  reported values. For a curve that improves over a run (a falling loss, a rising accuracy)
  the same-step threshold is always the more lenient one, and nothing changes.
* ``count_pruned``: trials pruned earlier count as references too, as the worst value at the
  steps they never reached. Without them the references are survivors only, so the bar rises
  with every pruned trial and "keep the best 15 %" compounds into keeping far fewer.

Settings of the default sweep and how they were chosen: README ("Pruning") and
``benchmarks/bench_pruning.py``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from optuna.pruners import BasePruner
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from lora_sweep.sweep.study import ATTR_PENALTY_FOR


def _last_value(trial: FrozenTrial) -> float | None:
    """The value at the last reported step (the end of the trial's curve)."""
    if not trial.intermediate_values:
        return None
    return trial.intermediate_values[max(trial.intermediate_values)]


def _finite(values: Any) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


class StepPercentilePruner(BasePruner):
    """Prune when the value at the current step is outside the best `percentile` % of the
    reference trials' values at that step (and of their last values, with `compare_final`).

    Args:
        percentile: Kept share, 0-100 (50 = median: prune the worse half; 15: keep the best 15 %).
        n_startup_trials: No pruning until this many trials completed.
        n_warmup_steps: No pruning before this step.
        interval_steps: Check every this many steps after the warm-up.
        n_min_trials: Completed trials that must have reported this step.
        compare_final: Threshold = the more lenient of the same-step percentile and the
            percentile of the completed trials' last reported values: a trial already as good
            as the kept share of the completed trials ended up is not pruned.
        count_pruned: Pruned trials are references too: their value where they reported
            this step, else (and as a last value) the worst of the completed trials' values.
    """

    def __init__(
        self,
        percentile: float = 50.0,
        n_startup_trials: int = 5,
        n_warmup_steps: int = 0,
        interval_steps: int = 1,
        n_min_trials: int = 1,
        compare_final: bool = True,
        count_pruned: bool = True,
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
        self.compare_final = bool(compare_final)
        self.count_pruned = bool(count_pruned)

    def _threshold(self, values: list[float], maximize: bool) -> float:
        """The boundary of the kept share: the worst value a kept trial may have."""
        return float(np.percentile(values, 100.0 - self.percentile if maximize else self.percentile))

    def prune(self, study: Any, trial: Any) -> bool:
        step = trial.last_step
        if step is None or step < self.n_warmup_steps or (step - self.n_warmup_steps) % self.interval_steps:
            return False
        completed = [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if ATTR_PENALTY_FOR not in t.user_attrs  # penalty records carry no curve
        ]
        if len(completed) < self.n_startup_trials:
            return False
        others = _finite(t.intermediate_values.get(step) for t in completed)
        if len(others) < self.n_min_trials:
            return False
        value = trial.intermediate_values[step]
        if not math.isfinite(value):
            return True
        maximize = study.direction == StudyDirection.MAXIMIZE
        worst = min if maximize else max
        pruned: list[FrozenTrial] = []
        if self.count_pruned:
            pruned = [
                t for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)) if t.number != trial.number
            ]
        at_step = [t.intermediate_values.get(step) for t in pruned]
        threshold = self._threshold(
            others + [v if v is not None and math.isfinite(v) else worst(others) for v in at_step], maximize
        )
        if self.compare_final:
            finals = _finite(map(_last_value, completed))
            if finals:
                final = self._threshold(finals + [worst(finals)] * len(pruned), maximize)
                threshold = worst(threshold, final)  # the more lenient of the two
        return value < threshold if maximize else value > threshold
