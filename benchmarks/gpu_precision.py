"""bf16 autocast against fp32 for the default trial on one GPU, by model size.

On a GPU a small model's step is bound by kernel launches, and autocast adds a cast per op:
this measures where bf16 starts to pay, the threshold `train.precision=auto` uses. For each
random-init Llama size, in one process: a warm-up trial in each precision (CUDA, cuBLAS and
autocast start-up), then `--rounds` interleaved fp32 and bf16 trials of the same batches
(8 rows of 512 tokens, packed); the median real tokens per second of the optimizer steps.
`135m-v49k` has SmolLM2-135M's shape and vocabulary size (49152: its LM head is ~21 % of the
parameters, a matmul bf16 speeds up), the others the embedded tokenizer's ~2k.

    python benchmarks/gpu_precision.py [--sizes 135m-v49k,100m,300m,750m] [--steps 20] [--rounds 2]
    python benchmarks/gpu_precision.py --cpu-smoke      # the script's own check
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from bench_trial import build_model_dir  # noqa: E402
from gpu_memory import long_records  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from lora_sweep.cache import TrialCache  # noqa: E402
from lora_sweep.cli import config_dir  # noqa: E402
from lora_sweep.config import RunConfig  # noqa: E402
from lora_sweep.trial import run_trial  # noqa: E402

SIZES = {  # hidden, layers, intermediate, query heads per KV head, vocabulary (None: the tokenizer's); head_dim 64
    "tiny": (256, 2, 688, 4, None),
    "135m-v49k": (576, 30, 1536, 3, 49152),
    "100m": (768, 16, 2048, 4, None),
    "300m": (1024, 24, 2816, 4, None),
    "750m": (2048, 16, 5632, 4, None),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="135m-v49k,100m,300m,750m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cpu-smoke", action="store_true")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    sizes = ["tiny"] if args.cpu_smoke else args.sizes.split(",")
    device = "cpu" if args.cpu_smoke else "cuda"
    tmp = Path(tempfile.mkdtemp(prefix="gpu_precision_"))
    data = tmp / "long.json"
    data.write_text(json.dumps(long_records(n=200, words=256)))
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for size in sizes:
            hidden, layers, inter, kv_ratio, vocab = SIZES[size]
            model_dir = build_model_dir(
                tmp / size, 64, hidden=hidden, layers=layers, intermediate=inter, kv_ratio=kv_ratio, vocab_size=vocab
            )
            cache = TrialCache()
            tps: dict[str, list[float]] = {"fp32": [], "bf16": []}
            plan = [("fp32", True), ("bf16", True)] + [(p, False) for _ in range(args.rounds) for p in ("fp32", "bf16")]
            for i, (precision, warmup) in enumerate(plan):
                cfg = compose(
                    config_name="config",
                    overrides=[
                        "model=local",
                        f"model.path={model_dir}",
                        "data=alpaca",
                        f"data.path={data}",
                        "data.max_length=512",
                        f"results_dir={tmp / 'results'}",
                        f"train.max_steps={3 if warmup else args.steps}",
                        "train.warmup_steps=1",
                        "train.eval_every=1000",
                        "train.sample_prompts=0",
                        "train.save_adapter=none",
                        f"train.device={device}",
                        f"train.precision={precision}",
                    ],
                )
                run_cfg = RunConfig.from_mapping(OmegaConf.to_container(cfg, resolve=True))
                result = run_trial(run_cfg, tmp / "runs" / f"{size}_{i}_{precision}", cache=cache)
                if not warmup:
                    tps[precision].append(result.real_tokens / max(result.step_seconds, 1e-9))
            n_params = sum(p.numel() for p in cache.models[0].model.parameters())
            fp32, bf16 = statistics.median(tps["fp32"]), statistics.median(tps["bf16"])
            print(
                f"{size} ({n_params / 1e6:.0f}M params): fp32 {fp32:.0f} real tok/s, bf16 {bf16:.0f}: "
                f"bf16/fp32 = {bf16 / fp32:.2f} (per round: fp32 "
                + ", ".join(f"{x:.0f}" for x in tps["fp32"])
                + "; bf16 "
                + ", ".join(f"{x:.0f}" for x in tps["bf16"])
                + ")",
                flush=True,
            )
            del cache
            if device == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
