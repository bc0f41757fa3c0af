"""StepPercentilePruner compares the value at this step, so falling curves can be pruned."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import create_trial

from lora_sweep.sweep.pruners import StepPercentilePruner

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study(direction: str, curves: list[dict[int, float]]) -> optuna.Study:
    study = optuna.create_study(direction=direction)
    for curve in curves:
        final = curve[max(curve)]
        study.add_trial(create_trial(value=final, params={"x": 0.5}, distributions={"x": FloatDistribution(0, 1)},
                                     intermediate_values=curve))
    return study


def _running(study: optuna.Study, curve: dict[int, float]) -> optuna.trial.FrozenTrial:
    trial = study.ask()
    for step, value in curve.items():
        trial.report(value, step)
    return study.get_trials(deepcopy=False)[-1]


# stability-like curves: 1.0 at step 1, then falling to their level
GOOD = [{1: 1.0, 10: 0.70, 20: 0.68}, {1: 1.0, 10: 0.66, 20: 0.65}, {1: 1.0, 10: 0.60, 20: 0.62}]


def test_prunes_a_falling_curve_that_median_pruner_keeps() -> None:
    study = _study("maximize", GOOD)
    bad = _running(study, {1: 1.0, 10: 0.40})
    assert StepPercentilePruner(n_startup_trials=3, n_warmup_steps=5).prune(study, bad)
    # Optuna's median pruner looks at the best value so far (1.0 at step 1) and keeps it
    assert not optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=5).prune(study, bad)


def test_keeps_a_curve_above_the_median_and_respects_warmup_and_startup() -> None:
    study = _study("maximize", GOOD)
    assert not StepPercentilePruner(n_startup_trials=3, n_warmup_steps=5).prune(study, _running(study, {1: 1.0, 10: 0.69}))
    early = _running(study, {1: 0.1})
    assert not StepPercentilePruner(n_startup_trials=3, n_warmup_steps=5).prune(study, early)
    assert not StepPercentilePruner(n_startup_trials=4, n_warmup_steps=5).prune(study, _running(study, {1: 1.0, 10: 0.1}))


def test_minimize_direction_and_percentile() -> None:
    study = _study("minimize", [{5: 1.0}, {5: 2.0}, {5: 3.0}, {5: 4.0}])
    assert StepPercentilePruner(n_startup_trials=1).prune(study, _running(study, {5: 2.6}))
    assert not StepPercentilePruner(n_startup_trials=1).prune(study, _running(study, {5: 2.4}))
    # keep only the top 25 %: 1.75 is the 25th percentile of the others
    assert StepPercentilePruner(percentile=25, n_startup_trials=1).prune(study, _running(study, {5: 2.0}))


def test_non_finite_value_is_pruned_and_bad_settings_refused() -> None:
    study = _study("maximize", GOOD)
    assert StepPercentilePruner(n_startup_trials=1).prune(study, _running(study, {10: float("nan")}))
    with pytest.raises(ValueError, match="percentile"):
        StepPercentilePruner(percentile=120)
