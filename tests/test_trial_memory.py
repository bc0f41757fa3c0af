"""Memory between in-process trials: the cache's release path (`TrialCache.end_trial`, after
every trial), an out-of-memory error (in a trial and in a sweep), and `peak_mem_mb` as the
trial's own peak."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lora_sweep.cache import TrialCache
from lora_sweep.config import RunConfig
from lora_sweep.memory import reset_peak_memory
from lora_sweep.trial import run_trial
from tests.conftest import REPO, TINY


def _cfg(compose_cfg, ckpt: Path, tmp_path: Path, *overrides: str) -> RunConfig:
    cfg = compose_cfg("model=local", f"model.path={ckpt}", f"results_dir={tmp_path}", *TINY, *overrides)
    return RunConfig.from_mapping(OmegaConf.to_container(cfg, resolve=True))


def _peak_rss_mb() -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def test_clear_drops_the_model_collects_and_empties_the_cuda_cache(
    compose_cfg, tiny_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = TrialCache()
    run_trial(_cfg(compose_cfg, tiny_ckpt, tmp_path), tmp_path / "run", cache=cache)
    (entry,) = cache.models
    model = weakref.ref(entry.model)
    del entry
    calls: list[str] = []
    collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *args: calls.append("gc.collect") or collect(*args))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # as on a machine training on CUDA
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    cache.clear()
    assert not cache.models and model() is None  # nothing else held the base model
    assert calls == ["gc.collect", "empty_cache"]


def test_an_out_of_memory_trial_releases_memory_after_giving_the_model_back(
    compose_cfg, tiny_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = TrialCache()
    seen: list[tuple[bool, bool]] = []

    def release() -> None:  # what the cache looks like when the release runs
        (entry,) = cache.models
        seen.append((entry.in_use, any("lora_" in n for n, _ in entry.model.named_modules())))

    monkeypatch.setattr(cache, "release", release)

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("lora_sweep.trial.train_loop", out_of_memory)
    result = run_trial(_cfg(compose_cfg, tiny_ckpt, tmp_path), tmp_path / "oom", cache=cache)
    assert result.status == "failed"
    assert result.reason == (
        "out of memory (train.batch_size=4 x data.max_length=64): CUDA out of memory. Tried to allocate 2.00 GiB"
    )
    assert seen == [(False, False)]  # released once, with the adapter already removed

    def other_failure(*args: object, **kwargs: object) -> None:
        raise RuntimeError("not memory")

    monkeypatch.setattr("lora_sweep.trial.train_loop", other_failure)
    result = run_trial(_cfg(compose_cfg, tiny_ckpt, tmp_path), tmp_path / "other", cache=cache)
    assert result.reason == "RuntimeError: not memory" and len(seen) == 2  # every trial ends with a release


def _clean(model: torch.nn.Module) -> bool:
    """No LoRA module and no gradient left in a base model."""
    no_lora = not any("lora_" in name for name, _ in model.named_modules())
    return no_lora and all(p.grad is None for p in model.parameters())


def test_every_trial_ends_through_end_trial_and_leaves_a_clean_base_model(
    compose_cfg, tiny_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = TrialCache()
    calls: list[str] = []
    end_trial = cache.end_trial

    def counting(entry, adapted, **kwargs) -> None:  # noqa: ANN001 - TrialCache.end_trial's own
        end_trial(entry, adapted, **kwargs)
        calls.append("end_trial")

    monkeypatch.setattr(cache, "end_trial", counting)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # as on a machine training on CUDA
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    cfg = _cfg(compose_cfg, tiny_ckpt, tmp_path)

    assert run_trial(cfg, tmp_path / "ok", cache=cache).status == "success"
    (entry,) = cache.models
    assert calls == ["empty_cache", "end_trial"] and _clean(entry.model) and not entry.in_use

    def failing_step(*args: object, **kwargs: object) -> None:  # inside the loop: the trial fails
        raise RuntimeError("a step went wrong")

    monkeypatch.setattr("lora_sweep.train.accumulate_gradients", failing_step)
    result = run_trial(cfg, tmp_path / "failed", cache=cache)
    assert result.status == "failed" and result.reason == "RuntimeError: a step went wrong"
    assert calls[2:] == ["empty_cache", "end_trial"] and _clean(entry.model)

    def failing_prepare(*args: object, **kwargs: object) -> None:  # after the adapter: the trial raises
        raise RuntimeError("no batches")

    monkeypatch.setattr("lora_sweep.data.make_dataloader", failing_prepare)
    with pytest.raises(RuntimeError, match="no batches"):
        run_trial(cfg, tmp_path / "raised", cache=cache)
    assert calls[4:] == ["empty_cache", "end_trial"]
    assert cache.models == [entry] and _clean(entry.model) and not entry.in_use  # reused by the next trial


_OOM_SWEEP = textwrap.dedent(
    """
    import sys

    import torch

    import lora_sweep.train
    import lora_sweep.trial
    from lora_sweep.cli import main

    trials = []
    real_loop, real_step = lora_sweep.trial.train_loop, lora_sweep.train.accumulate_gradients

    def loop(*args, **kwargs):
        trials.append(len(trials))
        return real_loop(*args, **kwargs)

    def step(*args, **kwargs):
        if len(trials) == 2:  # the sweep's second trial runs out of memory in its first step
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_step(*args, **kwargs)

    lora_sweep.trial.train_loop, lora_sweep.train.accumulate_gradients = loop, step
    sys.argv = ["lora_sweep", *sys.argv[1:]]
    main()
    """
)


def test_an_out_of_memory_trial_in_a_sweep_fails_is_penalized_and_the_worker_goes_on(tmp_path: Path) -> None:
    import optuna

    results = tmp_path / "results"
    args = ["-m", f"results_dir={results}", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=1"]
    args += [*TINY, "hydra.sweeper.enqueue=null", "train.save_adapter=none"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _OOM_SWEEP, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(
        study_name="lora_sweep",
        storage=optuna.storages.journal.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(results / "optuna_journal.log"))
        ),
    )
    trials = [t for t in study.get_trials() if "penalty_for_trial" not in t.user_attrs]
    assert trials[1].number == 1 and trials[1].state.name == "FAIL"
    reason = trials[1].user_attrs["reason"]
    assert reason.startswith("out of memory (train.batch_size=4 x data.max_length=64): CUDA out of memory"), reason
    penalties = [t for t in study.get_trials() if t.user_attrs.get("penalty_for_trial") == 1]
    assert len(penalties) == 1 and penalties[0].params == trials[1].params  # the sampler avoids its params
    assert len(trials) == 3 and trials[2].state.name in ("COMPLETE", "PRUNED")  # the worker went on
    assert "trial 1 FAIL" in proc.stdout and "out of memory (train.batch_size=4" in proc.stdout
    rows = (results / "lora_tuning_results.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 and sum("out of memory (train.batch_size=4 x data.max_length=64)" in r for r in rows) == 1
    result = json.loads((Path(trials[1].user_attrs["run_dir"]) / "result.json").read_text())
    assert result["status"] == "failed" and result["reason"] == reason


def test_peak_memory_is_the_trial_own_not_the_process_lifetime_peak(
    compose_cfg, tiny_ckpt: Path, tmp_path: Path
) -> None:
    if not reset_peak_memory(torch.device("cpu")):
        pytest.skip("the peak RSS cannot be reset here (/proc/self/clear_refs)")
    big = torch.ones(2**28)  # 1 GiB, every page touched
    earlier_peak_mb = _peak_rss_mb()
    del big
    result = run_trial(_cfg(compose_cfg, tiny_ckpt, tmp_path), tmp_path / "run")
    assert result.status != "failed" and result.device == "cpu"
    assert 0 < result.peak_mem_mb < earlier_peak_mb - 512


def test_the_loop_leaves_no_optimizer_state_or_gradients(compose_cfg, tiny_ckpt: Path, tmp_path: Path) -> None:
    """A trial's optimizer state and LoRA gradients are gone when its loop returns, not when the
    garbage collector next finds the scheduler/optimizer cycle."""
    import torch.optim

    optimizers: list[torch.optim.Optimizer] = []
    real_adamw = torch.optim.AdamW

    def recording_adamw(*args: object, **kwargs: object) -> torch.optim.Optimizer:
        optimizers.append(real_adamw(*args, **kwargs))
        return optimizers[-1]

    gc.disable()  # the cycle must not be what frees them
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.optim, "AdamW", recording_adamw)
            run_trial(_cfg(compose_cfg, tiny_ckpt, tmp_path), tmp_path / "run")
        (optimizer,) = optimizers
        assert not optimizer.state
        assert all(p.grad is None for group in optimizer.param_groups for p in group["params"])
    finally:
        gc.enable()


@pytest.mark.parametrize("where", ["lora_sweep.trial.apply_lora", "lora_sweep.cache.TrialCache.checkout_model"])
def test_out_of_memory_while_preparing_is_a_failed_trial_with_its_batch_shape(
    compose_cfg, tiny_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Running out of memory before the loop (loading the model onto the device, adding the
    adapter) ends the trial `failed` with the batch shape in its reason and a result.json, after
    releasing memory; the next trial in the same process then runs. Any other error still raises."""
    cache = TrialCache()
    releases: list[bool] = []
    release = cache.release
    monkeypatch.setattr(cache, "release", lambda: releases.append(True) or release())

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    with monkeypatch.context() as patch:
        patch.setattr(where, out_of_memory)
        result = run_trial(_cfg(compose_cfg, tiny_ckpt, tmp_path), tmp_path / "oom", cache=cache)
    assert result.status == "failed" and releases
    assert result.reason == (
        "out of memory (train.batch_size=4 x data.max_length=64): CUDA out of memory. Tried to allocate 8.00 GiB"
    )
    recorded = json.loads((tmp_path / "oom" / "result.json").read_text())
    assert recorded["status"] == "failed" and recorded["reason"] == result.reason
    assert all(_clean(entry.model) for entry in cache.models)  # no adapter left behind
    after = run_trial(_cfg(compose_cfg, tiny_ckpt, tmp_path), tmp_path / "next", cache=cache)
    assert after.status == "success", after.reason

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("not memory")

    monkeypatch.setattr(where, broken)
    with pytest.raises(RuntimeError, match="not memory"):
        run_trial(_cfg(compose_cfg, tiny_ckpt, tmp_path), tmp_path / "broken", cache=cache)
