"""`lora-sweep export`: rebuild a results CSV from an Optuna study (one row per trial)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_sweep.results import RESULTS_FILENAME


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-sweep export",
        description="Rebuild the results CSV of a sweep from its Optuna study (trial user attrs).",
    )
    parser.add_argument("--results-dir", default="results", help="the sweep's results_dir (default: results)")
    parser.add_argument("--storage", default=None,
                        help="Optuna storage URL or journal path (default: <results-dir>/optuna_journal.log)")
    parser.add_argument("--study-name", default="lora_sweep", help="study to export (default: lora_sweep)")
    parser.add_argument("--out", default=None,
                        help=f"CSV to write, replaced atomically (default: <results-dir>/sweeps/<study>/{RESULTS_FILENAME})")
    return parser


def main(argv: list[str]) -> int:
    """Returns the process exit code."""
    from lora_sweep.sweep.export import export_csv
    from lora_sweep.sweep.study import JOURNAL_NAME

    args = build_parser().parse_args(argv)
    results_dir = Path(args.results_dir).absolute()
    storage = args.storage or str(results_dir / JOURNAL_NAME)
    if args.storage is None and not Path(storage).is_file():
        print(f"lora_sweep: error: no study storage at {storage}; pass --storage or --results-dir", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else results_dir / "sweeps" / args.study_name / RESULTS_FILENAME
    try:
        count = export_csv(storage, args.study_name, out)
    except KeyError as err:  # optuna: no such study
        print(f"lora_sweep: error: study {args.study_name!r} not found in {storage}: {err}", file=sys.stderr)
        return 2
    print(f"wrote {count} rows to {out}")
    return 0
