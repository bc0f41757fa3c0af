"""Workers: the default sweep with 1 worker x all threads against one worker per core x 1 thread.

    .venv/bin/python benchmarks/bench_workers.py                 # 2 rounds, ~4-6 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_workers.py --rounds 3 --extra hydra/sweeper/pruner=none

Each round runs the real command twice, in alternating order, each in a fresh results_dir:

    python -m lora_sweep -m results_dir=<dir> hydra.sweeper.n_jobs=1      # 1 worker x <cores> threads
    python -m lora_sweep -m results_dir=<dir> hydra.sweeper.n_jobs=<cores> # <cores> workers x 1 thread

and reads the study and CSV afterwards. Wall time is the whole command as a user waits for it
(imports, worker start-up, every trial, the summary). Trials/hour counts finished trials
(complete + pruned); optimizer steps/hour is printed too, because pruning makes trials unequal
and two workers see a different sequence of trials (the sampler and pruner run on whatever
has finished, so a parallel sweep is not bit-reproducible; a 1-worker sweep is).

Last line: `workers_speedup=<x> trials_per_hour_1w=<a> trials_per_hour_nw=<b>` (medians over
rounds; speedup = b / a).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from lora_sweep.results import read_rows  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def run_sweep(n_jobs: int, extra: list[str]) -> dict[str, float]:
    """One default sweep with `n_jobs` workers in a fresh results_dir: wall, trials, steps, best."""
    results = Path(tempfile.mkdtemp(prefix=f"bench_workers_{n_jobs}_"))
    cmd = [sys.executable, "-m", "lora_sweep", "-m", f"results_dir={results}", f"hydra.sweeper.n_jobs={n_jobs}", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(results / "optuna_journal.log"))
    )
    study = optuna.load_study(study_name="lora_sweep", storage=storage)
    runs = [t for t in study.get_trials(deepcopy=False) if "run_dir" in t.user_attrs]
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in runs)
    steps = int(read_rows(results / "lora_tuning_results.csv")["steps_completed"].sum())
    try:
        best = float(study.best_value)
    except ValueError:
        best = float("nan")
    return {
        "wall": wall,
        "finished": finished,
        "steps": steps,
        "best": best,
        "trials_h": finished / wall * 3600,
        "steps_h": steps / wall * 3600,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds (each runs both settings, alternating order)")
    parser.add_argument("--workers", type=int, default=cores(), help="workers of the parallel setting (default: cores)")
    parser.add_argument("--extra", nargs="*", default=[], help="extra overrides for both commands")
    args = parser.parse_args()
    settings = {
        1: f"1 worker x {cores()} threads",
        args.workers: f"{args.workers} workers x {max(1, cores() // args.workers)} thread(s)",
    }
    print(f"machine: {cores()} cores; default sweep (`python -m lora_sweep -m`) {' '.join(args.extra)}")
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in settings}
    for rnd in range(args.rounds):
        order = list(settings) if rnd % 2 == 0 else list(settings)[::-1]
        for n_jobs in order:
            r = run_sweep(n_jobs, args.extra)
            runs[n_jobs].append(r)
            print(
                f"round {rnd + 1}: {settings[n_jobs]:<22} wall {r['wall']:6.1f} s, {r['finished']:.0f} trials, "
                f"{r['steps']:.0f} optimizer steps, best {r['best']:.4f}, {r['trials_h']:.0f} trials/h, "
                f"{r['steps_h']:.0f} steps/h",
                flush=True,
            )
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    one, many = med[1], med[args.workers]
    print()
    for n, m in med.items():
        print(
            f"{settings[n]:<22} median wall {m['wall']:6.1f} s, {m['trials_h']:6.0f} trials/h, "
            f"{m['steps_h']:7.0f} steps/h"
        )
    print(f"steps/hour ratio: {many['steps_h'] / one['steps_h']:.2f}")
    print(
        f"\nworkers_speedup={many['trials_h'] / one['trials_h']:.2f} trials_per_hour_1w={one['trials_h']:.0f} "
        f"trials_per_hour_nw={many['trials_h']:.0f}"
    )


if __name__ == "__main__":
    main()
