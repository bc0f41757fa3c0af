"""`python -m lora_sweep -m` end to end on the embedded default (subprocesses, tiny trials)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf

from lora_sweep.results import read_rows
from lora_sweep.sweep.context import recorded
from lora_sweep.sweep.study import open_storage, progress
from tests.conftest import REPO, run_cli
from tests.scale_helpers import SWEEP_TINY

pytestmark = pytest.mark.slow
optuna.logging.set_verbosity(optuna.logging.WARNING)

# Tiny trials (SWEEP_TINY): a sweep of a few trials takes seconds on 2 cores.


def load_study(results: Path) -> optuna.Study:
    return optuna.load_study(study_name="lora_sweep", storage=open_storage(str(results / "optuna_journal.log")))


def real_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if "penalty_for_trial" not in t.user_attrs]


def test_sweep_resume_rows_dashboard_attrs_and_replay(tmp_path: Path) -> None:
    # 8 steps rarely cut the loss by the default 5 %: any improvement makes a trial feasible
    # here, so that there is a best trial to replay
    tiny = [*SWEEP_TINY, "train.min_improvement=0"]
    first = run_cli("-m", f"results_dir={tmp_path}", "hydra.sweeper.n_trials=3", *tiny)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"optuna-dashboard {tmp_path / 'optuna_journal.log'}" in first.stdout
    second = run_cli("-m", f"results_dir={tmp_path}", "hydra.sweeper.n_trials=5", *tiny)
    assert second.returncode == 0, second.stderr[-3000:]
    study = load_study(tmp_path)
    assert progress(study).finished == 5
    numbers = sorted(t.number for t in real_trials(study))  # penalty records take numbers too
    assert len(numbers) == 5
    rows = read_rows(tmp_path / "lora_tuning_results.csv")
    assert sorted(rows["trial_number"].tolist()) == numbers  # one row per trial, none twice
    assert set(rows["study_name"]) == {"lora_sweep"} and set(rows["state"]) <= {"COMPLETE", "PRUNED", "FAIL"}
    by_number = {t.number: t.state.name for t in real_trials(study)}
    assert all(by_number[n] == s for n, s in zip(rows["trial_number"], rows["state"], strict=False))
    assert sorted(int(p.name) for p in (tmp_path / "sweeps" / "lora_sweep").iterdir() if p.name.isdigit()) == numbers
    # what the dashboard shows: metric name, per-trial metrics, per-step intermediate values
    assert study.metric_names == ["stability_index"]
    done = [t for t in real_trials(study) if t.state.name == "COMPLETE"]
    assert done, [t.user_attrs.get("reason") for t in real_trials(study)]
    trial = done[0]
    for key in (
        "avg_loss",
        "loss_slope",
        "grad_mean",
        "grad_std",
        "final_loss",
        "quality",
        "drawup",
        "spike_rate",
        "grad_volatility",
        "tokens_per_s",
        "peak_mem_mb",
        "run_dir",
        "train.max_steps",  # set by the sweep's overrides
        "lora.alpha",  # set by the trial's
    ):
        assert key in trial.user_attrs, key
    # a config value every trial shares is the study's base config (and each CSV row), not an attr
    assert "train.seed" not in trial.user_attrs
    assert OmegaConf.create(study.user_attrs["sweep.base_config"]).train.seed == 0
    assert recorded(trial)["train.seed"] == 0  # the recorded job result keeps the whole row
    assert sorted(trial.intermediate_values) == list(range(1, 9))
    assert "sweep.search_space" in study.user_attrs and "sweep.base_config" in study.user_attrs
    # a third run with the same target does nothing
    third = run_cli("-m", f"results_dir={tmp_path}", "hydra.sweeper.n_trials=5", *tiny)
    assert "nothing to do" in third.stdout and len(read_rows(tmp_path / "lora_tuning_results.csv")) == 5
    # the printed replay command reproduces the best trial's metrics as a single run
    replay = [line.split("replay: ", 1)[1] for line in second.stdout.splitlines() if "replay: " in line][0]
    replay_dir = tmp_path / "replay"
    args = [a for a in shlex.split(replay)[3:] if not a.startswith("results_dir=")]
    single = run_cli(*args, f"results_dir={replay_dir}")
    assert single.returncode == 0, single.stderr[-3000:]
    replayed = read_rows(replay_dir / "lora_tuning_results.csv").iloc[0]
    best = study.best_trial
    assert replayed["stability_index"] == pytest.approx(best.user_attrs["stability_index"], rel=1e-9, abs=1e-12)
    assert replayed["final_loss"] == pytest.approx(best.user_attrs["final_loss"], rel=1e-9)


def test_pruned_trials_end_pruned_in_study_and_csv(tmp_path: Path) -> None:
    # a deterministic pruner: stability_index is at most 1, so lower=2 prunes every trial at step 2
    proc = run_cli(
        "-m",
        f"results_dir={tmp_path}",
        "hydra.sweeper.n_trials=2",
        "hydra/sweeper/pruner=threshold",
        "hydra.sweeper.pruner.lower=2.0",
        "hydra.sweeper.pruner.n_warmup_steps=2",
        *SWEEP_TINY,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [t.state.name for t in real_trials(load_study(tmp_path))] == ["PRUNED", "PRUNED"]
    rows = read_rows(tmp_path / "lora_tuning_results.csv")
    assert list(rows["state"]) == ["PRUNED", "PRUNED"] and list(rows["status"]) == ["pruned", "pruned"]
    assert list(rows["steps_completed"]) == [2, 2]


def test_diverging_trials_fail_with_reason_and_the_sweep_goes_on(tmp_path: Path) -> None:
    proc = run_cli(
        "-m",
        f"results_dir={tmp_path}",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.max_failure_rate=1.0",
        "hydra/sweeper/pruner=none",
        "train.lr=choice(3e-3, 10.0)",  # 10: the largest lr allowed
        "train.max_grad_norm=1e9",
        "train.lr_scheduler=constant",
        *SWEEP_TINY,
        "lora.r=8",
        "lora.alpha=16",
        "hydra.sweeper.custom_search_space=null",
    )  # only lr varies
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = real_trials(load_study(tmp_path))
    assert len(trials) == 3
    for t in trials:
        if t.params["train.lr"] == 10.0:
            assert t.state.name == "FAIL" and t.user_attrs["status"] == "diverged" and t.user_attrs["reason"]
    rows = read_rows(tmp_path / "lora_tuning_results.csv")
    assert len(rows) == 3 and set(rows.loc[rows["train.lr"] == 10.0, "state"]) <= {"FAIL"}


def test_kill_9_mid_sweep_then_rerun_reaches_target_without_duplicates(tmp_path: Path) -> None:
    args = [
        sys.executable,
        "-m",
        "lora_sweep",
        "-m",
        f"results_dir={tmp_path}",
        "hydra.sweeper.n_trials=4",
        *SWEEP_TINY,
        "train.max_steps=30",
    ]
    proc = subprocess.Popen(
        args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    csv_path = tmp_path / "lora_tuning_results.csv"
    second_trial = tmp_path / "sweeps" / "lora_sweep" / "1" / ".hydra"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not second_trial.exists():
        time.sleep(0.05)
    time.sleep(0.5)  # inside trial 1: it has started, and needs seconds to finish 30 steps
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(read_rows(csv_path)) == 1  # trial 0 only
    rerun = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    study = load_study(tmp_path)
    assert progress(study).finished == 4
    rows = read_rows(csv_path)
    assert rows["trial_number"].is_unique and len(rows) == 4
    assert any(t.user_attrs.get("stale") for t in real_trials(study))


def test_export_rebuilds_the_csv_from_the_study(tmp_path: Path) -> None:
    assert run_cli("-m", f"results_dir={tmp_path}", "hydra.sweeper.n_trials=2", *SWEEP_TINY).returncode == 0
    out = tmp_path / "exported.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "lora_sweep", "export", "--results-dir", str(tmp_path), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    exported, written = read_rows(out), read_rows(tmp_path / "lora_tuning_results.csv")
    assert sorted(exported["trial_number"]) == sorted(written["trial_number"])
    merged = exported.merge(written, on="trial_number", suffixes=("_x", "_y"))
    # train.seed and model.name: the same in every trial, so in the recorded result, not in user attrs
    for col in ("stability_index", "final_loss", "lora.r", "train.lr", "state", "status", "train.seed", "model.name"):
        assert (merged[f"{col}_x"] == merged[f"{col}_y"]).all(), col
    missing = subprocess.run(
        [sys.executable, "-m", "lora_sweep", "export", "--results-dir", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert missing.returncode == 2 and "no study storage" in missing.stderr


def test_default_n_jobs_auto_runs_one_worker_per_core(tmp_path: Path) -> None:
    """`n_jobs: auto` (the default sweep's) on this CPU-only machine: one 1-thread worker
    process per core, all on one study, each trial once."""
    cores = len(os.sched_getaffinity(0))
    res = run_cli(
        "-m",
        f"results_dir={tmp_path}",
        "hydra.sweeper.n_jobs=auto",
        "hydra.sweeper.n_trials=4",
        *SWEEP_TINY,
        "hydra.sweeper.report_every=3",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    workers = f"; {cores} workers x 1 thread" if cores > 1 else "; 1 worker"
    assert res.stdout.splitlines()[2].endswith(workers), res.stdout  # the header says how many
    study = load_study(tmp_path)
    trials = real_trials(study)
    assert progress(study).finished >= 4 and len({t.number for t in trials}) == len(trials)
    rows = read_rows(tmp_path / "lora_tuning_results.csv")
    assert sorted(rows["trial_number"].tolist()) == sorted(t.number for t in trials)
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert done and all(sorted(t.intermediate_values) == [3, 6, 8] for t in done)  # report_every=3 and the last step
