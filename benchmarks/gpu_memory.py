"""Memory between in-process trials on one GPU, and a real out-of-memory trial (issue 17).

Runs `--trials` trials of one shape (the same batch size, max_length and LoRA rank; only the
learning rate and seed change) through one `TrialCache`, as a sweep worker does, and between
them one trial whose batch cannot fit (`--oom-batch` rows of `--max-length` tokens). After
each trial it reads the CUDA allocator: memory still allocated (the cached base model alone
should remain), reserved, and the trial's own peak (`peak_mem_mb`). Then the MFU of the
same-shape trials' optimizer steps against the device's bf16 matmul peak, measured here.

    python benchmarks/gpu_memory.py --model DIR [--trials 20] [--json OUT.json]

Prints one line per trial and a verdict line:
`memory: flat|GROWS (allocated after trial 1 A MiB, after trial N B MiB; peak trial 1 P1, trial N PN) oom: ok|...`
Exit code 1 when memory grows by more than `--tolerance-mib` or the OOM trial was not a
failed trial naming `out of memory` and its batch shape.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from bench_trial import flops_per_batch, matmul_ceiling  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from transformers import AutoConfig  # noqa: E402

from lora_sweep.cache import TrialCache  # noqa: E402
from lora_sweep.cli import config_dir  # noqa: E402
from lora_sweep.config import RunConfig  # noqa: E402
from lora_sweep.trial import run_trial  # noqa: E402

WORDS = (
    "the model learns a low rank update of each projection while the base weights stay frozen and "
    "every step trains on real tokens only so the loss measures what the adapter learned"
).split()


def long_records(n: int, words: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` Alpaca records of ~`words` words each: enough tokens that `--oom-batch` rows of
    `--max-length` tokens exist (packing needs the tokens, padding would hide the shape)."""
    rng = random.Random(seed)
    return [
        {
            "instruction": f"Continue text {i}.",
            "input": "",
            "output": " ".join(rng.choice(WORDS) for _ in range(words)),
        }
        for i in range(n)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a checkpoint directory (model=local)")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--oom-after", type=int, default=10, help="the OOM trial runs after this many trials")
    parser.add_argument("--oom-batch", type=int, default=4096, help="rows of the OOM trial's batch")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32", "auto"))
    parser.add_argument(
        "--tolerance-mib",
        type=float,
        default=4.0,
        help="growth of the memory allocated after a trial that counts as a leak",
    )
    parser.add_argument(
        "--memory-cap-gib",
        type=float,
        default=100.0,
        help="cap the allocator here (set_per_process_memory_fraction), so the OOM trial fails on any larger GPU too",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the per-trial figures here")
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="the script's own check on the CPU: 3 tiny trials, no OOM trial"
    )
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    if args.cpu_smoke:
        args.trials, args.oom_after, args.max_length, args.steps, args.batch_size = 3, 10**6, 64, 4, 4
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise SystemExit("no CUDA device: this script measures the CUDA allocator (--cpu-smoke: its own check)")
    gpu = device.type == "cuda"
    if args.trials < 2:
        raise SystemExit("--trials: at least 2 (trial 1 against the last)")
    if gpu:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total), device)

    tmp = Path(tempfile.mkdtemp(prefix="gpu_memory_"))
    data_file, oom_file = tmp / "long.json", tmp / "oom.json"  # every record is at least one packed row
    data_file.write_text(json.dumps(long_records(n=200, words=args.max_length // 2)))
    oom_file.write_text(json.dumps(long_records(n=args.oom_batch * 5 // 4, words=args.max_length // 2, seed=1)))
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):

        def run_cfg(*overrides: str, data: Path = data_file) -> RunConfig:
            cfg = compose(
                config_name="config",
                overrides=[
                    "model=local",
                    f"model.path={args.model}",
                    "data=alpaca",
                    f"data.path={data}",
                    f"data.max_length={args.max_length}",
                    f"results_dir={tmp / 'results'}",
                    f"train.max_steps={args.steps}",
                    "train.save_adapter=none",
                    f"train.device={device.type}",
                    f"train.precision={'fp32' if args.cpu_smoke else args.precision}",
                    *(["train.warmup_steps=1", "train.sample_prompts=1"] if args.cpu_smoke else []),
                    *overrides,
                ],
            )
            return RunConfig.from_mapping(OmegaConf.to_container(cfg, resolve=True))

        cache = TrialCache()
        rows: list[dict] = []
        rng = random.Random(0)
        plan = ["same"] * args.trials
        if args.oom_after < args.trials:
            plan.insert(args.oom_after, "oom")
        for i, kind in enumerate(plan):
            if kind == "oom":
                cfg = run_cfg(
                    f"train.batch_size={args.oom_batch}", "train.max_steps=2", "train.warmup_steps=1", data=oom_file
                )
            else:
                lr = 10 ** rng.uniform(-4, -2)
                cfg = run_cfg(f"train.batch_size={args.batch_size}", f"train.lr={lr:.3g}", f"train.seed={i}")
            result = run_trial(cfg, tmp / "runs" / f"{i:02d}_{kind}", cache=cache)
            row = {
                "i": i,
                "kind": kind,
                "status": result.status,
                "reason": result.reason,
                "steps": result.steps_completed,
                "peak_mem_mb": round(result.peak_mem_mb, 1),
                "allocated_after_mb": round(torch.cuda.memory_allocated(device) / 2**20, 1) if gpu else 0.0,
                "reserved_after_mb": round(torch.cuda.memory_reserved(device) / 2**20, 1) if gpu else 0.0,
                "real_tokens": result.real_tokens,
                "step_seconds": result.step_seconds,
                "precision": result.precision,
                "attn": result.attn_implementation,
                "seconds": round(result.duration_s, 2),
            }
            rows.append(row)
            print(
                f"trial {i + 1:>2} {kind:<4} {result.status:<8} steps={row['steps']:<3} "
                f"peak={row['peak_mem_mb']:>8} MiB "
                f"allocated after={row['allocated_after_mb']:>7} MiB reserved after={row['reserved_after_mb']:>7} MiB "
                f"{row['seconds']:>5} s {result.precision} {result.attn_implementation}"
                + (f"  reason: {result.reason[:140]}" if kind == "oom" else ""),
                flush=True,
            )

    same = [r for r in rows if r["kind"] == "same"]
    first, last = same[0], same[-1]
    # a leak shows as memory still allocated after the trials; the peaks vary by a few MiB
    # with the batches' lengths, so they get a relative tolerance (1 %)
    grows = last["allocated_after_mb"] - first["allocated_after_mb"]
    peak_grows = gpu and last["peak_mem_mb"] > first["peak_mem_mb"] * 1.01
    oom = next((r for r in rows if r["kind"] == "oom"), None)
    expected = f"out of memory (train.batch_size={args.oom_batch} x data.max_length={args.max_length})"
    oom_ok = oom is None or (oom["status"] == "failed" and oom["reason"].startswith(expected))
    recovered = all(r["status"] != "failed" for r in same)  # those after the OOM trial included

    n = 8192 if gpu else 256
    peak = matmul_ceiling([(n, n, n)], torch.bfloat16, device, seconds=1.0 if gpu else 0.2) / 1e3  # TFLOP/s
    tokens = sum(r["real_tokens"] for r in same[1:])  # trial 1 pays the warm-up
    seconds = sum(r["step_seconds"] for r in same[1:])
    # bench_trial's count for a row of max_length tokens (packed rows: every row is that long)
    per_token = flops_per_batch([args.max_length], AutoConfig.from_pretrained(args.model)) / args.max_length
    achieved = per_token * tokens / max(seconds, 1e-9) / 1e12
    print(
        f"throughput: {tokens / max(seconds, 1e-9):.0f} real tok/s in the optimizer steps of the {len(same) - 1} "
        f"same-shape trials after the first ({same[1]['precision']}), "
        f"{achieved:.1f} TFLOP/s = MFU {achieved / peak:.1%} of the measured bf16 peak {peak:.0f} TFLOP/s "
        f"({n}^3 matmul); median trial {statistics.median(r['seconds'] for r in same[1:]):.2f} s"
    )
    verdict = "flat" if grows <= args.tolerance_mib and not peak_grows else "GROWS"
    print(
        f"memory: {verdict} (allocated after trial 1 {first['allocated_after_mb']} MiB, after trial {len(same)} "
        f"{last['allocated_after_mb']} MiB; peak trial 1 {first['peak_mem_mb']} MiB, trial {len(same)} "
        f"{last['peak_mem_mb']} MiB) oom: {'ok' if oom_ok and recovered else 'NOT OK'}"
        + (f" ({oom['status']}: {oom['reason'][:100]}; next trials {'ran' if recovered else 'FAILED'})" if oom else "")
    )
    if args.json:
        figures = {"rows": rows, "bf16_peak_tflops": peak, "achieved_tflops": achieved}
        args.json.write_text(json.dumps(figures, indent=1))
    sys.exit(0 if verdict == "flat" and oom_ok and recovered else 1)


if __name__ == "__main__":
    main()
