"""Fault injection for the crash tests: ``LORA_SWEEP_FAULT=<point>:<n>`` SIGKILLs this process
the n-th time (1-based, default 1) it reaches the named point. Unset (always, outside tests),
every call is a dictionary lookup and nothing else happens.

Points (where they are reached):

* ``step`` -- a sweep trial finished an optimizer step (the app's step hook, e.g. ``lora_sweep.job``);
* ``after_record`` -- the job stored its result on the trial, its CSV row not yet written;
* ``csv_write`` -- the CSV append, after HALF of the row's bytes were written (a torn row);
* ``before_tell`` -- the job returned (row written), the sweeper has not told the study yet;
* ``journal_write`` -- a journal-storage append (``lora_sweep.sweep.study``), after HALF of its
  bytes were written (a torn record);
* ``adapter_save`` -- an adapter save (``lora_sweep.adapters``): its files written and fsync'd
  in the temporary directory, not yet renamed into place.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

ENV_VAR = "LORA_SWEEP_FAULT"
POINTS = ("step", "after_record", "csv_write", "before_tell", "journal_write", "adapter_save")
_hits: dict[str, int] = {}


def _armed(point: str) -> bool:
    spec = os.environ.get(ENV_VAR, "")
    name, _, count = spec.partition(":")
    if name != point:
        return False
    _hits[point] = _hits.get(point, 0) + 1
    return _hits[point] == (int(count) if count else 1)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def crash_point(point: str) -> None:
    """SIGKILL this process here when ``LORA_SWEEP_FAULT`` names this point (and count)."""
    if _armed(point):
        _die()


def torn_write(point: str, write: Callable[[bytes], object], payload: bytes) -> bool:
    """When armed for ``point``: write the first half of ``payload`` with ``write``, then SIGKILL.
    Returns False (nothing written) when not armed, so the caller writes normally."""
    if not _armed(point):
        return False
    write(payload[: max(1, len(payload) // 2)])
    _die()
    return True  # pragma: no cover - unreachable
