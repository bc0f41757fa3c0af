"""`benchmarks/bench_trial.py`'s accounting: `ours` is compared with baselines that evaluate
nothing, so its training time leaves out the trial's held-out evaluations, which it keeps apart."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import REPO


def _bench_trial():
    spec = importlib.util.spec_from_file_location("bench_trial", REPO / "benchmarks" / "bench_trial.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ours_throughput_is_training_time_without_its_held_out_evaluations(
    compose_cfg, alpaca_files, tmp_path: Path
) -> None:
    from lora_sweep.cache import TrialCache
    from lora_sweep.embedded import TINY_LLAMA_DIR

    bench = _bench_trial()
    results = tmp_path / "results"
    run = bench.run_ours(
        compose_cfg,
        TINY_LLAMA_DIR,
        alpaca_files.json_path,
        4,  # steps: the last one is evaluated, and so is step 0 (the base model, first trial)
        results,
        "t",
        "data.max_length=64",
        "train.sample_prompts=0",
        cache=TrialCache(),
    )
    recorded = json.loads((results / "runs" / "t" / "result.json").read_text())
    assert recorded["eval_seconds"] > 0
    assert run.eval_seconds == pytest.approx(recorded["eval_seconds"])
    assert run.seconds == pytest.approx(recorded["train_seconds"] - recorded["eval_seconds"])
    assert run.tps == pytest.approx(recorded["real_tokens"] / run.seconds)
    assert run.tps_with_evals == pytest.approx(recorded["real_tokens"] / recorded["train_seconds"])
    assert run.tps_with_evals < run.tps
