"""Pruning benchmark: the default sweep with and without pruning, at fixed seeds.

For each seed S it runs the real CLI twice, each in its own results_dir (a fresh temp dir
unless --keep is given), the same command except for the pruner (the default pruner, or
--pruned-overrides, against `hydra/sweeper/pruner=none`):

    python -m lora_sweep -m results_dir=<dir> hydra.sweeper.seed=S hydra.sweeper.n_jobs=1 \
        [--overrides] [--pruned-overrides]
    python -m lora_sweep -m results_dir=<dir> hydra.sweeper.seed=S hydra.sweeper.n_jobs=1 \
        [--overrides] hydra/sweeper/pruner=none

and prints per seed and in total: optimizer steps with/without pruning (the CSV's
`steps_completed`, summed over every trial row, pruned ones included), the share saved, the
best objective with/without (the study's best trial: the best *feasible* value of the first
objective, as the sweep reports it), and whether the unpruned run's best trial would have
been pruned: the configured pruner replayed over the unpruned study, trial by trial in
order, each trial compared with the earlier trials as the replay left them (kept ones
completed, the others pruned at the step the replay stopped them).

    .venv/bin/python benchmarks/bench_pruning.py                    # seeds 0 1 2, ~5 min on 2 idle CPU cores
    .venv/bin/python benchmarks/bench_pruning.py --seeds 0          # what the issue checks
    .venv/bin/python benchmarks/bench_pruning.py --pruned-overrides 'hydra.sweeper.pruner.percentile=25'
    .venv/bin/python benchmarks/bench_pruning.py --keep /tmp/bp     # keep the runs; a rerun reuses finished ones

One worker (`--n-jobs 1`, the default here) makes a seed's sweep reproducible: its trials,
and so the steps and best, do not depend on timing or load (the default sweep's
`n_jobs: auto` runs one worker per core, and then the sampler and pruner see whichever
trials finished first; `--n-jobs auto` measures that, as one sample per seed). On a machine
where another process keeps a core busy, `taskset -c 1 .venv/bin/python
benchmarks/bench_pruning.py` avoids two-thread oversubscription (~15 min for 3 seeds); the
numbers are the same. With --keep, each run's directory is named after a hash of its full
override list, so a rerun of the same command continues (a finished study: does nothing)
that same study.

Last line: `steps_saved=<s> best_pruned=<p> best_unpruned=<u> no_worse=<k>/<n>`, where
`steps_saved` is 1 - (total steps with pruning) / (total steps without), summed over the
seeds, `best_*` are the medians over the seeds of each run's best objective, and
`no_worse` counts the seeds whose pruned best is >= the unpruned best (<= when minimizing).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from lora_sweep.analysis import load_study, load_trials  # noqa: E402
from lora_sweep.sweep.context import build_pruner_from_study  # noqa: E402
from lora_sweep.sweep.study import ATTR_PENALTY_FOR  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)
NO_PRUNING = "hydra/sweeper/pruner=none"
STUDY = "lora_sweep"


@dataclass
class SweepResult:
    """What one sweep cost and found."""

    steps: int
    trials: int
    pruned: int
    best: float  # NaN when no feasible trial completed
    best_trial: int | None
    best_params: dict[str, Any]
    wall_s: float
    direction: str
    results_dir: Path
    reused: bool = False  # --keep: the study was already there (finished: the CLI had nothing to do)


@dataclass
class Replay:
    """The configured pruner replayed over an unpruned sweep."""

    steps: int
    pruned: int
    pruned_at: dict[int, int]  # trial number -> step at which the replay prunes it


# ------------------------------------------------------------------------------- running
def run_sweep(results_dir: Path, seed: int, overrides: list[str]) -> float:
    """Runs the default sweep through the CLI; returns its wall time. Exits on failure."""
    cmd = [
        sys.executable,
        "-m",
        "lora_sweep",
        "-m",
        f"results_dir={results_dir}",
        f"hydra.sweeper.seed={seed}",
        *overrides,
    ]
    results_dir.mkdir(parents=True, exist_ok=True)
    log_path = results_dir / "bench_pruning.log"
    start = time.perf_counter()
    with open(log_path, "a") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log_path.read_text().splitlines()[-15:]
        sys.exit(f"bench_pruning: `{shlex.join(cmd)}` exited {proc.returncode}:\n" + "\n".join(tail))
    return wall


def summarize(results_dir: Path, wall_s: float) -> SweepResult:
    """Steps (CSV `steps_completed`, every trial row) and the study's best feasible trial."""
    trials = load_trials(results_dir, STUDY)
    steps = int(trials["steps_completed"].fillna(0).astype("int64").sum())
    pruned = int((trials["state"] == "PRUNED").sum())
    study = load_study(results_dir, STUDY)
    direction = study.direction.name.lower()
    try:
        best = study.best_trial  # Optuna 5: skips infeasible trials
        value, number, params = float(best.value), best.number, dict(best.params)
    except ValueError:  # no feasible trial completed
        value, number, params = math.nan, None, {}
    return SweepResult(steps, len(trials), pruned, value, number, params, wall_s, direction, results_dir)


