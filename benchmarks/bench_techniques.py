"""What each technique buys on the default trial (embedded 976K Llama, sanity samples), side by side.

    .venv/bin/python benchmarks/bench_techniques.py            # ~2-3 min on 2 CPU cores

Runs the default trial in-process (warm cache, as inside a sweep worker) with one setting
changed at a time, in interleaved rounds, and prints median real tokens/s of the training
loop relative to the default, plus the self-check cost (cold vs cached base model) and an
AdamW step micro-benchmark (foreach vs fused vs for-loop) on the default LoRA parameters.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

DEFAULT = "default (packing, auto = fp32)"
VARIANTS = {
    DEFAULT: [],
    "uniform batches (data.packing=false)": ["data.packing=false"],
    "length grouping (data.group_by_length)": ["data.packing=false", "data.group_by_length=true"],
    "pad to max_length": ["data.packing=false", "data.padding=max_length"],
    "bf16 autocast (fp32 attention)": ["train.precision=bf16"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lora_sweep.cache import TrialCache
    from lora_sweep.cli import config_dir
    from lora_sweep.config import RunConfig
    from lora_sweep.model import offline_hub
    from lora_sweep.trial import run_trial

    offline_hub()
    tmp = Path(tempfile.mkdtemp(prefix="bench_tech_"))
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):

        def cfg(*extra: str) -> RunConfig:
            c = compose(config_name="config", overrides=[f"results_dir={tmp}", f"train.max_steps={args.steps}", *extra])
            return RunConfig.from_mapping(OmegaConf.to_container(c, resolve=True))

        cache = TrialCache()  # one per process, as a sweep worker holds it: later trials run warm
        cold = run_trial(cfg(), tmp / "cold", cache=cache)
        warm = run_trial(cfg(), tmp / "warm", cache=cache)
        print(
            f"self-check: {cold.self_check['seconds']} s on a cold base model, {warm.self_check['seconds']} s cached "
            f"(trial train loop {warm.train_seconds:.2f} s); metrics equal: {cold.metrics == warm.metrics}"
        )
        tps: dict[str, list[float]] = {k: [] for k in VARIANTS}
        for rnd in range(args.rounds):
            for name, extra in VARIANTS.items():
                r = run_trial(cfg(*extra), tmp / f"{rnd}_{len(tps[name])}_{abs(hash(name))}", cache=cache)
                tps[name].append(r.tokens_per_s)
            print(f"round {rnd + 1}: " + ", ".join(f"{v[-1]:.0f}" for v in tps.values()))
        base = statistics.median(tps[DEFAULT])
        print(f"\n{'variant':<42} {'real tok/s':>10} {'vs default':>10}")
        for name, values in tps.items():
            m = statistics.median(values)
            print(f"{name:<42} {m:>10.0f} {m / base:>10.2f}")
        cache.clear()

    # AdamW on the default LoRA parameters (q_proj, v_proj, r=8: 16 tensors)
    params = [torch.nn.Parameter(torch.randn(8, 128)) for _ in range(8)] + [
        torch.nn.Parameter(torch.randn(n, 8)) for n in (128, 64) * 4
    ]
    for p in params:
        p.grad = torch.randn_like(p)
    print()
    for label, kwargs in (("foreach", {"foreach": True}), ("fused", {"fused": True}), ("for-loop", {"foreach": False})):
        opt = torch.optim.AdamW(params, lr=1e-3, **kwargs)
        for _ in range(10):
            opt.step()
        start = time.perf_counter()
        for _ in range(300):
            opt.step()
        print(f"AdamW {label:<8}: {1e6 * (time.perf_counter() - start) / 300:.0f} us per step")


if __name__ == "__main__":
    main()
