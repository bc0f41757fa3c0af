"""Tiny Hydra app for the sweeper tests: a quadratic with injectable failures.

``mode=float`` returns ``(x-2)^2 + (y+1)^2`` (minimize); ``mode=mapping`` returns a dict
with ``value``, ``status``, ``constraint`` and reports intermediate values for pruning.
"""

from __future__ import annotations

import math
import time
from typing import Any

import hydra
from omegaconf import DictConfig


@hydra.main(version_base=None, config_path="conf", config_name="app")
def main(cfg: DictConfig) -> Any:
    x, y = float(cfg.x), float(cfg.y)
    value = (x - 2.0) ** 2 + (y + 1.0) ** 2
    inject = cfg.inject
    if inject.exception_above is not None and x > inject.exception_above:
        raise RuntimeError(f"injected failure at x={x}")
    if inject.nan_below is not None and x < inject.nan_below:
        value = math.nan
    if cfg.sleep:
        time.sleep(float(cfg.sleep))
    if cfg.mode == "float":
        return value
    from lora_sweep.sweep.context import TrialReporter, current_trial_context

    context = current_trial_context()
    reporter = TrialReporter.from_env()
    for step in range(int(cfg.steps)):
        if reporter is not None:
            reporter.report(value + (cfg.steps - step), step)
            if reporter.should_prune():
                return {"status": "pruned", "value": value, "pruned_at": step}
    return {
        "value": value,
        "x": x,
        "status": "success",
        "constraint": x - float(cfg.feasible_below),
        "trial_number": context.trial_number if context else -1,
    }


if __name__ == "__main__":
    main()