def replay(unpruned_dir: Path, pruned_dir: Path) -> Replay:
    """Replays the pruner configured for the pruned run over the unpruned run's curves.

    Trials are replayed in order; a trial the replay keeps becomes a completed reference
    for the later ones (with its real final value and constraints), one it prunes does not -
    as in a real pruned sweep that proposed the same parameters. Until the pruned sweep's
    sampler sees a different history (a pruned trial would have been among TPE's best), the
    replay is exactly what that sweep does.
    """
    source = load_study(unpruned_dir, STUDY)
    pruner = build_pruner_from_study(load_study(pruned_dir, STUDY))
    sim = optuna.create_study(direction=source.direction, pruner=pruner)
    steps = pruned = 0
    pruned_at: dict[int, int] = {}
    for original in source.get_trials(deepcopy=False):
        if ATTR_PENALTY_FOR in original.user_attrs:
            continue
        trial = sim.ask()
        n_steps = int(original.user_attrs.get("steps_completed", max(original.intermediate_values, default=0)))
        stop = None
        for step, value in sorted(original.intermediate_values.items()):
            trial.report(value, step)
            if trial.should_prune():
                stop = step
                break
        if stop is not None:
            sim.tell(trial, state=TrialState.PRUNED)
            pruned_at[original.number] = stop
            steps += stop
            pruned += 1
        elif original.state == TrialState.COMPLETE:
            for name, value in original.constraints.items():  # a pruner may read feasibility
                trial.set_constraint(name, value)
            sim.tell(trial, original.values)
            steps += n_steps
        else:
            sim.tell(trial, state=TrialState.FAIL)
            steps += n_steps
    return Replay(steps, pruned, pruned_at)


def run_dir(base: Path, seed: int, label: str, overrides: list[str]) -> Path:
    digest = hashlib.sha1("\0".join(overrides).encode()).hexdigest()[:8]
    return base / f"seed{seed}-{label}-{digest}"


# ------------------------------------------------------------------------------- report
def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.4f}"


def _wall(result: SweepResult) -> str:
    return f"{result.wall_s:.0f} s" + (" (kept run reused)" if result.reused else "")


def _fate(without: SweepResult, rep: Replay) -> str:
    """Whether the replayed pruner stops the unpruned run's best trial: `#N kept` / `#N pruned@step`."""
    if without.best_trial is None:
        return "-"
    step = rep.pruned_at.get(without.best_trial)
    return f"#{without.best_trial} " + (f"pruned@{step}" if step is not None else "kept")


