"""custom_search_space hook for the tests: y is conditional on x."""

from __future__ import annotations

from typing import Any


def y_from_x(cfg: Any, trial: Any) -> dict[str, Any]:
    """Samples a multiplier and sets ``y = -x * m`` (a conditional parameter)."""
    m = trial.suggest_categorical("m", [0.25, 0.5])
    return {"y": -trial.params["x"] * m}
