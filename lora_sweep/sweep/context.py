"""Job-side bridge: which study/trial am I, and how do I report and get pruned?

Mechanism (how the context reaches a job): for every trial the sweeper adds the Hydra override
``++hydra.job.env_set.LORA_SWEEP_TRIAL=<base64url(JSON)>``. Hydra's ``run_job`` sets the
``hydra.job.env_set`` variables in ``os.environ`` for the duration of the task function and
restores them afterwards, in whatever process runs the job -- in-process (basic launcher),
joblib/loky workers, submitit jobs -- because every launcher calls ``run_job`` with the job's
composed config. The override lives under ``hydra.*``, so the app's (possibly struct) config
is untouched and it is not part of ``hydra.overrides.task`` (the replay command stays clean).

The JSON carries the storage (URL or journal path), study name, trial id and number and the
objective names/directions. The pruner is NOT in it: the sweeper stores the configured
pruner's config as the study user attr ``sweep.pruner``, and :class:`TrialReporter` rebuilds
exactly that pruner for ``optuna.load_study(..., pruner=...)`` (load_study's default
MedianPruner is not the configured one). Intermediate values thus go straight into the shared
storage, where the dashboard shows them live and the sweeper's pruner sees them.

Usage inside a task function::

    reporter = TrialReporter.from_env()      # None outside a sweep
    for step in range(n):
        ...
        if reporter and step % 10 == 0:
            reporter.report(loss, step)
            if reporter.should_prune():
                return {"status": "pruned", ...}   # or: raise optuna.TrialPruned()
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

ENV_VAR = "LORA_SWEEP_TRIAL"
STUDY_ATTR_PRUNER = "sweep.pruner"
# A job's own copy of its return value, stored before it writes anything else: if the sweep
# process dies before `tell`, the next run finishes the trial with it instead of re-running it.
ATTR_JOB_RESULT = "job_result"


def recorded(trial: Any) -> Mapping[str, Any]:
    """The trial's job result as its job recorded it (every value it returned), or {}."""
    value = trial.user_attrs.get(ATTR_JOB_RESULT)
    return value if isinstance(value, Mapping) else {}


@dataclass(frozen=True)
class TrialContext:
    """Where a job's trial lives.

    Attributes:
        storage: Normalized storage (RDB URL or absolute journal file path).
        study_name: Study name.
        trial_id: Optuna storage trial id.
        trial_number: Trial number within the study.
        objective_names: Objective names (empty for plain-float apps).
        directions: ``minimize``/``maximize`` per objective.
        report_every: Report an intermediate value (and ask the pruner) every this many steps.
    """

    storage: str
    study_name: str
    trial_id: int
    trial_number: int
    objective_names: tuple[str, ...] = ()
    directions: tuple[str, ...] = ("minimize",)
    report_every: int = 1

    def encode(self) -> str:
        """Compact, override-safe encoding (base64url, no padding)."""
        raw = json.dumps(asdict(self), separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> TrialContext:
        """Inverse of :meth:`encode`."""
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        data = json.loads(raw)
        data["objective_names"] = tuple(data.get("objective_names") or ())
        data["directions"] = tuple(data.get("directions") or ("minimize",))
        return cls(**data)

    def override(self) -> str:
        """The Hydra override that delivers this context to the job."""
        return f"++hydra.job.env_set.{ENV_VAR}={self.encode()}"


def current_trial_context() -> TrialContext | None:
    """The running job's trial, or None when not launched by the lora_sweep sweeper."""
    text = os.environ.get(ENV_VAR)
    if not text:
        try:
            from hydra.core.hydra_config import HydraConfig

            if HydraConfig.initialized():
                text = HydraConfig.get().job.env_set.get(ENV_VAR)
        except Exception:
            text = None
    if not text:
        return None
    return TrialContext.decode(str(text))


def build_pruner_from_study(study: Any) -> Any:
    """Rebuilds the sweep's configured pruner from the study's user attrs."""
    from lora_sweep.sweep.samplers import build_pruner

    return build_pruner(study.user_attrs.get(STUDY_ATTR_PRUNER))


class TrialReporter:
    """Reports intermediate values of the running trial and asks whether to prune.

    Built on ``optuna.trial.Trial(optuna.load_study(..., pruner=<configured>), trial_id)``.
    Multi-objective studies cannot prune (Optuna); there both methods are no-ops.
    """

    def __init__(self, context: TrialContext) -> None:
        import optuna

        from lora_sweep.sweep.study import open_storage

        self.context = context
        storage = open_storage(context.storage)
        probe = optuna.load_study(study_name=context.study_name, storage=storage)
        pruner = build_pruner_from_study(probe)
        self.study = optuna.load_study(study_name=context.study_name, storage=storage, pruner=pruner)
        self.trial = optuna.trial.Trial(self.study, context.trial_id)
        self._single = len(self.study.directions) == 1

    @classmethod
    def from_env(cls) -> TrialReporter | None:
        """Reporter of the current job's trial, or None outside a sweep."""
        context = current_trial_context()
        return cls(context) if context is not None else None

    @property
    def direction(self) -> str:
        """``minimize``/``maximize`` of the (first) objective: report values oriented so the
        pruner reads "better" the same way (e.g. ``-loss`` for a maximized objective)."""
        return self.study.directions[0].name.lower()

    def report(self, value: float, step: int) -> None:
        """Stores ``value`` as the intermediate value at ``step``."""
        if self._single:
            self.trial.report(float(value), step=int(step))

    def should_prune(self) -> bool:
        """Whether the configured pruner says to stop this trial now."""
        return bool(self._single and self.trial.should_prune())

    def record_result(self, result: Mapping[str, Any]) -> None:
        """Stores the job's return mapping on its trial (scalars only; one storage write).

        Call it before the job's own side effects (e.g. a CSV row), so that a sweep killed
        between the job's end and the sweeper's `tell` can still finish this trial on resume.
        """
        plain = {k: v for k, v in result.items() if v is None or isinstance(v, (bool, int, float, str))}
        self.trial.set_user_attr(ATTR_JOB_RESULT, plain)

    def set_user_attr(self, key: str, value: Any) -> None:
        """Stores a user attribute on the trial (visible live in the dashboard)."""
        self.trial.set_user_attr(key, value)