def _no_worse(pruned: float, unpruned: float, direction: str) -> bool:
    if math.isnan(unpruned):
        return True
    if math.isnan(pruned):
        return False
    return pruned >= unpruned if direction == "maximize" else pruned <= unpruned


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sweeper seeds (default 0 1 2)")
    parser.add_argument("--overrides", default="", help="Hydra overrides for both runs (one shell-quoted string)")
    parser.add_argument(
        "--pruned-overrides",
        default="",
        help="Hydra overrides for the pruned run only, e.g. 'hydra.sweeper.pruner.percentile=25'",
    )
    parser.add_argument(
        "--n-jobs",
        default="1",
        help="hydra.sweeper.n_jobs for both runs (default 1: reproducible; 'auto': the sweep's default)",
    )
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="keep the runs under this directory (reused by a rerun of the same command)",
    )
    args = parser.parse_args(argv)

    common = [f"hydra.sweeper.n_jobs={args.n_jobs}", *shlex.split(args.overrides)]
    pruned_overrides = common + shlex.split(args.pruned_overrides)
    unpruned_overrides = common + [NO_PRUNING]
    with tempfile.TemporaryDirectory(prefix="bench_pruning-") as tmp:
        base = args.keep or Path(tmp)
        for label, overrides in (("pruned:  ", pruned_overrides), ("unpruned:", unpruned_overrides)):
            command = f"python -m lora_sweep -m results_dir=DIR hydra.sweeper.seed=S {shlex.join(overrides)}"
            print(f"{label} {command}".rstrip())
        rows = []
        for seed in args.seeds:
            results: dict[str, SweepResult] = {}
            for label, overrides in (("pruned", pruned_overrides), ("unpruned", unpruned_overrides)):
                where = run_dir(base.resolve(), seed, label, overrides)
                existed = (where / "optuna_journal.log").is_file()
                results[label] = summarize(where, run_sweep(where, seed, overrides))
                results[label].reused = existed
            with_p, without = results["pruned"], results["unpruned"]
            rep = replay(without.results_dir, with_p.results_dir)
            rows.append((seed, with_p, without, rep))
            print(
                f"seed {seed}: with pruning {with_p.steps} steps, {with_p.pruned}/{with_p.trials} pruned, "
                f"best {_fmt(with_p.best)} (trial {with_p.best_trial}), {_wall(with_p)}; "
                f"without {without.steps} steps, best {_fmt(without.best)} (trial {without.best_trial}) "
                f"{without.best_params}, {_wall(without)}; replayed over the unpruned run the pruner "
                f"prunes {rep.pruned} trials ({rep.steps} steps), its best: {_fate(without, rep)}",
                flush=True,
            )

    header = (
        f"{'seed':>4} {'steps_pruned':>12} {'steps_unpruned':>14} {'saved':>6} {'best_pruned':>11} "
        f"{'best_unpruned':>13} {'no_worse':>8} {'n_pruned':>8} {'unpruned_best_in_replay':>24}"
    )
    print()
    print(header)
    for seed, with_p, without, rep in rows:
        saved = 1.0 - with_p.steps / without.steps if without.steps else math.nan
        fate = _fate(without, rep)
        ok = _no_worse(with_p.best, without.best, without.direction)
        print(
            f"{seed:>4} {with_p.steps:>12} {without.steps:>14} {saved:>6.1%} {_fmt(with_p.best):>11} "
            f"{_fmt(without.best):>13} {'yes' if ok else 'NO':>8} {with_p.pruned:>4}/{with_p.trials:<3} {fate:>24}"
        )
    total_p = sum(r[1].steps for r in rows)
    total_u = sum(r[2].steps for r in rows)
    saved_total = 1.0 - total_p / total_u if total_u else math.nan
    best_p = statistics.median(r[1].best for r in rows)
    best_u = statistics.median(r[2].best for r in rows)
    no_worse = sum(_no_worse(r[1].best, r[2].best, r[2].direction) for r in rows)
    print(
        f"{'all':>4} {total_p:>12} {total_u:>14} {saved_total:>6.1%} {_fmt(best_p):>11} {_fmt(best_u):>13} "
        f"{f'{no_worse}/{len(rows)}':>8}   (steps: totals; best: medians over seeds)"
    )
    print(
        f"steps_saved={saved_total:.3f} best_pruned={_fmt(best_p)} best_unpruned={_fmt(best_u)} "
        f"no_worse={no_worse}/{len(rows)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
