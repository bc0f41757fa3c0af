"""The sweep's console: a sweep you can watch in one glance.

Worker 0 prints, on its standard output:

* a header (:func:`format_header`): the study and its storage, the dashboard command, the
  target, the objective and the workers;
* one line per trial of the study as it finishes (:func:`format_trial`), its own and every
  other worker's (read back from the storage): trials done of the target, number, state,
  objective value(s), the searched parameters, duration, and why it was pruned or failed;
* at the end the summary (:func:`format_summary`): counts, the top trials by the study's
  ranking, the best trial with its replay command, and the app's own summary lines.

On a terminal a progress line (tqdm) stays below those lines: done/total, pruned, failed,
running, the best so far, elapsed time and ETA. Anywhere else (CI, a pipe, a test) there is no
progress line and no escape code at all; the per-trial lines carry done/total themselves.

Whole lines only. While the sweep runs, worker 0's ``sys.stdout`` and ``sys.stderr`` (its
in-process jobs' log handlers, prints, warnings) and the pipes of the worker processes it
started go through :class:`SweepConsole`, which writes each complete line with one write,
above the progress line: lines of two workers never interleave mid-line and never tear the
progress line. A trial's own log stays in its job directory (the app decides what of it the
console shows; lora_sweep shows nothing of it unless ``verbose=true``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import shlex
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any, TextIO

from lora_sweep.sweep import study as study_mod
from lora_sweep.sweep.context import ENV_VAR

log = logging.getLogger(__name__)

PREFIX = "[lora_sweep]"
ATTR_OVERRIDES = "overrides"
"""The trial's job overrides (``shlex``-joined), set when it is asked."""
LEADERBOARD_SIZE = 5
REASON_CHARS = 200  # the rest of a long reason is in the trial's `reason` attribute and its log
TICK_S = 1.0  # progress line refresh (elapsed, ETA) while a trial runs
# the base64 trial context never reaches the console, whatever message would carry it
_TRIAL_CONTEXT = re.compile(rf"({ENV_VAR}=)[A-Za-z0-9_\-]+")
_VALUE_WIDTH = 10  # "-1.234e-05": the widest value `format_number` writes


def format_number(value: Any) -> str:
    """A value as the console shows it: floats to 4 significant digits, the rest as given."""
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return str(value)


def _override_value(text: str) -> str:
    """A command-line value shown short (``0.018924015744966476`` -> ``0.01892``)."""
    for kind in (int, float):
        try:
            return format_number(kind(text))
        except ValueError:
            continue
    return text


def format_duration(seconds: float | None) -> str:
    """``4.6s``, ``12m05s``, ``2h03m``; ``-`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """Each dotted key by its last part where no other key ends the same (``train.lr`` -> ``lr``)."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: (end if last.count(end) == 1 else key) for key, end in zip(keys, last, strict=True)}


def clean_line(text: str) -> str:
    """One line as a terminal would end up showing it (the text after its last carriage return),
    with any trial context override value masked."""
    line = text.rstrip("\r").rsplit("\r", 1)[-1]
    return _TRIAL_CONTEXT.sub(r"\1...", line) if ENV_VAR in line else line


