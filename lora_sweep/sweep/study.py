"""Optuna storage and study: resolve the storage, open/resume the study, count progress.

Storage choice: by default a journal file ``optuna_journal.log`` in the directory the app's hooks
name (``storage_dir``; lora_sweep: ``results_dir``) or else the sweep directory (Optuna's
``JournalStorage(JournalFileBackend(path))``). Measured for this project (DESIGN.md): under
16-48 concurrent writers on 2 cores SQLite raised "database is locked" (fixable with a 60 s
timeout, still 2-4x slower) while the journal file had no errors and was fastest;
optuna-dashboard opens both. Any Optuna storage URL is accepted as well:

* ``sqlite:///rel/or/abs.db`` (relative paths made absolute; 60 s lock timeout),
  ``postgresql://...``, ``mysql://...`` (anything with ``://``) -> ``RDBStorage``;
* a path ending in ``.db``/``.sqlite``/``.sqlite3`` -> SQLite at that (absolute) path;
* any other path -> journal file at that (absolute) path (its appends first drop a record torn
  by a killed writer, see ``_repairing_backend_class``).

RDB storages are opened once per process and settings (one connection pool per worker);
server databases get ``SERVER_ENGINE_KWARGS`` (pre-ping, small pool), overridable with
``hydra.sweeper.engine_kwargs``; a bare ``postgresql://`` uses whichever driver is installed.

Trial bookkeeping kept in trial user attributes (all visible in the dashboard):
``status`` (success | pruned | failed | diverged | stale | interrupted | penalty), ``reason``,
``worker`` (``host:pid`` of the process that asked the trial), ``stale`` (a trial left
RUNNING by a killed sweep; marked FAIL and re-queued, not counted towards ``n_trials``),
``penalty_for_trial`` (an infeasible COMPLETE record standing in for a failed trial so that
samplers learn to avoid it; not counted either), ``interrupted`` (a trial stopped by Ctrl-C:
FAIL without a penalty, its params re-queued, not counted), ``requeued_from_trial``.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from lora_sweep.sweep.durable import drop_torn_tail

JOURNAL_NAME = "optuna_journal.log"
ATTR_STATUS = "status"
ATTR_REASON = "reason"
ATTR_WORKER = "worker"
ATTR_GPU = "gpu"  # the GPU a pinned worker ran the trial on (its CUDA_VISIBLE_DEVICES entry)
ATTR_STALE = "stale"
ATTR_PENALTY_FOR = "penalty_for_trial"
ATTR_INTERRUPTED = "interrupted"
ATTR_REQUEUED_FROM = "requeued_from_trial"
_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
# A RUNNING trial without a worker attr is stale only this long after its start (see recover_stale).
NO_WORKER_GRACE_S = 300.0


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
    file_path = Path(storage).expanduser().absolute()
    if file_path.suffix in _SQLITE_SUFFIXES:
        return f"sqlite:///{file_path}"
    return str(file_path)


def default_storage(directory: str | Path) -> str:
    """Default storage: the journal file ``<directory>/optuna_journal.log``."""
    return normalize_storage(str(Path(str(directory)) / JOURNAL_NAME))


def is_journal(storage: str) -> bool:
    """True when ``storage`` (normalized) is a journal file path."""
    return "://" not in storage


# Connection-pool defaults for server databases (PostgreSQL, MySQL): test a pooled connection
# before use (a sweep outlives server restarts and idle-connection cuts between machines) and
# renew connections hourly. One sweep process uses one connection at a time, so a small pool
# keeps K workers x (sweeper + trial reporter) well below the server's max_connections.
SERVER_ENGINE_KWARGS: dict[str, Any] = {
    "pool_pre_ping": True,
    "pool_recycle": 3600,
    "pool_size": 2,
    "max_overflow": 2,
}
SQLITE_TIMEOUT_S = 60


def _with_driver(url: str) -> str:
    """``postgresql://`` with the PostgreSQL driver that is installed.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3; the project's ``postgres`` extra
    installs psycopg2 (``psycopg2-binary``). Use psycopg2 when psycopg 3 is absent. An explicit
    driver (``postgresql+psycopg://``, ``postgresql+psycopg2://``) is kept as given.
    """
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        if importlib.util.find_spec("psycopg2") is not None:
            return "postgresql+psycopg2://" + url[len("postgresql://") :]
    return url


def redact(storage: str) -> str:
    """The storage (or a command-line argument holding it) for messages, logs and study attrs: a
    URL's password replaced by ``***``. Better still, keep passwords out of URLs (PGPASSWORD or
    ~/.pgpass are read by the driver)."""
    if "://" not in storage or "@" not in storage:
        return storage
    scheme, _, rest = storage.partition("://")
    creds, at, host = rest.rpartition("@")
    user, colon, _password = creds.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}{at}{host}"


def _drop_torn_tail(path: str) -> int:
    """Drop a torn last journal record under the journal lock (Optuna writes whole
    '\n'-terminated JSON lines, so a missing '\n' is a record that was never committed)."""
    dropped = drop_torn_tail(path)
    if dropped:
        import logging

        logging.getLogger(__name__).warning(
            "Dropped a torn last record (%d bytes) of %s left by a killed writer", dropped, path
        )
    return dropped


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that arrives inside the block until it ends, then act on it as
    the handler in place would have. Around the journal's lock: Optuna's symlink lock, hit by
    a KeyboardInterrupt while it waits, releases the lock it does not hold (another process's),
    and one hit inside its release leaves the lock file for the others to wait out (30 s).
    Only the main thread has signal handlers; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield  # None: a handler installed outside Python, which could not be put back
        return
    caught: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            if callable(previous):  # Python's default (KeyboardInterrupt), or the sweep's own
                previous(signal.SIGINT, caught[0])
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGINT)


@functools.cache
def _repairing_backend_class() -> type:
    """Optuna's journal file backend whose appends first drop a torn last record.

    Left in place, a record torn by a writer killed mid-append (a multi-page write can be cut
    short by SIGKILL, or by a power loss) would be glued to the next record, and the journal
    would no longer load in any process. The check costs one 1-byte read per append.

    Inside `batched()` appends are held and written as one at its end (see `batched_writes`).
    """
    import json

    from optuna.storages.journal import JournalFileBackend

    from lora_sweep.sweep.faults import torn_write

    class RepairingJournalFileBackend(JournalFileBackend):
        _pending: list[dict[str, Any]] | None = None

        @contextlib.contextmanager
        def batched(self) -> Iterator[None]:
            if self._pending is not None:  # nested: the outer block writes them
                yield
                return
            self._pending = []
            try:
                yield
            finally:  # an error inside still writes what the caller was told was written
                pending, self._pending = self._pending, None
                if pending:
                    self.append_logs(pending)

        def append_logs(self, logs: list[dict[str, Any]]) -> None:
            if self._pending is not None:
                self._pending.extend(logs)
                return
            payload = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode("utf-8")

            def write(data: bytes) -> None:
                with open(self._file_path, "ab") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())

            torn_write("journal_write", write, payload)  # crash tests only (not under the lock)
            with sigint_deferred():
                self._lock.acquire()
                try:
                    _drop_torn_tail(self._file_path)
                    write(payload)
                finally:
                    self._lock.release()

    return RepairingJournalFileBackend


def open_storage(storage: str, engine_kwargs: dict[str, Any] | None = None) -> Any:
    """Builds the Optuna storage object for a normalized storage string.

    Args:
        storage: Normalized storage (see :func:`normalize_storage`).
        engine_kwargs: SQLAlchemy ``create_engine`` options for an RDB storage, merged over
            the defaults (SQLite: a 60 s lock timeout; servers: :data:`SERVER_ENGINE_KWARGS`).
    """
    import optuna

    # One storage object per process and settings: a sweep worker opens the study again for
    # every trial's reporter. New RDB engines per trial would pile up connections (measured:
    # ~6 per worker on PostgreSQL, 8 workers -> 50 connections); a new journal storage replays
    # the whole log (~30 ms at 8 trials, growing), a kept one reads only what was appended.
    key = (os.getpid(), storage, repr(sorted((engine_kwargs or {}).items())))
    if is_journal(storage):
        from optuna.storages.journal import JournalStorage

        cached_journal = _JOURNALS.get(key)
        if cached_journal is not None and _inode(storage) == cached_journal[0]:
            return cached_journal[1]  # the same file (not deleted or replaced since)
        Path(storage).parent.mkdir(parents=True, exist_ok=True)
        backend = _repairing_backend_class()(storage)
        journal = JournalStorage(backend)
        _JOURNALS[key] = (_inode(storage), journal, backend)
        return journal
    cached = _STORAGES.get(key)
    if cached is not None:
        return cached
    if storage.startswith("sqlite:///"):
        db = storage[len("sqlite:///") :]
        if db and db != ":memory:":
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
        kwargs.update(engine_kwargs or {})
        url = storage
    else:
        kwargs = dict(SERVER_ENGINE_KWARGS)
        kwargs.update(engine_kwargs or {})
        url = _with_driver(storage)
    rdb = _create_with_retry(lambda: optuna.storages.RDBStorage(url=url, engine_kwargs=kwargs))
    if not storage.endswith(":memory:"):  # an in-memory database stays private to its opener
        _STORAGES[key] = rdb
    return rdb


_STORAGES: dict[tuple[int, str, str], Any] = {}
_JOURNALS: dict[tuple[int, str, str], tuple[int | None, Any, Any]] = {}


@contextlib.contextmanager
def batched_writes(storage: str) -> Iterator[None]:
    """This process's writes to the journal `storage` (as `open_storage` opened it) inside the
    block go out as one locked, fsync'd append at its end: a trial's ~50 user attrs cost one
    append instead of ~50 (0.6-0.8 ms each), and a process killed in the middle leaves none of
    them rather than some. Reads inside the block do not see them yet: write only, then leave
    the block before reading (`study.tell` reads the trial back). A no-op for an RDB storage."""
    pid = os.getpid()
    backends = [entry[2] for (owner, name, _), entry in _JOURNALS.items() if owner == pid and name == storage]
    with contextlib.ExitStack() as stack:
        for backend in backends:
            stack.enter_context(backend.batched())
        yield


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _create_with_retry(create: Callable[[], Any], attempts: int = 5) -> Any:
    """Workers that start together on a fresh database all create Optuna's tables at once, and
    all but one fail on a duplicate type or table; the tables exist when they try again."""
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(attempts):
        try:
            return create()
        except (IntegrityError, OperationalError, ProgrammingError) as exc:
            racing = not isinstance(exc, OperationalError) or "already exists" in str(exc)
            if not racing or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")  # pragma: no cover


def dashboard_command(storage: str) -> str:
    """The exact optuna-dashboard command for this storage (with the installed PostgreSQL driver)."""
    import shlex

    return f"optuna-dashboard {shlex.quote(_with_driver(storage))}"


def open_study(
    *,
    storage: str,
    study_name: str,
    directions: Sequence[str],
    sampler: Any = None,
    pruner: Any = None,
    engine_kwargs: dict[str, Any] | None = None,
) -> Any:
    """Creates or loads (``load_if_exists``) the study and checks its directions match.

    Optuna's own INFO line ("A new study created" / "Using an existing study") is silenced: the
    sweep prints which study and storage it uses, and an error must stay one line.
    """
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(max(verbosity, optuna.logging.WARNING))
    try:
        backend = open_storage(storage, engine_kwargs)
        try:  # load an existing study without writing: create_study appends to a journal even then
            backend.get_study_id_from_name(study_name)
            study = optuna.load_study(study_name=study_name, storage=backend, sampler=sampler, pruner=pruner)
        except KeyError:
            study = optuna.create_study(
                storage=backend,
                study_name=study_name,
                directions=cast("list[Literal['minimize', 'maximize']]", list(directions)),
                sampler=sampler,
                pruner=pruner,
                load_if_exists=True,
            )
    finally:
        optuna.logging.set_verbosity(verbosity)
    existing = [d.name.lower() for d in study.directions]
    if existing != [d.lower() for d in directions]:
        raise StudyMismatchError(
            f"Study '{study_name}' in {redact(storage)} has directions {existing}, but this sweep asks "
            f"for {list(directions)}; use another hydra.sweeper.study_name or storage"
        )
    return study


def check_search_space(study: Any, distributions: Mapping[str, Any]) -> None:
    """Refuses a resume whose parameter changed kind or choices since the study's trials ran.

    Optuna rejects such a parameter only when the first trial asks for it, with a traceback,
    after the sweep has started; checked here it is one line before anything runs. Widened or
    narrowed numeric ranges stay allowed (Optuna accepts them).

    Raises:
        StudyMismatchError: Naming the parameter, both spaces and the way out.
    """
    from optuna.distributions import CategoricalDistribution, check_distribution_compatibility

    def describe(dist: Any) -> str:
        if isinstance(dist, CategoricalDistribution):
            return f"choice({', '.join(map(str, dist.choices))})"
        return repr(dist)

    for trial in study.get_trials(deepcopy=False):
        for name, old in trial.distributions.items():
            new = distributions.get(name)
            if new is None:
                continue
            try:
                check_distribution_compatibility(old, new)
            except ValueError:
                raise StudyMismatchError(
                    f"study '{study.study_name}' ran {name} as {describe(old)}, but this sweep asks for "
                    f"{describe(new)}; resume with the same choices, or start a new study with "
                    "hydra.sweeper.study_name=NEW_NAME"
                ) from None


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


def is_counted(trial: Any) -> bool:
    """Whether a trial counts towards ``n_trials`` (and is exported): not a penalty record, not
    stale, not interrupted (those two were re-queued under a new number)."""
    attrs = trial.user_attrs
    return not attrs.get(ATTR_STALE) and not attrs.get(ATTR_INTERRUPTED) and ATTR_PENALTY_FOR not in attrs


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
        if not is_counted(trial):
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


def recover_stale(study: Any, *, all_hosts: bool = False, finish: Callable[[Any], bool] | None = None) -> list[int]:
    """Marks trials left RUNNING by dead processes FAIL (stale) and re-queues their params.

    A RUNNING trial is stale when its ``worker`` attr names this host and a dead pid, or has no
    worker attr ``NO_WORKER_GRACE_S`` after it started (a worker sets it right after asking:
    a fresh trial without it belongs to a live worker of a sweep that starts at the same time),
    or ``all_hosts``. Trials of live processes and of other hosts are left alone, so several
    sweeps may share one study. ``finish(frozen) -> bool`` may finish a dead process's trial
    itself (its job had recorded a result); such a trial is not stale. Two processes recovering
    at once on an RDB storage re-queue a trial once: only the one whose FAIL lands re-queues.

    Returns:
        The numbers of the trials marked stale.
    """
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    host = socket.gethostname()
    now = datetime.datetime.now()
    stale: list[int] = []
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = str(frozen.user_attrs.get(ATTR_WORKER, ""))
        w_host, _, w_pid = worker.rpartition(":")
        if worker and not all_hosts:
            if w_host != host or not w_pid.isdigit() or _pid_alive(int(w_pid)):
                continue
        if not worker and not all_hosts and frozen.datetime_start is not None:
            if (now - frozen.datetime_start).total_seconds() < NO_WORKER_GRACE_S:
                continue
        try:
            if finish is not None and finish(frozen):
                continue
            trial = optuna.trial.Trial(study, frozen._trial_id)
            trial.set_user_attr(ATTR_STALE, True)
            trial.set_user_attr(ATTR_STATUS, "stale")
            trial.set_user_attr(ATTR_REASON, f"left RUNNING by a sweep process that no longer exists ({worker})")
            study.tell(frozen.number, state=TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue  # another process finished or recovered it meanwhile
        _requeue(study, frozen)
        stale.append(frozen.number)
    return stale


def _requeue(study: Any, frozen: Any) -> None:
    """Queue a trial's params again (the next ask runs them first)."""
    if frozen.params:
        study.enqueue_trial(dict(frozen.params), user_attrs={ATTR_REQUEUED_FROM: frozen.number})


def interrupt_trial(study: Any, trial: Any) -> None:
    """Record a RUNNING trial stopped by the user (Ctrl-C) and queue its params again.

    It is told FAIL (Optuna has no "interrupted" state) with ``status: interrupted``, but it is
    not a failed configuration: no penalty record steers the sampler away from it, it does not
    count towards ``n_trials`` or the failure rate, and the next run starts with its params.
    """
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    try:
        trial.set_user_attr(ATTR_INTERRUPTED, True)
        trial.set_user_attr(ATTR_STATUS, "interrupted")
        trial.set_user_attr(ATTR_REASON, "interrupted by the user (Ctrl-C); its params are queued again")
        frozen = study.tell(trial, state=TrialState.FAIL)
    except UpdateFinishedTrialError:
        return  # it finished (or was recovered by another process) meanwhile
    _requeue(study, frozen)


def worst_values(study: Any) -> list[float] | None:
    """Worst finite objective values over counted feasible COMPLETE trials (None if none)."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    directions = study.directions
    worst: list[float | None] = [None] * len(directions)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if not is_counted(trial) or trial.values is None:
            continue
        for i, (value, direction) in enumerate(zip(trial.values, directions, strict=False)):
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
