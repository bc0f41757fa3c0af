"""What lora_sweep plugs into its (app-agnostic) sweeper: ``hydra.sweeper.hooks``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lora_sweep.results import CSV_COLUMNS, PAYLOAD_CSV_KEY, append_row
from lora_sweep.sweep.hooks import SweepHooks

# The metrics a trial returns that can be a sweep's objective, with their directions.
OBJECTIVES: dict[str, str] = {
    "stability_index": "maximize",
    "quality": "maximize",
    "final_loss": "minimize",
}


class LoraSweepHooks(SweepHooks):
    """Objectives of a LoRA trial, the study beside the results, and the CSV row of a trial
    finished after its sweep died."""

    objectives = OBJECTIVES

    def storage_dir(self, app_cfg: Any) -> str | None:
        """The study lives beside the results CSV: ``<results_dir>/optuna_journal.log``."""
        try:
            results_dir = app_cfg.get("results_dir")
        except Exception:  # noqa: BLE001 - an interpolation that does not resolve outside a job
            return None
        return str(results_dir) if results_dir else None

    def on_recovered(self, recorded: Mapping[str, Any]) -> None:
        """Append the trial's results row unless its job wrote it before the sweep died (the
        job records the CSV path with its result)."""
        csv_path = recorded.get(PAYLOAD_CSV_KEY)
        if csv_path:
            append_row(Path(str(csv_path)), {k: recorded.get(k) for k in CSV_COLUMNS}, once=True)


HOOKS = LoraSweepHooks()
