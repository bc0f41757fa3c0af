"""Held-out loss: the token-weighted mean cross-entropy over every label of the validation set.

Not a mean of batch means: each batch contributes its summed loss and its label-token count,
so the value does not depend on how the set is batched. Batches are built for speed (sorted by
length, so little padding; sized by a token budget, larger than training batches since no
activations are kept for a backward pass; `EVAL_TOKENS_PER_BATCH`) and right-padded, which leaves every real token's
logits as they are unpadded (a test checks the value against one sequence at a time).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lora_sweep.data import IGNORE_INDEX, Collator, Example

EVAL_TOKENS_PER_BATCH = {"cpu": 1024, "cuda": 4096}
"""Padded tokens per evaluation batch by device type. On 2 CPU threads (default model, 40
held-out records of 20-180 tokens) 512-1024 tokens per batch evaluated in 0.11-0.13 s and one
8192-token batch in 0.46 s: sorted rows of similar length pad little when batches are small,
and a CPU gains nothing from wide ones. A GPU does; 4096 tokens keep the logits of a
128k-vocabulary model at 1 GiB in bf16 (the loss is then taken one row at a time in fp32)."""


@dataclass(frozen=True)
class EvalResult:
    """Held-out loss and what it was computed over."""

    loss: float
    label_tokens: int
    seconds: float


def eval_batches(
    examples: Sequence[Example], pad_token_id: int, *, tokens_per_batch: int = EVAL_TOKENS_PER_BATCH["cpu"]
) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of the examples sorted longest first, each at most
    ``tokens_per_batch`` padded tokens (one example per batch when it alone is longer)."""
    collate = Collator(pad_token_id, padding_side="right")
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids), reverse=True)
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for index in order:
        length = len(examples[index].input_ids)
        width = max(width, length)
        if current and width * (len(current) + 1) > tokens_per_batch:
            batches.append(current)
            current, width = [], length
        current.append(index)
    if current:
        batches.append(current)
    return [
        collate(
            [
                {"input_ids": torch.tensor(examples[i].input_ids), "labels": torch.tensor(examples[i].labels)}
                for i in batch
            ]
        )
        for batch in batches
    ]


def label_count(labels: torch.Tensor) -> int:
    """How many labels of a batch are predicted: those != -100 after the first position (no
    token precedes it). Counted on the tensor's device: a CPU batch costs no device sync."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The sum of next-token cross-entropies over labels != -100 of a [B, S] batch, in fp32,
    shifted as transformers' ForCausalLMLoss: position i predicts label i + 1, the last
    position nothing (the labels are shifted and padded, not the logits: fp32 logits are not copied).
    Differentiable: the training loss is this over the step's `label_count`."""
    shifted = nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    device: torch.device,
    *,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> EvalResult:
    """The held-out loss of ``model`` in eval mode (no dropout, no gradients), under the
    trial's precision (``autocast``: the training loop's per-forward context factory). The
    model's train/eval mode is restored afterwards."""
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    try:
        for batch in batches:
            inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "labels"}
            with autocast():
                logits = model(**inputs).logits
            labels = batch["labels"].to(device)
            for row in range(len(logits)):  # one row at a time: never an fp32 copy of the whole batch's logits
                total += loss_sum(logits[row : row + 1], labels[row : row + 1]).double()
            count += label_count(batch["labels"])  # the CPU batch's: no device sync
    finally:
        model.train(was_training)
    loss = float(total) / count if count else float("nan")
    return EvalResult(loss=loss, label_tokens=count, seconds=time.perf_counter() - start)
