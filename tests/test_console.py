"""The sweep console: a header, one line per trial, the leaderboard and summary; a progress line
on a terminal only; whole lines from every worker; no Hydra launch chatter, no trial context."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution

from lora_sweep.cli import SweepConsoleFilter
from lora_sweep.sweep.console import SweepConsole, TrialRow, clean_line, format_duration, format_trial, short_names
from lora_sweep.sweep.context import ENV_VAR
from lora_sweep.sweep.hooks import SweepHooks
from lora_sweep.sweep.runner import best_trials, rank_trials
from lora_sweep.sweep.study import open_storage, progress
from lora_sweep.sweep_hooks import HOOKS
from tests.conftest import REPO, run_cli
from tests.scale_helpers import SWEEP_TINY, real_trials

optuna.logging.set_verbosity(optuna.logging.WARNING)
APP = REPO / "tests" / "sweep_apps" / "app.py"

# The line formats of a sweep's console (a trial's params are `name=value` words).
DURATION = r"(?:\d+\.\ds|\d+m\d\ds|\d+h\d\dm|-)"
ROW = (
    rf"trial +(?P<number>\d+) (?P<state>COMPLETE|PRUNED|FAIL) +(?P<values>-|(?:\w+=\S+ *)+) +"
    rf"(?P<duration>{DURATION})  (?P<params>(?:\S+=\S+ ?)+|-)(?:  \((?P<why>.+)\))?"
)
TRIAL = re.compile(rf"\[lora_sweep\] \[ *(?P<done>\d+)/(?P<total>\d+)\] {ROW}")
RANKED = re.compile(rf"\[lora_sweep\] +(?P<rank>\d+)\. {ROW}")
HEADER = [
    re.compile(r"\[lora_sweep\] study '\w+' in \S+"),
    re.compile(r"\[lora_sweep\] dashboard: optuna-dashboard \S+.*"),
    re.compile(r"\[lora_sweep\] target: n_trials=\d+, \d+ finished; (?:maximize|minimize) \w+; .*worker.*"),
]
SUMMARY = [
    re.compile(r"\[lora_sweep\] study '\w+': \d+ finished trials \(\d+ failed, \d+ pruned\) in \S+"),
    re.compile(r"\[lora_sweep\] top \d+ by the study's ranking:"),
    RANKED,
    re.compile(r"\[lora_sweep\] no feasible completed trial yet"),
    re.compile(r"\[lora_sweep\] best trial \d+: .*; params \{.*\}"),
    re.compile(r"\[lora_sweep\] replay: python .*"),
]


class FakeTerminal(io.StringIO):
    """What a terminal receives, from a stream that says it is one."""

    def isatty(self) -> bool:
        return True


def rendered(raw: str) -> list[str]:
    """The lines a terminal ends up showing: each line's text after its last carriage return."""
    return [seg.rstrip("\r").rsplit("\r", 1)[-1] for seg in raw.split("\n")]


def _study(directions: list[str] | None = None) -> optuna.Study:
    return optuna.create_study(directions=directions or ["minimize"], sampler=optuna.samplers.RandomSampler(seed=0))


def _finish(study: optuna.Study, state: str, value: float | None = None, **attrs: object) -> None:
    trial = study.ask({"train.lr": FloatDistribution(1e-4, 1e-1, log=True), "lora.alpha": FloatDistribution(1, 64)})
    for key, attr in attrs.items():
        trial.set_user_attr(key, attr)
    if state == "pruned":
        trial.report(1.0, 7)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    elif state == "fail":
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    else:
        study.tell(trial, value)


# ----------------------------------------------------------------- formatting


