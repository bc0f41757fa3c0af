"""End-to-end sweeps of the tiny app in tests/sweep_apps (subprocesses, ~1 s each)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from lora_sweep.sweep.study import open_storage

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "tests" / "sweep_apps" / "app.py"
optuna.logging.set_verbosity(optuna.logging.WARNING)


def sweep(tmp: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    """Runs the app as a multirun with results under ``tmp``."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(APP), "-m", f"results_dir={tmp}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=tmp,
    )


def load(tmp: Path) -> optuna.Study:
    return optuna.load_study(study_name="app", storage=open_storage(str(tmp / "optuna_journal.log")))


def states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.trials if "penalty_for_trial" not in t.user_attrs]


def test_plugin_discovered_and_composes(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    info = subprocess.run(
        [sys.executable, str(APP), "--info", "plugins", "results_dir=x"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert "LoraSweepSweeper" in info.stdout
    cfg = subprocess.run(
        [
            sys.executable,
            str(APP),
            "results_dir=x",
            "hydra/sweeper=lora_sweep",
            "hydra/sweeper/sampler=random",
            "hydra/sweeper/pruner=hyperband",
            "--cfg",
            "hydra",
            "-p",
            "hydra.sweeper",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert cfg.returncode == 0, cfg.stderr
    assert "LoraSweepSweeper" in cfg.stdout and "RandomSampler" in cfg.stdout and "HyperbandPruner" in cfg.stdout


@pytest.mark.slow
def test_quadratic_reaches_n_trials_and_optimum(tmp_path: Path) -> None:
    res = sweep(tmp_path, "hydra.sweeper.n_trials=25")
    assert res.returncode == 0, res.stderr
    study = load(tmp_path)
    assert states(study) == ["COMPLETE"] * 25
    assert study.best_value < 2.0
    assert "best trial" in res.stdout and "replay: python" in res.stdout
    assert "optuna-dashboard " + str(tmp_path / "optuna_journal.log") in res.stdout
    assert sorted(int(p.name) for p in (tmp_path / "multirun").iterdir() if p.name.isdigit()) == list(range(25))


@pytest.mark.slow
def test_resume_total_target_and_job_dirs(tmp_path: Path) -> None:
    assert sweep(tmp_path, "hydra.sweeper.n_trials=3").returncode == 0
    res = sweep(tmp_path, "hydra.sweeper.n_trials=5")
    assert res.returncode == 0, res.stderr
    assert len(states(load(tmp_path))) == 5
    assert sorted(p.name for p in (tmp_path / "multirun").iterdir() if p.name.isdigit()) == list("01234")
    again = sweep(tmp_path, "hydra.sweeper.n_trials=5")
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert len(load(tmp_path).trials) == 5


def test_pruning_with_deterministic_pruner(tmp_path: Path) -> None:
    res = sweep(
        tmp_path,
        "mode=mapping",
        "hydra.sweeper.objective={value: minimize}",
        "hydra.sweeper.n_trials=6",
        "hydra/sweeper/pruner=threshold",
        "hydra.sweeper.pruner.upper=20",
    )
    assert res.returncode == 0, res.stderr
    study = load(tmp_path)
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert pruned and all(t.user_attrs["status"] == "pruned" for t in pruned)
    assert all(max(t.intermediate_values.values()) > 20 for t in pruned)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert all(t.user_attrs["trial_number"] == t.number for t in done)  # the job knew its trial
    assert study.metric_names == ["value"]
    assert "sweep.base_config" in study.user_attrs and "x" in study.user_attrs["sweep.search_space"]


def test_exception_and_nan_trials_fail_and_sweep_completes(tmp_path: Path) -> None:
    res = sweep(
        tmp_path,
        "hydra.sweeper.n_trials=10",
        "inject.exception_above=-1.0",
        "inject.nan_below=-3.0",
        "hydra.sweeper.max_failure_rate=1.0",
    )
    assert res.returncode == 0, res.stderr
    study = load(tmp_path)
    assert len(states(study)) == 10
    reasons = [t.user_attrs["reason"] for t in study.trials if t.state.name == "FAIL"]
    assert any(r.startswith("RuntimeError: injected failure") for r in reasons)
    assert any("non-finite" in r for r in reasons)
    penalties = [t for t in study.trials if "penalty_for_trial" in t.user_attrs]
    assert penalties and all(t.constraints == {"failed": 1.0} for t in penalties)


def test_max_failure_rate_aborts(tmp_path: Path) -> None:
    res = sweep(
        tmp_path,
        "hydra.sweeper.n_trials=10",
        "inject.exception_above=-10",
        "hydra.sweeper.failure_min_trials=3",
        "hydra.sweeper.max_failure_rate=0.5",
    )
    assert res.returncode != 0
    assert "Aborting the sweep: 3 of 3 finished trials failed" in res.stderr
    assert states(load(tmp_path)) == ["FAIL"] * 3


def test_bad_search_space_one_line_and_study_untouched(tmp_path: Path) -> None:
    assert sweep(tmp_path, "hydra.sweeper.n_trials=2").returncode == 0
    journal = (tmp_path / "optuna_journal.log").read_bytes()
    res = sweep(tmp_path, "hydra.sweeper.n_trials=4", "x=interval(5.0,1.0)")
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.strip()]
    assert errors == [
        "lora_sweep: error: Bad search-space override 'x=interval(5.0,1.0)': interval needs low < high, got (5.0, 1.0)"
    ]
    assert (tmp_path / "optuna_journal.log").read_bytes() == journal


def test_stale_running_trial_requeued(tmp_path: Path) -> None:
    assert sweep(tmp_path, "hydra.sweeper.n_trials=2").returncode == 0
    study = load(tmp_path)
    trial = study.ask(
        {"x": optuna.distributions.FloatDistribution(-5, 5), "y": optuna.distributions.FloatDistribution(-5, 5)}
    )
    import socket

    trial.set_user_attr("worker", f"{socket.gethostname()}:999999999")  # a dead sweep process
    res = sweep(tmp_path, "hydra.sweeper.n_trials=3")
    assert res.returncode == 0, res.stderr
    study = load(tmp_path)
    stale = study.trials[trial.number]
    assert stale.state.name == "FAIL" and stale.user_attrs["stale"] is True
    rerun = [t for t in study.trials if t.user_attrs.get("requeued_from_trial") == trial.number]
    assert len(rerun) == 1 and rerun[0].params == stale.params and rerun[0].state.name == "COMPLETE"
    counted = [t for t in study.trials if not t.user_attrs.get("stale")]
    assert len(counted) == 3


def test_custom_search_space_and_enqueue(tmp_path: Path) -> None:
    res = sweep(
        tmp_path,
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.params.y=0.0",
        "hydra.sweeper.custom_search_space=hooks.y_from_x",
        "hydra.sweeper.enqueue=[{x: 2.0, m: 0.5}]",
    )
    assert res.returncode == 0, res.stderr
    study = load(tmp_path)
    first = study.trials[0]
    assert first.params == {"x": 2.0, "m": 0.5}
    assert first.value == pytest.approx((2.0 - 2.0) ** 2 + (-1.0 + 1.0) ** 2)
    assert "y=-1.0" in first.user_attrs["overrides"]


@pytest.mark.slow
def test_two_worker_processes_share_one_study(tmp_path: Path) -> None:
    res = sweep(tmp_path, "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=6", "sleep=0.3")
    assert res.returncode == 0, res.stderr
    study = load(tmp_path)
    n = len(states(study))
    assert 6 <= n <= 7
    workers = {t.user_attrs["worker"] for t in study.trials}
    assert len(workers) == 2
    numbers = sorted(int(p.name) for p in (tmp_path / "multirun").iterdir() if p.name.isdigit())
    assert numbers == [t.number for t in study.trials]


def test_joblib_launcher(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    res = sweep(
        tmp_path,
        "hydra/launcher=joblib",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=4",
        "mode=mapping",
        "hydra.sweeper.objective={value: minimize}",
    )
    assert res.returncode == 0, res.stderr
    assert len(states(load(tmp_path))) == 4
