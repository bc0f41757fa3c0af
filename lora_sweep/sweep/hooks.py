"""What an app plugs into the sweeper: ``hydra.sweeper.hooks: package.module.NAME``.

The sweeper knows nothing of the app it sweeps. An app that wants more than "a job returns a
float or a mapping" names an object with any of these attributes (a :class:`SweepHooks`
instance, a subclass, or a module):

* ``objectives``: ``{metric name: direction}`` of the metrics its jobs return, so that
  ``hydra.sweeper.objective=NAME`` needs no direction and an unknown name is refused with the
  list of valid ones;
* ``storage_dir(app_cfg)``: the directory of the default journal storage (None: the sweep
  directory), e.g. the app's own results directory, so that results and study live together;
* ``best_trials(study)``: the trial(s) the end-of-sweep summary reports as best (None:
  Optuna's ``best_trial(s)``, the best feasible by the objective), for an app whose "best" also
  weighs something the objective does not;
* ``summary_lines(study)``: more lines for the end-of-sweep summary;
* ``dashboard_args(app_cfg)``: more arguments for the printed ``optuna-dashboard`` command,
  e.g. ``--artifact-dir DIR`` where the app keeps its trials' artifacts;
* ``on_recovered(recorded)``: called when a trial is finished from the result its job recorded
  (``TrialReporter.record_result``) because the sweep process died before telling the study;
  the app writes whatever the job would have written after recording (e.g. a results row).
  It must be idempotent: the job may have written it before the process died;
* ``on_sweep_end(study)``: called once when a sweep has run all its trials (by the first
  worker, after the others stopped; not after Ctrl-C, an abort, or a run with nothing to do),
  before the summary, e.g. to tidy up what the trials left or export the best one.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any


class SweepHooksError(ValueError):
    """``hydra.sweeper.hooks`` names nothing importable."""


class SweepHooks:
    """The no-op hooks of an app that registers none (and a base class for apps)."""

    objectives: Mapping[str, str] = {}

    def storage_dir(self, app_cfg: Any) -> str | None:
        """Where the default journal storage goes (None: the sweep directory)."""
        return None

    def best_trials(self, study: Any) -> list[Any] | None:
        """The summary's best trial(s); None: Optuna's best feasible by the objective."""
        return None

    def summary_lines(self, study: Any) -> list[str]:
        """Extra lines for the end-of-sweep summary."""
        return []

    def dashboard_args(self, app_cfg: Any) -> list[str]:
        """Extra arguments of the printed optuna-dashboard command (after the storage)."""
        return []

    def on_recovered(self, recorded: Mapping[str, Any]) -> None:
        """Finish the app-side effects of a trial told from its recorded job result."""

    def on_sweep_end(self, study: Any) -> None:
        """What the app does once the sweep's trials are all finished."""


class _ModuleHooks(SweepHooks):
    """Hooks given as a module (or any object): missing attributes fall back to no-ops."""

    def __init__(self, source: Any) -> None:
        self._source = source
        self.objectives = dict(getattr(source, "objectives", None) or {})

    def storage_dir(self, app_cfg: Any) -> str | None:
        handler = getattr(self._source, "storage_dir", None)
        return handler(app_cfg) if handler is not None else None

    def best_trials(self, study: Any) -> list[Any] | None:
        handler = getattr(self._source, "best_trials", None)
        return handler(study) if handler is not None else None

    def summary_lines(self, study: Any) -> list[str]:
        handler = getattr(self._source, "summary_lines", None)
        return list(handler(study)) if handler is not None else []

    def dashboard_args(self, app_cfg: Any) -> list[str]:
        handler = getattr(self._source, "dashboard_args", None)
        return [str(a) for a in handler(app_cfg)] if handler is not None else []

    def on_recovered(self, recorded: Mapping[str, Any]) -> None:
        handler = getattr(self._source, "on_recovered", None)
        if handler is not None:
            handler(recorded)

    def on_sweep_end(self, study: Any) -> None:
        handler = getattr(self._source, "on_sweep_end", None)
        if handler is not None:
            handler(study)


def load_hooks(path: str | None) -> SweepHooks:
    """The hooks object named by ``hydra.sweeper.hooks``: ``package.module.NAME``, or a module
    (its ``HOOKS`` object if it has one, else its module-level attributes); :class:`SweepHooks`
    when ``path`` is empty."""
    if not path:
        return SweepHooks()
    module_name, _, attr = str(path).rpartition(".")
    try:
        source: Any = importlib.import_module(str(path))
    except ImportError as first:
        if not module_name:
            raise SweepHooksError(
                f"hydra.sweeper.hooks={path!r} cannot be imported ({first}); give 'package.module.NAME'"
            ) from first
        try:
            source = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise SweepHooksError(
                f"hydra.sweeper.hooks={path!r} cannot be imported ({exc}); give 'package.module.NAME'"
            ) from exc
    if isinstance(getattr(source, "HOOKS", None), SweepHooks):  # a module naming its hooks object
        source = source.HOOKS
    if isinstance(source, type) and issubclass(source, SweepHooks):
        source = source()
    return source if isinstance(source, SweepHooks) else _ModuleHooks(source)
