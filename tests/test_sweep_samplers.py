"""Every sampler option of hydra/sweeper/sampler builds and drives a study (its dependencies are installed)."""

from __future__ import annotations

import warnings

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from lora_sweep.sweep.config import SAMPLERS
from lora_sweep.sweep.samplers import build_sampler, sampler_seed

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


def test_grid_workers_and_resumes_share_one_order() -> None:
    """Two workers (and a resumed third) asking in turn run every grid point exactly once.

    The grid sampler records each trial's point as an index into its seed-shuffled grid; with
    per-worker seeds the workers' index 0 named different points and points repeated."""
    space = {"r": CategoricalDistribution([1, 4, 16, 64]), "rs": CategoricalDistribution([False, True])}
    cfg = SAMPLERS["grid"]
    study = optuna.create_study()

    def sampler(worker_id: int) -> optuna.samplers.BaseSampler:
        seed = sampler_seed(cfg, base_seed=0, n_trials_so_far=len(study.trials), worker_id=worker_id)
        return build_sampler(cfg, seed=seed, distributions=space)

    workers = [sampler(0), sampler(1)]
    seen = []
    for i in range(8):
        if i == 5:  # a resume: a fresh sampler, more trials already in the study
            workers[0] = sampler(0)
        study.sampler = workers[i % 2]
        trial = study.ask(fixed_distributions=space)
        seen.append((trial.params["r"], trial.params["rs"]))
        study.tell(trial, 0.0)
    assert sorted(seen) == sorted((r, rs) for r in (1, 4, 16, 64) for rs in (False, True))


def test_sampler_seed_differs_per_worker_and_resume_except_for_the_grid() -> None:
    tpe = SAMPLERS["tpe"]
    seeds = {sampler_seed(tpe, base_seed=0, n_trials_so_far=n, worker_id=w) for n in (0, 7) for w in (0, 1)}
    assert len(seeds) == 4
    assert sampler_seed(SAMPLERS["grid"], base_seed=5, n_trials_so_far=7, worker_id=1) == 5
    assert sampler_seed(tpe, base_seed=None, n_trials_so_far=7, worker_id=1) is None
