"""Hydra Sweeper plugin ``hydra/sweeper: lora_sweep`` (Optuna 5, resumable, prunable).

Thin on purpose: Hydra imports every plugin module on every start, so this module imports
neither optuna nor torch; the logic is in :mod:`lora_sweep.sweep.runner` (imported lazily in
``sweep``). Any Hydra app can use it::

    defaults:
      - override hydra/sweeper: lora_sweep

and run ``python app.py -m 'x=interval(-5.0,5.0)' hydra.sweeper.n_trials=30``.
Settings: :class:`lora_sweep.sweep.config.LoraSweepSweeperConf`.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, List, Optional

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from lora_sweep.sweep.config import register_configs

register_configs()
log = logging.getLogger(__name__)


class LoraSweepSweeper(Sweeper):
    """Optuna sweeper: ask -> launch via the configured Hydra launcher -> tell."""

    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.config: Optional[DictConfig] = None
        self.launcher: Any = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(
        self,
        *,
        hydra_context: HydraContext,
        task_function: TaskFunction,
        config: DictConfig,
    ) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: List[str]) -> Any:
        from lora_sweep.sweep.console import format_summary
        from lora_sweep.sweep.runner import (
            EXIT_ABORTED,
            EXIT_INTERRUPTED,
            EXIT_USER_ERROR,
            USER_ERRORS,
            SweepAbortedError,
            SweepRunner,
            restore_sigint,
        )

        assert self.config is not None
        launcher_target = str(self.config.hydra.launcher.get("_target_", ""))
        runner = SweepRunner(
            settings=self.settings,
            config=self.config,
            launcher=self.launcher,
            argv=sys.argv,
            is_basic_launcher=launcher_target.endswith("basic_launcher.BasicLauncher"),
        )
        try:
            summary = runner.run(arguments)
        except USER_ERRORS as exc:  # one clear line instead of a traceback
            print(f"lora_sweep: error: {exc}", file=sys.stderr, flush=True)
            code = EXIT_ABORTED if isinstance(exc, SweepAbortedError) else EXIT_USER_ERROR
            raise SystemExit(code) from None
        except KeyboardInterrupt:
            restore_sigint(runner.previous_sigint)
            if runner.worker_id == 0:
                running = ", ".join(map(str, runner.interrupted))
                what = f"trial {running} queued again (not counted as failed)" if running else "no trial was running"
                print(
                    f"lora_sweep: interrupted: {what}; run the same command again to resume",
                    file=sys.stderr,
                    flush=True,
                )
            raise SystemExit(EXIT_INTERRUPTED) from None
        if runner.worker_id == 0:
            print(format_summary(summary), flush=True)
        return summary
