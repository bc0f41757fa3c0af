"""Helpers shared by the scale-out, load and crash tests: start sweep workers as a user would
(each its own `python -m lora_sweep -m ...` process, one thread each), read studies back."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

import optuna
import pytest

from lora_sweep.sweep.study import open_storage
from tests.conftest import REPO, one_worker

optuna.logging.set_verbosity(optuna.logging.WARNING)

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
APP = REPO / "tests" / "sweep_apps" / "app.py"
# Tiny real trials: a few optimizer steps on short sequences; no enqueued baseline; a report
# of the objective so far (and a pruner check) at every one of the 8 steps, where the default
# sweep reports the held-out improvement at each evaluation.
SWEEP_TINY = [
    "train.max_steps=8",
    "train.warmup_steps=2",
    "train.batch_size=4",
    "train.log_every=4",
    "data.max_length=64",
    "hydra.sweeper.enqueue=null",
    "hydra.sweeper.report_every=1",
    "train.prune_on=objective",
]


def worker_env(**extra: str) -> dict[str, str]:
    """One thread per worker process (2 shared cores), unbuffered output."""
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)


def lora_command(*args: str) -> list[str]:
    """A sweep command; one worker process unless `hydra.sweeper.n_jobs` is given."""
    return [sys.executable, "-m", "lora_sweep", *one_worker(["-m", *args])]


def app_command(*args: str) -> list[str]:
    return [sys.executable, str(APP), "-m", *args]


def start(cmd: Sequence[str], log: Path, **env: str) -> subprocess.Popen[bytes]:
    """Start one worker with its output in ``log`` (its own session, so kill -9 reaches it all)."""
    handle = open(log, "wb")  # noqa: SIM115 - closed by the child's exit; the test reads the file
    return subprocess.Popen(
        list(cmd), cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=worker_env(**env), start_new_session=True
    )


def run_workers(cmds: Sequence[Sequence[str]], logs: Path, timeout: float = 300, **env: str) -> list[int]:
    """Start every command at once and wait for all; returns their exit codes."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = [start(cmd, logs / f"worker{i}.log", **env) for i, cmd in enumerate(cmds)]
    try:
        return [proc.wait(timeout=timeout) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def log_tail(logs: Path, chars: int = 3000) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in sorted(logs.glob("*.log")))


def unique_study(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def require_postgres() -> None:
    """PostgreSQL is part of the test machines: its absence is a failure, never a skip."""
    try:
        import psycopg2

        psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="test", connect_timeout=5).close()
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"PostgreSQL is required on 127.0.0.1:5432 (user postgres, database test): {exc}")


def load(storage: str, study_name: str) -> optuna.Study:
    return optuna.load_study(study_name=study_name, storage=open_storage(storage))


def delete(storage: str, study_name: str) -> None:
    try:
        optuna.delete_study(study_name=study_name, storage=open_storage(storage))
    except KeyError:
        pass


def real_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that count: no penalty twins, no stale (killed) trials."""
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if "penalty_for_trial" not in t.user_attrs and not t.user_attrs.get("stale")
    ]


def storage_for(kind: str, tmp_path: Path) -> str:
    """A fresh storage of `kind` (journal, sqlite, postgresql); PostgreSQL must be up (fails loudly)."""
    if kind == "postgresql":
        require_postgres()
        return PG_URL
    return {"journal": str(tmp_path / "journal.log"), "sqlite": f"sqlite:///{tmp_path / 'study.db'}"}[kind]