def test_trial_line_has_number_state_values_params_duration_and_reason() -> None:
    study = _study()
    overrides = (
        f"results_dir=/r lora.r=8 train.lr=0.018924015744966476 lora.alpha=16 ++hydra.job.env_set.{ENV_VAR}=eyJzdG9y"
    )
    _finish(study, "complete", 0.25, overrides=overrides)
    _finish(study, "pruned", status="pruned", reason="pruned")
    _finish(study, "fail", status="diverged", reason="loss not finite\nat step 3")
    fixed = ["results_dir"]
    rows = [TrialRow.from_trial(t, metric_names=["loss"], fixed=fixed) for t in study.trials]
    lines = [format_trial(row, metric_names=["loss"], done=i + 1, total=20) for i, row in enumerate(rows)]
    for line in lines:
        assert TRIAL.fullmatch(line), line
    done = TRIAL.fullmatch(lines[0])
    assert (
        done is not None
        and done["number"] == "0"
        and done["state"] == "COMPLETE"
        and done["values"].strip() == "loss=0.25"
    )
    assert done["params"].startswith("r=8 lr=0.01892 alpha=16") and done["why"] is None  # fixed keys left out
    assert ENV_VAR not in lines[0]  # never the base64 trial context
    pruned = TRIAL.fullmatch(lines[1])
    assert pruned is not None and pruned["why"] == "pruned at step 7" and pruned["values"].strip() == "-"
    failed = TRIAL.fullmatch(lines[2])
    assert failed is not None and failed["state"] == "FAIL" and failed["why"] == "diverged: loss not finite at step 3"
    assert lines[0].startswith("[lora_sweep] [ 1/20] trial  0 COMPLETE loss=0.25")  # aligned columns


def test_small_helpers() -> None:
    assert short_names(["train.lr", "lora.r", "lora.dropout", "model.dropout"]) == {
        "train.lr": "lr",
        "lora.r": "r",
        "lora.dropout": "lora.dropout",
        "model.dropout": "model.dropout",
    }
    assert [format_duration(s) for s in (4.62, 65, 7380, None)] == ["4.6s", "1m05s", "2h03m", "-"]
    assert clean_line(f"50%|##  \r100%|####  x {ENV_VAR}=eyJhIjox-_Z") == f"100%|####  x {ENV_VAR}=..."


def test_rank_trials_is_the_studys_ranking_best_first() -> None:
    study = _study()
    for value in (3.0, 1.0, 2.0, 0.5):
        _finish(study, "complete", value)
    _finish(study, "pruned")
    infeasible = study.ask()
    infeasible.set_constraint("c", 1.0)
    study.tell(infeasible, 0.1)  # the lowest value, but infeasible: never ranked
    ranked = rank_trials(study, SweepHooks(), limit=5)
    assert [t.number for t in ranked] == [3, 1, 2, 0]
    assert [t.number for t in best_trials(study, SweepHooks())] == [3]  # what the summary calls best
    pareto = _study(["minimize", "minimize"])
    for values in ([1.0, 4.0], [4.0, 1.0], [2.0, 2.0], [3.0, 3.0], [5.0, 5.0]):
        trial = pareto.ask()
        pareto.tell(trial, values)
    # successive Pareto fronts, each by its first objective
    assert [t.number for t in rank_trials(pareto, SweepHooks(), limit=4)] == [0, 2, 1, 3]


def test_console_filter_hides_a_quiet_sweeps_logs_only() -> None:
    def shown(flt: SweepConsoleFilter, name: str, level: int) -> bool:
        return flt.filter(logging.LogRecord(name, level, __file__, 1, "msg", None, None))

    trial_log = SweepConsoleFilter(verbose=False, mode="MULTIRUN", quiet_level=None)
    assert not shown(trial_log, "lora_sweep.train", logging.INFO) and not shown(trial_log, "x", logging.ERROR)
    sweep_log = SweepConsoleFilter(verbose=False, mode="MULTIRUN", quiet_level="WARNING", loggers=["lora_sweep"])
    assert not shown(sweep_log, "lora_sweep.sweep_hooks", logging.INFO)
    assert shown(sweep_log, "lora_sweep.sweep_hooks", logging.WARNING) and shown(sweep_log, "submitit", logging.INFO)
    for loud in (SweepConsoleFilter(verbose=True, mode="MULTIRUN"), SweepConsoleFilter(verbose=False, mode="RUN")):
        assert shown(loud, "lora_sweep.train", logging.INFO)


# ----------------------------------------------------------------- the console class


