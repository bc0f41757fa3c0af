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
        study.add_trial(
            create_trial(
                value=final, params={"x": 0.5}, distributions={"x": FloatDistribution(0, 1)}, intermediate_values=curve
            )
        )
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
    assert not StepPercentilePruner(n_startup_trials=3, n_warmup_steps=5).prune(
        study, _running(study, {1: 1.0, 10: 0.69})
    )
    early = _running(study, {1: 0.1})
    assert not StepPercentilePruner(n_startup_trials=3, n_warmup_steps=5).prune(study, early)
    assert not StepPercentilePruner(n_startup_trials=4, n_warmup_steps=5).prune(
        study, _running(study, {1: 1.0, 10: 0.1})
    )


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


# early-stable runs that fall later (a high learning rate shows its drawups late)
FALLING = [{10: 0.70, 60: 0.55}, {10: 0.68, 60: 0.54}, {10: 0.66, 60: 0.56}]


def test_a_steady_trial_already_above_the_others_final_values_is_kept() -> None:
    study = _study("maximize", FALLING)
    steady = _running(study, {10: 0.60})  # below every value at step 10, above every final value
    assert StepPercentilePruner(n_startup_trials=3).prune(study, steady) is False
    assert StepPercentilePruner(n_startup_trials=3, compare_final=False).prune(study, steady) is True
    # below both thresholds: pruned either way
    assert StepPercentilePruner(n_startup_trials=3).prune(study, _running(study, {10: 0.50}))


def test_compare_final_changes_nothing_for_improving_curves() -> None:
    falling_loss = [{5: 2.0, 60: 1.0}, {5: 2.2, 60: 1.1}, {5: 2.4, 60: 1.2}]  # minimize, loss falls
    rising_accuracy = [{5: 0.5, 60: 0.9}, {5: 0.6, 60: 0.95}, {5: 0.7, 60: 0.97}]  # maximize
    for direction, curves, values in (
        ("minimize", falling_loss, (2.1, 2.2, 2.3, 2.5)),
        ("maximize", rising_accuracy, (0.45, 0.55, 0.65, 0.75)),
    ):
        for percentile in (25.0, 50.0):
            for value in values:
                study = _study(direction, curves)
                trial = _running(study, {5: value})
                with_final = StepPercentilePruner(percentile=percentile, n_startup_trials=1)
                same_step = StepPercentilePruner(percentile=percentile, n_startup_trials=1, compare_final=False)
                assert with_final.prune(study, trial) == same_step.prune(study, trial), (direction, value)


def _prune_running(study: optuna.Study, curve: dict[int, float]) -> None:
    trial = study.ask()
    for step, value in curve.items():
        trial.report(value, step)
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)


def test_pruned_trials_count_as_the_worst_where_they_stopped() -> None:
    study = _study("maximize", [{10: v, 20: v} for v in (0.58, 0.62, 0.64, 0.66)])
    for _ in range(3):
        _prune_running(study, {10: 0.40})  # pruned at step 10: the worst (0.58) at step 20 and as a last value
    trial = _running(study, {10: 0.61, 20: 0.61})
    # survivors only: the median of 0.58 / 0.62 / 0.64 / 0.66 is 0.63 -> pruned;
    # with the pruned trials the median of 7 is 0.58 -> kept (the bar does not rise with every pruned trial)
    assert StepPercentilePruner(n_startup_trials=1, count_pruned=False).prune(study, trial) is True
    assert StepPercentilePruner(n_startup_trials=1).prune(study, trial) is False
    # a trial below every completed one stays pruned
    assert StepPercentilePruner(n_startup_trials=1).prune(study, _running(study, {10: 0.5, 20: 0.5})) is True
    # pruned trials never make a trial pass the startup count
    assert StepPercentilePruner(n_startup_trials=5).prune(study, _running(study, {10: 0.1})) is False


def test_pruned_trials_use_their_own_value_where_they_reported() -> None:
    study = _study("minimize", [{5: 1.0}, {5: 2.0}])
    _prune_running(study, {5: 3.0})
    _prune_running(study, {5: 4.0})
    # references at step 5: 1, 2, 3, 4 -> median 2.5
    assert StepPercentilePruner(n_startup_trials=1).prune(study, _running(study, {5: 2.4})) is False
    assert StepPercentilePruner(n_startup_trials=1).prune(study, _running(study, {5: 2.6})) is True


def test_default_sweep_uses_the_tuned_step_percentile_pruner() -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lora_sweep.cli import config_dir
    from lora_sweep.sweep.samplers import build_pruner

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name="config", return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    pruner = build_pruner(cfg.hydra.sweeper.pruner)
    # the settings benchmarks/bench_pruning.py measured (README, "Pruning")
    assert isinstance(pruner, StepPercentilePruner)
    assert (pruner.percentile, pruner.n_startup_trials, pruner.n_warmup_steps, pruner.interval_steps) == (15.0, 2, 5, 1)
    assert pruner.compare_final and pruner.count_pruned
    median = build_pruner({"_target_": "lora_sweep.sweep.pruners.StepPercentilePruner", "percentile": 50.0})
    assert median.percentile == 50.0
