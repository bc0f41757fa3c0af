"""Memory between in-process trials: the cache's release path, the release after an
out-of-memory error, and `peak_mem_mb` as the trial's own peak."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lora_sweep.cache import TrialCache
from lora_sweep.config import RunConfig
from lora_sweep.memory import reset_peak_memory
from lora_sweep.trial import run_trial
from tests.conftest import TINY


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
    assert result.reason == "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert seen == [(False, False)]  # released once, with the adapter already removed

    def other_failure(*args: object, **kwargs: object) -> None:
        raise RuntimeError("not memory")

    monkeypatch.setattr("lora_sweep.trial.train_loop", other_failure)
    result = run_trial(_cfg(compose_cfg, tiny_ckpt, tmp_path), tmp_path / "other", cache=cache)
    assert result.reason == "RuntimeError: not memory" and len(seen) == 1  # no release needed


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