def _follow_three_trials(stream: io.StringIO) -> list[str]:
    """Three trials finishing while a job prints, warns and another thread writes lines; the
    lines the console should show, in order."""
    console = SweepConsole(stream=stream, errors=stream)
    study = _study()
    console.follow(study, total=3, metric_names=["value"], best=lambda: best_trials(study, SweepHooks()))
    expected = []
    with console.capture():
        for i in range(3):
            print("job log", i, "partial", end="")  # one line in two writes
            print(" end")
            sys.stderr.write(f"job warning {i}\n")
            writer = threading.Thread(target=lambda: [console.write(f"worker line {k}") for k in range(20)])
            writer.start()
            writer.join()
            _finish(study, "complete", float(i))
            console.poll()
            expected += [f"job log {i} partial end", f"job warning {i}", *(f"worker line {k}" for k in range(20))]
            expected.append(
                format_trial(
                    TrialRow.from_trial(study.trials[i], metric_names=["value"]),
                    metric_names=["value"],
                    done=i + 1,
                    total=3,
                )
            )
    console.close()
    return expected


def test_progress_line_on_a_terminal_keeps_every_line_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "121")
    monkeypatch.setenv("LINES", "41")
    terminal = FakeTerminal()
    expected = _follow_three_trials(terminal)
    raw = terminal.getvalue()
    assert "\r" in raw and "0/3 trials |" in raw and "2/3 trials |" in raw  # the progress line was drawn
    assert "pruned 0, failed 0" in raw and "best: #0 value=0" in raw
    assert [line for line in rendered(raw) if line.strip()] == expected  # ... and never tore a line


def test_no_progress_line_and_no_escape_codes_off_a_terminal() -> None:
    stream = io.StringIO()
    expected = _follow_three_trials(stream)
    raw = stream.getvalue()
    assert "\r" not in raw and "\x1b" not in raw
    assert raw.splitlines() == expected


# ----------------------------------------------------------------- real sweeps


def _lines_match(lines: list[str], notes: list[str]) -> None:
    """Every line is one of the console's formats (or one of the app's summary lines)."""
    formats = [*HEADER, TRIAL, *SUMMARY]
    for line in lines:
        assert any(f.fullmatch(line) for f in formats) or line in notes, line


def _load(results: Path) -> optuna.Study:
    return optuna.load_study(study_name="lora_sweep", storage=open_storage(str(results / "optuna_journal.log")))


