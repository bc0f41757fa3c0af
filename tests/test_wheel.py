"""The configs and the embedded default work from a non-editable wheel install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_sweep.results import read_rows
from tests.conftest import REPO, TINY

pytestmark = pytest.mark.slow


def test_wheel_install_runs_a_trial_outside_the_checkout(tmp_path: Path) -> None:
    wheels, site, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
    work.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(REPO)],
                   check=True, capture_output=True)
    (wheel,) = wheels.glob("lora_sweep-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True, capture_output=True)
    env = dict(os.environ, PYTHONPATH=str(site))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *args], cwd=work, env=env, capture_output=True, text=True, timeout=300)

    where = run("-c", "import lora_sweep.cli as c; print(c.__file__); print(c.config_dir())")
    module_file, conf = where.stdout.split()
    assert module_file.startswith(str(site)) and conf == str(site / "lora_sweep" / "conf")
    proc = run("-m", "lora_sweep", "results_dir=out", *TINY)
    assert proc.returncode == 0, proc.stderr
    row = read_rows(work / "out" / "lora_tuning_results.csv").iloc[0]
    assert row["model"] == "tiny_llama" and row["steps_completed"] == 6
    bad = run("-m", "lora_sweep", "lora=nope", "results_dir=out")
    assert bad.returncode == 2 and "Available options in 'lora': all_linear, qv" in bad.stderr
