"""Objectives and job outcomes: what a job returned -> how its trial is told.

Objective config (``hydra.sweeper.objective``):

* ``null`` -> the job returns a float (or a sequence of floats); directions from
  ``hydra.sweeper.direction`` (``minimize``/``maximize`` or a list);
* a name the app declares in its hooks' ``objectives`` (its direction comes from there; an
  undeclared name is refused with the declared ones listed), or, for an app that declares none,
  any metric name with ``direction`` -> the job returns a Mapping, the value is read by name;
* a list of declared names -> multi-objective (Pareto front); ``{name: direction, ...}`` for
  names the app does not declare.

Job return values: a float; a sequence of floats; or a Mapping whose scalar entries all go to
the trial's user attrs and whose special keys are honoured: ``status`` in {success, diverged,
failed, pruned}, ``reason`` (str), ``constraint`` (float, feasible when <= 0; or a mapping of
named constraints). A job exception, a non-finite objective, or an out-of-memory error makes
the trial FAIL with ``reason``; ``optuna.TrialPruned`` raised by the job or ``status: pruned``
makes it PRUNED.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

_DIRECTIONS = {"minimize", "maximize"}


class ObjectiveConfigError(ValueError):
    """Invalid ``objective``/``direction`` settings."""


@dataclass(frozen=True)
class ObjectiveSpec:
    """Names (None for plain-float apps) and directions of the study's objectives."""

    names: tuple[str, ...] | None
    directions: tuple[str, ...]

    @property
    def metric_names(self) -> list[str]:
        """Names for ``study.set_metric_names`` (``value``/``value_i`` for unnamed)."""
        if self.names:
            return list(self.names)
        if len(self.directions) == 1:
            return ["value"]
        return [f"value_{i}" for i in range(len(self.directions))]


def _check_direction(direction: Any) -> str:
    d = str(direction).lower()
    if d not in _DIRECTIONS:
        raise ObjectiveConfigError(f"direction must be minimize or maximize, got {direction!r}")
    return d


def parse_objective(
    objective: Any, direction: Any = "minimize", known: Mapping[str, str] | None = None
) -> ObjectiveSpec:
    """Builds an :class:`ObjectiveSpec` from the sweeper settings.

    Args:
        objective: None, a name, a list of names, or a mapping name -> direction.
        direction: Used for plain-float apps and for a single name of an app that declares no
            objectives.
        known: The app's declared objectives, name -> direction (its hooks' ``objectives``).
    """
    presets = {str(k): _check_direction(v) for k, v in (known or {}).items()}
    if objective is None or objective == "":
        dirs = direction if isinstance(direction, Sequence) and not isinstance(direction, str) else [direction]
        return ObjectiveSpec(None, tuple(_check_direction(d) for d in dirs))
    if isinstance(objective, str):
        objective = [objective]
    if isinstance(objective, Mapping):
        items = [(str(k), _check_direction(v)) for k, v in objective.items()]
    else:
        names = [str(n) for n in objective]
        if len(names) == 1 and not presets:
            dirs = direction if isinstance(direction, str) else (list(direction) or ["minimize"])[0]
            items = [(names[0], _check_direction(dirs))]
        else:
            unknown = [n for n in names if n not in presets]
            if unknown:
                valid = ", ".join(sorted(presets)) or "none declared"
                raise ObjectiveConfigError(
                    f"hydra.sweeper.objective: {', '.join(map(repr, unknown))} is not an objective "
                    f"this app reports; valid: {valid} (or a list of them; for another metric "
                    "give its direction, e.g. hydra.sweeper.objective={my_metric: maximize})"
                )
            items = [(n, presets[n]) for n in names]
    if not items:
        raise ObjectiveConfigError("objective is empty")
    return ObjectiveSpec(tuple(n for n, _ in items), tuple(d for _, d in items))


@dataclass
class Outcome:
    """How to tell a finished trial.

    Attributes:
        state: ``complete`` | ``pruned`` | ``fail``.
        values: Objective values (complete only).
        status: The ``status`` user attr (success, pruned, failed, diverged, oom, ...).
        reason: Failure/prune reason ('' on success).
        user_attrs: Scalars to store on the trial.
        constraints: name -> value (feasible when <= 0).
    """

    state: str
    values: list[float] | None = None
    status: str = "success"
    reason: str = ""
    user_attrs: dict[str, Any] = field(default_factory=dict)
    constraints: dict[str, float] = field(default_factory=dict)