@dataclass(frozen=True)
class TrialRow:
    """What the console shows of one finished trial.

    Attributes:
        number: Trial number.
        state: Optuna state name (``COMPLETE``, ``PRUNED``, ``FAIL``).
        values: Objective values by metric name (COMPLETE trials only).
        params: The trial's own job overrides (fixed ones left out), values shortened.
        duration_s: Start to finish, in seconds (None when unknown).
        status: The job's status (``success``, ``pruned``, ``diverged``, ``failed``, ...).
        reason: Why it was pruned or failed ('' otherwise).
        violated: The constraints above 0 of a COMPLETE trial (it is infeasible).
        gpu: The GPU its worker was pinned to ('' on the CPU or unpinned).
    """

    number: int
    state: str
    values: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    duration_s: float | None = None
    status: str = ""
    reason: str = ""
    violated: dict[str, float] = field(default_factory=dict)
    gpu: str = ""

    @classmethod
    def from_trial(cls, trial: Any, *, metric_names: Sequence[str], fixed: Collection[str] = ()) -> TrialRow:
        """The row of a finished Optuna ``FrozenTrial``; ``fixed``: the override keys every trial
        shares (not shown)."""
        attrs = trial.user_attrs
        state = trial.state.name
        values: dict[str, float] = {}
        if state == "COMPLETE" and trial.values:
            names = list(metric_names) if len(metric_names) == len(trial.values) else []
            names = names or [f"value_{i}" for i in range(len(trial.values))]
            values = dict(zip(names, trial.values, strict=True))
        reason = str(attrs.get(study_mod.ATTR_REASON) or "")
        if state == "PRUNED" and reason in ("", "pruned") and trial.last_step is not None:
            reason = f"pruned at step {trial.last_step}"
        start, end = trial.datetime_start, trial.datetime_complete
        return cls(
            number=trial.number,
            state=state,
            values=values,
            params=_params_of(trial, fixed),
            duration_s=(end - start).total_seconds() if start and end else None,
            status=str(attrs.get(study_mod.ATTR_STATUS) or ""),
            reason=reason,
            violated={k: v for k, v in trial.constraints.items() if v > 0} if state == "COMPLETE" else {},
            gpu=str(attrs.get(study_mod.ATTR_GPU) or ""),
        )


def _params_of(trial: Any, fixed: Collection[str]) -> dict[str, str]:
    """The overrides the trial's job ran with (what the search space and its hook chose), else
    its Optuna params."""
    text = trial.user_attrs.get(ATTR_OVERRIDES)
    if isinstance(text, str) and text:
        chosen = {}
        for token in shlex.split(text):
            key, sep, value = token.partition("=")
            key = key.lstrip("+~")
            if sep and key not in fixed and not key.startswith("hydra."):  # the app's own keys
                chosen[key] = _override_value(value)
        if chosen:
            return chosen
    return {key: format_number(value) for key, value in trial.params.items()}


def _why(row: TrialRow) -> str:
    if row.state == "FAIL":
        status = row.status or "failed"
        why = f"{status}: {row.reason}" if row.reason and row.reason != status else status
    elif row.state == "PRUNED":
        why = row.reason or "pruned"
    elif row.violated:
        why = "infeasible: " + ", ".join(f"{k}={format_number(v)}" for k, v in row.violated.items())
    else:
        return ""
    why = " ".join(why.split())  # one line
    return why if len(why) <= REASON_CHARS else why[: REASON_CHARS - 3] + "..."


def gpu_label(gpu: str) -> str:
    """``GPU 3`` for an index; a UUID entry (``GPU-...``, ``MIG-...``) cut to 12 characters."""
    return gpu[:12] if gpu.startswith(("GPU-", "MIG-")) else f"GPU {gpu}"


def _row_text(row: TrialRow, metric_names: Sequence[str], number_width: int) -> str:
    """``trial N STATE values duration params (why)``, in columns."""
    names = list(metric_names) or list(row.values)
    values = "  ".join(f"{n}={format_number(row.values[n])}" for n in names if n in row.values) or "-"
    width = sum(len(n) + 1 + _VALUE_WIDTH for n in names) + 2 * max(0, len(names) - 1)
    short = short_names(list(row.params))
    params = " ".join(f"{short[k]}={v}" for k, v in row.params.items()) or "-"
    device = f"  {gpu_label(row.gpu)}" if row.gpu else ""  # where a pinned worker ran it
    text = (
        f"trial {row.number:>{number_width}} {row.state:<8} {values:<{width}} "
        f"{format_duration(row.duration_s):>6}{device}  {params}"
    )
    why = _why(row)
    return f"{text}  ({why})" if why else text


def format_trial(row: TrialRow, *, metric_names: Sequence[str], done: int, total: int) -> str:
    """The line of a trial that just finished, ``done`` of ``total`` finished with it."""
    width = len(str(total))
    return clean_line(f"{PREFIX} [{done:>{width}}/{total}] {_row_text(row, metric_names, width)}")


