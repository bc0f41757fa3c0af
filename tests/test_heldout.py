"""Held-out evaluation inside a trial: what is recorded, and that "learned" is judged on it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from lora_sweep.cache import TrialCache
from lora_sweep.config import RunConfig
from lora_sweep.metrics import eval_summary
from lora_sweep.trial import run_trial
from tests.conftest import TINY


def _cfg(compose_cfg, tmp_path: Path, *overrides: str) -> RunConfig:
    cfg = compose_cfg(f"results_dir={tmp_path}", *TINY, "train.eval_every=3", *overrides)
    return RunConfig.from_mapping(OmegaConf.to_container(cfg, resolve=True))


def test_eval_summary_judges_learning_on_the_held_out_loss() -> None:
    points = [(0, 4.0), (10, 3.0), (20, 3.5)]
    summary = eval_summary(points, final_loss=2.0, min_improvement=0.05)
    assert summary["eval_loss"] == 3.5 and summary["eval_loss_base"] == 4.0
    assert summary["eval_improvement"] == pytest.approx(0.125)
    assert (summary["best_eval_loss"], summary["best_eval_step"]) == (3.0, 10)
    assert summary["generalization_gap"] == pytest.approx(1.5)
    assert summary["learned"] and summary["constraint"] == pytest.approx(0.05 - 0.125)
    flat = eval_summary([(0, 4.0), (20, 3.9)], final_loss=1.0, min_improvement=0.05)  # training loss fell a lot
    assert not flat["learned"] and flat["constraint"] > 0
    assert not eval_summary([(0, 4.0), (20, 3.0)], final_loss=1.0, min_improvement=0.05, finite_run=False)["learned"]
    nothing = eval_summary([(0, 4.0)], final_loss=1.0, min_improvement=0.05)
    assert math.isnan(nothing["eval_loss"]) and nothing["constraint"] >= 1.0 and not nothing["learned"]


def test_trial_records_held_out_losses_everywhere(compose_cfg, tmp_path: Path) -> None:
    result = run_trial(_cfg(compose_cfg, tmp_path), tmp_path / "run")
    assert result.status == "success"
    evals = pd.read_csv(tmp_path / "run" / "evals.csv")
    assert evals["step"].tolist() == [0, 3, 6]  # the base model, every eval_every steps, the end
    m = result.metrics
    assert m["eval_loss_base"] == evals["loss"].iloc[0] and m["eval_loss"] == evals["loss"].iloc[-1]
    assert m["eval_improvement"] == pytest.approx(1 - m["eval_loss"] / m["eval_loss_base"])
    assert m["generalization_gap"] == pytest.approx(m["eval_loss"] - m["final_loss"])
    assert m["best_eval_loss"] == evals["loss"].min()
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["metrics"]["eval_loss"] == m["eval_loss"] and saved["eval_seconds"] > 0
    row = result.csv_row(_cfg(compose_cfg, tmp_path))
    assert row["eval_loss"] == m["eval_loss"] and row["best_eval_step"] == m["best_eval_step"]


def test_a_trial_that_does_not_learn_held_out_is_infeasible(compose_cfg, tmp_path: Path) -> None:
    result = run_trial(_cfg(compose_cfg, tmp_path, "train.lr=1e-7"), tmp_path / "run")
    m = result.metrics
    assert result.status == "success" and not m["learned"]
    assert m["constraint"] == pytest.approx(0.05 - m["eval_improvement"]) and m["constraint"] > 0


def test_base_eval_is_the_same_for_every_trial_and_measured_once(compose_cfg, tmp_path: Path) -> None:
    cache = TrialCache()
    first = run_trial(_cfg(compose_cfg, tmp_path), tmp_path / "a", cache=cache)
    second = run_trial(_cfg(compose_cfg, tmp_path, "train.seed=3", "data.max_length=32"), tmp_path / "b", cache=cache)
    cold = run_trial(_cfg(compose_cfg, tmp_path, "train.seed=3", "data.max_length=32"), tmp_path / "c")
    # data.max_length is searched; the held-out sequences keep their own length
    assert first.metrics["eval_loss_base"] == second.metrics["eval_loss_base"] == cold.metrics["eval_loss_base"]
    assert pd.read_csv(tmp_path / "b" / "evals.csv")["seconds"].iloc[0] == 0.0  # cached, not measured again
    assert second.metrics == cold.metrics  # the cache changes no number


def test_an_explicit_validation_file_is_used_whole(compose_cfg, tmp_path: Path, alpaca_files) -> None:
    records = alpaca_files.records
    val = tmp_path / "val.json"
    val.write_text(json.dumps(records[:5]))
    result = run_trial(_cfg(compose_cfg, tmp_path, f"data.val_path={val}"), tmp_path / "run")
    split = run_trial(_cfg(compose_cfg, tmp_path), tmp_path / "split")
    assert result.status == "success" and result.metrics["eval_loss_base"] != split.metrics["eval_loss_base"]


def test_a_held_out_set_that_cannot_be_tokenized_is_refused_and_the_model_given_back(compose_cfg, tmp_path) -> None:
    from lora_sweep.errors import DataError
    from lora_sweep.trial import prepare

    cache = TrialCache()
    cfg = _cfg(compose_cfg, tmp_path, "data.mask_prompt=true", "data.eval_max_length=8")
    with pytest.raises(DataError, match=r"within data\.eval_max_length=8 tokens; raise data\.eval_max_length"):
        prepare(cfg, cache)
    (entry,) = cache.models
    assert not entry.in_use and not any("lora_" in name for name, _ in entry.model.named_modules())
