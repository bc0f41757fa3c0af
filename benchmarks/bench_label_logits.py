"""Logits of the labelled positions only vs full logits, side by side, on the trial itself.

    .venv/bin/python benchmarks/bench_label_logits.py            # ~6 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_label_logits.py --quick    # a smoke run

The same trial (in-process, warm cache, as in a sweep worker) twice per round, interleaved:
once as the trial runs it (the self-check's `label_logits` verified the model slices its
logits, `logits_to_keep` with a boolean mask) and once on the fallback path a model without
that gets (full [B, S, V] logits). Three settings, from least to most LM-head-bound:

- `default`: the CLI's default trial (embedded 976K Llama, vocabulary 1950, sanity samples,
  every response and prompt token labelled: `data.mask_prompt=false`);
- `default, mask_prompt`: the same with `data.mask_prompt=true` (the responses only);
- `32k vocab, mask_prompt`: an ~8M-parameter random Llama (hidden 256, 4 layers) with a
  32,000-token vocabulary (Llama 2's; the embedded tokenizer uses the first 1950), the
  `alpaca` template and `mask_prompt=true`: the shape of a small real model on instruction data.

Printed per setting: median optimizer-step time and held-out evaluation time of each path,
their ratio, the losses of both (they agree to fp32 rounding) and the share of positions whose
logits are computed. Last line: `speedup_default=<x> speedup_mask_prompt=<y> speedup_32k=<z>`
(full-logit step time / label-logit step time).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from bench_trial import build_model_dir  # noqa: E402  (the benchmark model builder)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="1 round of 6 steps")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps = 1, 8
    logging.disable(logging.WARNING)
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import lora_sweep.selfcheck as selfcheck
    from lora_sweep.cache import TrialCache
    from lora_sweep.cli import config_dir
    from lora_sweep.config import RunConfig
    from lora_sweep.model import offline_hub
    from lora_sweep.trial import run_trial

    offline_hub()
    tmp = Path(tempfile.mkdtemp(prefix="bench_label_logits_"))
    large = build_model_dir(tmp / "llama_32k", layers=4, vocab_size=32_000)  # hidden 256, 4 + 2 KV heads of 64
    common = [
        f"train.max_steps={args.steps}",
        "train.eval_every=20",
        "train.sample_prompts=0",
        "train.save_adapter=none",
    ]
    settings = {
        "default": [],
        "default, mask_prompt": ["data.mask_prompt=true"],
        "32k vocab, mask_prompt": [
            "model=local",
            f"model.path={large}",
            "data.template=alpaca",
            "data.mask_prompt=true",
        ],
    }
    accepts = selfcheck.accepts_logits_to_keep
    print(f"machine: {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    speedups = {}
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):

        def cfg(*extra: str) -> RunConfig:
            c = compose(config_name="config", overrides=[f"results_dir={tmp / 'results'}", *common, *extra])
            return RunConfig.from_mapping(OmegaConf.to_container(c, resolve=True))

        for name, extra in settings.items():
            runs: dict[bool, list[dict]] = {True: [], False: []}
            caches = {True: TrialCache(), False: TrialCache()}  # each path keeps its own verdict
            for sliced in (True, False):  # warm both caches (model load, self-check, base evaluation)
                selfcheck.accepts_logits_to_keep = accepts if sliced else (lambda model: False)
                run_trial(
                    cfg(*extra, "train.max_steps=6"), tmp / f"warm_{abs(hash(name))}_{sliced}", cache=caches[sliced]
                )
            for rnd in range(args.rounds):
                for sliced in (True, False):
                    selfcheck.accepts_logits_to_keep = accepts if sliced else (lambda model: False)
                    run_dir = tmp / f"{abs(hash(name))}_{rnd}_{sliced}"
                    result = run_trial(cfg(*extra), run_dir, cache=caches[sliced])
                    saved = json.loads((run_dir / "result.json").read_text())
                    detail = caches[sliced].models[0].checked["label_logits"]  # type: ignore[index]
                    assert detail.startswith("logits of the " if sliced else "full logits"), detail
                    runs[sliced].append({**saved, "detail": detail, "status": result.status})
            selfcheck.accepts_logits_to_keep = accepts
            step = {k: statistics.median(r["step_seconds"] for r in v) for k, v in runs.items()}
            evals = {k: statistics.median(r["eval_seconds"] for r in v) for k, v in runs.items()}
            loss = {k: v[-1]["metrics"]["final_loss"] for k, v in runs.items()}
            eval_loss = {k: v[-1]["metrics"]["eval_loss"] for k, v in runs.items()}
            speedups[name] = step[False] / step[True]
            print(f"\n{name}: {runs[True][-1]['detail']}")
            print(
                f"  optimizer steps: label logits {step[True]:.2f} s, full logits {step[False]:.2f} s "
                f"-> {step[False] / step[True]:.2f}x; held-out evaluations: {evals[True]:.3f} s vs "
                f"{evals[False]:.3f} s -> {evals[False] / max(evals[True], 1e-9):.2f}x"
            )
            print(
                f"  final loss {loss[True]:.6f} vs {loss[False]:.6f}; eval loss {eval_loss[True]:.6f} vs "
                f"{eval_loss[False]:.6f} (the same terms, summed in another order)"
            )
    print(
        f"\nspeedup_default={speedups['default']:.2f} speedup_mask_prompt={speedups['default, mask_prompt']:.2f} "
        f"speedup_32k={speedups['32k vocab, mask_prompt']:.2f}"
    )


if __name__ == "__main__":
    main()