def format_header(
    *,
    study_name: str,
    storage: str,
    dashboard: str,
    target: int,
    finished: int,
    objective: str,
    workers: str = "",
) -> list[str]:
    """The lines a sweep starts with (``storage`` and ``dashboard`` already redacted)."""
    plan = f"target: n_trials={target}, {finished} finished; {objective}"
    return [
        f"{PREFIX} study '{study_name}' in {storage}",
        f"{PREFIX} dashboard: {dashboard}",
        f"{PREFIX} {plan}; {workers}" if workers else f"{PREFIX} {plan}",
    ]


@dataclass
class SweepSummary:
    """Result of a sweep, as :func:`format_summary` prints it.

    Attributes:
        study_name: The study.
        storage: Its storage (as given; redact before printing).
        finished: Trials that count towards ``n_trials`` and finished.
        failed: Of them, FAIL.
        pruned: Of them, PRUNED.
        best: The best trial(s): ``number``, ``values`` by metric name, ``params``.
        replay_commands: The single-run command of each best trial.
        nothing_to_do: The study already had ``n_trials`` finished trials.
        notes: The app's summary lines.
        metric_names: The objectives' names.
        leaderboard: The top trials by the study's ranking, best first.
        elapsed_s: The sweep's wall time (None when it ran no trial).
    """

    study_name: str
    storage: str
    finished: int
    failed: int
    pruned: int
    best: list[dict[str, Any]] = field(default_factory=list)
    replay_commands: list[str] = field(default_factory=list)
    nothing_to_do: bool = False
    notes: list[str] = field(default_factory=list)
    metric_names: list[str] = field(default_factory=list)
    leaderboard: list[TrialRow] = field(default_factory=list)
    elapsed_s: float | None = None


def format_summary(summary: SweepSummary) -> str:
    """Human-readable end-of-sweep summary: counts, top trials, best trial and its replay
    command, the app's lines."""
    took = f" in {format_duration(summary.elapsed_s)}" if summary.elapsed_s is not None else ""
    lines = [
        f"{PREFIX} study '{summary.study_name}': {summary.finished} finished trials "
        f"({summary.failed} failed, {summary.pruned} pruned){took}",
    ]
    if summary.leaderboard:
        lines.append(f"{PREFIX} top {len(summary.leaderboard)} by the study's ranking:")
        width = max(len(str(row.number)) for row in summary.leaderboard)
        for rank, row in enumerate(summary.leaderboard, start=1):
            lines.append(f"{PREFIX} {rank:>2}. {_row_text(row, summary.metric_names, width)}")
    if not summary.best:
        lines.append(f"{PREFIX} no feasible completed trial yet")
    for best, command in zip(summary.best, summary.replay_commands, strict=False):
        values = ", ".join(
            f"{k}={v:.6g}" if isinstance(v, float) and math.isfinite(v) else f"{k}={v}"
            for k, v in best["values"].items()
        )
        lines.append(f"{PREFIX} best trial {best['number']}: {values}; params {best['params']}")
        lines.append(f"{PREFIX} replay: {command}")
    lines.extend(f"{PREFIX} {note}" for note in summary.notes)
    return "\n".join(clean_line(line) for line in lines)


def _best_text(best: Sequence[Any], metric_names: Sequence[str]) -> str:
    if not best:
        return ""
    if len(best) > 1:
        return f"best: {len(best)} trials on the front"
    trial = best[0]
    values = ", ".join(f"{n}={format_number(v)}" for n, v in zip(metric_names, trial.values or [], strict=False))
    return f"best: #{trial.number} {values}"


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


@dataclass
class _Follow:
    """The study the console follows, and what it has shown of it."""

    study: Any
    total: int
    metric_names: list[str]
    fixed: frozenset[str]
    best: Callable[[], Sequence[Any]] | None
    seen: set[int]
    done: int
    best_text: str = ""


