"""Build Optuna samplers and pruners from their ``_target_`` configs.

Seeding: the sampler gets ``seed = base_seed + offset`` where the caller passes
``offset = number of trials already in the study (+ a per-worker stride)``. A resumed sweep
therefore does not replay the start-up trials of the previous run, and parallel workers do
not propose identical trials, while a fresh sweep with the same seed is reproducible.

Grid: the grid is built from the search space (every parameter must be discrete: choice or
range). Optuna's ``GridSampler`` calls ``study.stop()`` when the grid is exhausted, which
raises outside ``study.optimize``; the sweeper caps ``n_trials`` at the grid size instead,
so that call is disabled here.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

_GRID_TARGET = "optuna.samplers.GridSampler"


class SamplerConfigError(ValueError):
    """Sampler/pruner config that cannot be built."""


def _import(target: str) -> Any:
    module_name, _, attr = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SamplerConfigError(f"cannot import {target}: {exc}") from exc


def _plain(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    if not isinstance(cfg, Mapping):
        try:
            from omegaconf import OmegaConf

            return dict(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
        except Exception as exc:  # pragma: no cover - defensive
            raise SamplerConfigError(f"not a mapping: {cfg!r}") from exc
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return dict(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover
        pass
    return {k: (_plain(v) if isinstance(v, Mapping) else v) for k, v in cfg.items()}


def _build(cfg: Mapping[str, Any], **extra: Any) -> Any:
    options = dict(cfg)
    target = options.pop("_target_", None)
    if not target:
        raise SamplerConfigError(f"config without _target_: {options}")
    for key, value in list(options.items()):
        if isinstance(value, Mapping) and "_target_" in value:
            options[key] = _build(value)
    cls = _import(str(target))
    accepted = inspect.signature(cls).parameters
    for key, value in extra.items():
        if key in accepted:
            options[key] = value
    try:
        return cls(**options)
    except TypeError as exc:
        raise SamplerConfigError(f"bad options for {target}: {exc}") from exc


def grid_search_space(distributions: Mapping[str, Any]) -> dict[str, list[Any]]:
    """Enumerates discrete distributions for the grid sampler."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    space: dict[str, list[Any]] = {}
    for name, dist in distributions.items():
        if isinstance(dist, CategoricalDistribution):
            space[name] = list(dist.choices)
        elif isinstance(dist, IntDistribution) and not dist.log:
            space[name] = list(range(dist.low, dist.high + 1, dist.step))
        elif isinstance(dist, FloatDistribution) and dist.step is not None:
            n = int(round((dist.high - dist.low) / dist.step)) + 1
            space[name] = [round(dist.low + i * dist.step, 12) for i in range(n)]
        else:
            raise SamplerConfigError(
                f"grid sampler needs discrete parameters; '{name}' is {dist!r}: use choice(...) or range(...)"
            )
    return space


def grid_size(distributions: Mapping[str, Any]) -> int:
    """Number of grid points."""
    size = 1
    for values in grid_search_space(distributions).values():
        size *= len(values)
    return size


def is_grid(cfg: Any) -> bool:
    """True when the sampler config selects the grid sampler."""
    return _plain(cfg).get("_target_") == _GRID_TARGET


SEED_STRIDE = 100_003
"""Seed distance between workers: their seeds never collide for any realistic trial count."""


def sampler_seed(cfg: Any, *, base_seed: int | None, n_trials_so_far: int, worker_id: int) -> int | None:
    """The seed a worker's sampler gets: ``base_seed + trials so far + worker stride``.

    The grid sampler is the exception: it shuffles its grid by its seed and records each
    trial's point as an index into that order, so every worker and every resume must shuffle
    alike (the base seed), or two workers' index 0 would name different points and the grid
    would run some points twice and never others.
    """
    if base_seed is None:
        return None
    if is_grid(cfg):
        return int(base_seed)
    return int(base_seed) + n_trials_so_far + worker_id * SEED_STRIDE


def build_sampler(cfg: Any, *, seed: int | None, distributions: Mapping[str, Any]) -> Any:
    """Instantiates the sampler config with ``seed`` (and the grid for the grid sampler)."""
    options = _plain(cfg) or {"_target_": "optuna.samplers.TPESampler"}
    if options.get("_target_") == _GRID_TARGET:
        from optuna.samplers import GridSampler

        class _CappedGridSampler(GridSampler):
            def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
                """No ``study.stop()``: the sweeper caps n_trials at the grid size."""

        options.pop("_target_")
        options.setdefault("search_space", grid_search_space(distributions))
        if seed is not None:
            options.setdefault("seed", seed)
        return _CappedGridSampler(**options)
    return _build(options, seed=seed)


def build_pruner(cfg: Any) -> Any:
    """Instantiates the pruner config (None -> ``NopPruner``)."""
    options = _plain(cfg)
    if not options:
        from optuna.pruners import NopPruner

        return NopPruner()
    return _build(options)


def pruner_config(cfg: Any) -> dict[str, Any]:
    """Plain-dict copy of a pruner config (stored on the study for jobs)."""
    return _plain(cfg)
