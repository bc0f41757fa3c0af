"""``custom_search_space`` hooks for conditional parameters.

A hook is ``fn(cfg, trial) -> dict of extra overrides``; it runs after the configured
``params`` were suggested (they are in ``trial.params``) and may suggest more. ``cfg`` is the
app's composed config, read-only (one copy serves every trial).
"""

from __future__ import annotations

from typing import Any

ALPHA_MULTIPLES = (0.5, 1.0, 2.0, 4.0)


def alpha_multiple_of_r(cfg: Any, trial: Any) -> dict[str, Any]:
    """Samples ``lora.alpha`` as ``r * m`` with ``m`` in {0.5, 1, 2, 4} (param ``lora.alpha_per_r``).

    ``r`` is the trial's ``lora.r`` if searched, else the config's ``lora.r``.
    """
    r = trial.params.get("lora.r", cfg.lora.r if cfg is not None else None)
    multiple = trial.suggest_categorical("lora.alpha_per_r", list(ALPHA_MULTIPLES))
    alpha = float(r) * float(multiple)
    return {"lora.alpha": int(alpha) if alpha.is_integer() else alpha}