class SweepConsole:
    """Whole lines on the sweep's console, above a live progress line on a terminal.

    Args:
        stream: Where lines and the progress line go (default: ``sys.stdout`` now).
        errors: Where error lines go (default: ``sys.stderr`` now).
        live: Show a progress line; None: when ``stream`` is a terminal.
        trials: Print a line per finished trial while following a study (worker 0; the other
            workers print none, worker 0 reads their trials back from the storage).
    """

    def __init__(
        self,
        *,
        stream: TextIO | None = None,
        errors: TextIO | None = None,
        live: bool | None = None,
        trials: bool = True,
    ) -> None:
        self.stream: TextIO = stream if stream is not None else sys.stdout
        self.errors: TextIO = errors if errors is not None else sys.stderr
        self.live = _is_tty(self.stream) if live is None else live
        self.show_trials = trials
        self._lock = threading.RLock()  # one line at a time, from any thread
        self._poll_lock = threading.Lock()  # one poll at a time; never held while writing
        self._bar: Any = None
        self._follow: _Follow | None = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    # ----------------------------------------------------------------- lines
    def write(self, text: str, *, error: bool = False) -> None:
        """Write ``text`` as whole lines, each with one write and a flush, above the progress line."""
        stream = self.errors if error else self.stream
        with self._lock:
            for line in str(text).split("\n"):
                self._emit(stream, clean_line(line))

    def note(self, text: str, *, error: bool = False) -> None:
        """One ``[lora_sweep] ...`` line."""
        self.write(f"{PREFIX} {text}", error=error)

    def _emit(self, stream: TextIO, line: str) -> None:
        bar = self._bar
        try:
            if bar is not None:
                bar.clear()
                self.stream.flush()  # the cleared line reaches the terminal before an error line
            stream.write(line + "\n")
            stream.flush()
            if bar is not None:
                bar.refresh()
        except (OSError, ValueError):  # a closed or broken console: the sweep goes on without it
            pass  # (not logged: the log handler may write through this very console)

    # ----------------------------------------------------------------- progress
    def follow(
        self,
        study: Any,
        *,
        total: int,
        metric_names: Sequence[str],
        fixed: Collection[str] = (),
        best: Callable[[], Sequence[Any]] | None = None,
        poll_every_s: float | None = None,
    ) -> None:
        """From now on, print a line for each trial of ``study`` that finishes and keep the
        progress line up to date (trials that finished before are counted, not shown).

        Args:
            study: The Optuna study.
            total: The sweep's target (``n_trials``).
            metric_names: The objectives' names.
            fixed: Override keys every trial shares (left out of the lines).
            best: The study's best trial(s) now, for the progress line.
            poll_every_s: Also read the study back this often (other processes' trials);
                None: only on :meth:`poll` (after each of this process's trials).
        """
        trials = study.get_trials(deepcopy=False)
        finished = [t for t in trials if t.state.is_finished()]
        self._follow = _Follow(
            study=study,
            total=total,
            metric_names=list(metric_names),
            fixed=frozenset(fixed),
            best=best,
            seen={t.number for t in finished},
            done=sum(study_mod.is_counted(t) for t in finished),
        )
        if self.live:
            from tqdm import tqdm

            with self._lock:
                self._bar = tqdm(
                    total=total,
                    initial=self._follow.done,
                    file=self.stream,
                    desc=PREFIX,
                    bar_format="{desc} {n_fmt}/{total_fmt} trials |{bar:20}| [{elapsed}<{remaining}]{postfix}",
                    dynamic_ncols=True,
                    leave=False,
                    smoothing=0,  # ETA from the mean trial time so far: trials are long and uneven
                )
        self.poll()
        if self.live or poll_every_s is not None:
            self._stop.clear()
            self._ticker = threading.Thread(target=self._tick, args=(poll_every_s,), name="sweep-console", daemon=True)
            self._ticker.start()

    def poll(self) -> None:
        """Print the lines of the trials that finished since the last poll; update the progress line."""
        follow = self._follow
        if follow is None:
            return
        with self._poll_lock:  # the storage is read outside `_lock`: a job may log meanwhile
            trials = follow.study.get_trials(deepcopy=False)
            new = sorted(
                (t for t in trials if t.state.is_finished() and t.number not in follow.seen),
                key=lambda t: (t.datetime_complete or datetime.min, t.number),
            )
            lines = []
            for trial in new:
                follow.seen.add(trial.number)
                if not study_mod.is_counted(trial):  # penalty records, stale or interrupted trials
                    continue
                follow.done += 1
                row = TrialRow.from_trial(trial, metric_names=follow.metric_names, fixed=follow.fixed)
                lines.append(format_trial(row, metric_names=follow.metric_names, done=follow.done, total=follow.total))
            if lines and follow.best is not None:
                try:
                    follow.best_text = _best_text(follow.best(), follow.metric_names)
                except Exception:  # noqa: BLE001 - an app hook's error never stops the sweep
                    log.debug("best trial for the progress line failed", exc_info=True)
            counted = [t for t in trials if study_mod.is_counted(t)]
            states = [t.state.name for t in counted]
            finished = sum(t.state.is_finished() for t in counted)
        with self._lock:
            if self.show_trials:
                for line in lines:
                    self._emit(self.stream, clean_line(line))
            bar = self._bar
            if bar is not None:
                parts = [
                    f"pruned {states.count('PRUNED')}",
                    f"failed {states.count('FAIL')}",
                    f"running {states.count('RUNNING')}",
                ]
                bar.total = max(follow.total, finished)
                bar.n = finished
                bar.set_postfix_str(", ".join([*parts, follow.best_text] if follow.best_text else parts), refresh=False)
                bar.refresh()

    def _tick(self, poll_every_s: float | None) -> None:
        last_poll = time.monotonic()
        while not self._stop.wait(TICK_S):
            try:
                if poll_every_s is not None and time.monotonic() - last_poll >= poll_every_s:
                    last_poll = time.monotonic()
                    self.poll()
                else:
                    with self._lock:
                        if self._bar is not None:
                            self._bar.refresh()  # elapsed and ETA move while a trial runs
            except Exception:  # noqa: BLE001 - the console never stops a sweep
                log.debug("console refresh failed", exc_info=True)

    def close(self) -> None:
        """Stop following: the last trials' lines, then the progress line goes (the summary follows)."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=10)
            self._ticker = None
        try:
            self.poll()
        except Exception:  # noqa: BLE001 - e.g. the storage went away: the summary says the rest
            log.debug("last console poll failed", exc_info=True)
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        self._follow = None

    # ----------------------------------------------------------------- other writers
    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """While the sweep runs, this process's ``sys.stdout`` and ``sys.stderr`` write whole
        lines through the console (a job's log handler resolves ``ext://sys.stdout`` then)."""
        saved = sys.stdout, sys.stderr
        proxies = _LineWriter(self, saved[0], error=False), _LineWriter(self, saved[1], error=True)
        sys.stdout, sys.stderr = proxies
        try:
            yield
        finally:
            sys.stdout, sys.stderr = saved
            for proxy in proxies:
                proxy.detach()

    def relay(self, pipe: IO[bytes], *, error: bool = False) -> threading.Thread:
        """Copy a worker process's output pipe to the console, line by line, until it closes."""

        def copy() -> None:
            try:
                with pipe:
                    for raw in iter(pipe.readline, b""):
                        self.write(raw.decode(errors="replace").rstrip("\n"), error=error)
            except (OSError, ValueError):  # the pipe went away with its worker
                pass

        thread = threading.Thread(target=copy, name="sweep-relay", daemon=True)
        thread.start()
        return thread


class _LineWriter:
    """A text stream that hands each complete line to the console (a partial line waits for its
    newline). Detached, it writes straight to the stream it replaced: log handlers created
    during the sweep keep a reference to it."""

    def __init__(self, console: SweepConsole, target: TextIO, *, error: bool) -> None:
        self._console = console
        self._target = target
        self._error = error
        self._partial = ""
        self._lock = threading.Lock()
        self._detached = False

    def write(self, text: str) -> int:
        if self._detached:
            return self._target.write(text)
        with self._lock:
            self._partial += text
            if "\n" not in self._partial:
                return len(text)
            complete, self._partial = self._partial.rsplit("\n", 1)
        self._console.write(complete, error=self._error)
        return len(text)

    def flush(self) -> None:
        if self._detached:
            self._target.flush()

    def isatty(self) -> bool:
        return _is_tty(self._target)

    def detach(self) -> None:
        with self._lock:
            rest, self._partial = self._partial, ""
            self._detached = True
        if rest:
            self._console.write(rest, error=self._error)

    def __getattr__(self, name: str) -> Any:  # encoding, fileno, buffer, ...: the real stream's
        return getattr(self._target, name)
