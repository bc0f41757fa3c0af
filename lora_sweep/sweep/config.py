"""Structured config of the ``lora_sweep`` Hydra sweeper and its sampler/pruner groups.

Registered in Hydra's ConfigStore by the plugin module (import-light: no optuna here):

* ``hydra/sweeper: lora_sweep`` -> :class:`LoraSweepSweeperConf`
* ``hydra/sweeper/sampler: tpe | random | gp | cmaes | qmc | grid``
* ``hydra/sweeper/pruner: none | median | percentile | successive_halving | hyperband |
  threshold | patient | step_median | step_percentile``

Sampler and pruner nodes carry an Optuna ``_target_`` and keyword options. The sweeper is
instantiated with ``_recursive_=False``, so they arrive as configs and are built by
:mod:`lora_sweep.sweep.samplers`, which injects the seed (samplers) and lets the job rebuild
the same pruner (see :mod:`lora_sweep.sweep.context`). Every TPE option that Optuna 5 changed
(``multivariate``, ``constant_liar``) is set explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

SWEEPER_TARGET = "hydra_plugins.lora_sweep_sweeper.lora_sweep_sweeper.LoraSweepSweeper"
PROVIDER = "lora_sweep"

SAMPLERS: dict[str, dict[str, Any]] = {
    "tpe": {
        "_target_": "optuna.samplers.TPESampler",
        "n_startup_trials": 10,
        "n_ei_candidates": 24,
        "multivariate": True,
        "group": False,
        "constant_liar": True,
    },
    "random": {"_target_": "optuna.samplers.RandomSampler"},
    "gp": {
        "_target_": "optuna.samplers.GPSampler",
        "n_startup_trials": 10,
        "deterministic_objective": False,
    },
    "cmaes": {
        "_target_": "optuna.samplers.CmaEsSampler",
        "n_startup_trials": 1,
        "sigma0": None,
        "restart_strategy": None,
        "popsize": None,
        "consider_pruned_trials": False,
        "use_separable_cma": False,
        "with_margin": False,
    },
    "qmc": {"_target_": "optuna.samplers.QMCSampler", "qmc_type": "sobol", "scramble": True},
    # search_space is derived from hydra.sweeper.params (every parameter must be discrete)
    "grid": {"_target_": "optuna.samplers.GridSampler"},
}

_MEDIAN = {
    "_target_": "optuna.pruners.MedianPruner",
    "n_startup_trials": 5,
    "n_warmup_steps": 10,
    "interval_steps": 1,
    "n_min_trials": 1,
}

PRUNERS: dict[str, dict[str, Any]] = {
    "none": {"_target_": "optuna.pruners.NopPruner"},
    "median": dict(_MEDIAN),
    "percentile": {
        "_target_": "optuna.pruners.PercentilePruner",
        "percentile": 25.0,
        "n_startup_trials": 5,
        "n_warmup_steps": 10,
        "interval_steps": 1,
        "n_min_trials": 1,
    },
    "successive_halving": {
        "_target_": "optuna.pruners.SuccessiveHalvingPruner",
        "min_resource": "auto",
        "reduction_factor": 4,
        "min_early_stopping_rate": 0,
        "bootstrap_count": 0,
    },
    "hyperband": {
        "_target_": "optuna.pruners.HyperbandPruner",
        "min_resource": 1,
        "max_resource": "auto",
        "reduction_factor": 3,
        "bootstrap_count": 0,
    },
    "threshold": {
        "_target_": "optuna.pruners.ThresholdPruner",
        "lower": None,
        "upper": None,
        "n_warmup_steps": 0,
        "interval_steps": 1,
    },
    # compare the value at this step, not the best so far (see lora_sweep.sweep.pruners)
    "step_median": {
        "_target_": "lora_sweep.sweep.pruners.StepPercentilePruner",
        "percentile": 50.0,
        "n_startup_trials": 5,
        "n_warmup_steps": 10,
        "interval_steps": 1,
        "n_min_trials": 1,
        "compare_final": True,
        "count_pruned": True,
    },
    # the default (conf/config.yaml): tuned with benchmarks/bench_pruning.py on the default
    # sweep (>= 40 % fewer optimizer steps at an equal or better best; README "Pruning")
    "step_percentile": {
        "_target_": "lora_sweep.sweep.pruners.StepPercentilePruner",
        "percentile": 15.0,
        "n_startup_trials": 2,
        "n_warmup_steps": 5,
        "interval_steps": 1,
        "n_min_trials": 1,
        "compare_final": True,
        "count_pruned": True,
    },
    "patient": {
        "_target_": "optuna.pruners.PatientPruner",
        "wrapped_pruner": dict(_MEDIAN),
        "patience": 3,
        "min_delta": 0.0,
    },
}


@dataclass
class LoraSweepSweeperConf:
    """``hydra.sweeper`` settings (see README / the plugin docstring for meanings)."""

    _target_: str = SWEEPER_TARGET
    _recursive_: bool = False
    defaults: List[Any] = field(default_factory=lambda: ["_self_", {"sampler": "tpe"}, {"pruner": "none"}])
    # total number of trials of the study (across resumes); a finished sweep does nothing
    n_trials: int = 20
    # Optuna storage: URL (sqlite:///..., postgresql://...) or journal file path;
    # null -> optuna_journal.log in the hooks' storage_dir (lora_sweep: results_dir), else the sweep dir
    storage: Optional[str] = None
    # SQLAlchemy create_engine options for an RDB storage (pool_size, pool_pre_ping, connect_args,
    # ...), merged over lora_sweep.sweep.study.SERVER_ENGINE_KWARGS (servers) or the SQLite timeout
    engine_kwargs: Any = None
    # null -> hydra.job.name
    study_name: Optional[str] = None
    # plain-float apps: minimize | maximize (or a list for a returned sequence of floats)
    direction: Any = "minimize"
    # mapping-returning apps: a metric name, a list of names (Pareto), or {name: direction}
    objective: Any = None
    # base seed; each sweep start re-seeds with seed + trials already in the study
    seed: Optional[int] = 0
    sampler: Any = None
    pruner: Any = None
    # trials in flight: worker processes (basic launcher) or batch size (other launchers);
    # auto: one single-threaded worker per core on a CPU-only machine, else 1
    n_jobs: Any = 1
    # a job reports its intermediate value (and asks the pruner) every this many steps and at
    # its last step; each report is a storage write (journal: an fsync'd append)
    report_every: int = 1
    # abort when failed/finished exceeds this after failure_min_trials trials
    max_failure_rate: float = 0.5
    failure_min_trials: int = 5
    # also add an infeasible "penalty" record so samplers avoid configs that failed
    penalize_failures: bool = True
    # key -> Hydra sweep syntax (choice/range/interval/tag(log,...)) or a plain value
    params: Optional[Dict[str, Any]] = None
    # "module.function" called as fn(cfg, trial) -> dict of extra overrides
    custom_search_space: Optional[str] = None
    # list of {param: value} dicts queued before sampling
    enqueue: Optional[List[Any]] = None
    # "package.module.NAME" of the app's hooks (lora_sweep.sweep.hooks): the objectives its jobs
    # report, what to write when a trial is finished from its recorded result
    hooks: Optional[str] = None
    # command printed in the end-of-sweep replay line; null -> derived from sys.argv
    replay_command: Optional[str] = None
    # internal: set on worker processes spawned by n_jobs (do not set by hand)
    worker_id: int = 0


def register_configs() -> None:
    """Stores the sweeper, sampler and pruner nodes in Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(group="hydra/sweeper", name="lora_sweep", node=LoraSweepSweeperConf, provider=PROVIDER)
    for name, node in SAMPLERS.items():
        cs.store(group="hydra/sweeper/sampler", name=name, node=node, provider=PROVIDER)
    for name, node in PRUNERS.items():
        cs.store(group="hydra/sweeper/pruner", name=name, node=node, provider=PROVIDER)
