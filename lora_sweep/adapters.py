"""A trial's LoRA adapter on disk: `<run_dir>/adapter/` (peft's `save_pretrained`:
`adapter_config.json` + `adapter_model.safetensors`), and its zip archive as an Optuna artifact
of its trial while a sweep keeps it.

Crash safety: an adapter is written into a temporary sibling, `adapter.tmp-<pid>-<host>-<random>`,
whose files are fsync'd before it is renamed to `adapter/`, so a process killed mid-save leaves
no `adapter/` that looks whole. An adapter is deleted the same way round (renamed aside, then
removed). Temporary directories whose process is dead (same host) are removed by the next save
beside them, and by a sweep's retention pass; nothing ever reports them.

Which adapters a sweep keeps (`train.save_adapter`, `train.keep_adapters`) is decided in
`lora_sweep.sweep_hooks`, under `lock(results_dir)`; this module only does the file work.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock

from lora_sweep import artifacts
from lora_sweep.results import LOCK_TIMEOUT_S
from lora_sweep.sweep.faults import crash_point

log = logging.getLogger(__name__)

ADAPTER_DIRNAME = "adapter"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TMP_INFIX = ".tmp-"  # <name>.tmp-<pid>-<host>-<random>: a save, delete or export in progress (or its leftover)
ARCHIVE_PREFIX = "adapter_trial_"  # the artifact's file name: adapter_trial_<number>.zip
ARCHIVE_MIMETYPE = "application/zip"
ATTR_ARTIFACT = "adapter_artifact_id"  # trial user attr: the id of its adapter archive artifact
LOCK_NAME = ".adapters.lock"


def complete_adapter(run_dir: str | os.PathLike[str]) -> Path | None:
    """`<run_dir>/adapter` when it holds a whole adapter (it only ever appears whole), else None."""
    path = Path(run_dir) / ADAPTER_DIRNAME
    return path if all((path / name).is_file() for name in ADAPTER_FILES) else None


def save_adapter(model: Any, run_dir: Path, *, initial: Mapping[str, Any] | None = None) -> tuple[Path, float]:
    """Save the adapter of `model` (a `PeftModel`) to `<run_dir>/adapter` atomically; returns
    (its path, seconds taken). An adapter already there (an earlier save of this run) is replaced.

    `initial`: the adapter's weights at initialisation, for an init that moved base weights
    (`lora.initial_adapter_state`): the adapter is then saved converted by peft into a plain
    LoRA of rank 2r that loads on the original base checkpoint."""
    start = time.perf_counter()
    run_dir = Path(run_dir)
    clean_leftovers(run_dir.parent)  # what dead processes left in this and the sibling run directories
    final = run_dir / ADAPTER_DIRNAME
    tmp = make_tmp_dir(run_dir, ADAPTER_DIRNAME)
    try:
        if initial is None:
            model.save_pretrained(str(tmp), safe_serialization=True)
        else:
            from safetensors.torch import save_file  # torch: not for the notebook side importing this module

            with tempfile.TemporaryDirectory(prefix="lora_sweep_initial_adapter_") as init_dir:
                # peft writes the initial config itself and reads the initial weights from here
                save_file(dict(initial), str(Path(init_dir) / "adapter_model.safetensors"))
                model.save_pretrained(
                    str(tmp), safe_serialization=True, path_initial_model_for_weight_conversion=init_dir
                )
        fsync_tree(tmp)
        crash_point("adapter_save")  # tests only: killed with the files written, not yet renamed
        if final.exists():
            discard(final)
        os.rename(tmp, final)
        _fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, time.perf_counter() - start


def discard(path: Path) -> None:
    """Delete a directory so that no half of it stays under its name: renamed aside first."""
    aside = make_tmp_dir(path.parent, path.name)
    os.rename(path, aside / path.name)  # into an empty temp dir: a rename, never a copy
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def lock(results_dir: Path) -> Iterator[None]:
    """The lock that serializes adapter retention (and the best export) across the processes of
    every sweep writing to `results_dir`."""
    Path(results_dir).mkdir(parents=True, exist_ok=True)
    with FileLock(str(Path(results_dir) / LOCK_NAME), timeout=LOCK_TIMEOUT_S):
        yield


def upload_archive(results_dir: Path, trial: Any, adapter: Path, *, number: int) -> str:
    """Zip `adapter` as `adapter_trial_<number>.zip` and upload it as an artifact of `trial`
    (an `optuna.trial.Trial`, while it runs); returns the artifact id."""
    with tempfile.TemporaryDirectory(prefix="lora_sweep_adapter_") as scratch:
        archive = shutil.make_archive(str(Path(scratch) / f"{ARCHIVE_PREFIX}{number}"), "zip", root_dir=adapter)
        return artifacts.upload(results_dir, trial, Path(archive), mimetype=ARCHIVE_MIMETYPE)


def remove_archives(results_dir: Path, study: Any, frozen: Any) -> int:
    """Delete every adapter archive of the trial `frozen` from the artifact store (found by the
    study's artifact records, so one uploaded by a process killed before it noted the id goes
    too); the samples and other artifacts stay. Returns how many files were removed."""
    from optuna.artifacts import get_all_artifact_meta
    from optuna.artifacts.exceptions import ArtifactNotFound

    removed = 0
    # a FrozenTrial's artifact records are read through the storage; the study holds the one it uses
    for meta in get_all_artifact_meta(frozen, storage=study._storage):
        if not meta.filename.startswith(ARCHIVE_PREFIX):
            continue
        try:
            artifacts.remove(results_dir, meta.artifact_id)
            removed += 1
        except ArtifactNotFound:
            pass  # removed by an earlier pass
    return removed


def make_tmp_dir(parent: Path, name: str) -> Path:
    """A fresh temporary directory `<parent>/<name>.tmp-<pid>-<host>-<random>`, which
    `clean_leftovers` removes once this process is dead."""
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        path = parent / f"{_tmp_prefix(name)}{uuid.uuid4().hex[:8]}"
        try:
            path.mkdir()  # not mkdtemp's 0o700: the adapter is as readable as the rest of the run directory
        except FileExistsError:
            continue
        return path


def clean_leftovers(root: Path, *, names: tuple[str, ...] = (ADAPTER_DIRNAME,)) -> int:
    """Remove the temporary directories (`<name>.tmp-*`) that processes of this host which are
    no longer alive left in `root` and its subdirectories; returns how many were removed. Those
    of live processes (a save in progress) and of other hosts are left alone."""
    removed = 0
    if not root.is_dir():
        return 0
    for name in names:
        for pattern in (f"{name}{TMP_INFIX}*", f"*/{name}{TMP_INFIX}*"):
            for path in root.glob(pattern):
                if path.is_dir() and _owner_is_dead(path.name.split(TMP_INFIX, 1)[1]):
                    shutil.rmtree(path, ignore_errors=True)
                    removed += not path.exists()
    if removed:
        log.info("removed %d half-written adapter or export directories left by killed processes", removed)
    return removed


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then the directories, so a rename after it publishes
    complete files."""
    for directory, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(directory))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_prefix(name: str) -> str:
    return f"{name}{TMP_INFIX}{os.getpid()}-{socket.gethostname()}-"


def _owner_is_dead(tag: str) -> bool:
    """Whether the `<pid>-<host>-<random>` tag of a temporary directory names a dead process of
    this host (the random part is hex: no '-')."""
    pid, _, rest = tag.partition("-")
    host = rest.rpartition("-")[0]
    if not pid.isdigit() or host != socket.gethostname():
        return False
    if int(pid) == os.getpid():
        return False  # ours: a save of this process removes its own on failure
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
