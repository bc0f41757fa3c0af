"""The trial's own peak memory: on CUDA the allocator's peak since its reset; on the CPU (Linux)
the peak RSS since `/proc/self/clear_refs` reset it. Without a reset the process's lifetime
peak (`ru_maxrss`) would report a worker's largest earlier trial for every later one."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_PROC_STATUS = Path("/proc/self/status")


def reset_peak_memory(device: torch.device) -> bool:
    """Start measuring the peak here; False when the CPU's peak RSS cannot be reset."""
    if device.type == "cuda":
        if torch.cuda.is_initialized():  # else nothing was allocated yet: the peak starts here anyway
            torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        _CLEAR_REFS.write_text("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
    except OSError:
        return False
    return True


def peak_memory_mb(device: torch.device, *, was_reset: bool) -> float:
    """Peak memory in MiB since `reset_peak_memory`: CUDA max allocated, or the CPU's peak RSS
    (the current RSS where the peak could not be reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kib = _proc_status_kib("VmHWM" if was_reset else "VmRSS")
    if kib is not None:
        return kib / 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # no /proc: the lifetime peak
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes there, KiB on Linux


def _proc_status_kib(key: str) -> int | None:
    try:
        lines = _PROC_STATUS.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0])
    return None
