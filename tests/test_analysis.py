"""lora_sweep.analysis: on a hand-built results directory (fast) and on a real tiny sweep (slow).

``tiny_sweep_dir`` is shared with test_notebooks.py and test_dashboard.py: the sweep runs
once per test session, however many test modules ask for it.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState, create_trial

from lora_sweep import analysis
from lora_sweep.results import RESULTS_FILENAME, append_row, write_step_log
from lora_sweep.sweep.study import ATTR_PENALTY_FOR, JOURNAL_NAME
from tests.conftest import sweeps_once

# ------------------------------------------------------------------ the shared tiny sweep

TINY_SWEEP_ARGS = (
    "hydra.sweeper.n_trials=6",
    "hydra.sweeper.n_jobs=1",
    "train.max_steps=12",
    "train.warmup_steps=2",
    "train.batch_size=4",
    "data.max_length=64",
    "hydra.sweeper.enqueue=null",
    # lr 8 diverges (status diverged, state FAIL); no clipping so it really does. Uniform
    # batches: there it diverged in all 3 (r, alpha) draws tried, packed in 1 of 3 (the others
    # ended not learned, final loss 6.1-6.8 of 7.6), and these tests need a diverged trial
    "train.lr=choice(3e-3, 1e-2, 8.0)",
    "data.packing=false",
    "train.max_grad_norm=1e9",
    "hydra.sweeper.max_failure_rate=1.0",
)


def tiny_sweep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Results dir of a real 6-trial sweep (one or more diverged trials), made once per session."""
    return sweeps_once(tmp_path_factory.getbasetemp() / "tiny_sweep", list(TINY_SWEEP_ARGS))


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sweep_dir(tmp_path_factory)


# ------------------------------------------------------------- a hand-built results dir

LR = FloatDistribution(1e-5, 1.0, log=True)
R = CategoricalDistribution([4, 8, 16, 32])
# number: (state, lr, r, stability, final_loss, learned, status, reason)
SPECS = {
    0: ("COMPLETE", 1e-3, 8, 0.8, 2.0, True, "success", ""),
    1: ("COMPLETE", 3e-3, 16, 0.6, 1.5, True, "success", ""),
    2: ("COMPLETE", 1e-4, 4, 0.9, 3.0, False, "success", ""),
    3: ("PRUNED", 2e-2, 8, 0.5, 2.5, True, "pruned", "pruned at step 3"),
    4: ("FAIL", 0.5, 32, 0.0, 9.0, False, "diverged", "loss drawup 2.0 > ln 3"),
    6: ("COMPLETE", 5e-3, 4, 0.7, 2.1, True, "success", ""),
}


def _steps(n: int, start: float) -> list[dict[str, float]]:
    return [
        {
            "step": t,
            "loss": start / t,
            "grad_norm": 1.0 + 0.1 * t,
            "lr": 1e-3,
            "tokens": 64,
            "real_tokens": 50,
            "elapsed_s": 0.1 * t,
        }
        for t in range(1, n + 1)
    ]


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    """A results dir as a sweep leaves it: journal study, CSV, run dirs - built by hand.

    Trial 5 is a penalty record for trial 4; trial 7 is RUNNING (in the study, not the
    CSV); trial 1's recorded run_dir has moved; trials 2 and 6 have no step log. The CSV
    also holds a single run (no study), which is not a trial.
    """
    storage = JournalStorage(JournalFileBackend(str(tmp_path / JOURNAL_NAME)))
    study = optuna.create_study(storage=storage, study_name="lora_sweep", direction="maximize")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["stability_index"])
    study.set_user_attr("sweep.objective", {"stability_index": "maximize"})
    csv = tmp_path / RESULTS_FILENAME
    append_row(csv, {"run_id": "single", "status": "success", "stability_index": 0.99, "final_loss": 0.1})
    for number in range(8):
        params, dists = {}, {"train.lr": LR, "lora.r": R}
        if number == 5:  # penalty record standing in for the failed trial 4
            study.add_trial(
                create_trial(
                    state=TrialState.COMPLETE,
                    value=0.0,
                    params={"train.lr": 0.5, "lora.r": 32},
                    distributions=dists,
                    user_attrs={ATTR_PENALTY_FOR: 4, "status": "penalty"},
                    constraints={"c": 1.0},
                )
            )
            continue
        if number == 7:
            study.add_trial(
                create_trial(
                    state=TrialState.RUNNING,
                    params={"train.lr": 1e-3, "lora.r": 4},
                    distributions=dists,
                )
            )
            continue
        state, lr, r, stab, final, learned, status, reason = SPECS[number]
        params = {"train.lr": lr, "lora.r": r}
        run_dir = tmp_path / "sweeps" / "lora_sweep" / str(number)
        attrs = {
            "stability_index": stab,
            "final_loss": final,
            "learned": learned,
            "status": status,
            "reason": reason,
            "run_dir": str(run_dir if number != 1 else tmp_path / "moved" / "1"),
            "lora.alpha": 2.0 * r,
            "train.warmup_steps": 1,
        }
        steps = {0: 10, 1: 8, 3: 3, 4: 5}.get(number)
        if steps:
            run_dir.mkdir(parents=True)
            write_step_log(run_dir / "steps.csv", _steps(steps, 4.0 + number))
        study.add_trial(
            create_trial(
                state=TrialState[state],
                value=stab if state == "COMPLETE" else None,
                params=params,
                distributions=dists,
                user_attrs=attrs,
                intermediate_values={1: 1.0, 2: stab} if state != "FAIL" else {1: 1.0},
                constraints=None if state == "FAIL" else {"learned": -0.1 if learned else 0.1},
            )
        )
        append_row(
            csv,
            {
                "study_name": "lora_sweep",
                "trial_number": number,
                "state": state,
                "run_id": str(number),
                "status": status,
                "reason": reason,
                "lora.r": r,
                "lora.alpha": 2.0 * r,
                "train.lr": lr,
                "train.warmup_steps": 1,
                "stability_index": stab,
                "final_loss": final,
                "learned": learned,
                "steps_completed": steps or 0,
                "run_dir": attrs["run_dir"],
            },
        )
    return tmp_path


