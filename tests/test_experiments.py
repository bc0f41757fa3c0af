"""The experiments (conf/experiment/*.yaml): they compose as grid sweeps, and their curves."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from lora_sweep import experiments
from lora_sweep.cli import config_dir
from lora_sweep.sweep.samplers import grid_size, is_grid
from lora_sweep.sweep.space import parse_search_space
from tests.conftest import REPO, sweeps_once

EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
# experiment -> its parameters that vary (the figure's axes) and their values in the full grid
AXES = {
    "rslora": {"lora.r": [1, 4, 16, 64], "lora.use_rslora": [False, True], "train.seed": [0, 1, 2]},
    "lora_without_regret": {"lora.r": [1, 4, 16, 64], "train.lr": [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2]},
    "loraplus": {
        "train.loraplus_lr_ratio": [1, 4, 16, 64],
        "train.lr": [5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2],
        "train.seed": [0, 1],
    },
}
# experiment -> overrides of its tiny version (CI): 4 grid points of a few steps each
TINY_EXPERIMENTS = {
    "rslora": ["lora.r=choice(1,4)", "train.seed=0"],
    "lora_without_regret": [
        "lora.r=choice(1,4)",
        "train.lr=choice(1e-3,1e-2)",
    ],
    "loraplus": [
        "train.loraplus_lr_ratio=choice(1,16)",
        # B's rate is lr x ratio: 1e-2 x 16 collapsed to uniform in 4 steps (a real divergence)
        "train.lr=choice(1e-3,3e-3)",
        "train.seed=0",
    ],
}
TINY_STEPS = ["train.max_steps=4", "train.eval_every=2", "train.warmup_steps=1", "train.batch_size=4"]


def _compose(*overrides: str) -> dict:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
        return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]
    finally:
        GlobalHydra.instance().clear()


def test_every_experiment_is_covered() -> None:
    assert EXPERIMENTS == sorted(AXES) == sorted(TINY_EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_as_a_full_grid(name: str) -> None:
    cfg = _compose(f"experiment={name}")
    sweeper = cfg["hydra"]["sweeper"]
    assert is_grid(sweeper["sampler"])
    assert sweeper["pruner"] is None  # every grid point runs to its last step
    assert sweeper["objective"] == "eval_loss" and sweeper["study_name"] == name
    assert sweeper["custom_search_space"] is None and sweeper["enqueue"] == []
    space = parse_search_space(sweeper["params"])
    varied = {key: list(dist.choices) for key, dist in space.distributions.items()}
    assert varied == AXES[name]
    # n_trials is the grid: a larger one would be capped, a smaller one would leave points out
    assert sweeper["n_trials"] == grid_size(space.distributions) == math.prod(len(v) for v in AXES[name].values())
    # the experiment's fixed values reach the trial, and the default sweep's data.max_length choice does not
    assert str(space.fixed["data.max_length"]) == "128"
    assert cfg["train"]["save_adapter"] == "none" and cfg["train"]["sample_prompts"] == 0


def test_without_an_experiment_the_default_sweep_is_unchanged() -> None:
    sweeper = _compose()["hydra"]["sweeper"]
    assert not is_grid(sweeper["sampler"]) and sweeper["study_name"] == "lora_sweep"
    assert sweeper["pruner"]["_target_"].endswith("StepPercentilePruner")


def _trials() -> pd.DataFrame:
    rows = [
        # r, seed, eval_loss, state
        (1, 0, 2.0, "COMPLETE"),
        (1, 1, 2.2, "COMPLETE"),
        (1, 2, 2.4, "COMPLETE"),
        (4, 0, 1.8, "COMPLETE"),
        (4, 1, 5.0, "FAIL"),  # diverged: its loss counts
        (4, 2, float("nan"), "FAIL"),  # no held-out loss: left out
        (16, 0, None, "PRUNED"),
    ]
    frame = pd.DataFrame(rows, columns=["lora.r", "train.seed", "eval_loss", "state"])
    return frame.assign(scaling=["a", "a", "b", "a", "a", "a", "a"])


def test_grid_curves_median_spread_and_failures() -> None:
    curves = experiments.grid_curves(_trials(), x="lora.r")
    assert curves["lora.r"].tolist() == [1, 4]
    assert curves["median"].tolist() == pytest.approx([2.2, 3.4])
    assert curves["min"].tolist() == pytest.approx([2.0, 1.8]) and curves["max"].tolist() == pytest.approx([2.4, 5.0])
    assert curves["n"].tolist() == [3, 2] and curves["n_failed"].tolist() == [0, 1]
    by = experiments.grid_curves(_trials(), x="lora.r", by="scaling")
    assert by[["scaling", "lora.r", "n"]].values.tolist() == [["a", 1, 2], ["a", 4, 2], ["b", 1, 1]]


def test_curve_minima_and_spread() -> None:
    curves = pd.DataFrame(
        {"r": [1, 1, 1, 4, 4, 4], "lr": [1e-3, 2e-3, 4e-3] * 2, "median": [3, 2, 2.5, 3, 2.8, 1], "n": [1] * 6}
    )
    minima = experiments.curve_minima(curves, x="lr", by="r")
    assert minima[["r", "lr"]].values.tolist() == [[1, 2e-3], [4, 4e-3]]
    assert experiments.spread_ratio(minima["lr"]) == pytest.approx(2.0)
    assert experiments.curve_minima(curves, x="lr")["median"].item() == 1
    with pytest.raises(ValueError, match="no positive values"):
        experiments.spread_ratio(pd.Series([0.0, float("nan")]))


def test_grid_curves_names_what_is_missing() -> None:
    with pytest.raises(KeyError, match="no column 'train.lr'"):
        experiments.grid_curves(_trials(), x="train.lr")
    with pytest.raises(ValueError, match="has the experiment's sweep run"):
        experiments.grid_curves(_trials().assign(eval_loss=None), x="lora.r")


def tiny_experiments_dir(base: Path) -> Path:
    """One results dir holding the tiny version of every experiment (a study each)."""
    return sweeps_once(base, *([f"experiment={name}", *TINY_EXPERIMENTS[name], *TINY_STEPS] for name in EXPERIMENTS))


@pytest.fixture(scope="session")
def tiny_experiments(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_experiments_dir(tmp_path_factory.getbasetemp() / "tiny_experiments")


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_tiny_experiment_runs_its_whole_grid(name: str, tiny_experiments: Path) -> None:
    from lora_sweep import analysis

    trials = analysis.load_trials(tiny_experiments, study_name=name)
    assert len(trials) == 4 and set(trials["state"]) == {"COMPLETE"}
    varied = [key for key in AXES[name] if trials[key].nunique() > 1]
    # every grid point exactly once (the grid's order is one across workers)
    assert not trials.duplicated(subset=varied).any()
    assert trials["eval_loss"].notna().all() and (trials["train.max_steps"] == 4).all()
