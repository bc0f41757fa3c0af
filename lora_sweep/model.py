"""Load a local checkpoint, resolve its attention implementation, patch its forward, and
verify its key/value head expansion.

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
from lora_sweep.errors import ConfigError, ModelError, first_line

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
        raise ModelError(f"cannot load a tokenizer from {model_dir}: {first_line(err)}") from err
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
        raise ModelError(f"cannot read the model config in {model_dir}: {first_line(err)}") from err


def model_skeleton(config: Any, cfg: ModelConfig) -> nn.Module:
    """The causal LM's modules built from its config on the meta device: shapes without weights
    (nothing allocated, nothing read), for checks that need only the layer layout."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"cannot build a causal LM from the config of {cfg.path}: {first_line(err)}") from err


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


def causal_lm_class(config: Any, cfg: ModelConfig) -> type:
    """The class `AutoModelForCausalLM` builds for `config`: looked up for transformers' own
    models, taken from a weightless skeleton for remote code (`model.trust_remote_code`)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    remote = cfg.trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if not remote and type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return cast(type, MODEL_FOR_CAUSAL_LM_MAPPING[type(config)])
    return type(model_skeleton(config, cfg))  # also refuses a config no causal LM is built from


def supports_sdpa(model: type | nn.Module) -> bool:
    """Whether transformers runs this model class's attention through SDPA: its `_supports_sdpa`
    class flag, the one `from_pretrained` consults (transformers 5.24 has no public accessor)."""
    model_class = model if isinstance(model, type) else type(model)
    return bool(getattr(model_class, "_supports_sdpa", False))


def resolve_attn_implementation(model: type | nn.Module, requested: str) -> str:
    """The attention implementation `model.attn_implementation=requested` means for this model
    class (or model): `auto` is SDPA where the class has it, else eager.

    Raises `ModelError` for an explicit `sdpa` on a class without it, so the refusal comes
    before any weights load (transformers' own refusal is a paragraph at load time).
    """
    model_class = model if isinstance(model, type) else type(model)
    if requested == "auto":
        return "sdpa" if supports_sdpa(model_class) else "eager"
    if requested == "sdpa" and not supports_sdpa(model_class):
        import transformers

        raise ModelError(
            f"model.attn_implementation=sdpa: {model_class.__name__} has no SDPA attention in transformers "
            f"{transformers.__version__}; use model.attn_implementation=eager or auto"
        )
    return requested


def attn_implementation_for(model_dir: Path, cfg: ModelConfig) -> str:
    """The attention implementation `load_model(model_dir, cfg)` gives the model (`sdpa` or
    `eager`), without loading weights: what a cached model is keyed by."""
    if cfg.attn_implementation == "eager":
        return "eager"
    return resolve_attn_implementation(causal_lm_class(load_model_config(model_dir, cfg), cfg), cfg.attn_implementation)


def load_model(model_dir: Path, cfg: ModelConfig, device: torch.device) -> nn.Module:
    """Load the causal LM from a local directory (never from a hub) and patch its forward.

    Its attention is `attn_implementation_for(model_dir, cfg)`; an explicit `sdpa` the model
    does not have is refused before the weights load.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    config = load_model_config(model_dir, cfg)
    expected = resolve_attn_implementation(causal_lm_class(config, cfg), cfg.attn_implementation)
    hf_logging.disable_progress_bar()  # one trial per line of output, not a bar per load
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir),
            config=config,
            dtype=_DTYPES[cfg.dtype],
            attn_implementation=_load_attn_implementation(config, cfg, expected),
            local_files_only=True,
            trust_remote_code=cfg.trust_remote_code,
            # transformers >= 5.2x kernelizes by default wherever `kernels` is installed (it is one
            # of its own dependencies): compiled code fetched from the Hub on a GPU at model.train(),
            # remote code the user did not ask for, and a ValueError offline
            use_kernels=False,
        )
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"cannot load a causal LM from {model_dir}: {first_line(err)}") from err
    loaded = model.config._attn_implementation
    if loaded != expected:  # the cache keys this model by `expected`
        raise ModelError(
            f"model.attn_implementation={cfg.attn_implementation} loaded {model_dir} with {loaded}, not {expected}; "
            "set model.attn_implementation=sdpa or eager"
        )
    patch_model_forward(model)
    # through nn.Module.to: transformers' decorated PreTrainedModel.to is typed as unbound
    return cast(nn.Module, model).to(device)


