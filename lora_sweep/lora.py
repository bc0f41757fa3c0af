"""Wrap a base model with a fresh LoRA adapter (peft), after checking the targets and rank fit."""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from lora_sweep.config import LoraSettings
from lora_sweep.dropout import use_fast_dropout
from lora_sweep.errors import LoraTargetError

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

log = logging.getLogger(__name__)


def apply_lora(model: nn.Module, settings: LoraSettings) -> PeftModel:
    """Freeze the base weights and add a LoRA adapter; returns the peft model.

    The targets are `resolve_targets`'s. Raises `LoraTargetError` before anything is injected
    when `lora.r` exceeds a targeted layer's smallest dimension; when the targets match no
    module, peft's injection is refused the same way.
    """
    from peft import get_peft_model

    check_rank(model, settings)
    try:
        peft_model = get_peft_model(model, _peft_config(model, settings, r=settings.r))
    except ValueError as err:
        raise _no_match(model, settings) from err
    if next(peft_model.parameters()).device.type == "cpu":
        use_fast_dropout(peft_model)  # the CPU's per-element Bernoulli draws are slow
    trainable, total = count_parameters(peft_model)
    log.info(
        "LoRA r=%d alpha=%g on %s: %d trainable of %d parameters (%.3f%%)",
        settings.r,
        settings.alpha,
        ",".join(adapted_modules(peft_model)),
        trainable,
        total,
        100.0 * trainable / total,
    )
    return peft_model


def adapted_modules(peft_model: PeftModel) -> list[str]:
    """The names (last component, sorted) of the layers the adapter was injected into: what
    `target_modules` resolved to."""
    from peft.tuners.lora import LoraLayer

    layers = (name for name, module in peft_model.named_modules() if isinstance(module, LoraLayer))
    return sorted({name.rsplit(".", 1)[-1] for name in layers})


def resolve_targets(model: nn.Module, settings: LoraSettings) -> list[str] | str | None:
    """What peft is given as `target_modules`: `lora.target_modules` as set (a list, or
    `all-linear`); for null, None where peft has a default for the model type (peft picks it,
    e.g. q_proj,v_proj for Llama, c_attn for GPT-2), else `all-linear` (every linear and Conv1D
    layer but the output head), logged once per model type."""
    from peft.utils import INCLUDE_LINEAR_LAYERS_SHORTHAND, TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    targets = settings.target_modules
    if targets is not None:
        return list(targets) if isinstance(targets, tuple) else targets
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        return None
    _log_all_linear_fallback(model_type)
    return INCLUDE_LINEAR_LAYERS_SHORTHAND


@functools.cache  # once per process and model type, not once per trial of a sweep
def _log_all_linear_fallback(model_type: str | None) -> None:
    log.info(
        "lora.target_modules=null: peft has no default target modules for model type %r; adapting all linear "
        "layers (all-linear)",
        model_type,
    )


def check_rank(model: nn.Module, settings: LoraSettings) -> None:
    """Refuse a rank larger than min(in_features, out_features) of any targeted layer.

    A rank within every adaptable layer's dimensions needs no further look (the usual case);
    otherwise the targets are resolved by a dry-run injection on the meta device.
    """
    dims = [d for d in map(_layer_dims, model.modules()) if d is not None]
    if not dims or settings.r <= min(min(d) for d in dims):
        return
    layers = targeted_layers(model, settings)
    name, (fan_in, fan_out) = min(layers.items(), key=lambda item: min(item[1]))
    limit = min(fan_in, fan_out)
    if settings.r > limit:
        raise LoraTargetError(
            f"lora.r={settings.r} exceeds the smallest dimension of the targeted layer {name} "
            f"(in_features={fan_in}, out_features={fan_out}); choose lora.r <= {limit}"
        )


def targeted_layers(model: nn.Module, settings: LoraSettings) -> dict[str, tuple[int, int]]:
    """{module name: (in_features, out_features)} of the layers `settings` would adapt.

    peft itself resolves the targets (lists, `all-linear`, null), injecting rank-1 adapters
    whose weights live on the meta device (nothing allocated), then removes them again.
    """
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    with torch.random.fork_rng(devices=[]):  # a trial's seeded draws never depend on this
        try:
            probe = get_peft_model(model, _peft_config(model, settings, r=1, plain=True), low_cpu_mem_usage=True)
        except ValueError as err:
            raise _no_match(model, settings) from err
    try:
        return {
            name: (layer.in_features, layer.out_features)
            for name, layer in model.named_modules()
            if isinstance(layer, LoraLayer) and layer.in_features and layer.out_features
        }
    finally:
        probe.unload()


