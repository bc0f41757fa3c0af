"""Cluster launchers: Hydra's submitit launcher runs our sweeps, each trial a job in its own
process that reports to the study; the packaged SLURM example (`hydra/launcher=lora_slurm`)
composes into a submitit SLURM launcher config."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from lora_sweep.results import read_rows
from tests.conftest import REPO
from tests.scale_helpers import SWEEP_TINY, load, lora_command, real_trials, worker_env


@pytest.mark.slow
def test_submitit_local_runs_each_trial_as_its_own_process_reporting_to_the_study(tmp_path: Path) -> None:
    results = tmp_path / "results"
    proc = subprocess.run(
        lora_command(
            f"results_dir={results}",
            "hydra/launcher=submitit_local",
            "hydra.sweeper.n_jobs=2",
            "hydra.sweeper.n_trials=2",
            *SWEEP_TINY,
            "train.lr=0.003",
        ),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=worker_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in proc.stdout + proc.stderr
    study = load(str(results / "optuna_journal.log"), "lora_sweep")
    trials = real_trials(study)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert all(sorted(t.intermediate_values) == list(range(1, 9)) for t in trials)  # reported by the jobs
    sweeper_pids = {t.user_attrs["worker"].rsplit(":", 1)[1] for t in trials}
    jobs = [p.name for p in (results / "sweeps" / "lora_sweep" / ".submitit").iterdir() if p.name.isdigit()]
    assert len(jobs) == 2 and not sweeper_pids & set(jobs)  # local job id = the job's own pid
    rows = read_rows(results / "lora_tuning_results.csv")
    assert sorted(rows["trial_number"]) == sorted(t.number for t in trials)


def test_slurm_example_config_composes() -> None:
    proc = subprocess.run(
        [
            *lora_command()[:3],
            "hydra/launcher=lora_slurm",
            "hydra.launcher.partition=gpu",
            "--cfg",
            "hydra",
            "-p",
            "hydra.launcher",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=worker_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in proc.stdout
    assert "partition: gpu" in proc.stdout and "gpus_per_node: 1" in proc.stdout