@pytest.mark.slow
def test_default_sweep_prints_a_header_a_line_per_trial_and_the_leaderboard(tmp_path: Path) -> None:
    proc = run_cli("-m", f"results_dir={tmp_path}", "hydra.sweeper.n_trials=4", *SWEEP_TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stdout and "\x1b" not in proc.stdout  # captured: no progress line
    lines = proc.stdout.splitlines()
    assert not any(f"{ENV_VAR}=" in line or "Launching" in line or " : " in line for line in lines)
    study = _load(tmp_path)
    finished = progress(study).finished
    ranked = rank_trials(study, HOOKS)
    best = best_trials(study, HOOKS)
    notes = [f"[lora_sweep] {note}" for note in HOOKS.summary_lines(study)]
    leaderboard = 1 + len(ranked) if ranked else 0
    assert len(lines) == 3 + finished + 1 + leaderboard + (2 * len(best) or 1) + len(notes), proc.stdout
    for line, header in zip(lines, HEADER, strict=False):
        assert header.fullmatch(line), line
    trial_lines = list(map(TRIAL.fullmatch, lines[3 : 3 + finished]))
    assert all(trial_lines) and len(trial_lines) == finished == 4, lines
    by_number = {t.number: t for t in study.trials}
    for done, match in enumerate(trial_lines, start=1):
        assert match is not None and int(match["done"]) == done and match["total"] == "4"
        trial = by_number[int(match["number"])]
        assert match["state"] == trial.state.name
        assert re.fullmatch(r"r=\d+ lr=\S+ alpha=\S+", match["params"]), match["params"]  # the searched ones
        if trial.state.name == "COMPLETE":
            assert match["values"].strip() == f"stability_index={trial.value:.4g}"
        else:
            assert match["why"], match.string  # why it was pruned or failed
    _lines_match(lines, notes)
    assert [int(m["number"]) for m in map(RANKED.fullmatch, lines) if m] == [t.number for t in ranked]
    # every trial's own log (steps, self-check, LoRA line) is in its run directory, not on the console
    log = (tmp_path / "sweeps" / "lora_sweep" / "0" / "lora_sweep.log").read_text()
    assert "step 8/8" in log and "self-check passed" in log and "LoRA r=" in log
    assert "step 8/8" not in proc.stdout and "self-check" not in proc.stdout


@pytest.mark.slow
def test_verbose_sweep_shows_the_trials_logs_too(tmp_path: Path) -> None:
    proc = run_cli("-m", f"results_dir={tmp_path}", "hydra.sweeper.n_trials=2", "verbose=true", *SWEEP_TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert sum("step 8/8 loss" in line for line in lines) == 2 and "self-check passed" in proc.stdout
    assert len([line for line in lines if TRIAL.fullmatch(line)]) == 2
    assert not any(f"{ENV_VAR}=" in line or "Launching" in line for line in lines)


@pytest.mark.slow
def test_two_workers_print_whole_lines_only(tmp_path: Path) -> None:
    # verbose, a log line per step and trials long enough that both workers train at once: many
    # lines from two processes, each of which must come out whole
    longer = [a for a in SWEEP_TINY if not a.startswith(("train.max_steps=", "train.log_every="))]
    proc = run_cli(
        "-m",
        f"results_dir={tmp_path}",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.n_jobs=2",
        "verbose=true",
        "train.max_steps=30",
        "train.log_every=1",
        "hydra/sweeper/pruner=none",
        *longer,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    study = _load(tmp_path)
    # two worker processes ran (under load one may finish every trial before the other starts one)
    assert "; 2 workers x 1 thread" in proc.stdout
    # a trial's log records, and (verbose) the sweep process's own
    job_log = re.compile(r"\[\d{4}-\d\d-\d\d [\d:,]+\](?:\[[\w.]+\]\[(?:INFO|WARNING)\] -|\[HYDRA\]) \S.*")
    notes = [f"[lora_sweep] {note}" for note in HOOKS.summary_lines(study)]
    for line in lines:
        assert job_log.fullmatch(line) or any(f.fullmatch(line) for f in [*HEADER, TRIAL, *SUMMARY]) or line in notes
    # every step line of every trial came through, once (log_every=1: a line per step run)
    steps = sum(bool(re.search(r"\]\[lora_sweep\.train\]\[INFO\] - step \d+/30 loss ", line)) for line in lines)
    assert steps == sum(int(t.user_attrs.get("steps_completed", 0)) for t in real_trials(study)) > 30
    trial_lines = [m for m in map(TRIAL.fullmatch, lines) if m]
    assert sorted(int(m["number"]) for m in trial_lines) == sorted(
        t.number for t in real_trials(study) if t.state.is_finished()
    )  # the other worker's trials too, each once
    assert [int(m["done"]) for m in trial_lines] == list(range(1, len(trial_lines) + 1))
    assert lines[2].endswith("; 2 workers x 1 thread")
    assert not any(f"{ENV_VAR}=" in line or "Launching" in line for line in lines)


def _on_a_terminal(cmd: list[str], cwd: Path, timeout: float = 120) -> tuple[int, str]:
    """Run `cmd` with a 120x40 pseudo-terminal as its stdout and stderr; its exit code and output."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL, cwd=cwd, env=env)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the terminal closed: every process writing to it exited
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return proc.wait(timeout=30), b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


@pytest.mark.slow
def test_progress_line_on_a_pseudo_terminal_with_two_workers(tmp_path: Path) -> None:
    code, raw = _on_a_terminal(
        [sys.executable, str(APP), "-m", f"results_dir={tmp_path}", "hydra.sweeper.n_trials=4"]
        + ["hydra.sweeper.n_jobs=2", "sleep=1.2"],
        cwd=tmp_path,
    )
    assert code == 0, raw[-3000:]
    study = optuna.load_study(study_name="app", storage=open_storage(str(tmp_path / "optuna_journal.log")))
    assert re.search(r"\[lora_sweep\] [0-4]/4 trials \|.*\| \[\d\d:\d\d<.*\], pruned 0, failed 0, running \d", raw), raw
    lines = [line for line in rendered(raw) if line.strip()]
    _lines_match(lines, [])
    assert len([line for line in lines if TRIAL.fullmatch(line)]) == progress(study).finished >= 4
    assert lines[-1].startswith("[lora_sweep] replay: python") and "trials |" not in "\n".join(lines)
