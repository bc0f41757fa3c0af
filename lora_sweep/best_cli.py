"""`lora-sweep best`: export a sweep's best trial (its adapter, config and model card, and with
`--merge` the merged model) to a directory; see `lora_sweep.best`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lora_sweep.best import BEST_DIRNAME, MERGED_DIRNAME, export_best
from lora_sweep.errors import EXIT_BAD_INPUT, InputError, error_message
from lora_sweep.sweep_hooks import best_trial


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-sweep best",
        description="Export the best trial of a sweep: its adapter, resolved config and a model card "
        "(and with --merge the merged model) in one directory.",
    )
    parser.add_argument("--results-dir", default="results", help="the sweep's results_dir (default: results)")
    parser.add_argument(
        "--storage", default=None, help="Optuna storage URL or journal path (default: <results-dir>/optuna_journal.log)"
    )
    parser.add_argument("--study-name", default="lora_sweep", help="study to read (default: lora_sweep)")
    parser.add_argument("--trial", type=int, default=None, help="export this trial number instead of the best")
    parser.add_argument(
        "--out",
        default=None,
        help=f"directory to write, replaced atomically (default: <results-dir>/{BEST_DIRNAME})",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help=f"also write the merged model (merge_and_unload, save_pretrained, tokenizer) to <out>/{MERGED_DIRNAME}",
    )
    return parser


def _fail(message: str) -> int:
    print(f"lora_sweep: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: list[str]) -> int:
    """Returns the process exit code: 0 exported, 2 bad input (one line on stderr)."""
    import optuna

    from lora_sweep.model import offline_hub
    from lora_sweep.sweep.study import JOURNAL_NAME, normalize_storage, open_storage

    args = build_parser().parse_args(argv)
    offline_hub()
    results_dir = Path(args.results_dir).absolute()
    storage = args.storage or str(results_dir / JOURNAL_NAME)
    if args.storage is None and not Path(storage).is_file():
        return _fail(f"no study storage at {storage}; pass --storage or --results-dir")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=args.study_name, storage=open_storage(normalize_storage(storage)))
    except KeyError:
        return _fail(f"study {args.study_name!r} not found in {storage}; pass --study-name")
    trial = _chosen(study, args.trial)
    if isinstance(trial, str):
        return _fail(trial)
    out = Path(args.out) if args.out else results_dir / BEST_DIRNAME
    try:
        written = export_best(study, trial, out, merge=args.merge)
    except InputError as err:  # BestError (no adapter or config, a foreign --out); ModelError (base checkpoint gone)
        print(error_message(err), file=sys.stderr)
        return EXIT_BAD_INPUT
    what = "adapter, config, model card" + (" and merged model" if args.merge else "")
    print(f"trial {trial.number}: {what} in {written}")
    return 0


def _chosen(study: Any, number: int | None) -> Any:
    """The trial to export, or a one-line reason why there is none."""
    from optuna.trial import TrialState

    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if number is not None:
        match = [t for t in completed if t.number == number]
        return match[0] if match else f"trial {number} of study {study.study_name!r} is not a completed trial"
    if not completed:
        return f"study {study.study_name!r} has no completed trial yet"
    best = best_trial(study)
    if best is None:
        return f"study {study.study_name!r} has no feasible completed trial (none learned enough); pick one: --trial N"
    return best
