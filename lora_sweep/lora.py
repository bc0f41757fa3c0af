"""Wrap a base model with a fresh LoRA adapter (peft)."""

from __future__ import annotations

import logging

from torch import nn

from lora_sweep.config import LoraSettings
from lora_sweep.dropout import use_fast_dropout

log = logging.getLogger(__name__)


class LoraTargetError(ValueError):
    """`lora.target_modules` names modules the model does not have."""


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Freeze the base weights and add a LoRA adapter; returns the peft model."""
    from peft import LoraConfig, get_peft_model

    targets = settings.target_modules if isinstance(settings.target_modules, str) else list(settings.target_modules)
    peft_config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        use_rslora=settings.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, peft_config)
    except ValueError as err:
        available = sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, nn.Linear)})
        raise LoraTargetError(
            f"lora.target_modules={settings.targets_label} matches no module of this model; "
            f"linear modules here: {', '.join(available)}"
        ) from err
    if next(peft_model.parameters()).device.type == "cpu":
        use_fast_dropout(peft_model)  # the CPU's per-element Bernoulli draws are slow
    trainable, total = count_parameters(peft_model)
    log.info("LoRA r=%d alpha=%g on %s: %d trainable of %d parameters (%.3f%%)",
             settings.r, settings.alpha, settings.targets_label, trainable, total, 100.0 * trainable / total)
    return peft_model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