def test_load_trials_merges_csv_and_study(results_dir: Path) -> None:
    trials = analysis.load_trials(results_dir)
    assert list(trials["trial_number"]) == [0, 1, 2, 3, 4, 6, 7]  # no penalty record, no single run
    assert list(trials.columns[:4]) == ["trial_number", "state", "status", "reason"]
    states = dict(zip(trials["trial_number"], trials["state"], strict=False))
    assert states == {0: "COMPLETE", 1: "COMPLETE", 2: "COMPLETE", 3: "PRUNED", 4: "FAIL", 6: "COMPLETE", 7: "RUNNING"}
    row = trials.set_index("trial_number").loc[4]
    assert row["status"] == "diverged" and "drawup" in row["reason"]
    # CSV dtypes, study-only columns
    assert str(trials["lora.r"].dtype) == "Int64" and trials["train.lr"].dtype == np.float64
    assert str(trials["learned"].dtype) == "boolean"
    assert list(trials["feasible"].astype("boolean").fillna(False)) == [True, True, False, True, False, True, False]
    assert trials.set_index("trial_number").loc[0, "value"] == pytest.approx(0.8)
    assert math.isnan(trials.set_index("trial_number").loc[3, "value"])


def test_load_trials_sources(results_dir: Path) -> None:
    from_csv = analysis.load_trials(results_dir, source="csv")
    assert list(from_csv["trial_number"]) == [0, 1, 2, 3, 4, 6]
    assert list(from_csv["feasible"]) == list(from_csv["learned"])
    from_study = analysis.load_trials(results_dir, source="study")
    assert list(from_study["trial_number"]) == [0, 1, 2, 3, 4, 6, 7]
    assert from_study["stability_index"].iloc[:6].tolist() == from_csv["stability_index"].tolist()
    with pytest.raises(ValueError, match="source"):
        analysis.load_trials(results_dir, source="sql")
    (results_dir / JOURNAL_NAME).unlink()
    assert len(analysis.load_trials(results_dir)) == 6  # auto falls back to the CSV
    with pytest.raises(FileNotFoundError, match="optuna_journal.log"):
        analysis.load_study(results_dir)
    with pytest.raises(FileNotFoundError, match="lora_tuning_results.csv"):
        analysis.load_trials(results_dir / "nowhere")


def test_load_study_names_missing_study(results_dir: Path) -> None:
    with pytest.raises(KeyError, match="lora_sweep"):
        analysis.load_study(results_dir, "other")


def test_load_curves_long_form(results_dir: Path) -> None:
    trials = analysis.load_trials(results_dir)
    curves = analysis.load_curves(trials, results_dir=results_dir)
    assert list(curves.columns[:4]) == ["trial_number", "state", "status", "step"]
    assert {"loss", "grad_norm", "lr", "tokens", "real_tokens", "elapsed_s"} <= set(curves.columns)
    lengths = curves.groupby("trial_number").size().to_dict()
    assert lengths == {0: 10, 1: 8, 3: 3, 4: 5}  # trial 1 found although its run_dir moved
    first = curves[curves["trial_number"] == 3]
    assert list(first["step"]) == [1, 2, 3] and set(first["state"]) == {"PRUNED"}
    assert first["loss"].tolist() == pytest.approx([7.0, 3.5, 7.0 / 3])
    # without results_dir the moved run is skipped; an empty selection gives an empty frame
    assert 1 not in set(analysis.load_curves(trials)["trial_number"])
    empty = analysis.load_curves(trials.iloc[0:0])
    assert empty.empty and "loss" in empty.columns


