"""Optuna storage and study: resolve the storage, open/resume the study, count progress.

Storage choice: by default a journal file ``<results_dir>/optuna_journal.log`` (Optuna's
``JournalStorage(JournalFileBackend(path))``). Measured for this project (DESIGN.md): under
16-48 concurrent writers on 2 cores SQLite raised "database is locked" (fixable with a 60 s
timeout, still 2-4x slower) while the journal file had no errors and was fastest;
optuna-dashboard opens both. Any Optuna storage URL is accepted as well:

* ``sqlite:///rel/or/abs.db`` (relative paths made absolute; 60 s lock timeout),
  ``postgresql://...``, ``mysql://...`` (anything with ``://``) -> ``RDBStorage``;
* a path ending in ``.db``/``.sqlite``/``.sqlite3`` -> SQLite at that (absolute) path;
* any other path -> journal file at that (absolute) path.

Trial bookkeeping kept in trial user attributes (all visible in the dashboard):
``status`` (success | pruned | failed | diverged | oom | stale | penalty), ``reason``,
``worker`` (``host:pid`` of the process that asked the trial), ``stale`` (a trial left
RUNNING by a killed sweep; marked FAIL and re-queued, not counted towards ``n_trials``),
``penalty_for_trial`` (an infeasible COMPLETE record standing in for a failed trial so that
samplers learn to avoid it; not counted either).
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JOURNAL_NAME = "optuna_journal.log"
ATTR_STATUS = "status"
ATTR_REASON = "reason"
ATTR_WORKER = "worker"
ATTR_STALE = "stale"
ATTR_PENALTY_FOR = "penalty_for_trial"
_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


class StudyMismatchError(ValueError):
    """The existing study is incompatible with the requested objectives."""


def normalize_storage(storage: str) -> str:
    """Returns a canonical storage string: an RDB URL or an absolute journal file path.

    Args:
        storage: URL or file path (relative paths are made absolute against the CWD).
    """
    storage = str(storage).strip()
    if storage.startswith("sqlite:///"):
        path = storage[len("sqlite:///") :]
        if path and not path.startswith("/") and path != ":memory:":
            path = str(Path(path).absolute())
            return f"sqlite:///{path}"
        return storage
    if "://" in storage:
        return storage
    path = Path(storage).expanduser().absolute()
    if path.suffix in _SQLITE_SUFFIXES:
        return f"sqlite:///{path}"
    return str(path)


def default_storage(app_cfg: Any, fallback_dir: str | Path) -> str:
    """Default storage: ``<results_dir>/optuna_journal.log`` or the sweep dir's journal."""
    results_dir = None
    try:
        results_dir = app_cfg.get("results_dir") if hasattr(app_cfg, "get") else None
    except Exception:  # an interpolation that does not resolve outside a job
        results_dir = None
    base = Path(str(results_dir)) if results_dir else Path(str(fallback_dir))
    return normalize_storage(str(base / JOURNAL_NAME))


def is_journal(storage: str) -> bool:
    """True when ``storage`` (normalized) is a journal file path."""
    return "://" not in storage


def open_storage(storage: str) -> Any:
    """Builds the Optuna storage object for a normalized storage string."""
    import optuna

    if is_journal(storage):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        Path(storage).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(storage))
    if storage.startswith("sqlite:///"):
        db = storage[len("sqlite:///") :]
        if db and db != ":memory:":
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.RDBStorage(
            url=storage, engine_kwargs={"connect_args": {"timeout": 60}}
        )
    return optuna.storages.RDBStorage(url=storage)


def dashboard_command(storage: str) -> str:
    """The exact optuna-dashboard command for this storage."""
    import shlex

    return f"optuna-dashboard {shlex.quote(storage)}"


def open_study(
    *,
    storage: str,
    study_name: str,
    directions: Sequence[str],
    sampler: Any = None,
    pruner: Any = None,
) -> Any:
    """Creates or loads (``load_if_exists``) the study and checks its directions match."""
    import optuna

    study = optuna.create_study(
        storage=open_storage(storage),
        study_name=study_name,
        directions=list(directions),
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )
    existing = [d.name.lower() for d in study.directions]
    if existing != [d.lower() for d in directions]:
        raise StudyMismatchError(
            f"Study '{study_name}' in {storage} has directions {existing}, but this sweep asks "
            f"for {list(directions)}; use another hydra.sweeper.study_name or storage"
        )
    return study


