"""Typed, validated run configuration.

Hydra composes a plain mapping; `RunConfig.from_mapping` turns it into frozen dataclasses
whose `__post_init__` checks every field, so a wrong type or an impossible value fails
before any model is loaded, with one line naming the key and the fix.

Every field of the four sections documents itself (`metadata["doc"]`): `config_keys` lists
them as dotted keys with their scalar types, and the results CSV has one column per key.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

from lora_sweep.errors import ConfigError

ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager")
DTYPES = ("float32", "bfloat16")  # float16 base weights: refused, see `FP16_REFUSED`
TEMPLATES = ("alpaca", "plain", "chat")
TRAIN_ON = ("assistant", "all")
PADDINGS = ("longest", "max_length")
LR_SCHEDULERS = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
PRUNE_ON = ("eval", "objective")
SAVE_ADAPTER = ("best_k", "all", "none")
LORA_INITS = ("default", "gaussian", "pissa", "olora")
MIN_MAX_LENGTH = 8
# Training on fp16 base weights needs a gradient scaler (fp16's range underflows small
# gradients and overflows large activations); the loop uses none, bf16 has fp32's range.
FP16_REFUSED = (
    "model.dtype=float16 cannot be trained here (fp16 needs a gradient scaler, which this trainer does not use): "
    "use model.dtype=bfloat16, or model.dtype=float32 with train.precision=bf16"
)


def _fail(key: str, expected: str, value: Any, example: str) -> NoReturn:
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


def documented(doc: str, *, default: Any = MISSING) -> Any:
    """A config field with its one-line doc (`metadata["doc"]`, the results column's doc too)."""
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint to fine-tune and how to load it."""

    name: str = documented("model option name, e.g. tiny_llama or local")
    path: str | None = documented("checkpoint directory (empty: the embedded tiny Llama)")
    attn_implementation: str = documented(
        "attention kernel: auto (SDPA where the model has it, else eager), sdpa or eager", default="auto"
    )
    dtype: str = documented("dtype of the base weights (LoRA weights stay float32)", default="float32")
    trust_remote_code: bool = documented("whether the checkpoint's own modelling code may run", default=False)
    self_check: bool = documented("whether the start-up self-check ran (true/false)", default=True)

    def __post_init__(self) -> None:
        _check_optional_path("model.path", self.path)
        _check_choice("model.attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        if self.dtype == "float16":
            raise ConfigError(FP16_REFUSED)
        _check_choice("model.dtype", self.dtype, DTYPES)
        _check_bool("model.trust_remote_code", self.trust_remote_code)
        _check_bool("model.self_check", self.self_check)


@dataclass(frozen=True)
class DataConfig:
    """Which records to train on and how to turn them into token batches."""

    name: str = documented("data option name, e.g. sanity or alpaca")
    path: str | None = documented(
        "training data: JSON, JSONL, Parquet or a save_to_disk directory (empty: the embedded sanity samples)"
    )
    template: str = documented(
        "record format and prompt: alpaca or plain (instruction records), chat (conversations, the tokenizer's "
        "chat template)",
        default="alpaca",
    )
    max_length: int = documented("maximum tokens per sequence", default=256)
    mask_prompt: bool = documented(
        "instruction records: train on the response only, prompt labels masked (true/false)", default=False
    )
    train_on: str = documented(
        "chat: the tokens trained on, assistant (assistant turns only) or all (every token)", default="assistant"
    )
    padding: str = documented("batch padding: longest (each batch to its longest) or max_length", default="longest")
    group_by_length: bool = documented("batches of similar lengths (true/false)", default=False)
    packing: bool = documented(
        "concatenate examples into rows with no attention across them: no padding, the same tokens per step "
        "(true/false)",
        default=True,
    )
    val_size: float = documented(
        "held-out records: a fraction (< 1, at least 4 records) or a count (>= 1); ignored with val_path",
        default=0.1,
    )
    val_path: str | None = documented(
        "validation data, in any format data.path takes (empty: split val_size off data.path)", default=None
    )
    val_seed: int = documented("seed of the validation split (independent of train.seed)", default=0)
    eval_max_length: int | None = documented(
        "tokens per held-out sequence, fixed for the whole sweep whatever data.max_length a trial "
        "trains with (empty: the model's context, at most 2048)",
        default=None,
    )

    def __post_init__(self) -> None:
        _check_optional_path("data.path", self.path)
        _check_choice("data.template", self.template, TEMPLATES)
        _check_int("data.max_length", self.max_length, MIN_MAX_LENGTH, "256")
        _check_bool("data.mask_prompt", self.mask_prompt)
        _check_choice("data.train_on", self.train_on, TRAIN_ON)
        if self.template == "chat" and self.mask_prompt:
            raise ConfigError(
                "data.mask_prompt applies to instruction records; with data.template=chat the loss is on the "
                "assistant turns by default (data.train_on=assistant): drop data.mask_prompt=true"
            )
        _check_choice("data.padding", self.padding, PADDINGS)
        _check_bool("data.group_by_length", self.group_by_length)
        _check_bool("data.packing", self.packing)
        if self.packing and self.group_by_length:
            raise ConfigError(
                "data.group_by_length=true needs data.packing=false: packing (the default) fills its rows "
                "itself; add data.packing=false, or drop data.group_by_length"
            )
        if self.packing and self.padding != "longest":
            raise ConfigError(
                f"data.padding={self.padding} needs data.packing=false: packed rows (the default) are not "
                "padded per sequence; add data.packing=false, or drop data.padding"
            )
        _check_float("data.val_size", self.val_size, low=0.0, low_open=True, example="0.1")
        if self.val_size >= 1 and not float(self.val_size).is_integer():
            _fail("data.val_size", "a fraction below 1 or a whole number of records", self.val_size, "0.1")
        if self.val_path is not None:
            _check_optional_path("data.val_path", self.val_path)
        _check_int("data.val_seed", self.val_seed, 0, "0")
        if self.eval_max_length is not None:
            _check_int("data.eval_max_length", self.eval_max_length, MIN_MAX_LENGTH, "512")


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA adapter: rank, scaling and where it is applied."""

    r: int = documented("LoRA rank")
    alpha: float = documented("LoRA scaling numerator alpha")
    dropout: float = documented("dropout on the LoRA input", default=0.0)
    target_modules: tuple[str, ...] | str | None = documented(
        "module names asked for, comma-separated, or all-linear; empty: peft's default for the model type "
        "(adapted_modules has what was adapted)",
        default=("q_proj", "v_proj"),
    )
    use_rslora: bool = documented("rank-stabilised scaling alpha/sqrt(r) instead of alpha/r", default=False)
    use_dora: bool = documented(
        "DoRA: weight-decomposed LoRA, a learned magnitude per output (true/false)", default=False
    )
    init: str = documented(
        "adapter initialisation: default (A Kaiming-uniform, B 0), gaussian, pissa (principal singular vectors "
        "of W) or olora (QR of W); pissa and olora move W's part into the adapter",
        default="default",
    )

    def __post_init__(self) -> None:
        _check_int("lora.r", self.r, 1, "8")
        _check_float("lora.alpha", self.alpha, low=0.0, low_open=True, example="16")
        _check_float("lora.dropout", self.dropout, low=0.0, high=0.99, example="0.05")
        _check_bool("lora.use_rslora", self.use_rslora)
        _check_bool("lora.use_dora", self.use_dora)
        _check_choice("lora.init", self.init, LORA_INITS)
        targets = self.target_modules
        if targets is None:
            return  # peft's default target modules for the model type (refused where it has none)
        if isinstance(targets, str):
            if targets != "all-linear":
                _fail("lora.target_modules", "a list of module names, 'all-linear' or null", targets, "[q_proj,v_proj]")
        elif not targets or not all(isinstance(t, str) and t for t in targets):
            _fail("lora.target_modules", "a non-empty list of module names", list(targets), "[q_proj,v_proj]")

    @property
    def targets_label(self) -> str:
        """The target modules as one string for logs: comma-joined, `all-linear`, or `auto`
        (null: peft's default for the model type)."""
        if self.target_modules is None:
            return "auto"
        return self.target_modules if isinstance(self.target_modules, str) else ",".join(self.target_modules)


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop."""

    lr: float = documented("peak learning rate")
    max_steps: int = documented("optimizer steps requested")
    batch_size: int = documented("sequences per micro-batch (per optimizer step: batch_size x grad_accum_steps)")
    grad_accum_steps: int = documented(
        "micro-batches per optimizer step; the loss is averaged over all their label tokens", default=1
    )
    seed: int = documented("random seed", default=0)
    warmup_steps: int = documented("learning-rate warm-up steps (W in the metrics)", default=0)
    lr_scheduler: str = documented("learning-rate schedule after warm-up", default="cosine")
    weight_decay: float = documented("AdamW weight decay", default=0.0)
    loraplus_lr_ratio: float = documented(
        "LoRA+: learning rate of the B matrices over that of A (1: plain LoRA, one learning rate)", default=1.0
    )
    max_grad_norm: float = documented("gradient clipping threshold on the total norm", default=1.0)
    min_improvement: float = documented(
        "held-out improvement a run needs to count as learned: eval_loss <= (1 - this) * eval_loss_base", default=0.05
    )
    eval_every: int = documented(
        "optimizer steps between held-out evaluations (also at step 0 and the end)", default=20
    )
    prune_on: str = documented(
        "what a sweep's pruner compares: eval (held-out improvement at eval steps) or objective (every report)",
        default="eval",
    )
    device: str = documented("device asked for: auto, cpu, cuda or cuda:N (device: the one used)", default="auto")
    log_every: int = documented("optimizer steps between log lines", default=10)
    precision: str = documented("precision asked for: auto, fp32 or bf16 (precision: the one used)", default="auto")
    save_adapter: str = documented(
        "adapters kept in run directories: best_k (the keep_adapters best of the study), all or none",
        default="best_k",
    )
    keep_adapters: int = documented("k of save_adapter=best_k: how many of the best adapters stay on disk", default=3)
    sample_prompts: int = documented(
        "validation prompts answered by greedy decoding after a completed trial (0: none)", default=3
    )
    sample_max_new_tokens: int = documented("tokens generated per sample answer", default=32)

    def __post_init__(self) -> None:
        _check_float("train.lr", self.lr, low=0.0, low_open=True, high=10.0, example="1e-3")
        _check_int("train.max_steps", self.max_steps, 1, "60")
        _check_int("train.batch_size", self.batch_size, 1, "8")
        _check_int("train.grad_accum_steps", self.grad_accum_steps, 1, "4")
        _check_int("train.seed", self.seed, 0, "0")
        _check_int("train.warmup_steps", self.warmup_steps, 0, "5")
        if self.warmup_steps >= self.max_steps:
            raise ConfigError(
                f"train.warmup_steps ({self.warmup_steps}) must be smaller than train.max_steps "
                f"({self.max_steps}); lower train.warmup_steps or raise train.max_steps"
            )
        _check_choice("train.lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        _check_float("train.weight_decay", self.weight_decay, low=0.0, example="0.0")
        _check_float("train.loraplus_lr_ratio", self.loraplus_lr_ratio, low=1.0, high=1024.0, example="16")
        _check_float("train.max_grad_norm", self.max_grad_norm, low=0.0, low_open=True, example="1.0")
        _check_float("train.min_improvement", self.min_improvement, low=0.0, high=1.0, example="0.05")
        device = self.device
        index = device.removeprefix("cuda:") if isinstance(device, str) and device.startswith("cuda:") else ""
        if not (device in ("auto", "cpu", "cuda") or (index.isascii() and index.isdigit())):
            _fail("train.device", "auto, cpu, cuda or cuda:N", device, "auto")
        _check_int("train.log_every", self.log_every, 1, "10")
        _check_int("train.eval_every", self.eval_every, 1, "20")
        _check_choice("train.prune_on", self.prune_on, PRUNE_ON)
        _check_choice("train.precision", self.precision, PRECISIONS)
        _check_choice("train.save_adapter", self.save_adapter, SAVE_ADAPTER)
        _check_int("train.keep_adapters", self.keep_adapters, 1, "3")
        _check_int("train.sample_prompts", self.sample_prompts, 0, "3")
        _check_int("train.sample_max_new_tokens", self.sample_max_new_tokens, 1, "32")


@dataclass(frozen=True)
class RunConfig:
    """Everything one trial needs, validated."""

    model: ModelConfig
    data: DataConfig
    lora: LoraSettings
    train: TrainConfig
    results_dir: Path

    def flat_values(self) -> dict[str, Any]:
        """`{"model.path": ..., "lora.r": ..., ...}` for every key of `config_keys`, in order;
        a list of target modules comma-joined (a results cell, a study user attribute)."""
        values: dict[str, Any] = {}
        for section in SECTIONS:
            settings = getattr(self, section)
            for item in fields(settings):
                value = getattr(settings, item.name)
                values[f"{section}.{item.name}"] = ",".join(value) if isinstance(value, tuple) else value
        return values

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


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "lora": LoraSettings, "train": TrainConfig}
"""The config sections a trial reads, by their key prefix."""


@dataclass(frozen=True)
class ConfigKey:
    """One config value as a dotted key, e.g. `lora.r`: its scalar type and its doc."""

    key: str
    type: type  # bool, int, float or str (lists and optional paths are text in a table)
    doc: str


def config_keys() -> tuple[ConfigKey, ...]:
    """Every field of every section, in section and field order."""
    keys = []
    for section, schema in SECTIONS.items():
        hints = typing.get_type_hints(schema)
        for item in fields(schema):
            keys.append(ConfigKey(f"{section}.{item.name}", _scalar_type(hints[item.name]), item.metadata["doc"]))
    return tuple(keys)


def _scalar_type(hint: Any) -> type:
    """bool, int or float for a (possibly optional) number or flag; str for everything else."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) else [hint]
    return args[0] if len(args) == 1 and args[0] in (bool, int, float) else str


def _section(cfg: Mapping[str, Any], name: str, schema: type) -> dict[str, Any]:
    """The `name` section of `cfg`, with unknown and missing keys reported by name."""
    section = cfg.get(name)
    if not isinstance(section, Mapping):
        raise ConfigError(f"config section '{name}' is missing; select one, e.g. {name}=<option>")
    known = {f.name for f in fields(schema)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(f"unknown key {name}.{unknown[0]}; valid keys of '{name}': {', '.join(sorted(known))}")
    required = {f.name for f in fields(schema) if f.default is MISSING}
    missing = sorted(k for k in required if k not in section)
    if missing:
        raise ConfigError(f"{name}.{missing[0]} is required; set it with {name}.{missing[0]}=<value>")
    return dict(section)
