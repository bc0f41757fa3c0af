"""Optuna artifacts of a sweep's trials (adapter archives, samples), kept in a
`FileSystemArtifactStore` under the results directory, where optuna-dashboard shows them
(`optuna-dashboard <journal> --artifact-dir <results_dir>/artifacts`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ARTIFACT_DIRNAME = "artifacts"


def artifact_dir(results_dir: Path) -> Path:
    """Where a results directory's artifacts live."""
    return Path(results_dir) / ARTIFACT_DIRNAME


def artifact_store(results_dir: Path) -> Any:
    """The results directory's `FileSystemArtifactStore` (the directory is created)."""
    from optuna.artifacts import FileSystemArtifactStore

    directory = artifact_dir(results_dir)
    directory.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(base_path=str(directory))


def upload(results_dir: Path, trial: Any, path: Path, *, mimetype: str | None = None) -> str:
    """Upload the file `path` as an artifact of `trial` (an `optuna.trial.Trial`); returns its id."""
    from optuna.artifacts import upload_artifact

    return upload_artifact(
        artifact_store=artifact_store(results_dir), file_path=str(path), study_or_trial=trial, mimetype=mimetype
    )


def remove(results_dir: Path, artifact_id: str) -> None:
    """Delete an artifact's file from the store (its metadata stays on the trial)."""
    artifact_store(results_dir).remove(artifact_id)