def worker_tag() -> str:
    """``host:pid`` identifying the current process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_counted(trial: Any) -> bool:
    attrs = trial.user_attrs
    return not attrs.get(ATTR_STALE) and ATTR_PENALTY_FOR not in attrs


@dataclass
class Progress:
    """Trial counts towards ``n_trials`` (stale and penalty records excluded)."""

    finished: int = 0
    failed: int = 0
    pruned: int = 0
    complete: int = 0
    running: int = 0
    waiting: int = 0

    @property
    def failure_rate(self) -> float:
        """Failed / finished (0 when nothing finished)."""
        return self.failed / self.finished if self.finished else 0.0


def progress(study: Any) -> Progress:
    """Counts the study's trials that count towards ``n_trials``."""
    from optuna.trial import TrialState

    out = Progress()
    for trial in study.get_trials(deepcopy=False):
        if not _is_counted(trial):
            continue
        if trial.state == TrialState.RUNNING:
            out.running += 1
        elif trial.state == TrialState.WAITING:
            out.waiting += 1
        else:
            out.finished += 1
            out.failed += trial.state == TrialState.FAIL
            out.pruned += trial.state == TrialState.PRUNED
            out.complete += trial.state == TrialState.COMPLETE
    return out


def recover_stale(
    study: Any, *, all_hosts: bool = False, finish: Callable[[Any], bool] | None = None
) -> list[int]:
    """Marks trials left RUNNING by dead processes FAIL (stale) and re-queues their params.

    A RUNNING trial is stale when its ``worker`` attr names this host and a dead pid (or has
    no worker attr, or ``all_hosts``). Trials of live processes and of other hosts are left
    alone, so several sweeps may share one study. ``finish(frozen) -> bool`` may finish a
    dead process's trial itself (its job had recorded a result); such a trial is not stale.

    Returns:
        The numbers of the trials marked stale.
    """
    import optuna
    from optuna.trial import TrialState

    host = socket.gethostname()
    stale: list[int] = []
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = str(frozen.user_attrs.get(ATTR_WORKER, ""))
        w_host, _, w_pid = worker.rpartition(":")
        if worker and not all_hosts:
            if w_host != host or not w_pid.isdigit() or _pid_alive(int(w_pid)):
                continue
        if finish is not None and finish(frozen):
            continue
        trial = optuna.trial.Trial(study, frozen._trial_id)
        trial.set_user_attr(ATTR_STALE, True)
        trial.set_user_attr(ATTR_STATUS, "stale")
        trial.set_user_attr(
            ATTR_REASON, f"left RUNNING by a sweep process that no longer exists ({worker})"
        )
        study.tell(frozen.number, state=TrialState.FAIL, skip_if_finished=True)
        if frozen.params:
            study.enqueue_trial(
                dict(frozen.params), user_attrs={"requeued_from_trial": frozen.number}
            )
        stale.append(frozen.number)
    return stale


def worst_values(study: Any) -> list[float] | None:
    """Worst finite objective values over counted feasible COMPLETE trials (None if none)."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    directions = study.directions
    worst: list[float | None] = [None] * len(directions)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if not _is_counted(trial) or trial.values is None:
            continue
        for i, (value, direction) in enumerate(zip(trial.values, directions)):
            if not math.isfinite(value):
                continue
            cur = worst[i]
            if cur is None:
                worst[i] = value
            elif direction == StudyDirection.MAXIMIZE:
                worst[i] = min(cur, value)
            else:
                worst[i] = max(cur, value)
    if any(w is None for w in worst):
        return None
    return [float(w) for w in worst if w is not None]


def add_penalty_record(study: Any, failed: Any) -> bool:
    """Adds an infeasible COMPLETE twin of a failed trial so samplers avoid its params.

    Optuna's samplers ignore FAIL trials (TPE only reads COMPLETE/PRUNED), so a config that
    always fails (OOM, divergence) would be proposed again and again. The twin has the failed
    trial's params, the worst objective values seen so far and the constraint ``failed=1``
    (infeasible): TPE puts infeasible trials in its "bad" group, GP models the constraint,
    and ``study.best_trial(s)`` skip it. The failed trial itself stays FAIL with its reason;
    the twin carries ``penalty_for_trial`` and is excluded from counts and CSV export.

    Returns:
        True if a twin was added (needs params and at least one finished value).
    """
    import optuna

    values = worst_values(study)
    if values is None or not failed.params:
        return False
    twin = optuna.trial.create_trial(
        state=optuna.trial.TrialState.COMPLETE,
        values=values,
        params=dict(failed.params),
        distributions=dict(failed.distributions),
        user_attrs={ATTR_PENALTY_FOR: failed.number, ATTR_STATUS: "penalty"},
        constraints={"failed": 1.0},
    )
    study.add_trial(twin)
    return True
