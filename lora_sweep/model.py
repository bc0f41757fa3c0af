"""Load a local checkpoint, patch its forward, and verify its GQA key/value expansion.

The patch is the seed's rule, enforced: the attention mask reaches the model as a 2-D
[batch, seq] 0/1 (or bool) tensor and transformers builds the 4-D mask itself. Measured on
transformers 5: a 2-D additive float mask (0 / -inf) is silently inverted, a hand-built
4-D long mask raises in SDPA and is silently wrong in eager, so both are refused here.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from lora_sweep.config import ModelConfig
from lora_sweep.embedded import TINY_LLAMA_DIR
from lora_sweep.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

_PATCH_ATTR = "_lora_sweep_mask_patch"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class AttentionMaskError(ValueError):
    """An attention mask in a form that transformers would silently misread."""


def resolve_model_dir(cfg: ModelConfig) -> Path:
    """The checkpoint directory: `model.path`, or the embedded tiny Llama when it is null."""
    if cfg.path is None:
        return TINY_LLAMA_DIR
    path = Path(cfg.path).expanduser()
    if not path.is_dir():
        raise ModelError(
            f"model.path={cfg.path} is not a directory; point it at a local checkpoint saved with "
            "save_pretrained (hub ids are not downloaded)"
        )
    if not (path / "config.json").is_file():
        raise ModelError(
            f"model.path={cfg.path} is not a Hugging Face checkpoint (no config.json); point it at a "
            "directory written by model.save_pretrained and tokenizer.save_pretrained"
        )
    return path


def load_tokenizer(model_dir: Path, cfg: ModelConfig) -> Any:
    """Load the checkpoint's tokenizer; a missing pad token falls back to EOS.

    The fallback is safe here because labels are masked by the attention mask, not the pad id.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(model_dir), local_files_only=True, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load a tokenizer from {model_dir}: {_first_line(err)}") from err
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelError(
                f"the tokenizer in {model_dir} has neither a pad nor an EOS token; set pad_token in its "
                "tokenizer_config.json"
            )
        log.info("tokenizer has no pad token; padding with EOS (labels are masked by the attention mask)")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_config(model_dir: Path, cfg: ModelConfig) -> Any:
    """The checkpoint's `config.json` as a transformers config (no weights loaded)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            str(model_dir), local_files_only=True, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"cannot read the model config in {model_dir}: {_first_line(err)}") from err


def model_skeleton(config: Any, cfg: ModelConfig) -> nn.Module:
    """The causal LM's modules built from its config on the meta device: shapes without weights
    (nothing allocated, nothing read), for checks that need only the layer layout."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"cannot build a causal LM from the config of {cfg.path}: {_first_line(err)}") from err


# Where configs keep their longest sequence: most models, then GPT-2 style ones.
_POSITION_KEYS = ("max_position_embeddings", "n_positions")


