"""The validation split: which records are held out, the same for every trial of a sweep.

A record's side depends only on its content and the split seed (``data.val_seed``), never on
``train.seed``, the file's order or the process: each record is ranked by a keyed hash of its
content and the lowest ranks are held out. Identical records share a hash and so a side, so no
text is both trained on and evaluated. Resuming a sweep, adding workers or reordering the file
leaves the split as it was.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from lora_sweep.errors import DataError

MIN_VAL_RECORDS = 4
"""A fractional ``data.val_size`` never holds out fewer records than this (a loss over one or
two records is too noisy to rank trials by)."""
MAX_VAL_RECORDS_FROM_FRACTION = 1000
"""A fractional ``data.val_size`` holds out at most this many records: every evaluation runs the
whole set, and 10 % of a 50k-record file would cost more than the training steps between
evaluations. A count (``data.val_size=5000``) holds out exactly that many."""
MIN_TRAIN_RECORDS = 1


def val_count(n_records: int, val_size: float | int) -> int:
    """How many of ``n_records`` are held out: an int is a count; a float in (0, 1) a fraction,
    rounded up, at least ``MIN_VAL_RECORDS`` and at most ``MAX_VAL_RECORDS_FROM_FRACTION``."""
    if isinstance(val_size, bool):
        raise DataError(f"data.val_size must be a fraction in (0, 1) or a record count, got {val_size!r}")
    if isinstance(val_size, int):
        count = val_size
    else:
        count = min(max(MIN_VAL_RECORDS, math.ceil(val_size * n_records)), MAX_VAL_RECORDS_FROM_FRACTION)
    if count < 1 or n_records - count < MIN_TRAIN_RECORDS:
        raise DataError(
            f"data.val_size={val_size} leaves {max(0, n_records - count)} training and {min(count, n_records)} "
            f"validation records of {n_records}; both need at least one: lower data.val_size, add records, or "
            "give data.val_path"
        )
    return count


def _rank_key(record: Mapping[str, Any], seed: int) -> str:
    content = json.dumps(record, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(f"{seed}\0{content}".encode()).hexdigest()


def split_records(
    records: Sequence[Mapping[str, Any]], *, val_size: float | int, seed: int
) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """(train, validation) records; both keep the file's order.

    Whole groups of identical records go to one side, so the validation set may hold a few
    more records than ``val_count`` asks for when the cut falls inside a group.
    """
    wanted = val_count(len(records), val_size)
    keys = [_rank_key(record, seed) for record in records]
    held: set[str] = set()
    taken = 0
    counts: dict[str, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    for key in sorted(counts):
        if taken >= wanted:
            break
        held.add(key)
        taken += counts[key]
    train = [r for r, k in zip(records, keys, strict=True) if k not in held]
    val = [r for r, k in zip(records, keys, strict=True) if k in held]
    if not train:
        raise DataError(
            f"data.val_size={val_size} holds out every distinct record of {len(records)}; lower data.val_size "
            "or give data.val_path"
        )
    return train, val
