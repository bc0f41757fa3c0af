"""Typed, validated run configuration.

Hydra composes a plain mapping; `RunConfig.from_mapping` turns it into frozen dataclasses
whose `__post_init__` checks every field, so a wrong type or an impossible value fails
before any model is loaded, with one line naming the key and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
DTYPES = ("float32", "bfloat16", "float16")
TEMPLATES = ("alpaca", "plain")
PADDINGS = ("longest", "max_length")
LR_SCHEDULERS = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
MIN_MAX_LENGTH = 8


class ConfigError(ValueError):
    """An invalid configuration value; the message is one line naming the key and the fix."""


def _fail(key: str, expected: str, value: Any, example: str) -> None:
    raise ConfigError(f"{key} must be {expected}, got {value!r} (for example: {key}={example})")


def _check_int(key: str, value: Any, minimum: int, example: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(key, f"an integer >= {minimum}", value, example)


def _check_float(
    key: str, value: Any, *, low: float, high: float = math.inf, low_open: bool = False, example: str
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"> {low}" if low_open else f">= {low}"
        expected = f"a number {bound}" + (f" and <= {high}" if high != math.inf else "")
        _fail(key, expected, value, example)


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(key, "one of " + ", ".join(choices), value, choices[0])


def _check_bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(key, "true or false", value, "true")


def _check_optional_path(key: str, value: Any) -> None:
    if value == "???":  # OmegaConf's mandatory-value marker, left unset by the user
        raise ConfigError(f"{key} is required for this option; set it with {key}=/path/to/it")
    if value is not None and (not isinstance(value, str) or not value.strip()):
        _fail(key, "a path (or null for the embedded default)", value, "/path/to/file")


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint to fine-tune and how to load it."""

    name: str
    path: str | None
    attn_implementation: str = "sdpa"
    dtype: str = "float32"
    trust_remote_code: bool = False
    self_check: bool = True

    def __post_init__(self) -> None:
        _check_optional_path("model.path", self.path)
        _check_choice("model.attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        _check_choice("model.dtype", self.dtype, DTYPES)
        _check_bool("model.trust_remote_code", self.trust_remote_code)
        _check_bool("model.self_check", self.self_check)


@dataclass(frozen=True)
class DataConfig:
    """Which records to train on and how to turn them into token batches."""

    name: str
    path: str | None
    template: str = "alpaca"
    max_length: int = 256
    mask_prompt: bool = False
    padding: str = "longest"
    group_by_length: bool = False

    def __post_init__(self) -> None:
        _check_optional_path("data.path", self.path)
        _check_choice("data.template", self.template, TEMPLATES)
        _check_int("data.max_length", self.max_length, MIN_MAX_LENGTH, "256")
        _check_bool("data.mask_prompt", self.mask_prompt)
        _check_choice("data.padding", self.padding, PADDINGS)
        _check_bool("data.group_by_length", self.group_by_length)


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA adapter: rank, scaling and where it is applied."""

    r: int
    alpha: float
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")
    use_rslora: bool = False

    def __post_init__(self) -> None:
        _check_int("lora.r", self.r, 1, "8")
        _check_float("lora.alpha", self.alpha, low=0.0, low_open=True, example="16")
        _check_float("lora.dropout", self.dropout, low=0.0, high=0.99, example="0.05")
        _check_bool("lora.use_rslora", self.use_rslora)
        targets = self.target_modules
        if isinstance(targets, str):
            if targets != "all-linear":
                _fail("lora.target_modules", "a list of module names or 'all-linear'", targets, "[q_proj,v_proj]")
        elif not targets or not all(isinstance(t, str) and t for t in targets):
            _fail("lora.target_modules", "a non-empty list of module names", list(targets), "[q_proj,v_proj]")

    @property
    def targets_label(self) -> str:
        """The target modules as one comma-joined string (for the CSV and logs)."""
        return self.target_modules if isinstance(self.target_modules, str) else ",".join(self.target_modules)


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop."""

    lr: float
    max_steps: int
    batch_size: int
    seed: int = 0
    warmup_steps: int = 0
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    min_improvement: float = 0.05
    device: str = "auto"
    log_every: int = 10
    precision: str = "auto"

    def __post_init__(self) -> None:
        _check_float("train.lr", self.lr, low=0.0, low_open=True, high=10.0, example="1e-3")
        _check_int("train.max_steps", self.max_steps, 1, "60")
        _check_int("train.batch_size", self.batch_size, 1, "8")
        _check_int("train.seed", self.seed, 0, "0")
        _check_int("train.warmup_steps", self.warmup_steps, 0, "5")
        if self.warmup_steps >= self.max_steps:
            raise ConfigError(
                f"train.warmup_steps ({self.warmup_steps}) must be smaller than train.max_steps "
                f"({self.max_steps}); lower train.warmup_steps or raise train.max_steps"
            )
        _check_choice("train.lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        _check_float("train.weight_decay", self.weight_decay, low=0.0, example="0.0")
        _check_float("train.max_grad_norm", self.max_grad_norm, low=0.0, low_open=True, example="1.0")
        _check_float("train.min_improvement", self.min_improvement, low=0.0, high=1.0, example="0.05")
        device = self.device
        if not (device in ("auto", "cpu", "cuda") or (isinstance(device, str) and device.startswith("cuda:"))):
            _fail("train.device", "auto, cpu, cuda or cuda:N", device, "auto")
        _check_int("train.log_every", self.log_every, 1, "10")
        _check_choice("train.precision", self.precision, PRECISIONS)


@dataclass(frozen=True)
class RunConfig:
    """Everything one trial needs, validated."""

    model: ModelConfig
    data: DataConfig
    lora: LoraSettings
    train: TrainConfig
    results_dir: Path

    @property
    def csv_path(self) -> Path:
        return self.results_dir / "lora_tuning_results.csv"

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> RunConfig:
        """Build from a resolved plain mapping (e.g. `OmegaConf.to_container(cfg, resolve=True)`)."""
        results_dir = cfg.get("results_dir")
        if not isinstance(results_dir, str) or not results_dir.strip():
            _fail("results_dir", "a directory path", results_dir, "results")
        lora = dict(_section(cfg, "lora", LoraSettings))
        if isinstance(lora.get("target_modules"), list):
            lora["target_modules"] = tuple(lora["target_modules"])
        return cls(
            model=ModelConfig(**_section(cfg, "model", ModelConfig)),
            data=DataConfig(**_section(cfg, "data", DataConfig)),
            lora=LoraSettings(**lora),
            train=TrainConfig(**_section(cfg, "train", TrainConfig)),
            results_dir=Path(results_dir).expanduser().absolute(),
        )


def _section(cfg: Mapping[str, Any], name: str, schema: type) -> dict[str, Any]:
    """The `name` section of `cfg`, with unknown and missing keys reported by name."""
    section = cfg.get(name)
    if not isinstance(section, Mapping):
        raise ConfigError(f"config section '{name}' is missing; select one, e.g. {name}=<option>")
    known = {f.name for f in fields(schema)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(
            f"unknown key {name}.{unknown[0]}; valid keys of '{name}': {', '.join(sorted(known))}"
        )
    required = {f.name for f in fields(schema) if f.default is MISSING}
    missing = sorted(k for k in required if k not in section)
    if missing:
        raise ConfigError(f"{name}.{missing[0]} is required; set it with {name}.{missing[0]}=<value>")
    return dict(section)
