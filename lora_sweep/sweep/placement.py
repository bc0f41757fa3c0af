"""Where a sweep's worker processes run: one GPU (or none) and a number of CPU threads each.

`plan_placement` is a pure function of the ``hydra.sweeper.n_jobs`` setting, the number K of
visible GPUs and the CPU core count:

* ``auto`` and K >= 1: K workers, worker i on GPU i, ``cores // K`` threads each;
* ``auto`` and K = 0: one single-threaded worker per core (a CPU machine);
* N workers and K >= 1: GPUs assigned round-robin (worker i on GPU ``i % K``), with a note
  when N != K (some GPU runs several workers, or some stay unused);
* N workers and K = 0: N CPU workers, ``cores // N`` threads each.

Never more workers than trials left (``max_workers``). `visible_gpus` counts the GPUs without
initialising CUDA in this process (so a process can still choose its own device afterwards):
an existing ``CUDA_VISIBLE_DEVICES`` is taken as given, else NVML (the driver's management
library, what ``nvidia-smi`` reads) is asked. Nothing here knows the app the sweep runs.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class WorkerSlot:
    """One worker process: its id (0 is the sweeper's own process), the index of its GPU among
    the visible ones (None: none, it trains on the CPU) and its CPU threads."""

    worker_id: int
    gpu: int | None
    threads: int


@dataclass(frozen=True)
class Placement:
    """The per-worker plan of a sweep on one machine (see `plan_placement`)."""

    workers: tuple[WorkerSlot, ...]
    gpus: int  # K, the GPUs visible to the sweep
    note: str = ""  # one line when the workers do not map one to one onto the GPUs

    @property
    def n_workers(self) -> int:
        return len(self.workers)

    @property
    def threads(self) -> int:
        return self.workers[0].threads

    def slot(self, worker_id: int) -> WorkerSlot:
        return self.workers[worker_id]

    def describe(self, labels: Sequence[str] | None = None) -> str:
        """E.g. ``2 workers x 8 threads, GPU 0 and GPU 1``; on a CPU machine ``1 worker`` or
        ``2 workers x 1 thread``. `labels`: how to name the visible GPUs (default their index)."""
        n, threads = self.n_workers, self.threads
        if not self.gpus:
            return f"{n} workers x {threads} thread{'s' if threads > 1 else ''}" if n > 1 else "1 worker"
        text = f"{n} worker{'s' if n > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}"
        used = list(dict.fromkeys(w.gpu for w in self.workers if w.gpu is not None))
        names = [str(labels[g]) if labels is not None and g < len(labels) else str(g) for g in used]
        return f"{text}, {_gpu_list(names)}"


def _gpu_list(names: Sequence[str]) -> str:
    """``GPU 0``, ``GPU 0 and GPU 1``, ``GPUs 0-7``, ``GPU 0, GPU 2 and GPU 5``."""
    if len(names) == 1:
        return f"GPU {names[0]}"
    if len(names) > 2 and all(n.isdigit() for n in names):
        numbers = [int(n) for n in names]
        if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
            return f"GPUs {numbers[0]}-{numbers[-1]}"
    gpus = [f"GPU {n}" for n in names]
    return f"{', '.join(gpus[:-1])} and {gpus[-1]}"


def parse_n_jobs(value: Any) -> int | None:
    """A ``hydra.sweeper.n_jobs`` setting: None for ``auto``, else a positive int; raises
    ValueError (one line naming the key) for anything else."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    try:
        n = int(value)
        if n != value and str(n) != str(value).strip():
            raise ValueError
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise ValueError(f"hydra.sweeper.n_jobs={value!r}: give a positive number of workers or 'auto'")
    return n


def plan_placement(n_jobs: Any, *, gpus: int, cores: int, max_workers: int | None = None) -> Placement:
    """The per-worker plan for ``n_jobs`` (``auto`` or a positive int) with `gpus` visible GPUs
    and `cores` CPU cores, at most `max_workers` workers (the trials left). Threads per worker:
    ``cores // workers``, at least 1. Raises ValueError for a bad ``n_jobs``."""
    requested = parse_n_jobs(n_jobs)
    cores = max(1, int(cores))
    gpus = max(0, int(gpus))
    if requested is None:
        requested = gpus if gpus else cores
    n = requested if max_workers is None else max(1, min(requested, int(max_workers)))
    threads = max(1, cores // n)
    workers = tuple(WorkerSlot(i, i % gpus if gpus else None, threads) for i in range(n))
    return Placement(workers=workers, gpus=gpus, note=_round_robin_note(n, gpus))


def _round_robin_note(n: int, gpus: int) -> str:
    if not gpus or n == gpus:
        return ""
    if gpus == 1:
        return f"{n} workers on 1 GPU: GPU 0 runs all {n}"
    head = f"{n} worker{'s' if n > 1 else ''} on {gpus} GPUs: round-robin"
    if n < gpus:
        unused = [str(g) for g in range(n, gpus)]
        return f"{head}, {_gpu_list(unused)} unused"
    per_gpu = Counter(i % gpus for i in range(n))
    if len(set(per_gpu.values())) == 1:
        return f"{head}, {n // gpus} workers per GPU"
    busiest = [f"GPU {g} runs {c} workers" for g, c in sorted(per_gpu.items()) if c > min(per_gpu.values())]
    return f"{head}, {', '.join(busiest)}"


def worker_env(slot: WorkerSlot, visible: Sequence[str], base: Mapping[str, str]) -> dict[str, str]:
    """The environment of a spawned worker: `base` with its threads and, when it has a GPU, the
    one device it may see (``CUDA_VISIBLE_DEVICES`` = that GPU's entry in `visible`, so a worker
    of a sweep started with ``CUDA_VISIBLE_DEVICES=2,3`` gets ``2`` or ``3``)."""
    env = dict(base)
    for var in THREAD_VARS:
        env[var] = str(slot.threads)
    if slot.gpu is not None:
        env[CUDA_VISIBLE_DEVICES] = str(visible[slot.gpu])
    return env


def cuda_in_use() -> bool:
    """Whether this process has initialised CUDA (torch imported and a device used), without
    importing torch: a job pinned to a GPU may still have trained on the CPU
    (`train.device=cpu`, or a `CUDA_VISIBLE_DEVICES` exported on a machine without one)."""
    torch = sys.modules.get("torch")
    try:
        return bool(torch is not None and torch.cuda.is_initialized())
    except AttributeError:  # a stub or partial torch
        return False


def pinned_gpu(placement: Placement | None, visible: Sequence[str]) -> str | None:
    """The GPU worker 0's trials run on, as the user names it (its ``CUDA_VISIBLE_DEVICES``
    entry), or None when the plan gives it none (a CPU machine, no placement)."""
    gpu = placement.slot(0).gpu if placement is not None else None
    return None if gpu is None else str(visible[gpu])


def spawned_worker_gpu(environ: Mapping[str, str] | None = None) -> str | None:
    """The GPU a spawned worker was pinned to (`worker_env` gave it exactly one), else None."""
    value = (os.environ if environ is None else environ).get(CUDA_VISIBLE_DEVICES, "").strip()
    devices = parse_visible_devices(value) if value else []
    return devices[0] if len(devices) == 1 else None


def pin_this_process(slot: WorkerSlot, visible: Sequence[str], environ: Any = None) -> bool:
    """Give this process (worker 0, which runs its jobs in-process) its GPU: sets
    ``CUDA_VISIBLE_DEVICES`` before its first job. Returns False when CUDA was already
    initialised here (torch loaded and initialised): the setting then no longer changes which
    devices this process sees, and worker 0 keeps the device it has (``cuda:0``, the first
    visible GPU, which is the one round-robin gives it)."""
    if slot.gpu is None:
        return True
    env = os.environ if environ is None else environ
    env[CUDA_VISIBLE_DEVICES] = str(visible[slot.gpu])
    return not cuda_in_use()


def parse_visible_devices(value: str) -> list[str]:
    """The devices a ``CUDA_VISIBLE_DEVICES`` value selects, in order: indices or UUIDs
    (``GPU-...``, ``MIG-...``); as CUDA does, the list ends at the first invalid entry (e.g.
    ``-1``), and an empty value selects none."""
    out: list[str] = []
    for raw in value.split(","):
        entry = raw.strip()
        if not entry:
            break
        if entry.lstrip("+-").isdigit():
            if int(entry) < 0:
                break
            entry = str(int(entry))
        elif not (entry.startswith("GPU-") or entry.startswith("MIG-")):
            break
        if entry in out:  # a duplicate makes CUDA see no device at all
            return []
        out.append(entry)
    return out


def nvml_device_count() -> int | None:
    """GPUs as NVML reports them (no CUDA context, no CUDA initialisation); None when NVML
    cannot be loaded or initialised."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    try:
        if nvml.nvmlInit_v2() != 0:
            return None
        count = ctypes.c_uint(0)
        rc = nvml.nvmlDeviceGetCount_v2(ctypes.byref(count))
        nvml.nvmlShutdown()
    except AttributeError:  # an old or odd library
        return None
    return int(count.value) if rc == 0 else None


def visible_gpus(environ: Mapping[str, str] | None = None) -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries, counted without
    initialising CUDA here.

    ``CUDA_VISIBLE_DEVICES`` set: the devices it selects (empty: none). Else, when torch is
    already loaded and built without CUDA: none. Else NVML's count; without NVML (no NVIDIA
    driver) none; on ROCm torch's count. Only when NVML is there but fails does an already loaded torch count them
    (`torch.cuda.device_count()`, which itself tries NVML first and may then initialise the
    CUDA driver).
    """
    env = os.environ if environ is None else environ
    value = env.get(CUDA_VISIBLE_DEVICES)
    if value is not None:
        return parse_visible_devices(value)
    torch = sys.modules.get("torch")
    if torch is not None and not _torch_has_cuda(torch):
        return []
    if torch is not None and getattr(torch.version, "hip", None):  # ROCm: no NVML; torch asks amdsmi first
        return [str(i) for i in range(int(torch.cuda.device_count()))]
    count = nvml_device_count()
    if count is None:
        try:
            ctypes.CDLL("libnvidia-ml.so.1")
        except OSError:
            return []  # no NVIDIA driver: no CUDA device
        count = int(torch.cuda.device_count()) if torch is not None else 0
    return [str(i) for i in range(count)]


def _torch_has_cuda(torch: Any) -> bool:
    try:
        return bool(torch.backends.cuda.is_built())
    except AttributeError:
        return True  # cannot tell: let NVML decide
