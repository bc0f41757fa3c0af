"""The causal-LM loss of a batch: summed next-token cross-entropy over its labels, in fp32.

`summed_loss` asks the model for the logits of the labelled positions only when it can
(`label_logits_only=True`): transformers' `logits_to_keep` with a boolean [B, S] mask projects
just those hidden states onto the vocabulary, so a prompt's tokens, padding and the last
position cost no LM-head matmul, no [B, S, V] logits and no cross-entropy. The sum is the
same terms as over full logits (`loss_sum`); whether a model honours the mask is checked
once per base model (`lora_sweep.selfcheck.check_label_logits`), which decides the flag.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lora_sweep.data import IGNORE_INDEX

LOSS_CHUNK_POSITIONS = 2048
"""Positions per cross-entropy call on sliced logits: at a 128k vocabulary an fp32 copy of
2048 positions' logits is 1 GiB, whatever the batch."""


def label_count(labels: torch.Tensor) -> int:
    """How many labels of a batch are predicted: those != -100 after the first position (no
    token precedes it). Counted on the tensor's device: a CPU batch costs no device sync."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the positions that predict them: position i predicts label i + 1, the
    last position nothing (-100), as transformers' ForCausalLMLoss shifts them."""
    return nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """The boolean [B, S] mask of the positions whose logits the loss reads (`shifted_labels`
    != -100): what `logits_to_keep` is given."""
    return shifted_labels(labels) != IGNORE_INDEX


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The sum of next-token cross-entropies over labels != -100 of a [B, S] batch's full
    [B, S, V] logits, in fp32 (the labels are shifted and padded, not the logits: fp32 logits
    are not copied). Differentiable: the training loss is this over the step's `label_count`."""
    return nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), shifted_labels(labels).flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model's forward (through a peft wrapper) takes `logits_to_keep`; every
    transformers causal LM of the mainstream families does."""
    wrapped: Any = model  # a peft model (torch types its attributes Tensor | Module)
    base = wrapped.get_base_model() if hasattr(wrapped, "get_base_model") else wrapped
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def label_logits(model: nn.Module, inputs: Mapping[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """The [N, V] logits of the N positions where `keep` is True, in row-major order."""
    return model(**inputs, use_cache=False, logits_to_keep=keep).logits


def summed_loss(
    model: nn.Module, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor, *, label_logits_only: bool
) -> torch.Tensor:
    """The summed next-token cross-entropy of one batch (`inputs` on the model's device, `labels`
    beside them), in fp32; differentiable. `label_logits_only`: the model computes logits only
    where a label is read (see the module docstring), else every position's (`loss_sum`)."""
    if not label_logits_only:  # no labels given: the model computes no loss of its own; no KV cache
        return loss_sum(model(**inputs, use_cache=False).logits, labels)
    keep = label_positions(labels)
    logits = label_logits(model, inputs, keep)
    targets = shifted_labels(labels)[keep]
    if not len(targets):  # no label: 0, still part of the graph (a micro-batch's backward runs)
        return logits.float().sum()
    parts = [
        nn.functional.cross_entropy(
            logits[i : i + LOSS_CHUNK_POSITIONS].float(), targets[i : i + LOSS_CHUNK_POSITIONS], reduction="sum"
        )
        for i in range(0, len(targets), LOSS_CHUNK_POSITIONS)
    ]
    return torch.stack(parts).sum()
