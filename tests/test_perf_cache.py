"""The in-process cache: a trial on a cached base model equals the same trial started cold."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lora_sweep.cache import TrialCache
from lora_sweep.config import RunConfig
from lora_sweep.errors import ModelError
from lora_sweep.precision import resolve_precision
from lora_sweep.trial import run_trial, warm_up
from tests.conftest import REPO, TINY


def _cfg(compose_cfg, ckpt: Path, tmp_path: Path, *overrides: str) -> RunConfig:
    cfg = compose_cfg("model=local", f"model.path={ckpt}", f"results_dir={tmp_path}", *TINY, *overrides)
    return RunConfig.from_mapping(OmegaConf.to_container(cfg, resolve=True))


def _losses(run_dir: Path) -> list[str]:
    return [line.split(",")[1] for line in (run_dir / "steps.csv").read_text().splitlines()[1:]]


def _base_state(cache: TrialCache) -> tuple:
    (entry,) = cache.models
    base = entry.model
    names = [name for name, _ in base.named_modules()]
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._backward_hooks) for m in base.modules())
    return len(names), hooks, sorted(vars(base)), any("lora" in n for n in names), base.training


def test_cached_trials_equal_cold_trials(compose_cfg, tiny_ckpt: Path, tmp_path: Path) -> None:
    a = _cfg(compose_cfg, tiny_ckpt, tmp_path, "lora.r=4", "train.lr=3e-3")
    b = _cfg(
        compose_cfg,
        tiny_ckpt,
        tmp_path,
        "lora.r=16",
        "train.lr=1e-2",
        "train.seed=7",
        "data.max_length=48",
        "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]",
    )
    cache = TrialCache()
    cold = run_trial(a, tmp_path / "a_cold", cache=cache)
    state = _base_state(cache)
    first_b = run_trial(b, tmp_path / "b", cache=cache)
    assert _base_state(cache) == state  # no adapter layers, hooks or attributes left behind
    warm = run_trial(a, tmp_path / "a_warm", cache=cache)
    again_b = run_trial(b, tmp_path / "b_again", cache=cache)
    assert _base_state(cache) == state
    assert not cold.cache_hit and warm.cache_hit and first_b.cache_hit
    assert warm.status == cold.status and warm.steps_completed == cold.steps_completed == 6
    assert warm.metrics == cold.metrics and _losses(tmp_path / "a_warm") == _losses(tmp_path / "a_cold")
    assert again_b.metrics == first_b.metrics
    assert warm.trainable_params == cold.trainable_params  # LoRA layers do not accumulate
    assert warm.real_tokens == cold.real_tokens
    # the model-level checks ran once for this base model; the per-adapter ones every trial
    assert not cold.self_check["eager_matches_sdpa"].startswith("cached")
    assert warm.self_check["eager_matches_sdpa"].startswith("cached: ")
    assert cold.self_check["packing_isolation"].startswith("2 packed sequences")  # packing: the default
    assert warm.self_check["packing_isolation"] == f"cached: {cold.self_check['packing_isolation']}"
    assert not warm.self_check["first_backward"].startswith("cached")
    cache.clear()
    assert not cache.models
    cleared = run_trial(a, tmp_path / "a_cleared", cache=cache)
    assert not cleared.cache_hit and cleared.metrics == cold.metrics
    assert run_trial(a, tmp_path / "a_fresh").metrics == cold.metrics  # no cache given: a cold start


def test_split_eval_batches_and_packing_are_reused_until_the_file_changes(
    compose_cfg, tiny_ckpt: Path, tmp_path: Path
) -> None:
    from lora_sweep.embedded import SANITY_SAMPLES_PATH
    from lora_sweep.trial import prepared_trial

    records = json.loads(SANITY_SAMPLES_PATH.read_text())
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records[:120]))
    cfg = _cfg(compose_cfg, tiny_ckpt, tmp_path, "data=alpaca", f"data.path={data}", "data.template=plain")
    cache = TrialCache()

    def held_out_and_shape() -> tuple[list, int, tuple]:
        with prepared_trial(cfg, cache) as prepared:
            sampler = prepared.loader.batch_sampler
            labels = sum(int((b["labels"] != -100).sum()) for b in prepared.eval_batches)
            return prepared.eval_batches, labels, (sampler.rows, sampler.width)

    first, labels, shape = held_out_and_shape()
    again, labels_again, shape_again = held_out_and_shape()
    assert again is first and (labels_again, shape_again) == (labels, shape)  # built once, read by both
    data.write_text(json.dumps(records[:60]))  # the file changes: its split, batches and packing too
    changed, labels_changed, _ = held_out_and_shape()
    assert changed is not first and labels_changed < labels
    cache.clear()
    assert held_out_and_shape()[0] is not changed


@pytest.mark.slow
def test_cached_trial_equals_a_fresh_process(compose_cfg, tiny_ckpt: Path, tmp_path: Path) -> None:
    overrides = ["model=local", f"model.path={tiny_ckpt}", f"results_dir={tmp_path}", *TINY]
    cache = TrialCache()
    run_trial(_cfg(compose_cfg, tiny_ckpt, tmp_path, "lora.r=16", "train.seed=3"), tmp_path / "other", cache=cache)
    warm = run_trial(_cfg(compose_cfg, tiny_ckpt, tmp_path), tmp_path / "warm", cache=cache)
    assert warm.cache_hit
    script = (
        "import json, sys; from lora_sweep.trial import run_trial; from lora_sweep.config import RunConfig\n"
        "from hydra import compose, initialize_config_dir; from omegaconf import OmegaConf\n"
        "from lora_sweep.cli import config_dir\n"
        "with initialize_config_dir(config_dir=str(config_dir()), version_base='1.3'):\n"
        "    cfg = compose(config_name='config', overrides=sys.argv[2:])\n"
        "r = run_trial(RunConfig.from_mapping(OmegaConf.to_container(cfg, resolve=True)), sys.argv[1])\n"
        "print(json.dumps(r.metrics))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "fresh"), *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(out.strip().splitlines()[-1]) == json.loads(json.dumps(warm.metrics))
    assert _losses(tmp_path / "fresh") == _losses(tmp_path / "warm")


def test_failed_model_checks_are_not_cached(compose_cfg, nan_ckpt: Path, tmp_path: Path) -> None:
    cache = TrialCache()
    cfg = _cfg(compose_cfg, nan_ckpt, tmp_path)
    first = run_trial(cfg, tmp_path / "one", cache=cache)
    second = run_trial(cfg, tmp_path / "two", cache=cache)
    assert first.status == second.status == "failed" and "self-check" in second.reason
    assert second.cache_hit
    (entry,) = cache.models
    assert entry.checked is None and not entry.in_use


def test_precision_auto_is_fp32_for_tiny_models_and_bf16_runs(compose_cfg, tiny_ckpt: Path, tmp_path: Path) -> None:
    tiny = torch.nn.Linear(4, 4)
    assert resolve_precision("auto", torch.device("cpu"), tiny) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu"), tiny) == "bf16"
    assert resolve_precision("fp32", torch.device("cpu"), tiny) == "fp32"
    cache = TrialCache()
    result = run_trial(_cfg(compose_cfg, tiny_ckpt, tmp_path, "train.precision=bf16"), tmp_path / "bf16", cache=cache)
    assert result.status != "failed" and result.steps_completed == 6 and result.precision == "bf16"
    saved = json.loads((tmp_path / "bf16" / "result.json").read_text())
    assert saved["precision"] == "bf16"
    (entry,) = cache.models
    assert all(p.dtype == torch.float32 for p in entry.model.parameters())  # fp32 master weights


def test_warm_up_loads_the_base_model_once_and_changes_no_result(compose_cfg, tiny_ckpt: Path, tmp_path: Path) -> None:
    """A sweep worker's warm-up puts the base model in the cache and runs the model-level
    self-checks; its first trial is then a cache hit with exactly the metrics of a cold trial."""
    cfg = _cfg(compose_cfg, tiny_ckpt, tmp_path)
    cold = run_trial(cfg, tmp_path / "cold")
    cache = TrialCache()
    gc.unfreeze()  # what an earlier test's warm-up froze
    frozen_before = gc.get_freeze_count()
    try:
        warm_up(cfg, cache)
        # what the worker holds for good is frozen: full collections in its trials skip it
        assert gc.get_freeze_count() > frozen_before + 10_000
    finally:
        gc.unfreeze()  # this test process is not a worker
    (entry,) = cache.models
    assert not entry.in_use
    warm = run_trial(cfg, tmp_path / "warm", cache=cache)
    assert warm.cache_hit and not cold.cache_hit
    assert warm.self_check["eager_matches_sdpa"].startswith("cached: ")
    assert warm.self_check["packing_isolation"].startswith("cached: 2 packed sequences")
    assert warm.metrics == cold.metrics and _losses(tmp_path / "warm") == _losses(tmp_path / "cold")


def test_warm_up_raises_bad_input_and_swallows_the_rest(
    compose_cfg, tiny_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bad input is the sweep's to refuse before its study; any other failure is left for the
    first trial to run again and report as its own."""
    cache = TrialCache()
    try:
        with pytest.raises(ModelError, match="is not a directory"):
            warm_up(_cfg(compose_cfg, tmp_path / "no_such_checkpoint", tmp_path), cache)

        def broken_self_check(*args: object, **kwargs: object) -> None:
            raise RuntimeError("not an input problem")

        monkeypatch.setattr("lora_sweep.trial.run_self_check", broken_self_check)
        warm_up(_cfg(compose_cfg, tiny_ckpt, tmp_path), cache)  # no error
    finally:
        gc.unfreeze()
    (entry,) = cache.models
    assert entry.checked is None and not entry.in_use
