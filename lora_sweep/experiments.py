"""Reading an experiment's grid (``conf/experiment/*.yaml``): a metric per grid point.

An experiment is a grid sweep, often with several seeds per point. The figures of the
experiment notebooks are curves of a metric's median over seeds against one parameter, one
curve per value of another; these helpers compute those curves and their minima from the
trials table of :func:`lora_sweep.analysis.load_trials`. They import neither torch nor optuna.
"""

from __future__ import annotations

import math

import pandas as pd


def grid_curves(trials: pd.DataFrame, *, x: str, by: str | None = None, metric: str = "eval_loss") -> pd.DataFrame:
    """The median, min and max of ``metric`` over the trials at each (``by``, ``x``) point.

    Every trial with a finite ``metric`` counts, whatever its state: a diverged trial's
    held-out loss is part of the curve (``n_failed`` says how many such trials a point has),
    so that a learning rate that blows up shows as a high point, not as a gap.

    Args:
        trials: One row per trial (``analysis.load_trials``).
        x: The parameter on the x axis, e.g. ``"lora.r"``.
        by: The parameter with one curve per value (``None``: a single curve).
        metric: The column to aggregate.

    Returns:
        Columns ``by`` (when given), ``x``, ``median``, ``min``, ``max``, ``n``, ``n_failed``,
        sorted by ``by`` then ``x``.

    Raises:
        KeyError: ``x``, ``by`` or ``metric`` is not a column of ``trials``.
        ValueError: No trial has a finite ``metric``.
    """
    keys = [by, x] if by else [x]
    missing = [c for c in (*keys, metric) if c not in trials.columns]
    if missing:
        raise KeyError(f"no column {missing[0]!r} in the trials; columns: {', '.join(map(str, trials.columns))}")
    values = pd.to_numeric(trials[metric], errors="coerce")
    usable = trials.assign(_value=values)[values.map(lambda v: math.isfinite(v) if pd.notna(v) else False)]
    if usable.empty:
        raise ValueError(f"no trial has a finite {metric}: has the experiment's sweep run?")
    failed = usable["state"].astype(str).str.upper().eq("FAIL") if "state" in usable else False
    usable = usable.assign(_failed=failed)
    grouped = usable.groupby(keys, sort=True)
    curves = grouped["_value"].agg(["median", "min", "max", "count"]).rename(columns={"count": "n"})
    curves["n_failed"] = grouped["_failed"].sum().astype(int)
    return curves.reset_index()


def curve_minima(curves: pd.DataFrame, *, x: str, by: str | None = None) -> pd.DataFrame:
    """The point of lowest median on each curve of :func:`grid_curves` (one row per curve)."""
    if by is None:
        return curves.loc[[curves["median"].idxmin()]].reset_index(drop=True)
    best = curves.loc[curves.groupby(by, sort=True)["median"].idxmin()]
    return best[[by, x, "median", "n"]].reset_index(drop=True)


def spread_ratio(values: pd.Series) -> float:
    """max / min of positive values, e.g. how far apart the per-rank optimal learning rates are."""
    positive = pd.to_numeric(values, errors="coerce").dropna()
    positive = positive[positive > 0]
    if positive.empty:
        raise ValueError("no positive values to compare")
    return float(positive.max() / positive.min())
