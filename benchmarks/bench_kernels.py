"""What the CPU kernel choices buy, step by step on identical batches (8M Llama, warm shapes).

    .venv/bin/python benchmarks/bench_kernels.py                  # head_dim 64 and 32, ~8 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_kernels.py --head-dims 64 --rounds 1
    .venv/bin/python benchmarks/bench_kernels.py --data /path/to/alpaca_seed_tasks.json

One process holds one model per variant, all built from the same checkpoint and LoRA init.
Every batch of a length-grouped epoch (the benchmark data of bench_trial.py) is trained by
each variant in turn, so a slow second on a busy machine costs every variant alike; one
warm-up epoch first compiles every shape (oneDNN creates a bf16 kernel per new matrix shape,
~2 ms each). Variants, each adding one technique:

  fp32             train.precision=fp32 (peft's nn.Dropout)
  bf16 autocast    + bf16 autocast as HF Trainer's bf16=True does: attention in bf16 too
  + fp32 attention + SDPA in fp32 under autocast, with transformers' explicit mask
  + causal kernel  + no mask for right-padded batches: SDPA's is_causal path
                     (lora_sweep.precision.mixed_precision / causal_sdpa_mask)
  + fast dropout   + FastDropout for LoRA's dropout: what the CLI runs (lora_sweep.dropout)

Data: bench_trial.py's (`--data`, default `$LORA_SWEEP_SEED_TASKS`, else records generated from
the embedded sanity samples in the seed tasks' shape), the records with 20-400 tokens; the data
used is printed. Prints real tokens/s per variant (median over rounds) and the ratio to the one
before it.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_trial as bench  # noqa: E402  (sets up sys.path, offline hub, warnings)
import torch  # noqa: E402

from lora_sweep import data as data_lib  # noqa: E402
from lora_sweep.config import ModelConfig  # noqa: E402
from lora_sweep.embedded import TINY_LLAMA_DIR  # noqa: E402
from lora_sweep.lora import apply_lora  # noqa: E402
from lora_sweep.model import load_model, load_tokenizer  # noqa: E402
from lora_sweep.precision import mixed_precision  # noqa: E402

VARIANTS = ("fp32", "bf16 autocast", "+ fp32 attention", "+ causal kernel", "+ fast dropout")
MASKED_FP32_SDPA = "bench_sdpa_fp32_explicit_mask"  # fp32 attention with transformers' own sdpa_mask


def make_step(model_dir: Path, variant: str, stack: contextlib.ExitStack) -> Callable[[dict], float]:
    """One optimizer step of the training loop's phases for `variant` (a fresh LoRA model)."""
    import lora_sweep.lora as lora_lib

    cpu = torch.device("cpu")
    model = load_model(model_dir, ModelConfig(name="local", path=str(model_dir)), cpu)
    fast_dropout = variant == "+ fast dropout"
    original = lora_lib.use_fast_dropout
    lora_lib.use_fast_dropout = original if fast_dropout else (lambda m: 0)
    try:
        torch.manual_seed(bench.SEED)
        model = apply_lora(model, bench.LORA)
    finally:
        lora_lib.use_fast_dropout = original
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=bench.LR, fused=True)
    model.train()
    if variant == "fp32":
        autocast = contextlib.nullcontext
    elif variant == "bf16 autocast":
        autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = stack.enter_context(mixed_precision(model, "bf16", cpu))
        if variant == "+ fp32 attention":
            from transformers import AttentionInterface
            from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

            from lora_sweep.precision import sdpa_fp32_attention_forward

            AttentionInterface.register(MASKED_FP32_SDPA, sdpa_fp32_attention_forward)
            AttentionMaskInterface.register(MASKED_FP32_SDPA, sdpa_mask)
            model.get_base_model().set_attn_implementation(MASKED_FP32_SDPA)  # mixed_precision restores sdpa

    def step(batch: dict) -> float:
        with autocast():
            loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
        optimizer.step()
        return float(loss)

    return step


def run(head_dim: int, rounds: int, tmp: Path, records: list[dict[str, str]]) -> dict[str, float]:
    model_dir = bench.build_model_dir(tmp / f"llama8m_hd{head_dim}", head_dim)
    tokenizer = load_tokenizer(model_dir, ModelConfig(name="local", path=str(model_dir)))
    examples = [
        e
        for e in data_lib.tokenize_records(
            records, tokenizer, template="plain", max_length=bench.MAX_LENGTH, mask_prompt=False
        )
        if bench.MIN_TEXT_TOKENS <= len(e.input_ids) <= 400
    ]
    loader = data_lib.make_dataloader(
        data_lib.SanityDataset(examples),
        data_lib.Collator(tokenizer.pad_token_id),
        batch_size=bench.BATCH,
        seed=bench.SEED,
        group_by_length=True,
    )
    batches = list(loader)
    with contextlib.ExitStack() as stack:
        steps = {v: make_step(model_dir, v, stack) for v in VARIANTS}
        for batch in batches:  # warm-up epoch: every shape once
            for step in steps.values():
                step(batch)
        rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(rounds):
            seconds = dict.fromkeys(VARIANTS, 0.0)
            tokens = 0
            for batch in batches:
                tokens += int(batch["attention_mask"].sum())
                for variant, step in steps.items():
                    start = time.perf_counter()
                    step(batch)
                    seconds[variant] += time.perf_counter() - start
            for variant in VARIANTS:
                rates[variant].append(tokens / seconds[variant])
    return {v: statistics.median(r) for v, r in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 32])
    parser.add_argument("--rounds", type=int, default=3, help="epochs measured (medians reported)")
    bench.add_data_argument(parser)
    args = parser.parse_args()
    bench.offline_hub()
    tmp = Path(tempfile.mkdtemp(prefix="bench_kernels_"))
    tokenizer = load_tokenizer(TINY_LLAMA_DIR, ModelConfig(name="tiny_llama", path=None))  # every benchmark model's
    records, source = bench.benchmark_records(args.data, tokenizer, tmp)
    lengths = [
        len(e.input_ids)
        for e in data_lib.tokenize_records(
            records, tokenizer, template="plain", max_length=bench.MAX_LENGTH, mask_prompt=False
        )
    ]
    kept = sum(bench.MIN_TEXT_TOKENS <= n <= 400 for n in lengths)
    print(
        f"{torch.get_num_threads()} torch threads, bf16 native={torch.ops.mkldnn._is_mkldnn_bf16_supported()}, "
        f"torch {torch.__version__}"
    )
    print(
        f"data: {source}; 8-sample length-grouped batches of the {kept} records with {bench.MIN_TEXT_TOKENS}-400 tokens"
    )
    for head_dim in args.head_dims:
        tps = run(head_dim, args.rounds, tmp, records)
        print(f"\nhead_dim {head_dim} ({256 // head_dim} query / {128 // head_dim} KV heads), {args.rounds} epochs:")
        print(f"{'variant':<18} {'real tok/s':>10} {'vs previous':>12} {'vs fp32':>8}")
        previous = None
        for variant, value in tps.items():
            step_ratio = f"{value / previous:.2f}" if previous else "-"
            print(f"{variant:<18} {value:>10.0f} {step_ratio:>12} {value / tps['fp32']:>8.2f}")
            previous = value


if __name__ == "__main__":
    main()