def _load_attn_implementation(config: Any, cfg: ModelConfig, expected: str) -> str | None:
    """What `from_pretrained` is asked for: `expected`, except `auto` on a composite model
    (sub-configs, e.g. a vision tower), where None lets transformers choose per sub-model as
    `auto` does (a string would force it on every sub-model, refused where one lacks it)."""
    if cfg.attn_implementation == "auto" and getattr(config, "sub_configs", None):
        return None
    return expected


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"train.device={name} but no CUDA device is visible; use train.device=auto or cpu")
    device = torch.device(name)
    if device.index is not None and device.index >= (count := torch.cuda.device_count()):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        pinned = (
            f" (CUDA_VISIBLE_DEVICES={visible}: a sweep worker pinned to one GPU sees it as cuda:0)" if visible else ""
        )
        raise ModelError(
            f"train.device={name} but {count} CUDA device(s) are visible{pinned}; use train.device=auto or cuda"
        )
    return device


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


# Config keys for the number of key/value heads: most models, then Falcon.
_KV_HEAD_KEYS = ("num_key_value_heads", "num_kv_heads")


def attention_heads(config: Any) -> tuple[int, int]:
    """(query heads, key/value heads) of the decoder, read from the text config of a composite
    model too (`get_text_config`), through `attribute_map` (GPT-2's `n_head`). A config that
    states no key/value heads is multi-head, unless it says `multi_query` (one key/value head)."""
    text = _text_config(config)
    n_heads = getattr(text, "num_attention_heads", None)
    if not isinstance(n_heads, int) or n_heads < 1:
        raise ModelError(f"the {type(text).__name__} of this checkpoint states no num_attention_heads")
    n_kv = next((v for k in _KV_HEAD_KEYS if isinstance(v := getattr(text, k, None), int) and v > 0), n_heads)
    if getattr(text, "multi_query", False) is True and not getattr(text, "new_decoder_architecture", False):
        n_kv = 1  # GPT-BigCode, Falcon-7B: one key/value head (Falcon's num_kv_heads is then unused)
    if n_heads % n_kv:
        raise ModelError(f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}")
    return n_heads, n_kv


# What attention layers pass to the expansion (eager and SDPA alike): query heads per key/value head.
_GROUPS_ATTR = "num_key_value_groups"


def expansion_factors(model: nn.Module) -> list[int]:
    """The key/value expansion factors the model's attention layers state (sorted, distinct);
    empty when none states one (e.g. GPT-2, GPT-NeoX)."""
    return sorted({int(getattr(m, _GROUPS_ATTR)) for m in model.modules() if hasattr(m, _GROUPS_ATTR)})


