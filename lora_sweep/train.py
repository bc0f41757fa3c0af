"""The LoRA training loop: one plain function, phases named in comments."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lora_sweep.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepRecord:
    """What one optimizer step measured. `grad_norm` is the pre-clip total norm."""

    step: int
    loss: float
    grad_norm: float
    lr: float
    tokens: int
    real_tokens: int
    elapsed_s: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


# Called after every step with the history so far; returning True stops the run (pruned).
StepHook = Callable[[list[StepRecord]], bool]


@dataclass
class LoopResult:
    """The per-step history and why the loop stopped early ("" when it ran all steps)."""

    steps: list[StepRecord]
    stop_reason: str = ""
    pruned: bool = False
    train_seconds: float = 0.0


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, schedule: str) -> float:
    """LR multiplier for 0-based optimizer step `step`: linear warm-up reaching 1.0 at the last
    warm-up step, then cosine / linear decay (never reaching 0 on the last step) or constant."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def train_loop(
    model: nn.Module,
    batches: Iterator[Mapping[str, torch.Tensor]],
    cfg: TrainConfig,
    device: torch.device,
    *,
    on_step: StepHook | None = None,
) -> LoopResult:
    """Train the trainable parameters of `model` for `cfg.max_steps` steps.

    Stops early on a non-finite loss or grad norm (recorded, no optimizer step taken) and
    when `on_step` asks to (pruning). The only host synchronisation per step is reading the
    loss and grad norm, which the metrics need.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lr_lambda=lambda s: lr_factor(s, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps, schedule=cfg.lr_scheduler),
    )
    result = LoopResult(steps=[])
    model.train()
    start = time.perf_counter()
    for step in range(1, cfg.max_steps + 1):
        # data: counts come from the CPU batch, so they cost no device sync
        batch = next(batches)
        tokens, real_tokens = batch["input_ids"].numel(), int(batch["attention_mask"].sum())
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        lr = scheduler.get_last_lr()[0]

        # forward + backward (mean cross-entropy over labels != -100)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()

        # clip, recording the pre-clip norm
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm=cfg.max_grad_norm)
        loss_value, grad_value = float(loss.detach()), float(grad_norm)
        result.steps.append(
            StepRecord(step, loss_value, grad_value, lr, tokens, real_tokens, time.perf_counter() - start)
        )
        if not (math.isfinite(loss_value) and math.isfinite(grad_value)):
            result.stop_reason = f"non-finite {'loss' if not math.isfinite(loss_value) else 'grad norm'} at step {step}"
            log.warning("stopping: %s", result.stop_reason)
            break

        # update
        optimizer.step()
        scheduler.step()

        # progress, and the pruning hook
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            elapsed = time.perf_counter() - start
            seen = sum(r.real_tokens for r in result.steps)
            log.info("step %d/%d loss %.4f grad_norm %.3f lr %.2e %.0f tok/s",
                     step, cfg.max_steps, loss_value, grad_value, lr, seen / max(elapsed, 1e-9))
        if on_step is not None and on_step(result.steps):
            result.pruned = True
            result.stop_reason = f"pruned at step {step}"
            log.info("stopping: %s", result.stop_reason)
            break
    result.train_seconds = time.perf_counter() - start
    return result