def test_intermediate_values(results_dir: Path) -> None:
    values = analysis.intermediate_values(analysis.load_study(results_dir))
    assert list(values.columns) == ["trial_number", "state", "step", "value"]
    assert set(values["trial_number"]) == {0, 1, 2, 3, 4, 6}  # not the penalty record
    assert values[values["trial_number"] == 0]["value"].tolist() == [1.0, 0.8]


def test_by_state(results_dir: Path) -> None:
    trials = analysis.load_trials(results_dir)
    assert list(analysis.by_state(trials, "complete")["trial_number"]) == [0, 1, 2, 6]
    assert list(analysis.by_state(trials, "PRUNED", "FAIL")["trial_number"]) == [3, 4]
    with pytest.raises(ValueError, match="unknown state"):
        analysis.by_state(trials, "DONE")
    with pytest.raises(ValueError, match="at least one"):
        analysis.by_state(trials)


def test_best_trials_are_feasible_and_complete(results_dir: Path) -> None:
    trials = analysis.load_trials(results_dir)
    assert list(analysis.best_trials(trials)["trial_number"]) == [0, 6, 1]  # 2 is infeasible
    assert list(analysis.best_trials(trials, feasible_only=False, n=2)["trial_number"]) == [2, 0]
    assert list(analysis.best_trials(trials, metric="final_loss")["trial_number"]) == [1, 0, 6]
    with pytest.raises(ValueError, match="direction"):
        analysis.best_trials(trials, metric="lora.r")
    assert list(analysis.best_trials(trials, metric="lora.r", direction="maximize")["trial_number"]) == [1, 0, 6]
    # as the sweep's summary: only trials that learned at least half the largest held-out improvement
    held_out = trials.assign(eval_improvement=trials["trial_number"].map({0: 0.1, 1: 0.4, 2: 0.5, 6: 0.3}))
    assert list(analysis.best_trials(held_out)["trial_number"]) == [6, 1]  # 0 learned 0.1 < 0.5 x 0.5
    assert list(analysis.best_trials(held_out, learned_share=None)["trial_number"]) == [0, 6, 1]


def test_pareto_front(results_dir: Path) -> None:
    trials = analysis.load_trials(results_dir)
    # (final_loss, stability): 0 (2.0, .8), 1 (1.5, .6), 2 (3.0, .9), 6 (2.1, .7) - 6 is dominated by 0
    assert list(analysis.pareto_front(trials)["trial_number"]) == [1, 0, 2]
    assert list(analysis.pareto_front(trials, feasible_only=True)["trial_number"]) == [1, 0]
    assert list(analysis.pareto_front(trials, states=("COMPLETE", "PRUNED", "FAIL"))["trial_number"]) == [1, 0, 2]
    ties = pd.DataFrame(
        {"state": ["COMPLETE"] * 3, "final_loss": [1.0, 1.0, np.nan], "stability_index": [0.5, 0.5, 0.9]}
    )
    assert len(analysis.pareto_front(ties)) == 2  # equal points do not dominate each other; NaN ignored


def test_varied_params(results_dir: Path) -> None:
    trials = analysis.load_trials(results_dir)
    study = analysis.load_study(results_dir)
    assert analysis.varied_params(trials, study) == ["lora.r", "lora.alpha", "train.lr"]


def test_param_importances(results_dir: Path) -> None:
    study = analysis.load_study(results_dir)
    importances = analysis.param_importances(study)
    assert importances.name == "importance"
    assert set(importances.index) == {"train.lr", "lora.r"}
    assert importances.sum() == pytest.approx(1.0)
    assert list(importances) == sorted(importances, reverse=True)
    evaluator = optuna.importance.PedAnovaImportanceEvaluator(target_quantile=0.5, region_quantile=1.0)
    for_loss = analysis.param_importances(study, target="final_loss", evaluator=evaluator)
    assert set(for_loss.index) == {"train.lr", "lora.r"}
    only_lr = analysis.param_importances(study, params=["train.lr"])
    assert list(only_lr.index) == ["train.lr"] and only_lr.iloc[0] == pytest.approx(1.0)


