"""Sweeper logic without Hydra subprocesses: objectives, outcomes, storage, context, export."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest

from lora_sweep.export_cli import export_csv
from lora_sweep.sweep import study as study_mod
from lora_sweep.sweep.context import TrialContext, TrialReporter
from lora_sweep.sweep.objective import (
    ObjectiveConfigError,
    outcome_from_exception,
    outcome_from_return,
    parse_objective,
)
from lora_sweep.sweep.samplers import build_pruner, build_sampler, grid_search_space
from lora_sweep.sweep.space import parse_search_space
from lora_sweep.sweep_hooks import OBJECTIVES

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_objective_presets_and_mapping() -> None:
    known = OBJECTIVES  # what lora_sweep's hooks declare
    assert parse_objective(None, "maximize").directions == ("maximize",)
    assert parse_objective("stability_index", known=known).directions == ("maximize",)
    spec = parse_objective(["stability_index", "final_loss"], known=known)
    assert spec.names == ("stability_index", "final_loss")
    assert spec.directions == ("maximize", "minimize")
    assert parse_objective({"acc": "maximize"}, known=known).names == ("acc",)
    assert parse_objective("acc", "maximize").directions == ("maximize",)  # an app that declares none
    with pytest.raises(ObjectiveConfigError):
        parse_objective(["acc", "loss"])
    with pytest.raises(ObjectiveConfigError):
        parse_objective(None, "up")
    with pytest.raises(
        ObjectiveConfigError,
        match="'bogus' is not an objective .* valid: best_eval_loss, eval_improvement, eval_loss, final_loss, quality, "
        "stability_index",
    ):
        parse_objective("bogus", known=known)


def test_hooks_load_from_a_dotted_path_and_default_to_no_ops() -> None:
    from lora_sweep.sweep.hooks import SweepHooks, SweepHooksError, load_hooks
    from lora_sweep.sweep_hooks import HOOKS

    assert load_hooks("lora_sweep.sweep_hooks.HOOKS") is HOOKS
    assert load_hooks("lora_sweep.sweep_hooks") is HOOKS  # a module: its HOOKS object
    plain = load_hooks(None)
    assert type(plain) is SweepHooks and plain.objectives == {} and plain.on_recovered({}) is None
    assert plain.storage_dir({"results_dir": "r"}) is None  # a generic app: the sweep dir
    assert HOOKS.storage_dir({"results_dir": "r"}) == "r"  # lora_sweep: the study beside its CSV
    with pytest.raises(SweepHooksError, match="hydra.sweeper.hooks='no.such.thing' cannot be imported"):
        load_hooks("no.such.thing")


def test_restore_sigint_gives_the_caller_its_handler_back() -> None:
    import signal

    from lora_sweep.sweep.runner import exit_on_next_sigint, restore_sigint

    def mine(signum: int, frame: object) -> None:
        return None

    before = signal.signal(signal.SIGINT, mine)
    try:
        replaced = exit_on_next_sigint()
        assert replaced is mine and signal.getsignal(signal.SIGINT) is not mine
        restore_sigint(replaced)
        assert signal.getsignal(signal.SIGINT) is mine
    finally:
        signal.signal(signal.SIGINT, before)


def test_outcomes() -> None:
    spec = parse_objective("stability_index", known=OBJECTIVES)
    ok = outcome_from_return({"stability_index": 0.7, "avg_loss": 2.0, "constraint": 0.5, "run_dir": "/x"}, spec)
    assert ok.state == "complete" and ok.values == [0.7]
    assert ok.constraints == {"constraint": 0.5} and ok.user_attrs["run_dir"] == "/x"
    assert outcome_from_return({"status": "pruned"}, spec).state == "pruned"
    div = outcome_from_return({"status": "diverged", "reason": "loss nan at step 3"}, spec)
    assert (div.state, div.status, div.reason) == ("fail", "diverged", "loss nan at step 3")
    nan = outcome_from_return({"stability_index": math.nan}, spec)
    assert nan.state == "fail" and "non-finite" in nan.reason
    plain = parse_objective(None)
    assert outcome_from_return(1.5, plain).values == [1.5]
    assert outcome_from_return(math.inf, plain).state == "fail"
    assert outcome_from_return({"a": 1}, plain).state == "fail"
    oom = outcome_from_exception(MemoryError("x"))
    assert oom.status == "failed" and oom.reason.startswith("out of memory")
    assert outcome_from_exception(optuna.TrialPruned()).state == "pruned"
    assert outcome_from_exception(RuntimeError("boom")).reason == "RuntimeError: boom"


def test_normalize_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert study_mod.normalize_storage("sqlite:///x.db") == f"sqlite:///{tmp_path}/x.db"
    assert study_mod.normalize_storage("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert study_mod.normalize_storage("j.log") == str(tmp_path / "j.log")
    assert study_mod.normalize_storage("a/b.db") == f"sqlite:///{tmp_path}/a/b.db"
    assert study_mod.normalize_storage("postgresql://u@h/db") == "postgresql://u@h/db"
    assert study_mod.dashboard_command(str(tmp_path / "j.log")) == f"optuna-dashboard {tmp_path}/j.log"


def test_context_round_trip_and_reporter_uses_configured_pruner(tmp_path: Path) -> None:
    storage = str(tmp_path / "j.log")
    study = study_mod.open_study(storage=storage, study_name="s", directions=["minimize"])
    study.set_user_attr("sweep.pruner", {"_target_": "optuna.pruners.ThresholdPruner", "upper": 1.0})
    trial = study.ask()
    ctx = TrialContext(storage=storage, study_name="s", trial_id=trial._trial_id, trial_number=trial.number)
    assert TrialContext.decode(ctx.encode()) == ctx
    assert set(ctx.encode()) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    reporter = TrialReporter(ctx)
    reporter.report(0.5, 0)
    assert not reporter.should_prune()
    reporter.report(2.0, 1)
    assert reporter.should_prune()  # load_study's default MedianPruner would not prune here
    assert study.trials[0].intermediate_values == {0: 0.5, 1: 2.0}


def test_stale_trials_failed_and_requeued(tmp_path: Path) -> None:
    storage = str(tmp_path / "j.log")
    study = study_mod.open_study(storage=storage, study_name="s", directions=["minimize"])
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    trial.set_user_attr("worker", f"{study_mod.worker_tag().rsplit(':', 1)[0]}:999999999")
    assert study_mod.recover_stale(study) == [0]
    frozen = study.trials[0]
    assert frozen.state.name == "FAIL" and frozen.user_attrs["stale"] is True
    assert study.trials[1].state.name == "WAITING"
    assert study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}).params == frozen.params
    assert study_mod.progress(study).finished == 0


def test_penalty_record_is_infeasible_and_not_counted(tmp_path: Path) -> None:
    study = study_mod.open_study(storage=str(tmp_path / "j.log"), study_name="s", directions=["minimize"])
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    good = study.ask(dist)
    study.tell(good, 3.0)
    bad = study.ask(dist)
    frozen = study.tell(bad, state=optuna.trial.TrialState.FAIL)
    assert study_mod.add_penalty_record(study, frozen)
    twin = study.trials[-1]
    assert twin.values == [3.0] and twin.constraints == {"failed": 1.0}
    assert study.best_trial.number == good.number
    p = study_mod.progress(study)
    assert (p.finished, p.failed) == (2, 1)


def test_samplers_and_pruners_build() -> None:
    space = parse_search_space({"a": "choice(1,2)", "b": "range(0,3)"})
    tpe = build_sampler(
        {"_target_": "optuna.samplers.TPESampler", "multivariate": True}, seed=3, distributions=space.distributions
    )
    assert isinstance(tpe, optuna.samplers.TPESampler)
    grid = build_sampler({"_target_": "optuna.samplers.GridSampler"}, seed=0, distributions=space.distributions)
    assert isinstance(grid, optuna.samplers.GridSampler)
    assert grid_search_space(space.distributions) == {"a": [1, 2], "b": [0, 1, 2]}
    patient = build_pruner(
        {
            "_target_": "optuna.pruners.PatientPruner",
            "patience": 2,
            "wrapped_pruner": {"_target_": "optuna.pruners.MedianPruner"},
        }
    )
    assert isinstance(patient, optuna.pruners.PatientPruner)
    assert isinstance(build_pruner(None), optuna.pruners.NopPruner)


def test_export_csv_one_row_per_trial(tmp_path: Path) -> None:
    storage = str(tmp_path / "j.log")
    study = study_mod.open_study(storage=storage, study_name="s", directions=["maximize"])
    dist = {"lora.r": optuna.distributions.CategoricalDistribution((4, 8))}
    for i, state in enumerate(["COMPLETE", "PRUNED", "FAIL"]):
        t = study.ask(dist)
        t.set_user_attr("status", {"COMPLETE": "success", "PRUNED": "pruned", "FAIL": "failed"}[state])
        t.set_user_attr("stability_index", 0.5 + i)
        if state == "COMPLETE":
            study.tell(t, 0.5)
        else:
            study.tell(t, state=getattr(optuna.trial.TrialState, state))
    study_mod.add_penalty_record(study, study.trials[2])
    killed = study.ask(dist)  # a trial killed mid-run: stale, re-queued, never a row
    killed.set_user_attr("worker", f"{study_mod.worker_tag().rsplit(':', 1)[0]}:999999999")
    study_mod.recover_stale(study)
    out = tmp_path / "out.csv"
    assert export_csv(storage, "s", out) == 3
    import csv

    rows = list(csv.DictReader(out.open()))
    assert [r["state"] for r in rows] == ["COMPLETE", "PRUNED", "FAIL"]
    assert [r["trial_number"] for r in rows] == ["0", "1", "2"]
    assert all(r["study_name"] == "s" and r["lora.r"] in {"4", "8"} for r in rows)


def test_runner_batches_through_a_non_basic_launcher(tmp_path: Path) -> None:
    """n_jobs = batch size for launchers other than the basic one (e.g. joblib)."""
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    from lora_sweep.sweep.runner import SweepRunner

    batches: list[int] = []

    class FakeLauncher:
        def launch(self, job_overrides, initial_job_idx):  # noqa: ANN001, ANN202
            batches.append(len(job_overrides))
            out = []
            for overrides in job_overrides:
                x = float(next(o for o in overrides if o.startswith("x=")).split("=", 1)[1])
                ret = JobReturn(status=JobStatus.COMPLETED)
                ret.return_value = (x - 1.0) ** 2
                out.append(ret)
            return out

    config = OmegaConf.create(
        {
            "results_dir": str(tmp_path),
            "hydra": {
                "sweep": {"dir": str(tmp_path / "multirun"), "subdir": "${hydra.job.num}"},
                "job": {"name": "fake"},
            },
        }
    )
    settings = {
        "n_trials": 5,
        "n_jobs": 2,
        "seed": 0,
        "params": {"x": "interval(-2.0, 2.0)"},
        "sampler": {"_target_": "optuna.samplers.RandomSampler"},
        "replay_command": "python app.py",
    }
    runner = SweepRunner(
        settings=settings, config=config, launcher=FakeLauncher(), argv=["app.py"], is_basic_launcher=False
    )
    summary = runner.run([])
    assert batches == [2, 2, 1] and summary.finished == 5
    assert summary.replay_commands[0].startswith("python app.py x=")


def test_trial_whose_job_recorded_a_result_is_finished_not_rerun(tmp_path: Path) -> None:
    """A sweep killed after the job recorded its result but before `tell`: resume finishes it."""
    from omegaconf import OmegaConf

    from lora_sweep.sweep.context import ATTR_JOB_RESULT
    from lora_sweep.sweep.runner import SweepRunner

    storage = str(tmp_path / "optuna_journal.log")
    study = study_mod.open_study(storage=storage, study_name="s", directions=["maximize"])
    dead = f"{study_mod.worker_tag().rsplit(':', 1)[0]}:999999999"
    finished = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    finished.set_user_attr("worker", dead)
    finished.set_user_attr(ATTR_JOB_RESULT, {"status": "success", "score": 0.75, "constraint": -0.2, "reason": ""})
    killed = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    killed.set_user_attr("worker", dead)

    config = OmegaConf.create(
        {
            "results_dir": str(tmp_path),
            "hydra": {"sweep": {"dir": str(tmp_path / "m"), "subdir": "${hydra.job.num}"}, "job": {"name": "s"}},
        }
    )
    settings = {
        "n_trials": 1,
        "objective": {"score": "maximize"},
        "params": {"x": "interval(0.0, 1.0)"},
        "sampler": {"_target_": "optuna.samplers.RandomSampler"},
        "storage": storage,
    }
    runner = SweepRunner(settings=settings, config=config, launcher=None, argv=["app.py"])
    runner.prepare([])
    runner.open()
    trials = study_mod.open_study(storage=storage, study_name="s", directions=["maximize"]).trials
    assert trials[0].state.name == "COMPLETE" and trials[0].values == [0.75]
    assert trials[0].user_attrs["status"] == "success" and "stale" not in trials[0].user_attrs
    assert trials[1].state.name == "FAIL" and trials[1].user_attrs["stale"] is True
    requeued = [t for t in trials if t.state.name == "WAITING"]
    assert [t.user_attrs.get("requeued_from_trial") for t in requeued] == [1]  # only the killed trial reruns


def test_n_jobs_auto_and_bad_values() -> None:
    from lora_sweep.sweep.runner import SweepError, resolve_n_jobs

    assert resolve_n_jobs("auto", is_basic=True, cores=2, cuda=False) == 2  # one 1-thread worker per core
    assert resolve_n_jobs("auto", is_basic=True, cores=8, cuda=True) == 1  # a GPU: one trial at a time
    assert resolve_n_jobs("auto", is_basic=False, cores=8, cuda=False) == 1  # other launchers: batch of 1
    assert resolve_n_jobs(3, is_basic=True) == 3 and resolve_n_jobs("2", is_basic=True) == 2
    for bad in (0, -1, 2.5, "many", None):
        with pytest.raises(SweepError, match="n_jobs"):
            resolve_n_jobs(bad, is_basic=True)


def test_journal_storage_is_kept_per_process_until_the_file_is_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "journal.log")
    first = study_mod.open_storage(path)
    optuna.create_study(study_name="s", storage=first)
    assert study_mod.open_storage(path) is first  # no replay of the whole log per trial
    Path(path).unlink()
    fresh = study_mod.open_storage(path)
    assert fresh is not first and fresh.get_all_studies() == []


def test_batched_writes_are_one_append_and_survive_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    path = str(tmp_path / "journal.log")
    study = optuna.create_study(study_name="s", storage=study_mod.open_storage(path))
    trial = study.ask()
    fsyncs: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(study_mod.os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd))[1])
    lines = len(Path(path).read_text().splitlines())
    with pytest.raises(RuntimeError, match="mid-block"), study_mod.batched_writes(path):
        for i in range(5):
            trial.set_user_attr(f"a{i}", i)
        assert len(Path(path).read_text().splitlines()) == lines and not fsyncs  # held until the block ends
        raise RuntimeError("mid-block")
    assert len(fsyncs) == 1 and len(Path(path).read_text().splitlines()) == lines + 5  # one append, five records
    assert study.trials[0].user_attrs == {f"a{i}": i for i in range(5)}
    with study_mod.batched_writes(str(tmp_path / "other.log")):  # another storage: written at once
        trial.set_user_attr("b", 1)
    assert len(fsyncs) == 2


def test_a_ctrl_c_inside_a_journal_write_is_held_until_it_ends() -> None:
    import os
    import signal

    steps: list[str] = []
    with pytest.raises(KeyboardInterrupt):  # Python's default handler, after the block
        with study_mod.sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            steps.append("after the signal, still inside")
    assert steps == ["after the signal, still inside"]
    calls: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    try:
        with study_mod.sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            assert calls == []
        assert calls == [signal.SIGINT]  # the handler in place acts on it once, afterwards
        with study_mod.sigint_deferred():
            pass
        assert calls == [signal.SIGINT] and signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_tell_writes_each_attr_once_and_rows_stay_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every user attr is an fsync'd journal record: `tell` writes `status`/`reason` once (not
    from the job's row and again), and not a key whose value the trial already has as a param;
    the trial's attrs at ask and at tell go out in one journal append each; the exported row
    still has every column."""
    import json
    import os

    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    from lora_sweep.sweep.runner import SweepRunner

    class FakeLauncher:
        def launch(self, job_overrides, initial_job_idx):  # noqa: ANN001, ANN202
            out = []
            for overrides in job_overrides:
                x = float(next(o for o in overrides if o.startswith("x=")).split("=", 1)[1])
                ret = JobReturn(status=JobStatus.COMPLETED)
                ret.return_value = {"x": x, "score": -x * x, "status": "success", "reason": "", "steps": 3}
                out.append(ret)
            return out

    config = OmegaConf.create(
        {
            "results_dir": str(tmp_path),
            "hydra": {"sweep": {"dir": str(tmp_path / "m"), "subdir": "${hydra.job.num}"}, "job": {"name": "s"}},
        }
    )
    settings = {
        "n_trials": 2,
        "objective": {"score": "maximize"},
        "params": {"x": "interval(0.0, 1.0)"},
        "sampler": {"_target_": "optuna.samplers.RandomSampler"},
        "storage": str(tmp_path / "j.log"),
    }
    runner = SweepRunner(
        settings=settings, config=config, launcher=FakeLauncher(), argv=["app.py"], is_basic_launcher=False
    )
    fsyncs: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(study_mod.os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd))[1])
    assert runner.run([]).finished == 2
    records = [json.loads(line) for line in (tmp_path / "j.log").read_text().splitlines()]
    written = [(r["trial_id"], key) for r in records if "user_attr" in r and "trial_id" in r for key in r["user_attr"]]
    assert len(written) == len(set(written))  # no attr written twice
    attr_records = sum(1 for r in records if "user_attr" in r and "trial_id" in r)
    assert attr_records >= 2 * 6  # job_dir, worker, overrides at ask; score, status, reason, steps at tell
    assert len(fsyncs) <= len(records) - attr_records + 2 * 2  # each trial's attrs: one append at ask, one at tell
    assert not any(key == "x" for _, key in written)  # the param itself
    trial = runner.study.trials[0]
    assert trial.user_attrs["status"] == "success" and trial.user_attrs["steps"] == 3
    from lora_sweep.analysis import trials_from_study

    frame = trials_from_study(runner.study)
    assert len(frame) == 2 and frame.loc[0, "x"] == trial.params["x"]  # the column comes from the param
    assert frame.loc[0, "steps"] == 3 and frame.loc[0, "status"] == "success"


def test_job_returns_only_the_config_values_its_overrides_set(compose_cfg) -> None:
    """The sweeper stores each returned scalar as a user attr (a storage write apiece): the job
    returns the metrics and what its overrides set, not the config every trial shares."""
    from omegaconf import OmegaConf

    from lora_sweep.config import RunConfig
    from lora_sweep.job import study_attrs

    cfg = RunConfig.from_mapping(OmegaConf.to_container(compose_cfg("lora.r=16"), resolve=True))
    row = {**cfg.flat_values(), "stability_index": 0.5, "run_dir": "/r", "status": "success"}
    attrs = study_attrs(row, cfg, ["lora.r=16", "++train.max_steps=9", "results_dir=/x"])
    assert attrs == {
        "lora.r": 16,
        "train.max_steps": cfg.train.max_steps,
        "stability_index": 0.5,
        "run_dir": "/r",
        "status": "success",
    }
    assert len(row) - len(attrs) == len(cfg.flat_values()) - 2  # every other config value left out