def kv_expansion_functions(model: nn.Module) -> tuple[dict[str, Any], list[str]]:
    """({name: function}, [what could not be found]): the `repeat_kv` functions this model's
    attention calls, looked up where the calls resolve them: in the globals of each attention
    layer's modeling module's `eager_attention_forward` (eager), and of the function
    transformers dispatches `sdpa` to (its SDPA integration, which expands with `repeat_kv`
    when there is a mask and leaves it to torch's `enable_gqa` otherwise)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    found: dict[str, Any] = {}
    missing: list[str] = []
    eager_modules = {type(m).__module__ for m in model.modules() if hasattr(m, _GROUPS_ATTR)}
    for module_name in sorted(eager_modules or {type(model).__module__}):
        eager = getattr(importlib.import_module(module_name), "eager_attention_forward", None)
        fn = getattr(eager, "__globals__", {}).get("repeat_kv")
        if fn is None:
            missing.append(f"{module_name} has no eager_attention_forward calling repeat_kv")
        else:
            found[f"{eager.__module__}.repeat_kv"] = fn
    if supports_sdpa(model):
        sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
        fn = getattr(sdpa, "__globals__", {}).get("repeat_kv")
        if fn is None:
            missing.append(f"{sdpa.__module__} has no repeat_kv")
        else:
            found[f"{sdpa.__module__}.repeat_kv"] = fn
    return found, missing


def _check_enable_gqa(n_kv: int, n_rep: int, head_dim: int, device: torch.device) -> None:
    """torch's own GQA in SDPA (`enable_gqa=True`) against SDPA on keys/values expanded with
    `repeat_interleave(dim=1)`, on the model's device (a CUDA kernel is not the CPU's)."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, n, 5, head_dim, generator=gen).to(device) for n in (n_kv * n_rep, n_kv, n_kv))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    got = sdpa(q, k, v, is_causal=True, enable_gqa=True)
    expected = sdpa(q, k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1), is_causal=True)
    if not torch.allclose(got, expected, atol=1e-5, rtol=1e-4):
        raise ModelError("torch's scaled_dot_product_attention(enable_gqa=True) does not expand key/value heads")


def verify_kv_expansion(model: nn.Module) -> str:
    """Check the key/value head expansion this model's attention uses: every `repeat_kv` it
    calls (`kv_expansion_functions`) must equal `repeat_interleave(dim=1)` (query head h reads
    key/value head h // n_rep), and so must torch's `enable_gqa` where SDPA can take that path.

    Returns a one-line summary of what was verified, with "not verified: ..." and why for what
    could not be; never a pass for what was not checked. Raises `ModelError` on a wrong expansion.
    """
    config = cast(Any, model).config  # a transformers config (torch types the attribute Tensor | Module)
    n_heads, n_kv = attention_heads(config)
    n_rep = n_heads // n_kv
    groups = expansion_factors(model)
    reps = [r for r in (groups or [n_rep]) if r > 1]
    if not reps:
        return f"no key/value expansion (multi-head attention: {n_heads} heads)"
    summary = f"GQA: {n_heads} query heads share {n_kv} key/value heads (n_rep={n_rep})"
    if groups and groups != [n_rep]:
        summary += f", attention layers expand {'/'.join(map(str, groups))}x"
    text = _text_config(config)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // n_heads
    probe = torch.randn(2, n_kv, 5, head_dim, generator=torch.Generator().manual_seed(0))
    functions, missing = kv_expansion_functions(model)
    for name, fn in functions.items():
        for rep in reps:
            got = fn(probe, rep)
            if got.shape != (2, n_kv * rep, 5, head_dim) or not torch.equal(got, probe.repeat_interleave(rep, dim=1)):
                raise ModelError(f"{name} does not expand key/value heads like repeat_interleave(dim=1)")
    verified = [".".join(name.rsplit(".", 2)[-2:]) for name in functions]
    if supports_sdpa(model):
        for rep in reps:
            _check_enable_gqa(n_kv, rep, head_dim, next(model.parameters()).device)
        verified.append("torch SDPA enable_gqa")
    if not groups:
        missing.append("no attention layer states num_key_value_groups, so the expansion is the model's own")
    if missing:  # eager_matches_sdpa still compares the two attention paths end to end
        return f"{summary}; verified: {', '.join(verified) or 'nothing'}; not verified: {'; '.join(missing)}"
    return f"{summary}; verified: {', '.join(verified)}"


def _text_config(config: Any) -> Any:
    """The decoder's config: a composite model's `text_config`, else the config itself."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def offline_hub() -> None:
    """Make sure nothing is fetched from a model hub at run time, and keep the output quiet."""
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # transformers 5 deprecation notices raised from inside peft, not actionable for users
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
