"""Crashes: sweeps killed with SIGKILL, then rerun.

* Stale trials on every storage kind (journal, SQLite, PostgreSQL): a worker killed mid-trial
  leaves a RUNNING trial that the next run marks FAIL (stale) and re-queues with its params.
* kill -9 of a real lora sweep at 5 named points (``LORA_SWEEP_FAULT``, see lora_sweep.sweep.faults):
  mid-training, after the job recorded its result, DURING a CSV write (a torn row), between the
  job's return and the sweeper's tell, and DURING a journal-storage write (a torn record); every
  rerun recovers, and the last one reaches n_trials with one intact CSV row per finished trial.
"""

from __future__ import annotations

import csv
import signal
import subprocess
import time
from pathlib import Path

import pytest

from lora_sweep.results import CSV_COLUMNS, read_rows
from lora_sweep.sweep.study import normalize_storage, progress
from tests.conftest import REPO
from tests.scale_helpers import (
    PG_URL,
    SWEEP_TINY,
    app_command,
    delete,
    load,
    log_tail,
    lora_command,
    real_trials,
    start,
    storage_for,
    unique_study,
    worker_env,
)

pytestmark = pytest.mark.slow


def _wait_running(storage: str, name: str, timeout: float = 120) -> int:
    """Number of the first trial that is RUNNING in the storage with its worker recorded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            for t in load(storage, name).get_trials(deepcopy=False):
                if t.state.name == "RUNNING" and t.user_attrs.get("worker"):
                    return t.number
        except (KeyError, ValueError):
            pass  # the study or storage is not created yet
        time.sleep(0.2)
    raise AssertionError("no trial started")


@pytest.mark.parametrize("kind", ["journal", "sqlite", "postgresql"])
def test_worker_killed_mid_trial_leaves_a_stale_trial_that_the_next_run_requeues(tmp_path: Path, kind: str) -> None:
    storage = storage_for(kind, tmp_path)
    name = unique_study(f"stale_{kind}")
    args = [
        f"results_dir={tmp_path}",
        f"hydra.sweeper.storage={storage}",
        f"hydra.sweeper.study_name={name}",
        "hydra.sweeper.n_trials=2",
        "mode=mapping",
        "hydra.sweeper.objective={value: minimize}",
    ]
    try:
        worker = start(app_command(*args, "sleep=60"), tmp_path / "killed.log")
        killed = _wait_running(normalize_storage(storage), name)
        job_started = tmp_path / "multirun" / str(killed) / ".hydra" / "overrides.yaml"
        deadline = time.monotonic() + 60
        while not job_started.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # the job is asleep inside the trial, the sweeper holds no storage lock
        worker.send_signal(signal.SIGKILL)
        assert worker.wait(timeout=30) == -signal.SIGKILL
        rerun = subprocess.run(
            app_command(*args), capture_output=True, text=True, cwd=REPO, env=worker_env(), timeout=120
        )
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        study = load(normalize_storage(storage), name)
        stale = study.trials[killed]
        assert stale.state.name == "FAIL" and stale.user_attrs["stale"] is True
        assert stale.user_attrs["status"] == "stale" and "no longer exists" in stale.user_attrs["reason"]
        requeued = [t for t in study.trials if t.user_attrs.get("requeued_from_trial") == killed]
        assert len(requeued) == 1 and requeued[0].params == stale.params and requeued[0].state.name == "COMPLETE"
        assert progress(study).finished == 2 and len(real_trials(study)) == 2
    finally:
        if kind == "postgresql":
            delete(PG_URL, name)


# (fault, what the rerun after it has to recover)
FAULTS = [
    ("step:12", "trial 1 killed at its 4th step: RUNNING, no result -> stale, re-queued"),
    ("after_record:1", "result recorded, no CSV row -> finished from the record, row written"),
    ("csv_write:2", "half a CSV row written -> torn line dropped (kept in .torn), row written once"),
    ("before_tell:1", "row written, study not told -> finished from the record, no second row"),
    ("journal_write:20", "half a journal record written -> torn record dropped, journal loads"),
]


def _csv_records(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def test_kill_9_at_five_points_then_rerun_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    results = tmp_path / "results"
    n_trials = 6
    cmd = lora_command(f"results_dir={results}", f"hydra.sweeper.n_trials={n_trials}", *SWEEP_TINY)
    journal, csv_path = results / "optuna_journal.log", results / "lora_tuning_results.csv"
    for i, (fault, why) in enumerate(FAULTS):
        proc = start(cmd, tmp_path / f"run{i}.log", LORA_SWEEP_FAULT=fault)
        code = proc.wait(timeout=300)
        assert code == -signal.SIGKILL, f"{fault} ({why}) was not reached: exit {code}\n{log_tail(tmp_path)}"
    assert Path(str(csv_path) + ".torn").is_file()  # the torn row was kept aside ...
    final = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=worker_env(), timeout=300)
    assert final.returncode == 0, final.stderr[-3000:] + log_tail(tmp_path)
    output = final.stdout + final.stderr + "".join(p.read_text() for p in tmp_path.glob("run*.log"))
    assert "Dropped a torn last record" in output  # the torn journal record was repaired
    assert output.count("finished from the result its job recorded") >= 3  # not re-run, not lost
    study = load(str(journal), "lora_sweep")
    finished = [t for t in real_trials(study) if t.state.name in ("COMPLETE", "PRUNED", "FAIL")]
    assert progress(study).finished == n_trials == len(finished)
    assert any(t.user_attrs.get("stale") for t in study.trials)
    records = _csv_records(csv_path)  # ... and the CSV holds only intact rows: header + one per trial
    assert records[0] == list(CSV_COLUMNS) and all(len(r) == len(CSV_COLUMNS) for r in records)
    rows = read_rows(csv_path)
    assert rows["trial_number"].is_unique, rows["trial_number"].tolist()
    assert sorted(rows["trial_number"]) == sorted(t.number for t in finished)
    states = {t.number: t.state.name for t in finished}
    assert all(states[n] == s for n, s in zip(rows["trial_number"], rows["state"], strict=False))
    assert rows["run_dir"].map(lambda d: Path(d, "result.json").is_file()).all()
