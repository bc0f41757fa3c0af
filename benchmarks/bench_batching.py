"""What the batching does to the sweep's verdicts: uniform, length-grouped and packed batches on
the same grid of trials, side by side in one run.

    .venv/bin/python benchmarks/bench_batching.py              # ~5 min on 2 quiet cores (~15 with the seed tasks)
    .venv/bin/python benchmarks/bench_batching.py --data PATH      # also an Alpaca file (e.g. the seed tasks)
    .venv/bin/python benchmarks/bench_batching.py --quick          # a smoke run (~1 min)

Each batching runs the same sweep, `python -m lora_sweep -m` (a fresh process each), over a
grid of 24 configurations (lora.r x train.lr x data.max_length, no pruning, so every trial
runs to the end), first on the embedded default data, then on `--data` / `$LORA_SWEEP_SEED_TASKS`
when given. Trials are matched by their parameters, not their numbers (two workers finish in
any order). Printed per batching, against uniform batches (the reference, what the stability
index was designed on):
- Spearman rank correlation of the trials' stability_index and of their eval_loss;
  `uniform_seed1` (uniform batches under train.seed=1) is the noise floor: how far two runs of
  the same batching agree at all; `packed_seed1` is the same for packing;
- whether the sweep's chosen best trial (the top of the study's ranking: learned trials first,
  then by stability_index) is the same configuration, and the overlap of the top 5;
- the median coefficient of variation of the real tokens per step (how equal the steps are);
- the sweep's wall time (process start to exit) and its ratio to uniform's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SEED_TASKS_ENV = "LORA_SWEEP_SEED_TASKS"
MODES = {
    "uniform": ["data.packing=false", "data.group_by_length=false"],
    # the noise floor: the same batching under another seed (another shuffle and LoRA init)
    "uniform_seed1": ["data.packing=false", "data.group_by_length=false", "train.seed=1"],
    "grouped": ["data.packing=false", "data.group_by_length=true"],
    "packed": ["data.packing=true", "data.group_by_length=false"],
    "packed_seed1": ["data.packing=true", "data.group_by_length=false", "train.seed=1"],
}
# (mode, its reference): each batching against uniform, and each seed-1 run against its own seed 0
REFERENCE = {"uniform_seed1": "uniform", "grouped": "uniform", "packed": "uniform", "packed_seed1": "packed"}
GRID = {
    "lora.r": "choice(4,16)",
    "train.lr": "choice(1e-3,3e-3,1e-2,3e-2)",
    "data.max_length": "choice(64,128,256)",
}
KEYS = list(GRID)


def sweep(results: Path, mode: str, data: list[str], quick: bool) -> float:
    """Run one grid sweep; returns its wall time in seconds."""
    grid = dict(GRID)
    extra = []
    if quick:
        grid = {"lora.r": "choice(4)", "train.lr": "choice(1e-3,1e-2)", "data.max_length": "choice(64,128)"}
        extra = ["train.max_steps=10", "train.eval_every=5"]
    n_trials = 1
    for spec in grid.values():
        n_trials *= spec.count(",") + 1
    cmd = [
        sys.executable,
        "-m",
        "lora_sweep",
        "-m",
        f"results_dir={results}",
        "hydra/sweeper/sampler=grid",
        "hydra.sweeper.pruner=null",
        "hydra.sweeper.custom_search_space=null",
        "hydra.sweeper.enqueue=[]",
        f"hydra.sweeper.n_trials={n_trials}",
        f"hydra.sweeper.study_name=batching_{mode}",
        "train.save_adapter=none",
        "train.sample_prompts=0",
        *data,
        *MODES[mode],
        *extra,
        *(f"{k}={v}" for k, v in grid.items()),
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} sweep failed ({proc.returncode}):\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}")
    return time.perf_counter() - start


def step_token_cv(results: Path, run_dirs: pd.Series) -> float:
    """Median over trials of std/mean of the real tokens per optimizer step."""
    cvs = []
    for run_dir in run_dirs:
        steps = pd.read_csv(Path(run_dir) / "steps.csv")
        tokens = steps["real_tokens"]
        cvs.append(float(tokens.std(ddof=0) / tokens.mean()))
    return statistics.median(cvs)


def ranking(frame: pd.DataFrame) -> list[tuple]:
    """Configurations best first, as the sweep ranks them: learned trials first, then stability."""
    ordered = frame.sort_values(["learned", "stability_index"], ascending=[False, False])
    return [tuple(v.item() if hasattr(v, "item") else v for v in row) for row in ordered[KEYS].itertuples(index=False)]


def compare(name: str, data: list[str], quick: bool) -> None:
    from lora_sweep.results import read_rows

    tmp = Path(tempfile.mkdtemp(prefix="bench_batching_"))
    frames, walls = {}, {}
    for mode in MODES:
        results = tmp / mode
        walls[mode] = sweep(results, mode, data, quick)
        frame = read_rows(results / "lora_tuning_results.csv")
        frame = frame[frame["status"].isin(["success", "diverged"])].copy()
        frame["learned"] = frame["learned"].astype(str).str.lower() == "true"
        frames[mode] = frame
        print(f"  {mode}: {len(frame)} trials in {walls[mode]:.1f} s", flush=True)
    print(f"\n{name}")
    print(
        f"{'batching':<14} {'vs':<8} {'wall s':>7} {'x uniform':>9} {'rho(stab)':>9} {'rho(eval)':>9} "
        f"{'best same':>9} {'top5 overlap':>12} {'step-token CV':>13} {'best (r, lr, max_length)':>26}"
    )
    for mode, frame in frames.items():
        ref_mode = REFERENCE.get(mode, mode)
        joined = frame.merge(frames[ref_mode], on=KEYS, suffixes=("", "_ref"))
        rho_stab = joined["stability_index"].corr(joined["stability_index_ref"], method="spearman")
        rho_eval = joined["eval_loss"].corr(joined["eval_loss_ref"], method="spearman")
        rank, ref_rank = ranking(frame), ranking(frames[ref_mode])
        overlap = len(set(rank[:5]) & set(ref_rank[:5]))
        cv = step_token_cv(tmp / mode, frame["run_dir"])
        print(
            f"{mode:<14} {ref_mode:<8} {walls[mode]:>7.1f} {walls['uniform'] / walls[mode]:>9.2f} {rho_stab:>9.3f} "
            f"{rho_eval:>9.3f} {'yes' if rank[0] == ref_rank[0] else 'no':>9} {overlap:>10}/5 {cv:>13.3f} "
            f"{str(rank[0]):>26}"
        )
    print(f"(results under {tmp})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get(SEED_TASKS_ENV), metavar="PATH")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"machine: {cpu}, {os.cpu_count()} cpus")
    compare("embedded default data (data=sanity)", [], args.quick)
    if args.data:
        compare(
            f"{args.data} (data=alpaca, plain template)",
            ["data=alpaca", f"data.path={args.data}", "data.template=plain"],
            args.quick,
        )


if __name__ == "__main__":
    main()
