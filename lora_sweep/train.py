"""The LoRA training loop: one plain function, phases named in comments."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
from torch import nn

from lora_sweep.config import TrainConfig
from lora_sweep.data import model_inputs, real_token_count
from lora_sweep.evaluate import EvalResult
from lora_sweep.loss import label_count, summed_loss
from lora_sweep.precision import mixed_precision

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


@dataclass(frozen=True)
class EvalPoint:
    """One held-out evaluation: after `step` optimizer steps (0: the base model)."""

    step: int
    loss: float
    seconds: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


EVAL_LOG_COLUMNS = ("step", "loss", "seconds")  # evals.csv beside steps.csv

# Called after every step with the step and eval histories so far; True stops the run (pruned).
StepHook = Callable[[list[StepRecord], list[EvalPoint]], bool]
# The held-out loss of the model as it is now, under the loop's per-forward autocast context.
Evaluate = Callable[[Callable[[], Any]], EvalResult]


@dataclass
class LoopResult:
    """The per-step history and why the loop stopped early ("" when it ran all steps)."""

    steps: list[StepRecord]
    evals: list[EvalPoint] = field(default_factory=list)
    stop_reason: str = ""
    pruned: bool = False
    train_seconds: float = 0.0  # the whole loop, hooks and logging included
    step_seconds: float = 0.0  # optimizer steps only (data -> update), without hooks and logging
    eval_seconds: float = 0.0  # held-out evaluations (a cached base evaluation costs nothing)


@contextlib.contextmanager
def released(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Drop the optimizer's state (AdamW moments) and the gradients on leaving, also on an error.

    The LR scheduler and the optimizer reference each other, so without this both live on,
    holding the state and every LoRA gradient, until the next garbage collection: in a worker
    that runs trial after trial, into the next trial's memory.
    """
    try:
        yield
    finally:
        optimizer.zero_grad(set_to_none=True)
        optimizer.state.clear()


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


def accumulate_gradients(
    model: nn.Module,
    micro_batches: Sequence[Mapping[str, torch.Tensor]],
    *,
    device: torch.device,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    label_logits_only: bool = False,
) -> tuple[torch.Tensor, int]:
    """Forward and backward every micro-batch of one optimizer step, adding to the gradients.

    Each micro-batch's summed cross-entropy is divided by the label count of the whole step
    (counted on the CPU batches first: no device sync), so the gradient is that of one batch of
    all the step's sequences, not a mean of micro-batch means (which would weigh the tokens of
    a micro-batch with few labels more). Returns (the step's token-weighted mean loss, detached,
    on the device; its label-token count). `micro_batches` are CPU batches, moved one at a time.
    `label_logits_only`: the model computes logits only where a label is read (`summed_loss`).
    """
    label_tokens = sum(label_count(batch["labels"]) for batch in micro_batches)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for batch in micro_batches:
        inputs = {k: v.to(device, non_blocking=True) for k, v in model_inputs(batch).items()}
        labels = batch["labels"].to(device, non_blocking=True)
        with autocast():
            summed = summed_loss(model, inputs, labels, label_logits_only=label_logits_only)
        (summed / label_tokens).backward()
        total += summed.detach()
    return total / label_tokens, label_tokens


