"""Ctrl-C in a sweep: the running trial is recorded as interrupted (not a failed configuration:
no penalty, not counted) and re-queued; the next run resumes with it; a second Ctrl-C exits at
once; nothing is torn."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from lora_sweep.results import read_rows, results_csv_path
from lora_sweep.sweep import study as study_mod
from lora_sweep.sweep.runner import EXIT_INTERRUPTED
from tests.conftest import REPO

pytestmark = pytest.mark.slow

SMALL = [
    "train.warmup_steps=1",
    "train.batch_size=4",
    "data.max_length=64",
    "hydra.sweeper.report_every=1",
    "hydra.sweeper.enqueue=null",
    "train.log_every=1000",
    "train.prune_on=objective",
]


def _sweep(results: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "lora_sweep", "-m", f"results_dir={results}", *SMALL, *args]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def _terminal_sigint() -> None:
    """In the child before exec: Ctrl-C's default disposition, as in a terminal. A test run
    started in the background by a shell without job control (`make test &`, `nohup`) ignores
    SIGINT, and an ignored SIGINT is inherited through exec: the sweep would rightly ignore it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _load(results: Path) -> optuna.Study:
    storage = study_mod.open_storage(str(results / study_mod.JOURNAL_NAME))
    return optuna.load_study(study_name="lora_sweep", storage=storage)


def _wait_until_training(results: Path, proc: subprocess.Popen[str], n_running: int) -> None:
    """Until `n_running` trials have reported an intermediate value (they are mid-training)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if (results / study_mod.JOURNAL_NAME).is_file():
            running = [
                t
                for t in _load(results).get_trials(deepcopy=False)
                if t.state.name == "RUNNING" and t.intermediate_values
            ]
            if len(running) >= n_running:
                return
        time.sleep(0.3)
    raise AssertionError("no trial started training")


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_ctrl_c_requeues_the_running_trial_without_penalty(tmp_path: Path, n_jobs: int) -> None:
    results = tmp_path / "results"
    # a new session: the whole sweep (worker 0 and its workers) gets the SIGINT, as from a terminal
    proc = subprocess.Popen(
        _sweep(results, "hydra.sweeper.n_trials=4", "train.max_steps=3000", f"hydra.sweeper.n_jobs={n_jobs}"),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=_terminal_sigint,
    )
    _wait_until_training(results, proc, n_running=n_jobs)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lora_sweep: interrupted"), err

    trials = _load(results).get_trials(deepcopy=False)
    interrupted = [t for t in trials if t.user_attrs.get("status") == "interrupted"]
    assert len(interrupted) == n_jobs and all(t.state.name == "FAIL" for t in interrupted)
    assert not any(study_mod.ATTR_PENALTY_FOR in t.user_attrs for t in trials)  # no penalty record
    waiting = [t for t in trials if t.state.name == "WAITING"]
    assert sorted(t.user_attrs[study_mod.ATTR_REQUEUED_FROM] for t in waiting) == sorted(t.number for t in interrupted)
    assert study_mod.progress(_load(results)).finished == 0  # interrupted trials do not count
    csv = results_csv_path(results)
    assert not csv.exists() or len(read_rows(csv)) == 0  # nothing half-written

    # the next run starts with the interrupted params and finishes the sweep
    again = subprocess.run(
        _sweep(results, "hydra.sweeper.n_trials=2", "train.max_steps=4", "hydra.sweeper.n_jobs=1"),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    study = _load(results)
    reran = {
        t.user_attrs[study_mod.ATTR_REQUEUED_FROM]: t
        for t in study.get_trials(deepcopy=False)
        if study_mod.ATTR_REQUEUED_FROM in t.user_attrs and t.state.name != "WAITING"
    }
    for first in interrupted:
        assert reran[first.number].params == first.params
    assert study_mod.progress(study).finished == 2
    assert len(read_rows(csv)) == 2


def test_second_ctrl_c_exits_at_once() -> None:
    from lora_sweep.sweep.runner import exit_on_next_sigint

    assert callable(exit_on_next_sigint)
    code = (
        "from lora_sweep.sweep.runner import exit_on_next_sigint as e; e(); print('ready', flush=True); "
        "import time; time.sleep(60)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True, preexec_fn=_terminal_sigint
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == EXIT_INTERRUPTED
    assert time.monotonic() - start < 5
