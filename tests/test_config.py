"""Every config option composes; bad values fail validation with one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lora_sweep.cli import config_dir, preflight
from lora_sweep.config import RunConfig
from lora_sweep.errors import INPUT_ERRORS, ConfigError, InputError, error_line

GROUPS = ("model", "data", "lora", "train")
REQUIRED_KEYS = [
    "lora.r",
    "lora.alpha",
    "lora.dropout",
    "lora.target_modules",
    "lora.use_rslora",
    "train.lr",
    "train.max_steps",
    "train.batch_size",
    "train.seed",
    "data.max_length",
]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_composes_and_validates(compose_cfg, group: str, option: str) -> None:
    extra = {"model/local": ["model.path=/some/ckpt"], "data/alpaca": ["data.path=/some/data.json"]}
    cfg = compose_cfg(f"{group}={option}", *extra.get(f"{group}/{option}", []))
    run_cfg = RunConfig.from_mapping(OmegaConf.to_container(cfg, resolve=True))
    assert run_cfg.results_dir == Path("results").absolute()


def test_group_options_exist() -> None:
    assert {"tiny_llama", "local"} <= set(_options("model"))
    assert {"sanity", "alpaca"} <= set(_options("data"))
    assert {"qv", "all_linear"} <= set(_options("lora"))
    assert "default" in _options("train")


def test_required_keys_exist(compose_cfg) -> None:
    cfg = compose_cfg()
    for key in REQUIRED_KEYS:
        assert OmegaConf.select(cfg, key, default="absent") != "absent", key
    assert cfg.results_dir == "results"
    assert cfg.lora.target_modules is None  # peft's default for the model type


BAD = [
    (["lora.r=0"], "lora.r must be an integer >= 1"),
    (["lora.r=2.5"], "lora.r must be an integer >= 1"),
    (["train.lr=-1"], "train.lr must be a number > 0"),
    (["train.lr=0"], "train.lr must be a number > 0"),
    (["train.lr=abc"], "train.lr must be a number"),
    (["data.max_length=4"], "data.max_length must be an integer >= 8"),
    (["lora.dropout=1.5"], "lora.dropout must be a number"),
    (["train.warmup_steps=60", "train.max_steps=60"], "train.warmup_steps (60) must be smaller"),
    (["train.lr_scheduler=step"], "train.lr_scheduler must be one of cosine, linear, constant"),
    (["model.attn_implementation=flash"], "model.attn_implementation must be one of auto, sdpa, eager"),
    (["data=chat", "data.train_on=prompt"], "data.train_on must be one of assistant, all"),
    (["data=chat", "+data.mask_prompt=true"], "data.mask_prompt applies to instruction records"),
    (["data.template=chatml"], "data.template must be one of alpaca, plain, chat"),
    (["train.grad_accum_steps=0"], "train.grad_accum_steps must be an integer >= 1"),
    (["lora.init=loftq"], "lora.init must be one of default, gaussian, pissa, olora"),
    (["lora.use_dora=maybe"], "lora.use_dora must be true or false"),
    (["train.loraplus_lr_ratio=0.5"], "train.loraplus_lr_ratio must be a number >= 1.0"),
    (["train.save_adapter=best"], "train.save_adapter must be one of best_k, all, none"),
    (["lora.target_modules=[]"], "lora.target_modules must be a non-empty list"),
    (["lora.target_modules=attention"], "lora.target_modules must be a list of module names, 'all-linear' or null"),
    (["model=local"], "model.path is required"),
    (["data=alpaca"], "data.path is required"),
    (["+lora.rank=3"], "unknown key lora.rank"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_values_rejected_with_one_line(compose_cfg, overrides: list[str], message: str) -> None:
    cfg = compose_cfg(*overrides)
    with pytest.raises(ConfigError) as info:
        RunConfig.from_mapping(OmegaConf.to_container(cfg, resolve=True))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["lora=foo"], "Could not find 'lora/foo'; Available options in 'lora': all_linear, default, qv"),
        (["lora.rank=3"], "Could not override 'lora.rank'"),
        (["lora.r=choice(1,2"], "bad override"),
        (["train.lr=-1"], "train.lr must be a number > 0"),
        (["-m", "lora.r=0", "train.lr=tag(log, interval(1e-4, 1e-2))"], "lora.r must be an integer >= 1"),
    ],
)
def test_preflight_reports_hydra_and_validation_errors_in_one_line(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        preflight(argv)
    line = error_line(info.value)
    assert message in line
    assert "\n" not in line


def test_preflight_leaves_sweep_expressions_to_the_sweeper() -> None:
    preflight(["-m", "lora.r=choice(4,8)", "train.lr=tag(log, interval(1e-4, 1e-2))"])  # no error


def test_preflight_skips_help_and_info_flags() -> None:
    preflight(["--cfg", "job", "lora.r=0"])  # Hydra handles these flags itself


def test_null_target_modules_means_peft_defaults(compose_cfg) -> None:
    cfg = RunConfig.from_mapping(OmegaConf.to_container(compose_cfg("lora.target_modules=null"), resolve=True))
    assert cfg.lora.target_modules is None and cfg.lora.targets_label == "auto"
    assert cfg.flat_values()["lora.target_modules"] is None


def test_flat_values_cover_every_section_field(compose_cfg) -> None:
    cfg = RunConfig.from_mapping(OmegaConf.to_container(compose_cfg("data.mask_prompt=true", "lora=qv"), resolve=True))
    values = cfg.flat_values()
    assert values["data.mask_prompt"] is True and values["lora.target_modules"] == "q_proj,v_proj"
    assert values["model.dtype"] == "float32" and values["train.precision"] == "auto"


def test_every_input_error_is_one_input_error_class() -> None:
    assert all(issubclass(kind, InputError) and issubclass(kind, ValueError) for kind in INPUT_ERRORS)
    assert len(set(INPUT_ERRORS)) == 4
