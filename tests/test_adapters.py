"""The adapter is the product: every completed trial saves its adapter (crash-safe), a sweep keeps
the best `train.keep_adapters` of them (and their archives in the artifact store), and the best
one is exported ready to use: `<results_dir>/best/` and `lora-sweep best [--merge]`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from omegaconf import OmegaConf

from lora_sweep import adapters
from lora_sweep.artifacts import artifact_dir
from lora_sweep.cache import TrialCache
from lora_sweep.config import RunConfig
from lora_sweep.embedded import TINY_LLAMA_DIR
from lora_sweep.evaluate import evaluate_loss
from lora_sweep.results import read_rows
from lora_sweep.sweep.study import open_storage
from lora_sweep.sweep_hooks import best_trial, kept_numbers, retain_adapters
from lora_sweep.trial import prepared_trial
from tests.conftest import REPO, TINY, run_cli
from tests.scale_helpers import SWEEP_TINY, lora_command, start, worker_env

optuna.logging.set_verbosity(optuna.logging.WARNING)

# Tiny trials that all complete: no pruner, learning rates that do not diverge, any held-out
# improvement feasible (8 steps rarely cut the loss by 5 %), no sample answers (they cost more
# than the training here).
ADAPTER_TINY = [
    *SWEEP_TINY,
    "hydra/sweeper/pruner=none",
    "train.lr=tag(log, interval(1e-3, 2e-2))",
    "train.min_improvement=0",
    "train.sample_prompts=0",
]


def _study(results: Path) -> optuna.Study:
    return optuna.load_study(study_name="lora_sweep", storage=open_storage(str(results / "optuna_journal.log")))


def _completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if "penalty_for_trial" not in t.user_attrs
    ]


def _on_disk(results: Path) -> dict[int, Path]:
    """Trial number -> its complete adapter directory, for every sweep trial that has one."""
    found = {}
    for run_dir in (results / "sweeps" / "lora_sweep").iterdir():
        adapter = adapters.complete_adapter(run_dir)
        if adapter is not None:
            found[int(run_dir.name.split("_")[0])] = adapter
    return found


def _adapter_archives(study: optuna.Study, results: Path) -> dict[int, list[str]]:
    """Trial number -> ids of its adapter archives whose file is in the artifact store."""
    from optuna.artifacts import get_all_artifact_meta

    store = artifact_dir(results)
    archives: dict[int, list[str]] = {}
    for trial in study.get_trials(deepcopy=False):
        for meta in get_all_artifact_meta(trial, storage=study._storage):
            if meta.filename.startswith(adapters.ARCHIVE_PREFIX) and (store / meta.artifact_id).is_file():
                archives.setdefault(trial.number, []).append(meta.artifact_id)
    return archives


def _leftovers(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(f"*{adapters.TMP_INFIX}*"))


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1 and lines[0].startswith("lora_sweep: error: "), proc.stderr


@pytest.fixture(scope="module")
def sweep5(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, subprocess.CompletedProcess[str]]]:
    """5 tiny trials on two worker processes (the retention passes take turns on one lock),
    keeping the best 2 adapters."""
    results = tmp_path_factory.mktemp("sweep5")
    proc = run_cli(
        "-m",
        f"results_dir={results}",
        "hydra.sweeper.n_trials=5",
        "hydra.sweeper.n_jobs=2",
        "train.keep_adapters=2",
        *ADAPTER_TINY,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    yield results, proc


@pytest.mark.slow
def test_a_sweep_keeps_the_best_k_adapters_and_only_their_archives(
    sweep5: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    results, proc = sweep5
    study = _study(results)
    completed = _completed(study)
    assert len(completed) >= 3, [t.user_attrs.get("reason") for t in study.trials]  # so that one was deleted
    kept = kept_numbers(study, completed, 2)
    best = best_trial(study)
    assert best is not None and best.number in kept and len(kept) == 2
    assert set(_on_disk(results)) == kept  # the adapters of the others are gone
    archives = _adapter_archives(study, results)
    assert set(archives) == kept and all(len(ids) == 1 for ids in archives.values())
    # nothing else in the store: every file there is an artifact some trial records
    from optuna.artifacts import get_all_artifact_meta

    recorded = {m.artifact_id for t in study.trials for m in get_all_artifact_meta(t, storage=study._storage)}
    assert {p.name for p in artifact_dir(results).iterdir()} <= recorded
    for number in kept:  # each archive is the adapter itself
        with zipfile.ZipFile(artifact_dir(results) / archives[number][0]) as archive:
            assert set(adapters.ADAPTER_FILES) <= set(archive.namelist())
        trial = study.trials[number]
        assert trial.user_attrs[adapters.ATTR_ARTIFACT] == archives[number][0]
    rows = read_rows(results / "lora_tuning_results.csv").set_index("trial_number")
    for number in kept:  # a kept trial's row names its adapter ...
        assert rows.loc[number, "adapter_dir"] == str(_on_disk(results)[number])
    for number, path in rows["adapter_dir"].items():  # ... and a row names no adapter that is half there
        assert not path or number in kept or not Path(path).exists()
    result = json.loads((results / "sweeps" / "lora_sweep" / str(best.number) / "result.json").read_text())
    assert 0 < result["adapter_seconds"] < 5
    # the best, ready to use: adapter, config, card with the summary's replay command
    best_dir = results / "best"
    assert json.loads((best_dir / "best.json").read_text())["trial_number"] == best.number
    assert set(adapters.ADAPTER_FILES) <= {p.name for p in best_dir.iterdir()}
    assert (best_dir / "config.yaml").read_text() == (Path(best.user_attrs["run_dir"]) / "config.yaml").read_text()
    replay = next(line for line in proc.stdout.splitlines() if line.startswith("[lora_sweep] replay: "))
    card = (best_dir / "README.md").read_text()
    assert replay.removeprefix("[lora_sweep] replay: ") in card and "eval_loss" in card
    assert f"its adapter, config and model card: {best_dir}" in proc.stdout
    assert not _leftovers(results)


def _held_out(best_dir: Path) -> tuple[list[dict[str, torch.Tensor]], torch.device]:
    """The held-out batches the trial evaluated: `trial.prepare` on its own config."""
    cfg = RunConfig.from_mapping(OmegaConf.to_container(OmegaConf.load(best_dir / "config.yaml"), resolve=True))
    with prepared_trial(cfg, TrialCache()) as prepared:
        return prepared.eval_batches, prepared.device


def _peft_model(best_dir: Path) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(TINY_LLAMA_DIR, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(best_dir)).eval()


@pytest.mark.slow
def test_b_the_best_directory_loads_and_reproduces_its_held_out_loss(
    sweep5: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    results, _ = sweep5
    best_dir = results / "best"
    manifest = json.loads((best_dir / "best.json").read_text())
    assert manifest["metrics"]["precision"] == "fp32"  # train.precision=auto on the tiny model
    batches, device = _held_out(best_dir)
    loss = evaluate_loss(_peft_model(best_dir), batches, device).loss
    recorded = float(manifest["metrics"]["eval_loss"])
    assert abs(loss - recorded) < 1e-5, (loss, recorded)
    assert recorded < float(manifest["metrics"]["eval_loss_base"])  # and it is a trained adapter


@pytest.mark.slow
def test_c_best_merge_writes_a_plain_model_with_the_adapters_logits(
    sweep5: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    results, _ = sweep5
    out = tmp_path / "exported"
    proc = run_cli("best", "--results-dir", str(results), "--out", str(out), "--merge")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"in {out}" in proc.stdout
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    batch = _held_out(out)[0][0]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        folded, adapted = merged(**inputs).logits, _peft_model(out)(**inputs).logits
    # fp32 sums in another order: logits of magnitude ~17 differ by a few ulps (measured 1.1e-5
    # absolute), so the bound is 1e-5 of the logits' scale; the probabilities within 1e-5 absolute
    scale = adapted.abs().max().item()
    assert (folded - adapted).abs().max().item() <= 1e-5 * scale
    assert (folded.softmax(-1) - adapted.softmax(-1)).abs().max().item() <= 1e-5
    assert torch.equal(folded.argmax(-1), adapted.argmax(-1))
    # run again: the export is replaced whole
    again = run_cli("best", "--results-dir", str(results), "--out", str(out))
    assert again.returncode == 0 and not (out / "merged").exists() and not _leftovers(tmp_path)


@pytest.mark.slow
def test_d_kill_9_mid_save_leaves_no_half_adapter_and_all_keeps_every_completed_one(tmp_path: Path) -> None:
    results = tmp_path / "results"
    cmd = lora_command(f"results_dir={results}", "hydra.sweeper.n_trials=3", "train.save_adapter=all", *ADAPTER_TINY)
    proc = start(cmd, tmp_path / "killed.log", LORA_SWEEP_FAULT="adapter_save:2")
    assert proc.wait(timeout=300) == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    killed = results / "sweeps" / "lora_sweep" / "1"
    assert _leftovers(killed) and adapters.complete_adapter(killed) is None  # written, never renamed
    rerun = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=worker_env(), timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not _leftovers(results)  # cleaned up
    assert not (killed / adapters.ADAPTER_DIRNAME).exists()  # and never reported
    study = _study(results)
    assert study.trials[1].user_attrs.get("stale") and not study.trials[1].user_attrs.get("adapter_dir")
    completed = {t.number for t in _completed(study)}
    assert len(completed) == 3 and set(_on_disk(results)) == completed == set(_adapter_archives(study, results))
    rows = read_rows(results / "lora_tuning_results.csv")
    assert 1 not in set(rows["trial_number"])
    assert all(adapters.complete_adapter(Path(p).parent) is not None for p in rows["adapter_dir"])


@pytest.mark.slow
def test_e_save_adapter_none_saves_nothing_and_a_single_run_keeps_its_adapter(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", f"results_dir={sweep}", "hydra.sweeper.n_trials=2", "train.save_adapter=none", *ADAPTER_TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not _on_disk(sweep) and not _adapter_archives(_study(sweep), sweep) and not (sweep / "best").exists()
    assert set(read_rows(sweep / "lora_tuning_results.csv")["adapter_dir"]) == {""}
    for mode in ("best_k", "none"):
        single = tmp_path / mode
        run = run_cli(f"results_dir={single}", *TINY, f"train.save_adapter={mode}", "train.sample_prompts=0")
        assert run.returncode == 0, run.stderr[-3000:]
        (run_dir,) = (single / "runs").iterdir()
        (adapter_dir,) = read_rows(single / "lora_tuning_results.csv")["adapter_dir"]
        if mode == "none":
            assert adapter_dir == "" and not (run_dir / adapters.ADAPTER_DIRNAME).exists()
        else:
            assert adapter_dir == str(run_dir / adapters.ADAPTER_DIRNAME) == str(adapters.complete_adapter(run_dir))
            saved = json.loads((run_dir / "result.json").read_text())
            assert saved["adapter_dir"] == adapter_dir and saved["adapter_seconds"] > 0


@pytest.mark.slow
def test_f_bad_input_to_lora_sweep_best_is_one_line_and_exit_2(
    sweep5: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    results, _ = sweep5
    _one_error_line(run_cli("best", "--results-dir", str(tmp_path)))  # no study storage
    _one_error_line(run_cli("best", "--results-dir", str(results), "--study-name", "nope"))
    deleted = sorted({t.number for t in _completed(_study(results))} - set(_on_disk(results)))
    _one_error_line(run_cli("best", "--results-dir", str(results), "--trial", str(deleted[0])))  # adapter deleted
    _one_error_line(run_cli("best", "--results-dir", str(results), "--trial", "999"))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    _one_error_line(run_cli("best", "--results-dir", str(results), "--out", str(foreign)))
    assert (foreign / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"  # a study without a completed trial
    empty.mkdir()
    study = optuna.create_study(study_name="lora_sweep", storage=open_storage(str(empty / "optuna_journal.log")))
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    _one_error_line(run_cli("best", "--results-dir", str(empty)))


def _fake_adapter(run_dir: Path) -> Path:
    adapter = run_dir / adapters.ADAPTER_DIRNAME
    adapter.mkdir(parents=True)
    for name in adapters.ADAPTER_FILES:
        (adapter / name).write_text("{}")
    return adapter


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # set_metric_names
def test_retention_judges_the_trial_not_yet_told_and_never_deletes_the_best(tmp_path: Path) -> None:
    """In process, on a study of made-up trials: the pass runs before its trial is told."""
    study = optuna.create_study(direction="maximize")
    study.set_metric_names(["stability_index"])
    gains = {0: 0.30, 1: 0.05, 2: 0.28, 3: 0.02}  # held-out improvements: 1 and 3 learned too little
    values = {0: 0.5, 1: 0.9, 2: 0.6, 3: 0.95}
    for number, gain in gains.items():
        attrs = {"run_dir": str(tmp_path / str(number)), "eval_improvement": gain}
        _fake_adapter(tmp_path / str(number))
        study.add_trial(optuna.trial.create_trial(values=[values[number]], user_attrs=attrs, constraints={"c": -1.0}))
    failed = tmp_path / "4"  # a stale trial's whole adapter: its trial never completed
    _fake_adapter(failed)
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={"run_dir": str(failed)}))
    running = study.ask()  # its job returned this; the sweeper has not told it yet
    _fake_adapter(tmp_path / "5")
    payload = {"stability_index": 0.7, "eval_improvement": 0.29, "constraint": -1.0, "run_dir": str(tmp_path / "5")}
    kept = retain_adapters(study, tmp_path, mode="best_k", keep=2, current=(running.number, payload))
    assert kept == {5, 2}  # the learners (0, 2, 5) by stability; 1 and 3 did not learn enough
    assert {n for n in range(6) if adapters.complete_adapter(tmp_path / str(n))} == {2, 5}
    for key in ("eval_improvement", "run_dir"):
        running.set_user_attr(key, payload[key])
    running.set_constraint("c", -1.0)
    study.tell(running, [0.7])
    assert best_trial(study).number == 5
    assert retain_adapters(study, tmp_path, mode="best_k", keep=1) == {5}  # the current best stays
    assert retain_adapters(study, tmp_path, mode="all", keep=1) == {0, 1, 2, 3, 5}
    assert not any(tmp_path.rglob(f"*{adapters.TMP_INFIX}*"))


def test_a_dead_process_half_save_is_cleaned_and_a_live_one_is_not(tmp_path: Path) -> None:
    live_pid = os.getppid()  # alive: our parent
    host = socket.gethostname()
    run = tmp_path / "0"
    run.mkdir()
    gone = run / f"adapter{adapters.TMP_INFIX}{2**22 + 12345}-{host}-abcd1234"  # beyond pid_max: never alive
    alive = run / f"adapter{adapters.TMP_INFIX}{live_pid}-{host}-abcd1234"
    other_host = run / f"adapter{adapters.TMP_INFIX}{2**22 + 12345}-elsewhere-abcd1234"
    for path in (gone, alive, other_host):
        path.mkdir()
    assert adapters.clean_leftovers(tmp_path) == 1
    assert not gone.exists() and alive.exists() and other_host.exists()