# How a job's ``status`` becomes its trial's Optuna state (the one mapping; apps that record
# the state themselves, e.g. in a results row, read it from here).
STATE_OF_STATUS: dict[str, str] = {
    "success": "COMPLETE",
    "pruned": "PRUNED",
    "diverged": "FAIL",
    "failed": "FAIL",
}
OOM_PREFIX = "out of memory"


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error (host ``MemoryError``, CUDA/MPS OOM)."""
    name = type(exc).__name__
    return isinstance(exc, MemoryError) or "OutOfMemory" in name or OOM_PREFIX in str(exc).lower()


def failure_reason(exc: BaseException) -> str:
    """One line saying why a job failed: ``out of memory: ...`` for an OOM, else
    ``ExceptionType: first line of the message``."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if is_out_of_memory(exc):
        return f"{OOM_PREFIX}: {first or type(exc).__name__}"[:2000]
    return (f"{type(exc).__name__}: {first}" if first else type(exc).__name__)[:2000]


def outcome_from_exception(exc: BaseException) -> Outcome:
    """Outcome of a job that raised (status ``failed``; an OOM's reason starts ``out of memory``)."""
    if type(exc).__name__ == "TrialPruned":
        return Outcome(state="pruned", status="pruned", reason=str(exc) or "pruned by the pruner")
    return Outcome(state="fail", status="failed", reason=failure_reason(exc))


def _scalar(value: Any) -> Any:
    """Storage-safe scalar (non-finite floats as strings) or None if not a scalar."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else str(value)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return _scalar(value.item())
    return None


def _to_float(value: Any) -> float | None:
    try:
        return float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        return None


def _values_from(ret: Any, spec: ObjectiveSpec) -> tuple[list[float] | None, str]:
    """Extracts objective values; returns (values, error)."""
    if isinstance(ret, Mapping):
        if not spec.names:
            return None, (
                "the job returned a mapping; set hydra.sweeper.objective to the key(s) to optimise "
                f"(keys: {sorted(map(str, ret))[:12]})"
            )
        missing = [n for n in spec.names if n not in ret]
        if missing:
            return None, f"objective key(s) {missing} missing from the job's return value"
        raw = [ret[n] for n in spec.names]
    elif isinstance(ret, Sequence) and not isinstance(ret, (str, bytes)):
        raw = list(ret)
    else:
        raw = [ret]
    if len(raw) != len(spec.directions):
        return None, f"expected {len(spec.directions)} objective value(s), got {len(raw)}"
    values = [_to_float(v) for v in raw]
    if any(v is None for v in values):
        return None, f"objective value(s) {raw!r} are not numbers"
    return [float(v) for v in values if v is not None], ""


def outcome_from_return(ret: Any, spec: ObjectiveSpec) -> Outcome:
    """Outcome of a job that returned ``ret``."""
    attrs: dict[str, Any] = {}
    constraints: dict[str, float] = {}
    status = "success"
    reason = ""
    if isinstance(ret, Mapping):
        for key, value in ret.items():
            scalar = _scalar(value)
            if scalar is not None or value is None:
                attrs[str(key)] = scalar
        status = str(ret.get("status", "success") or "success").lower()
        reason = str(ret.get("reason", "") or "")
        raw_constraint = ret.get("constraint")
        items: Iterable[tuple[Any, Any]]
        if isinstance(raw_constraint, Mapping):
            items = raw_constraint.items()
        elif raw_constraint is not None:
            items = [("constraint", raw_constraint)]
        else:
            items = []
        for name, value in items:
            number = _to_float(value)
            if number is None or math.isnan(number):
                constraints[str(name)] = 1.0  # unknown -> infeasible
            else:
                constraints[str(name)] = number
    if status == "pruned":
        return Outcome(state="pruned", status="pruned", reason=reason or "pruned", user_attrs=attrs)
    if STATE_OF_STATUS.get(status) == "FAIL":
        return Outcome(
            state="fail",
            status=status,
            reason=reason or status,
            user_attrs=attrs,
            constraints=constraints,
        )
    values, error = _values_from(ret, spec)
    if values is None:
        return Outcome(state="fail", status="failed", reason=error, user_attrs=attrs)
    if not all(math.isfinite(v) for v in values):
        return Outcome(
            state="fail",
            status="failed",
            reason=f"non-finite objective value(s) {values}",
            user_attrs=attrs,
            constraints=constraints,
        )
    return Outcome(
        state="complete",
        values=values,
        status=status,
        reason=reason,
        user_attrs=attrs,
        constraints=constraints,
    )
