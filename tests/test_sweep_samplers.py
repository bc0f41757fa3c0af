"""Every sampler option of hydra/sweeper/sampler builds and drives a study (its dependencies are installed)."""

from __future__ import annotations

import warnings

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from lora_sweep.sweep.config import SAMPLERS
from lora_sweep.sweep.samplers import build_sampler

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_option_runs_a_few_trials(name: str) -> None:
    if name == "grid":
        space = {"r": CategoricalDistribution([4, 8]), "n": IntDistribution(1, 3)}
    else:
        space = {"lr": FloatDistribution(1e-4, 1e-1, log=True), "r": IntDistribution(1, 8)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(sampler=build_sampler(SAMPLERS[name], seed=3, distributions=space))
        for _ in range(4):
            trial = study.ask(fixed_distributions=space)
            study.tell(trial, float(sum(float(v) for v in trial.params.values())))
    assert len(study.trials) == 4 and study.best_value >= 0
