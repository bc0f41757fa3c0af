"""optuna-dashboard, for real: the README's command on a real sweep's journal, read via its JSON
API, and the command a sweep prints, which also serves the trials' artifacts (samples)."""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from lora_sweep.samples import SAMPLES_FILENAME, read_samples
from lora_sweep.sweep.study import ATTR_PENALTY_FOR, JOURNAL_NAME
from tests.conftest import run_cli
from tests.scale_helpers import SWEEP_TINY
from tests.test_analysis import tiny_sweep_dir

pytest.importorskip("optuna_dashboard")

START_TIMEOUT_S = 60.0


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sweep_dir(tmp_path_factory)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _dashboard_command() -> list[str]:
    """The console script installed next to this interpreter (what the README runs)."""
    script = Path(sys.executable).with_name("optuna-dashboard")
    if script.is_file():
        return [str(script)]
    found = shutil.which("optuna-dashboard")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from optuna_dashboard._cli import main; sys.exit(main())"]


def _read(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return response.read()


def _get(url: str) -> dict:
    return json.loads(_read(url).decode("utf-8"))


def _wait_until_up(proc: subprocess.Popen, url: str) -> dict:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"optuna-dashboard exited with {proc.returncode}")
        try:
            return _get(url)
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.25)
    raise AssertionError(f"optuna-dashboard did not answer {url} within {START_TIMEOUT_S:.0f} s")


@contextlib.contextmanager
def _serve(args: list[str], *, cwd: Path) -> Iterator[str]:
    """optuna-dashboard with `args` on 127.0.0.1 and a free port; yields its base URL once it answers."""
    port = _free_port()
    with (cwd / "dashboard.log").open("w") as log:
        proc = subprocess.Popen(
            [*_dashboard_command(), *args, "--host", "127.0.0.1", "--port", str(port)],
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            _wait_until_up(proc, f"{base}/api/studies")
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _attrs(trial: dict) -> dict[str, str]:
    return {a["key"]: a["value"] for a in trial["user_attrs"]}


@pytest.mark.slow
def test_dashboard_serves_the_sweep(tiny_sweep: Path, tmp_path: Path) -> None:
    import optuna

    from lora_sweep import analysis

    journal = tiny_sweep / JOURNAL_NAME
    study = analysis.load_study(tiny_sweep)
    expected = {t.number: t for t in study.get_trials() if ATTR_PENALTY_FOR not in t.user_attrs}
    with _serve([str(journal)], cwd=tmp_path) as base:
        summaries = _get(f"{base}/api/studies")["study_summaries"]
        summary = next(s for s in summaries if s["study_name"] == "lora_sweep")
        assert summary["directions"] == ["maximize"]

        detail = _get(f"{base}/api/studies/{summary['study_id']}?after=0")
        assert detail["name"] == "lora_sweep"
        assert detail["objective_names"] == ["stability_index"]
        assert detail["has_intermediate_values"] is True
        by_number = {t["number"]: t for t in detail["trials"]}
        assert set(expected) <= set(by_number)  # penalty records are there too, marked
        for number, trial in expected.items():
            shown = by_number[number]
            assert shown["state"].upper() == trial.state.name
            attrs = _attrs(shown)
            assert attrs["status"] == trial.user_attrs["status"]
            assert float(attrs["stability_index"]) == pytest.approx(float(trial.user_attrs["stability_index"]))
            assert {"final_loss", "reason", "run_dir", "drawup", "spike_rate", "grad_volatility"} <= set(attrs)
            assert {p["name"] for p in shown["params"]} == set(trial.params)
            steps = {iv["step"]: iv["value"] for iv in shown["intermediate_values"]}
            assert steps.keys() == trial.intermediate_values.keys()
            if trial.state == optuna.trial.TrialState.COMPLETE:
                assert shown["values"] == pytest.approx(trial.values)
                held_out = {"eval_loss", "eval_loss_base", "eval_improvement", "best_eval_loss", "generalization_gap"}
                assert held_out <= set(attrs)
                assert float(attrs["eval_loss"]) == pytest.approx(float(trial.user_attrs["eval_loss"]))
                assert steps  # the per-step objective the pruner compared
        states = {by_number[n]["state"] for n in expected}
        assert {"Complete", "Fail"} <= states
        failed = [n for n, t in expected.items() if t.state.name == "FAIL"]
        assert all(_attrs(by_number[n])["status"] == "diverged" for n in failed)
        # every completed trial's samples are an artifact of it; a diverged one has none
        artifacts = {n: {a["filename"] for a in by_number[n]["artifacts"]} for n in expected}
        assert all(SAMPLES_FILENAME in artifacts[n] for n, t in expected.items() if t.state.name == "COMPLETE")
        assert all(SAMPLES_FILENAME not in artifacts[n] for n in failed)
        penalties = [t for t in detail["trials"] if ATTR_PENALTY_FOR in _attrs(t)]
        assert len(penalties) == len(failed)
        assert {a["key"] for a in detail["union_user_attrs"]} >= {"stability_index", "status", "reason"}


@pytest.mark.slow
def test_printed_dashboard_command_serves_the_best_trials_samples(tmp_path: Path) -> None:
    from lora_sweep import analysis

    results = tmp_path / "results"
    res = run_cli("-m", f"results_dir={results}", "hydra.sweeper.n_trials=2", *SWEEP_TINY, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    printed = next(line for line in res.stdout.splitlines() if line.startswith("[lora_sweep] dashboard: "))
    command = shlex.split(printed.removeprefix("[lora_sweep] dashboard: "))
    assert command == ["optuna-dashboard", str(results / JOURNAL_NAME), "--artifact-dir", str(results / "artifacts")]

    best = int(analysis.best_trials(analysis.load_trials(results), n=1)["trial_number"].iloc[0])
    with _serve(command[1:], cwd=tmp_path) as base:  # exactly the printed arguments
        study_id = next(s["study_id"] for s in _get(f"{base}/api/studies")["study_summaries"])
        trials = {t["number"]: t for t in _get(f"{base}/api/studies/{study_id}?after=0")["trials"]}
        shown = trials[best]
        by_name = {a["filename"]: a for a in shown["artifacts"]}  # adapters may be there too
        samples = by_name[SAMPLES_FILENAME]
        assert samples["mimetype"] == "application/jsonl"
        body = _read(f"{base}/artifacts/{study_id}/{shown['trial_id']}/{samples['artifact_id']}")
    run_dir = Path(_attrs(shown)["run_dir"])
    assert body == (run_dir / SAMPLES_FILENAME).read_bytes()
    lines = [json.loads(line) for line in body.decode("utf-8").splitlines()]
    assert lines == read_samples(run_dir / SAMPLES_FILENAME) and len(lines) == 3
    assert {"prompt", "reference", "answer", "base_answer"} <= set(lines[0])


def test_dashboard_args_come_from_the_apps_hooks(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from lora_sweep.sweep.hooks import SweepHooks, load_hooks
    from lora_sweep.sweep_hooks import HOOKS

    app_cfg = OmegaConf.create({"results_dir": str(tmp_path)})
    assert HOOKS.dashboard_args(app_cfg) == ["--artifact-dir", str(tmp_path / "artifacts")]
    assert SweepHooks().dashboard_args(app_cfg) == []  # an app without hooks: the plain command
    assert load_hooks("lora_sweep.sweep_hooks").dashboard_args(app_cfg) == HOOKS.dashboard_args(app_cfg)