def adaptable_module_names(model: nn.Module) -> list[str]:
    """Names (last component, sorted) of the model's linear and Conv1D layers."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if name and _is_linear(module)})


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def _conv1d_only(model: nn.Module) -> bool:
    """Whether every adaptable layer but the output head is a Conv1D (GPT-2 style), whose
    weight is stored (in, out): peft's `fan_in_fan_out`, set here rather than by peft with a
    warning per layer."""
    from transformers.pytorch_utils import Conv1D

    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    layers = [m for m in model.modules() if _is_linear(m) and m is not head]
    return bool(layers) and all(isinstance(m, Conv1D) for m in layers)


def _layer_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a layer peft can adapt: linear, GPT-2's Conv1D, embedding, convolution."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        fan_in, fan_out = module.weight.shape  # Conv1D stores (in, out)
        return int(fan_in), int(fan_out)
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module.in_channels, module.out_channels
    return None


def _no_match(model: nn.Module, settings: LoraSettings) -> LoraTargetError:
    return LoraTargetError(
        f"lora.target_modules={settings.targets_label} matches no module of this model; "
        f"linear modules here: {', '.join(adaptable_module_names(model))}"
    )


MOVES_BASE_WEIGHTS = ("pissa", "olora")
"""Inits that move part of each targeted weight into the adapter (W becomes W - B A)."""


def initial_adapter_state(peft_model: PeftModel, settings: LoraSettings) -> dict[str, torch.Tensor] | None:
    """A copy of the adapter as initialised, for inits that move base weights (else None).

    A PiSSA/OLoRA adapter is trained against the residual base W - B0 A0, so saved as it is it
    would be wrong on the user's original checkpoint. peft converts it at save time into a
    plain LoRA of rank 2r that is right on the original W (`save_pretrained`'s
    `path_initial_model_for_weight_conversion`), given the adapter's initial weights: these.
    """
    if settings.init not in MOVES_BASE_WEIGHTS:
        return None
    from peft import get_peft_model_state_dict

    return {name: tensor.detach().clone() for name, tensor in get_peft_model_state_dict(peft_model).items()}


def _peft_config(model: nn.Module, settings: LoraSettings, *, r: int, plain: bool = False) -> LoraConfig:
    """The peft config of `settings`; `plain` (a dry run that only resolves the targets): the
    default init and no DoRA, which compute nothing from the weights."""
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=cast(int, settings.alpha),  # peft annotates int but scales by any float alpha
        lora_dropout=settings.dropout,
        target_modules=resolve_targets(model, settings),
        fan_in_fan_out=_conv1d_only(model),
        use_rslora=settings.use_rslora,
        use_dora=settings.use_dora and not plain,
        # lora.init is peft's init_lora_weights by name, except default (True: A Kaiming-uniform, B zero)
        init_lora_weights=cast(Any, True if plain or settings.init == "default" else settings.init),  # a Literal
        bias="none",
        task_type="CAUSAL_LM",
    )


def base_weights_to_restore(model: nn.Module, settings: LoraSettings) -> dict[str, torch.Tensor]:
    """Copies of the weights that `settings`' init will change (PiSSA and OLoRA subtract their
    initial adapter from each targeted weight, and peft's `unload()` does not add it back):
    {module name: weight}, empty for the inits that leave the base model as it is. Given back
    to `restore_base_weights` after the adapter is removed, so a cached base model stays
    bit-identical for the next trial."""
    if settings.init not in MOVES_BASE_WEIGHTS:
        return {}
    return {name: _weight(model, name).detach().clone() for name in targeted_layers(model, settings)}


def restore_base_weights(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copy `base_weights_to_restore`'s weights back into the (unloaded) base model."""
    with torch.no_grad():
        for name, weight in saved.items():
            _weight(model, name).copy_(weight)


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    return cast(torch.Tensor, model.get_submodule(name).weight)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