def position_limit(config: Any) -> tuple[str, int] | None:
    """(config key, value) of the longest sequence the model's positions cover, also from a
    nested `text_config` (multimodal models); None when the config states none."""
    for candidate in (config, getattr(config, "text_config", None)):
        for key in _POSITION_KEYS:
            value = getattr(candidate, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return key, value
    return None


def check_max_length(max_length: int, config: Any, *, key: str = "data.max_length") -> None:
    """Refuse a sequence length (`key`, by default `data.max_length`) beyond the model's
    position limit."""
    limit = position_limit(config)
    if limit is not None and max_length > limit[1]:
        name, value = limit
        raise ConfigError(f"{key}={max_length} exceeds the model's {name}={value}; choose {key} <= {value}")


def load_model(model_dir: Path, cfg: ModelConfig, device: torch.device) -> nn.Module:
    """Load the causal LM from a local directory (never from a hub) and patch its forward."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one trial per line of output, not a bar per load
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir),
            dtype=_DTYPES[cfg.dtype],
            attn_implementation=cfg.attn_implementation,
            local_files_only=True,
            trust_remote_code=cfg.trust_remote_code,
        )
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"cannot load a causal LM from {model_dir}: {_first_line(err)}") from err
    patch_model_forward(model)
    # through nn.Module.to: transformers' decorated PreTrainedModel.to is typed as unbound
    return cast(nn.Module, model).to(device)


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"train.device={name} but no CUDA device is visible; use train.device=auto or cpu")
    return torch.device(name)


def check_attention_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Accept a 2-D 0/1 or bool mask (returned as bool); refuse what transformers would misread."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise AttentionMaskError(
            f"attention_mask must be 2-D [batch, seq] with 1 for real tokens, got a {mask.dim()}-D tensor "
            f"{tuple(mask.shape)}; pass the tokenizer's mask and let transformers build the 4-D mask"
        )
    if mask.dtype.is_floating_point:
        raise AttentionMaskError(
            f"attention_mask must be 0/1 integers or bool, got {mask.dtype}; additive float masks "
            "(0 / -inf) are silently inverted by transformers"
        )
    if mask.dtype != torch.bool:
        if bool(((mask != 0) & (mask != 1)).any()):
            raise AttentionMaskError("attention_mask must contain only 0 and 1")
        mask = mask.bool()
    return mask


def _mask_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if len(args) > 1:  # forward(input_ids, attention_mask, ...) called positionally
        args = (args[0], check_attention_mask(args[1]), *args[2:])
    if "attention_mask" in kwargs:
        kwargs["attention_mask"] = check_attention_mask(kwargs["attention_mask"])
    return args, kwargs


def patch_model_forward(model: nn.Module) -> None:
    """Guard the model's forward with `check_attention_mask` (idempotent).

    A forward pre-hook, not a monkeypatched method: it survives peft wrapping (peft calls the
    base model through `__call__`) and leaves the class untouched for other models.
    """
    if getattr(model, _PATCH_ATTR, None) is None:
        handle = model.register_forward_pre_hook(_mask_pre_hook, with_kwargs=True)
        setattr(model, _PATCH_ATTR, handle)


def is_patched(model: nn.Module) -> bool:
    return getattr(model, _PATCH_ATTR, None) is not None


def kv_expansion_functions(model: nn.Module) -> dict[str, Any]:
    """The `repeat_kv` functions this model's attention paths call: its modeling module (eager)
    and transformers' SDPA integration (SDPA with a padding mask)."""
    found = {}
    for module_name in (type(model).__module__, "transformers.integrations.sdpa_attention"):
        module = importlib.import_module(module_name)
        fn = getattr(module, "repeat_kv", None)
        if fn is not None:
            found[f"{module_name}.repeat_kv"] = fn
    return found


def verify_kv_expansion(model: nn.Module) -> str:
    """Check every `repeat_kv` the model uses equals `repeat_interleave(dim=1)` (the correct GQA
    expansion: query head h reads key/value head h // n_rep). Returns a one-line summary."""
    config = cast(Any, model).config  # a transformers config (torch types the attribute Tensor | Module)
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    if n_heads % n_kv:
        raise ModelError(f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}")
    n_rep = n_heads // n_kv
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    probe = torch.randn(2, n_kv, 5, head_dim, generator=torch.Generator().manual_seed(0))
    expected = probe.repeat_interleave(max(n_rep, 2), dim=1)
    for name, fn in kv_expansion_functions(model).items():
        got = fn(probe, max(n_rep, 2))  # n_rep=1 is a no-op; test the expansion itself with 2
        if got.shape != expected.shape or not torch.equal(got, expected):
            raise ModelError(f"{name} does not expand key/value heads like repeat_interleave(dim=1)")
    return f"GQA: {n_heads} query heads share {n_kv} key/value heads (n_rep={n_rep}); repeat_kv verified"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def offline_hub() -> None:
    """Make sure nothing is fetched from a model hub at run time, and keep the output quiet."""
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # transformers 5 deprecation notices raised from inside peft, not actionable for users
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
