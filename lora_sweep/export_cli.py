"""`lora-sweep export`: rebuild a results CSV from an Optuna study (one row per trial)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_sweep.results import CSV_COLUMNS, RESULTS_FILENAME, write_rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-sweep export",
        description="Rebuild the results CSV of a sweep from its Optuna study (trial user attrs).",
    )
    parser.add_argument("--results-dir", default="results", help="the sweep's results_dir (default: results)")
    parser.add_argument(
        "--storage", default=None, help="Optuna storage URL or journal path (default: <results-dir>/optuna_journal.log)"
    )
    parser.add_argument("--study-name", default="lora_sweep", help="study to export (default: lora_sweep)")
    parser.add_argument(
        "--out",
        default=None,
        help=f"CSV to write, replaced atomically (default: <results-dir>/sweeps/<study>/{RESULTS_FILENAME})",
    )
    return parser


def export_csv(storage: str, study_name: str, csv_path: Path) -> int:
    """Write ``csv_path`` (atomically) with one results row per finished, counted trial of the
    study; returns the row count. User attrs outside the results schema are dropped, so the
    file stays appendable by ``results.append_row``."""
    import optuna

    from lora_sweep.sweep.export import trial_rows
    from lora_sweep.sweep.study import normalize_storage, open_storage

    study = optuna.load_study(study_name=study_name, storage=open_storage(normalize_storage(storage)))
    rows = trial_rows(study, columns=CSV_COLUMNS)
    write_rows(csv_path, rows)
    return len(rows)


def main(argv: list[str]) -> int:
    """Returns the process exit code."""
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
