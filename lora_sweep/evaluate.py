"""Held-out loss: the token-weighted mean cross-entropy over every label of the validation set.

Not a mean of batch means: each batch contributes its summed loss and its label-token count,
so the value does not depend on how the set is batched. Batches are built for speed (sorted by
length, so little padding; sized by a token budget, larger than training batches since no
activations are kept for a backward pass; `EVAL_TOKENS_PER_BATCH`) and right-padded, which leaves every real token's
logits as they are unpadded (a test checks the value against one sequence at a time). Where
attention runs one causal SDPA per packed sequence (the CPU's, `lora_sweep.precision`), they
are packed rows instead: no padding at all, and no token attends across sequences.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lora_sweep.data import Collator, Example, PackingCollator, model_inputs
from lora_sweep.loss import label_count, loss_sum, summed_loss

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


def _items(examples: Sequence[Example], indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
    return [
        {"input_ids": torch.tensor(examples[i].input_ids), "labels": torch.tensor(examples[i].labels)} for i in indices
    ]


def packed_eval_rows(lengths: Sequence[int], width: int) -> list[list[int]]:
    """First-fit decreasing: indices of `lengths` grouped into rows of at most `width` tokens (a
    longer one alone), longest first."""
    rows: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True):
        row = next((r for r, room in enumerate(free) if lengths[index] <= room), None)
        if row is None:
            rows.append([])
            free.append(width)
            row = len(rows) - 1
        rows[row].append(index)
        free[row] -= lengths[index]
    return rows


def eval_batches(
    examples: Sequence[Example],
    pad_token_id: int,
    *,
    tokens_per_batch: int = EVAL_TOKENS_PER_BATCH["cpu"],
    packed: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of the examples sorted longest first, each at most
    ``tokens_per_batch`` padded tokens (one example per batch when it alone is longer).
    ``packed``: one packed row per batch instead (`PackingCollator`, `packed_eval_rows`): for
    attention that runs per packed sequence; under a block mask a row would cost its width squared."""
    if packed:
        lengths = [len(e.input_ids) for e in examples]
        return [
            PackingCollator(pad_token_id, width=max(tokens_per_batch, *(lengths[i] for i in row)))(
                _items(examples, row)
            )
            for row in packed_eval_rows(lengths, tokens_per_batch)
        ]
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
    return [collate(_items(examples, batch)) for batch in batches]


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    device: torch.device,
    *,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    label_logits_only: bool = False,
) -> EvalResult:
    """The held-out loss of ``model`` in eval mode (no dropout, no gradients), under the
    trial's precision (``autocast``: the training loop's per-forward context factory).
    ``label_logits_only``: logits of the labelled positions only (`lora_sweep.loss.summed_loss`).
    The model's train/eval mode is restored afterwards."""
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    try:
        for batch in batches:
            inputs = {k: v.to(device, non_blocking=True) for k, v in model_inputs(batch).items()}
            labels = batch["labels"].to(device)
            if label_logits_only:
                with autocast():
                    total += summed_loss(model, inputs, labels, label_logits_only=True).double()
            else:
                with autocast():
                    logits = model(**inputs, use_cache=False).logits
                for row in range(len(logits)):  # one row at a time: never an fp32 copy of the whole batch's logits
                    total += loss_sum(logits[row : row + 1], labels[row : row + 1]).double()
            count += label_count(batch["labels"])  # the CPU batch's: no device sync
    finally:
        model.train(was_training)
    loss = float(total) / count if count else float("nan")
    return EvalResult(loss=loss, label_tokens=count, seconds=time.perf_counter() - start)
