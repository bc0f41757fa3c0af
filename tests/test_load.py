"""Load: 8 concurrent workers on each storage kind (journal file, SQLite, PostgreSQL).

The workers are the sweeper's own (`hydra.sweeper.n_jobs=8`: 8 processes on one study, one
thread each) running the tiny sweep app in mapping mode, whose trials are nearly instant and
report 3 intermediate values each: every trial is ~10 storage reads and writes (ask, attrs,
reports, pruning checks, tell), so storage contention is far higher than with real trials.
No "database is locked" (SQLite has a 60 s busy timeout), no error, no trial number twice."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from lora_sweep.sweep.study import normalize_storage
from tests.conftest import REPO
from tests.scale_helpers import PG_URL, app_command, delete, load, real_trials, storage_for, unique_study, worker_env

pytestmark = pytest.mark.slow
WORKERS, N_TRIALS = 8, 16


@pytest.mark.parametrize("kind", ["journal", "sqlite", "postgresql"])
def test_eight_workers_on_one_storage(tmp_path: Path, kind: str) -> None:
    storage = storage_for(kind, tmp_path)
    name = unique_study(f"load_{kind}")
    cmd = app_command(
        f"results_dir={tmp_path}",
        f"hydra.sweeper.storage={storage}",
        f"hydra.sweeper.study_name={name}",
        f"hydra.sweeper.n_jobs={WORKERS}",
        f"hydra.sweeper.n_trials={N_TRIALS}",
        "mode=mapping",
        "hydra.sweeper.objective={value: minimize}",
        "hydra/sweeper/pruner=median",
        "steps=3",
    )
    try:
        start = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=worker_env(), timeout=300)
        wall = time.monotonic() - start
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output[-4000:]
        assert "database is locked" not in output and "Traceback" not in output, output[-4000:]
        study = load(normalize_storage(storage), name)
        trials = real_trials(study)
        numbers = [t.number for t in trials]
        assert len(set(numbers)) == len(numbers)
        assert N_TRIALS <= len(trials) <= N_TRIALS + WORKERS - 1
        assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials), {t.state.name for t in trials}
        workers = {t.user_attrs["worker"] for t in trials}
        assert len(workers) >= WORKERS // 2, workers  # the load really was spread over processes
        print(
            f"[load] {kind}: {WORKERS} workers, {len(trials)} trials "
            f"({sum(t.state.name == 'PRUNED' for t in trials)} pruned) from {len(workers)} processes "
            f"in {wall:.1f} s, 0 errors"
        )
    finally:
        if kind == "postgresql":
            delete(PG_URL, name)