def test_param_importances_too_few_trials(results_dir: Path) -> None:
    study = analysis.load_study(results_dir)
    # usable: COMPLETE 0, 1, 2, 6 and the diverged FAIL 4 (not the penalty, pruned or running ones)
    with pytest.raises(analysis.NotEnoughTrialsError, match="at least 6 .* has 5"):
        analysis.param_importances(study, min_trials=6)
    with pytest.raises(analysis.NotEnoughTrialsError, match="has 4"):
        analysis.param_importances(study, include_failed=False, min_trials=5)
    one = optuna.create_study(direction="maximize")
    one.add_trial(
        create_trial(
            value=0.5, params={"train.lr": 1e-3}, distributions={"train.lr": LR}, user_attrs={"stability_index": 0.5}
        )
    )
    with pytest.raises(analysis.NotEnoughTrialsError, match="n_trials"):
        analysis.param_importances(one)
    same = optuna.create_study(direction="maximize")
    for value in (0.1, 0.2, 0.3, 0.4):
        same.add_trial(
            create_trial(
                value=value,
                params={"train.lr": 1e-3},
                distributions={"train.lr": LR},
                user_attrs={"stability_index": value},
            )
        )
    with pytest.raises(analysis.NotEnoughTrialsError, match="two different values"):
        analysis.param_importances(same)
    assert issubclass(analysis.NotEnoughTrialsError, ValueError)


# ------------------------------------------------------------------------ the real sweep


@pytest.mark.slow
def test_analysis_on_a_real_sweep(tiny_sweep: Path) -> None:
    study = analysis.load_study(tiny_sweep)
    trials = analysis.load_trials(tiny_sweep)
    real = [t for t in study.get_trials() if ATTR_PENALTY_FOR not in t.user_attrs]
    assert list(trials["trial_number"]) == [t.number for t in real]
    assert list(trials["state"]) == [t.state.name for t in real]
    assert len(trials) == 6
    from_csv = analysis.load_trials(tiny_sweep, source="csv")
    assert from_csv["stability_index"].tolist() == pytest.approx(trials["stability_index"].tolist())
    assert {"lora.r", "lora.alpha", "train.lr", "final_loss", "stability_index", "run_dir", "feasible"} <= set(
        trials.columns
    )
    # config columns come typed from the config's fields, whether read from the study or the CSV
    from_study = analysis.load_trials(tiny_sweep, source="study")
    for frame in (from_study, from_csv):
        assert str(frame["data.mask_prompt"].dtype) == "boolean"
        assert str(frame["data.max_length"].dtype) == "Int64"
        # null targets (the default): peft's choice for Llama, recorded in adapted_modules
        assert set(frame["lora.target_modules"].fillna("")) == {""} and set(frame["adapted_modules"]) == {
            "q_proj,v_proj"
        }
        assert set(frame["model.dtype"]) == {"float32"} and set(frame["train.precision"]) == {"auto"}

    failed = analysis.by_state(trials, "FAIL")
    assert len(failed) >= 1 and set(failed["status"]) == {"diverged"} and (failed["stability_index"] == 0).all()

    curves = analysis.load_curves(trials)
    lengths = curves.groupby("trial_number").size()
    for _, row in trials.iterrows():
        assert lengths[row["trial_number"]] == row["steps_completed"] + 1  # + step 0: the base model's eval
        curve = curves[curves["trial_number"] == row["trial_number"]].set_index("step")
        assert curve.loc[0, "eval_loss"] == pytest.approx(row["eval_loss_base"]) and pd.isna(curve.loc[0, "loss"])
        if row["state"] == "COMPLETE":  # the held-out loss at the last step is the trial's eval_loss
            assert curve.loc[row["steps_completed"], "eval_loss"] == pytest.approx(row["eval_loss"])
    assert trials["eval_loss_base"].nunique() == 1  # every trial of a sweep starts from one base
    values = analysis.intermediate_values(study)
    complete = analysis.by_state(trials, "COMPLETE")
    assert set(complete["trial_number"]) <= set(values["trial_number"])

    best = analysis.best_trials(trials)
    assert len(best) >= 1 and (best["state"] == "COMPLETE").all() and best["feasible"].all()
    assert best["stability_index"].is_monotonic_decreasing
    front = analysis.pareto_front(trials)
    assert front["stability_index"].max() == complete["stability_index"].max()  # the most stable is on it
    assert front["final_loss"].min() == complete["final_loss"].min()  # and so is the lowest loss
    importances = analysis.param_importances(study)
    assert "train.lr" in importances.index and importances.sum() == pytest.approx(1.0)
