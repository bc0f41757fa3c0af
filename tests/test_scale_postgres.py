"""Distributed optimisation on one PostgreSQL study: the same `python -m lora_sweep -m` command
started as 4 independent worker processes (as on 4 machines), each with one thread.

PostgreSQL runs on the test machines (127.0.0.1:5432, trust auth, database `test`); if it is
absent these tests FAIL, they do not skip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lora_sweep.results import read_rows
from tests.conftest import REPO
from tests.scale_helpers import (
    PG_URL,
    SWEEP_TINY,
    delete,
    load,
    log_tail,
    lora_command,
    real_trials,
    require_postgres,
    run_workers,
    unique_study,
)

pytestmark = pytest.mark.slow
WORKERS, N_TRIALS = 4, 8


def test_four_workers_share_one_postgres_study(tmp_path: Path) -> None:
    require_postgres()
    name = unique_study("pg4")
    # two "machines", each with its own results_dir (and so its own CSV), two workers each
    machines = [tmp_path / "machine_a", tmp_path / "machine_b"]
    cmds = [
        lora_command(
            f"results_dir={machines[i // 2]}",
            f"hydra.sweeper.storage={PG_URL}",
            f"hydra.sweeper.study_name={name}",
            f"hydra.sweeper.n_trials={N_TRIALS}",
            # connection-pool settings pass through to SQLAlchemy
            "hydra.sweeper.engine_kwargs={pool_size: 1, max_overflow: 1, pool_pre_ping: true}",
            # deterministic pruning: stability_index <= 1 < lower, judged from step 6 on
            "hydra/sweeper/pruner=threshold",
            "hydra.sweeper.pruner.lower=2.0",
            "hydra.sweeper.pruner.n_warmup_steps=6",
            *SWEEP_TINY,
        )
        for i in range(WORKERS)
    ]
    try:
        codes = run_workers(cmds, tmp_path / "logs")
        assert codes == [0] * WORKERS, log_tail(tmp_path / "logs")
        study = load(PG_URL, name)
        trials = real_trials(study)
        numbers = [t.number for t in trials]
        assert N_TRIALS <= len(trials) <= N_TRIALS + WORKERS - 1, numbers
        assert len(set(numbers)) == len(numbers)
        assert all(t.state.name == "PRUNED" for t in trials), [t.state.name for t in trials]
        assert all(max(t.intermediate_values) == 6 for t in trials)  # every job read the shared pruner
        by_worker: dict[str, list[str]] = {}
        for t in trials:
            by_worker.setdefault(t.user_attrs["worker"], []).append(t.state.name)
        assert len(by_worker) == WORKERS, by_worker  # all four cooperated, pruning in every one
        # every trial's row exactly once across the machines' CSVs ...
        rows = [read_rows(m / "lora_tuning_results.csv") for m in machines if (m / "lora_tuning_results.csv").exists()]
        written = sorted(n for frame in rows for n in frame["trial_number"])
        assert written == sorted(numbers)
        assert all(set(frame["state"]) == {"PRUNED"} and set(frame["study_name"]) == {name} for frame in rows)
        # ... and the export command rebuilds one CSV of the whole study from PostgreSQL
        out = tmp_path / "export.csv"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "lora_sweep",
                "export",
                "--storage",
                PG_URL,
                "--study-name",
                name,
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        exported = read_rows(out)
        assert sorted(exported["trial_number"]) == sorted(numbers) and exported["trial_number"].is_unique
    finally:
        delete(PG_URL, name)
