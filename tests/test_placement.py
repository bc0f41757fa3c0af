"""Worker placement: the plan for K = 0, 1, 2, 8 GPUs, GPU counting without CUDA, and the
environment each spawned worker of a sweep gets (processes faked, no GPU needed)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import optuna
import pytest

from lora_sweep.sweep.placement import (
    parse_visible_devices,
    pin_this_process,
    pinned_gpu,
    plan_placement,
    spawned_worker_gpu,
    visible_gpus,
    worker_env,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _plan(placement: Any) -> list[tuple[int, int | None, int]]:
    return [(w.worker_id, w.gpu, w.threads) for w in placement.workers]


def test_cpu_machine_keeps_one_single_threaded_worker_per_core() -> None:
    auto = plan_placement("auto", gpus=0, cores=4)
    assert _plan(auto) == [(0, None, 1), (1, None, 1), (2, None, 1), (3, None, 1)] and auto.note == ""
    assert auto.describe() == "4 workers x 1 thread"
    two = plan_placement(2, gpus=0, cores=16)
    assert _plan(two) == [(0, None, 8), (1, None, 8)] and two.describe() == "2 workers x 8 threads"
    assert plan_placement(1, gpus=0, cores=16).describe() == "1 worker"
    assert plan_placement("auto", gpus=0, cores=4, max_workers=3).n_workers == 3  # never more than trials left


def test_one_gpu() -> None:
    auto = plan_placement("auto", gpus=1, cores=16)
    assert _plan(auto) == [(0, 0, 16)] and auto.note == "" and auto.describe() == "1 worker x 16 threads, GPU 0"
    three = plan_placement(3, gpus=1, cores=16)
    assert _plan(three) == [(0, 0, 5), (1, 0, 5), (2, 0, 5)]
    assert three.note == "3 workers on 1 GPU: GPU 0 runs all 3"


def test_two_gpus() -> None:
    auto = plan_placement("auto", gpus=2, cores=16)
    assert _plan(auto) == [(0, 0, 8), (1, 1, 8)] and auto.note == ""
    assert auto.describe() == "2 workers x 8 threads, GPU 0 and GPU 1"
    assert auto.describe(["2", "3"]) == "2 workers x 8 threads, GPU 2 and GPU 3"  # CUDA_VISIBLE_DEVICES=2,3
    three = plan_placement(3, gpus=2, cores=16)
    assert _plan(three) == [(0, 0, 5), (1, 1, 5), (2, 0, 5)]
    assert three.note == "3 workers on 2 GPUs: round-robin, GPU 0 runs 2 workers"
    assert plan_placement(4, gpus=2, cores=16).note == "4 workers on 2 GPUs: round-robin, 2 workers per GPU"
    one = plan_placement(1, gpus=2, cores=16)
    assert _plan(one) == [(0, 0, 16)] and one.note == "1 worker on 2 GPUs: round-robin, GPU 1 unused"
    capped = plan_placement("auto", gpus=2, cores=16, max_workers=1)  # one trial left
    assert _plan(capped) == [(0, 0, 16)]


def test_eight_gpus() -> None:
    auto = plan_placement("auto", gpus=8, cores=16)
    assert _plan(auto) == [(i, i, 2) for i in range(8)] and auto.note == ""
    assert auto.describe() == "8 workers x 2 threads, GPUs 0-7"
    assert _plan(plan_placement("auto", gpus=8, cores=4)) == [(i, i, 1) for i in range(8)]  # at least 1 thread
    twelve = plan_placement(12, gpus=8, cores=48)
    assert [w.gpu for w in twelve.workers] == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]
    assert twelve.note == (
        "12 workers on 8 GPUs: round-robin, GPU 0 runs 2 workers, GPU 1 runs 2 workers, "
        "GPU 2 runs 2 workers, GPU 3 runs 2 workers"
    )
    assert plan_placement(3, gpus=8, cores=48).note == "3 workers on 8 GPUs: round-robin, GPUs 3-7 unused"


@pytest.mark.parametrize("bad", [0, -1, 2.5, "many", None])
def test_bad_n_jobs_is_refused_naming_the_key(bad: Any) -> None:
    with pytest.raises(ValueError, match="hydra.sweeper.n_jobs"):
        plan_placement(bad, gpus=2, cores=4)


def test_visible_devices_are_parsed_as_cuda_does() -> None:
    assert parse_visible_devices("") == []
    assert parse_visible_devices("0,1") == ["0", "1"]
    assert parse_visible_devices(" 3 , 1 ") == ["3", "1"]
    assert parse_visible_devices("1,-1,2") == ["1"]  # an invalid entry ends the list
    assert parse_visible_devices("0,0") == []  # a duplicate hides every device
    assert parse_visible_devices("GPU-8f2a,MIG-1c3d") == ["GPU-8f2a", "MIG-1c3d"]
    assert parse_visible_devices("nonsense") == []


def test_gpus_are_counted_from_the_environment_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)  # as a CUDA build of torch
    monkeypatch.setattr("lora_sweep.sweep.placement.nvml_device_count", lambda: 4)
    assert visible_gpus({}) == ["0", "1", "2", "3"]
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)  # a CPU build: no GPU whatever NVML says
    assert visible_gpus({}) == []
    assert not torch.cuda.is_initialized()


def test_worker_env_pins_one_gpu_and_the_threads() -> None:
    placement = plan_placement(3, gpus=2, cores=16)
    base = {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "4,6", "OMP_NUM_THREADS": "16"}
    envs = [worker_env(slot, ["4", "6"], base) for slot in placement.workers]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["4", "6", "4"]
    assert all(e["OMP_NUM_THREADS"] == e["MKL_NUM_THREADS"] == "5" and e["PATH"] == "/bin" for e in envs)
    cpu = worker_env(plan_placement(2, gpus=0, cores=2).workers[1], [], {"CUDA_VISIBLE_DEVICES": ""})
    assert cpu == {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # untouched
    environ: dict[str, str] = {}
    assert pin_this_process(placement.workers[0], ["4", "6"], environ) and environ == {"CUDA_VISIBLE_DEVICES": "4"}
    environ = {}
    assert pin_this_process(plan_placement(1, gpus=0, cores=2).workers[0], [], environ) and environ == {}


def test_a_gpu_is_labelled_by_index_or_short_uuid() -> None:
    from lora_sweep.sweep.console import gpu_label

    assert gpu_label("3") == "GPU 3"
    assert gpu_label("GPU-8f3c1a2b-0000-1111-2222-333344445555") == "GPU-8f3c1a2b"
    assert gpu_label("MIG-a1b2c3d4-e5f6") == "MIG-a1b2c3d4"


def test_the_gpu_a_trial_runs_on_is_named_as_the_user_names_it() -> None:
    two = plan_placement("auto", gpus=2, cores=16)
    assert pinned_gpu(two, ["4", "GPU-a1b2"]) == "4" and pinned_gpu(None, []) is None
    assert pinned_gpu(plan_placement(2, gpus=0, cores=2), []) is None
    assert spawned_worker_gpu({"CUDA_VISIBLE_DEVICES": "GPU-a1b2"}) == "GPU-a1b2"
    assert spawned_worker_gpu({"CUDA_VISIBLE_DEVICES": " 3 "}) == "3"
    for unpinned in ({}, {"CUDA_VISIBLE_DEVICES": ""}, {"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "-1"}):
        assert spawned_worker_gpu(unpinned) is None, unpinned


class _FakeProc:
    def __init__(self, cmd: list[str], env: dict[str, str], **_: Any) -> None:
        self.cmd, self.env = cmd, env
        self.stdout, self.stderr = io.BytesIO(b""), io.BytesIO(b"")

    def wait(self, timeout: float | None = None) -> int:
        return 0

    def send_signal(self, sig: int) -> None:
        pass


def _sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n_jobs: Any) -> tuple[list[_FakeProc], list[str], str]:
    """A 4-trial sweep through the basic-launcher path, worker 0 running every trial in-process
    and the other workers' processes faked: (spawned, worker 0's CUDA_VISIBLE_DEVICES at each
    job, console output)."""
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    from lora_sweep.sweep import runner as runner_mod
    from lora_sweep.sweep.console import SweepConsole

    spawned: list[_FakeProc] = []
    seen: list[str] = []

    def popen(cmd: list[str], env: dict[str, str], **kwargs: Any) -> _FakeProc:
        spawned.append(_FakeProc(cmd, env, **kwargs))
        return spawned[-1]

    class Launcher:
        def launch(self, job_overrides: list[list[str]], initial_job_idx: int) -> list[JobReturn]:
            seen.append(os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))  # at each of worker 0's jobs
            ret = JobReturn(status=JobStatus.COMPLETED)
            ret.return_value = 1.0
            return [ret for _ in job_overrides]

    monkeypatch.setattr(runner_mod.subprocess, "Popen", popen)
    monkeypatch.setattr(runner_mod, "_cpu_count", lambda: 16)
    monkeypatch.setattr(runner_mod, "set_threads", lambda threads: seen.append(f"threads={threads}"))
    config = OmegaConf.create(
        {
            "results_dir": str(tmp_path),
            "hydra": {"sweep": {"dir": str(tmp_path / "m"), "subdir": "${hydra.job.num}"}, "job": {"name": "s"}},
        }
    )
    settings = {
        "n_trials": 4,
        "n_jobs": n_jobs,
        "params": {"x": "interval(0.0, 1.0)"},
        "sampler": {"_target_": "optuna.samplers.RandomSampler"},
        "storage": str(tmp_path / "journal.log"),
    }
    out = io.StringIO()
    runner = runner_mod.SweepRunner(
        settings=settings,
        config=config,
        launcher=Launcher(),
        argv=["app.py", "-m"],
        console=SweepConsole(stream=out, errors=out, live=False),
    )
    assert runner.run([]).finished == 4
    return spawned, seen, out.getvalue()


def test_sweep_on_two_gpus_pins_each_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")  # counted as given; restored after the test
    monkeypatch.setattr("lora_sweep.sweep.runner.cuda_in_use", lambda: True)  # as after a job trained on it
    spawned, seen, console = _sweep(tmp_path, monkeypatch, "auto")
    (worker1,) = spawned
    assert worker1.env["CUDA_VISIBLE_DEVICES"] == "3" and worker1.env["OMP_NUM_THREADS"] == "8"
    assert "hydra.sweeper.worker_id=1" in worker1.cmd
    assert seen[0] == "threads=8" and set(seen[1:]) == {"2"}  # worker 0: its own GPU before its first job
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"  # and the sweep's value back afterwards
    assert "; 2 workers x 8 threads, GPU 2 and GPU 3" in console
    trial_lines = [line for line in console.splitlines() if "/4] trial" in line]
    assert len(trial_lines) == 4 and all("  GPU 2  x=" in line for line in trial_lines), console  # where each ran


def test_sweep_round_robin_through_the_gpu_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # so the test's os.environ is restored afterwards
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr("lora_sweep.sweep.runner.visible_gpus", lambda: ["0", "1"])  # as on a 2-GPU machine
    spawned, seen, console = _sweep(tmp_path, monkeypatch, 3)
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in spawned] == ["1", "0"]
    assert {p.env["MKL_NUM_THREADS"] for p in spawned} == {"5"}
    assert seen[0] == "threads=5" and set(seen[1:]) == {"0"}
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    assert "; 3 workers x 5 threads, GPU 0 and GPU 1" in console
    assert "[lora_sweep] 3 workers on 2 GPUs: round-robin, GPU 0 runs 2 workers" in console
    # the jobs never initialised CUDA here (as with train.device=cpu): no trial line claims a GPU
    trial_lines = [line for line in console.splitlines() if "/4] trial" in line]
    assert len(trial_lines) == 4 and not any("GPU" in line for line in trial_lines), console


def test_sweep_on_a_cpu_machine_sets_no_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr("lora_sweep.sweep.runner.visible_gpus", lambda: [])
    spawned, seen, console = _sweep(tmp_path, monkeypatch, 2)
    assert [p.env.get("CUDA_VISIBLE_DEVICES") for p in spawned] == [None] and set(seen[1:]) == {"<unset>"}
    assert console.splitlines()[2].endswith("; 2 workers x 8 threads")
    assert "GPU" not in console  # no device column on the CPU


def test_a_cuda_index_the_worker_cannot_see_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker pinned to one GPU sees it as cuda:0: `train.device=cuda:1` there is bad input
    naming CUDA_VISIBLE_DEVICES and the fix, not a CUDA error mid-trial; a malformed index is
    refused by the config."""
    import torch

    from lora_sweep.config import TrainConfig
    from lora_sweep.errors import ConfigError, ModelError
    from lora_sweep.model import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert resolve_device("cuda:0") == torch.device("cuda:0") and resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(ModelError) as err:
        resolve_device("cuda:1")
    assert str(err.value) == (
        "train.device=cuda:1 but 1 CUDA device(s) are visible (CUDA_VISIBLE_DEVICES=3: a sweep worker pinned "
        "to one GPU sees it as cuda:0); use train.device=auto or cuda"
    )
    for bad in ("cuda:x", "cuda:", "cuda:-1", "gpu"):
        with pytest.raises(ConfigError, match="train.device"):
            TrainConfig(lr=1e-3, max_steps=10, batch_size=2, device=bad)
    assert TrainConfig(lr=1e-3, max_steps=10, batch_size=2, device="cuda:7").device == "cuda:7"
