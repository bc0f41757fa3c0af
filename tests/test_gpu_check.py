"""`benchmarks/gpu_check.sh --cpu-smoke`: the GPU check's scripts run end to end on the CPU, so
a session lent a device (15 minutes of it) does not find them broken."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_the_gpu_check_runs_on_the_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "LOG_DIR": str(tmp_path / "logs")}
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-smoke"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    summary = out[out.index("gpu_check summary") :]
    assert "result: OK" in summary and "FAILED" not in summary, summary
    assert "status=success" in summary and "self_check=[" in summary  # step 2: a trial and its self-check
    assert "memory: flat" in summary and "oom: ok" in summary  # step 3: gpu_memory.py
    assert "3 trials (3 complete" in summary  # step 4: the sweep
    assert "precision: tiny" in summary and "bf16/fp32 = " in summary  # step 6: gpu_precision.py
    figures = json.loads((tmp_path / "logs" / "memory.json").read_text())
    rows = figures["rows"]
    assert [r["kind"] for r in rows] == ["same"] * 3 and all(r["status"] == "success" for r in rows)