def make_optimizer(model: nn.Module, params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; with `train.loraplus_lr_ratio` != 1, peft's LoRA+
    optimizer (the B matrices at lr x ratio; the schedule scales every group alike)."""
    build: Callable[..., torch.optim.Optimizer]
    if cfg.loraplus_lr_ratio != 1.0:
        from peft.optimizers import create_loraplus_optimizer

        build = functools.partial(
            create_loraplus_optimizer,
            cast(Any, model),  # a peft model
            torch.optim.AdamW,
            lr=cfg.lr,
            loraplus_lr_ratio=cfg.loraplus_lr_ratio,
            weight_decay=cfg.weight_decay,
            loraplus_weight_decay=cfg.weight_decay,
        )
    else:
        build = functools.partial(torch.optim.AdamW, params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    try:  # fused: one kernel for all LoRA tensors (measured 3x faster than foreach on 2 CPU threads)
        return build(fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return build(foreach=True)


def train_loop(
    model: nn.Module,
    batches: Iterator[Mapping[str, torch.Tensor]],
    cfg: TrainConfig,
    device: torch.device,
    *,
    on_step: StepHook | None = None,
    precision: str = "fp32",
    first_step_check: Callable[[nn.Module, float], None] | None = None,
    evaluate: Evaluate | None = None,
    base_eval: EvalResult | None = None,
    label_logits_only: bool = False,
) -> LoopResult:
    """Train the trainable parameters of `model` for `cfg.max_steps` steps.

    Each step draws `cfg.grad_accum_steps` micro-batches from `batches` and accumulates their
    gradients (`accumulate_gradients`: the loss is the mean over all their label tokens, so
    batch_size 2 x 4 micro-batches trains exactly as batch_size 8 on the same sequences); a
    `StepRecord` holds that loss and the tokens of all of them.
    Stops early on a non-finite loss or grad norm (recorded, no optimizer step taken) and
    when `on_step` asks to (pruning). The only host synchronisation per step is reading the
    loss and grad norm, which the metrics need. `precision="bf16"` runs the forward under
    bf16 autocast (weights, gradients and optimizer state keep their dtype; see
    `lora_sweep.precision.mixed_precision`).
    `first_step_check(model, loss)` runs after the first step's last backward, before anything
    is updated (the self-check's first-backward check, at no extra forward/backward); it may raise.
    `evaluate` measures the held-out loss at step 0 (or takes `base_eval`, the base model's,
    measured by an earlier trial: LoRA's B = 0 at init makes step 0 the base model), every
    `cfg.eval_every` steps and after the last step, before that step's hook sees it. Evaluation
    runs in eval mode and draws no random numbers, so the training steps are the same with it.
    `label_logits_only`: the forward computes logits only where a label is read
    (`lora_sweep.loss.summed_loss`; the trial sets it where the self-check verified it).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lr_lambda=lambda s: lr_factor(
            s, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps, schedule=cfg.lr_scheduler
        ),
    )
    result = LoopResult(steps=[])
    model.train()
    start = time.perf_counter()
    # bf16 on the CPU: attention stays fp32; the optimizer's state and the gradients go at the end
    with released(optimizer), mixed_precision(model, precision, device) as autocast:

        def held_out(step: int, known: EvalResult | None = None) -> None:
            assert evaluate is not None
            measured = known if known is not None else evaluate(autocast)
            result.evals.append(EvalPoint(step, measured.loss, 0.0 if known is not None else measured.seconds))
            result.eval_seconds += result.evals[-1].seconds

        if evaluate is not None:
            held_out(0, base_eval)  # the reference every improvement is relative to
        for step in range(1, cfg.max_steps + 1):
            # data: grad_accum_steps micro-batches; counts come from the CPU batches (no device sync)
            step_start = time.perf_counter()
            micro_batches = [next(batches) for _ in range(cfg.grad_accum_steps)]
            tokens = sum(b["input_ids"].numel() for b in micro_batches)
            real_tokens = sum(real_token_count(b) for b in micro_batches)
            lr = cast(float, scheduler.get_last_lr()[0])  # torch allows a Tensor lr; ours is a float

            # forward + backward of each micro-batch (cross-entropy summed over the step's labels)
            optimizer.zero_grad(set_to_none=True)
            loss, _ = accumulate_gradients(
                model, micro_batches, device=device, autocast=autocast, label_logits_only=label_logits_only
            )
            if step == 1 and first_step_check is not None:
                first_step_check(model, float(loss))

            # clip, recording the pre-clip norm
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm=cfg.max_grad_norm)
            loss_value, grad_value = float(loss), float(grad_norm)
            result.steps.append(
                StepRecord(step, loss_value, grad_value, lr, tokens, real_tokens, time.perf_counter() - start)
            )
            if not (math.isfinite(loss_value) and math.isfinite(grad_value)):
                result.stop_reason = (
                    f"non-finite {'loss' if not math.isfinite(loss_value) else 'grad norm'} at step {step}"
                )
                log.warning("stopping: %s", result.stop_reason)
                break

            # update
            optimizer.step()
            scheduler.step()
            result.step_seconds += time.perf_counter() - step_start

            # held-out loss, progress, and the pruning hook
            if evaluate is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                held_out(step)
                log.info("step %d/%d eval_loss %.4f", step, cfg.max_steps, result.evals[-1].loss)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                elapsed = time.perf_counter() - start
                seen = sum(r.real_tokens for r in result.steps)
                log.info(
                    "step %d/%d loss %.4f grad_norm %.3f lr %.2e %.0f tok/s",
                    step,
                    cfg.max_steps,
                    loss_value,
                    grad_value,
                    lr,
                    seen / max(elapsed, 1e-9),
                )
            if on_step is not None and on_step(result.steps, result.evals):
                result.pruned = True
                result.stop_reason = f"pruned at step {step}"
                log.info("stopping: %s", result.stop_reason)
                break
    result.train_seconds = time.perf_counter() - start
    return result
