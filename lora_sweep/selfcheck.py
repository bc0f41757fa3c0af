"""Start-up self-check on one probe batch, before the first optimizer step.

Each check guards a bug that trains silently wrong rather than crashing: a broken GQA
key/value expansion (eager and SDPA logits disagree; skipped, saying so, for a model without
SDPA), a misread padding mask (a padded row differs from itself unpadded), padding trained on
(labels on pad positions), frozen base weights not frozen, a dead adapter (zero lora_B
gradients), an implausible initial loss, and with packing, sequences that see each other
(packed rows' logits differ from each sequence alone). One check decides a fast path instead
of guarding one: the loss reads only the labelled positions' logits where the model computes
exactly those alone (`check_label_logits`), else every position's.
It runs under a forked RNG, so a trial's results do not depend on whether it ran.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from lora_sweep.data import IGNORE_INDEX, model_inputs
from lora_sweep.loss import accepts_logits_to_keep, label_logits, label_positions
from lora_sweep.model import ModelError, supports_sdpa, verify_kv_expansion

# Checks of the base model and the code path (not of the adapter): with lora_B = 0 at init the
# adapted model computes exactly the base model, so these pass or fail per base model. A
# trial on a cached base model that already passed them reuses their details (`model_checks`).
MODEL_LEVEL_CHECKS = ("kv_expansion", "eager_matches_sdpa", "padding_invariance", "label_logits")
# Also of the base model, but run only for a trial that packs; cached from its first such trial.
PACKING_CHECK = "packing_isolation"


class SelfCheckError(RuntimeError):
    """A self-check failed; `check` names it."""

    def __init__(self, check: str, detail: str) -> None:
        super().__init__(f"self-check '{check}' failed: {detail}")
        self.check = check


@dataclass
class SelfCheckReport:
    """What each check found (check name -> one-line detail) and how long it took."""

    details: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    label_logits: bool = False  # the loss may read the labelled positions' logits only (checks not cached)


def _logit_tolerance(logits: torch.Tensor, *, dtype: torch.dtype) -> float:
    """The largest |difference| allowed between two computations of the same `logits`: float32
    rounding, or bf16/fp16's ~100x coarser one when `dtype` (what the model computed in) is
    coarser than float32."""
    scale = max(1.0, float(logits.abs().max()))
    low_precision = torch.finfo(dtype).eps > torch.finfo(torch.float32).eps
    return (1e-1 if low_precision else 2e-3) * scale


def _require_close(
    check: str,
    got: torch.Tensor,
    want: torch.Tensor,
    *,
    scale: torch.Tensor,
    dtype: torch.dtype,
    failure: Callable[[float, float], str],
) -> float:
    """max |got - want|; raises `SelfCheckError(check, failure(diff, tolerance))` above the
    `_logit_tolerance` of `scale`."""
    diff = float((got - want).abs().max())
    tol = _logit_tolerance(scale, dtype=dtype)
    if not diff <= tol:
        raise SelfCheckError(check, failure(diff, tol))
    return diff


def check_labels_ignore_padding(batch: Mapping[str, torch.Tensor]) -> str:
    mask, labels = batch["attention_mask"], batch["labels"]
    n_pad = int((mask == 0).sum())
    leaked = int((labels[mask == 0] != IGNORE_INDEX).sum())
    if leaked:
        raise SelfCheckError(
            "labels_ignore_padding",
            f"{leaked} of {n_pad} padding positions carry a label (labels must be -100 where attention_mask == 0)",
        )
    return f"{n_pad} padding positions, none labelled"


def check_only_lora_trainable(model: nn.Module) -> str:
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    stray = [name for name in trainable if "lora_" not in name]
    if stray or not trainable:
        detail = f"non-LoRA parameters are trainable: {stray[:3]}" if stray else "no trainable LoRA parameters"
        raise SelfCheckError("only_lora_trainable", detail)
    return f"{len(trainable)} LoRA tensors trainable, base frozen"


def _logits(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.dtype]:
    """(float32 logits, the dtype the model computed them in): the coarser of the logits' own
    dtype and the base weights' (a model may upcast its logits after a bf16 forward)."""
    logits = model(**model_inputs(batch), use_cache=False).logits
    wrapped: Any = model  # a peft model (torch types its attributes Tensor | Module)
    base = wrapped.get_base_model() if hasattr(wrapped, "get_base_model") else wrapped
    weights = base.dtype  # a transformers model: its weights' floating dtype
    coarser = max((logits.dtype, weights), key=lambda d: torch.finfo(d).eps)
    return logits.float(), coarser


def check_eager_matches_sdpa(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> str:
    base = cast(Any, model).get_base_model()  # a peft model
    if not supports_sdpa(base):
        return f"skipped: {type(base).__name__} has no SDPA attention; eager only, nothing to compare"
    configured = base.config._attn_implementation
    real = batch["attention_mask"].bool()
    logits = {}
    try:
        for name in ("sdpa", "eager"):
            base.set_attn_implementation(name)
            if base.config._attn_implementation != name:  # a model that cannot switch only warns
                return f"skipped: {type(base).__name__} cannot switch its attention to {name} at run time"
            logits[name] = _logits(model, batch)
    finally:
        base.set_attn_implementation(configured)
    (sdpa, dtype), (eager, _) = logits["sdpa"], logits["eager"]
    sdpa, eager = sdpa[real], eager[real]
    diff = _require_close(
        "eager_matches_sdpa",
        sdpa,
        eager,
        scale=sdpa,
        dtype=dtype,
        failure=lambda diff, tol: (
            f"eager and SDPA logits differ by {diff:.3g} on real tokens (tolerance {tol:.2g}); "
            "the key/value head expansion (repeat_kv) or the mask handling is broken"
        ),
    )
    return f"max |eager - sdpa| = {diff:.2g} on {int(real.sum())} real tokens"


def check_padding_invariance(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> str:
    mask = batch["attention_mask"]
    lengths = mask.sum(dim=1)
    row = int(torch.argmin(lengths))
    n_pad = int(mask.shape[1] - lengths[row])
    real = mask[row].bool()
    padded, dtype = _logits(model, batch)
    padded = padded[row][real]
    alone = {"input_ids": batch["input_ids"][row][real][None], "attention_mask": mask[row][real][None]}
    unpadded = _logits(model, alone)[0][0]
    diff = _require_close(
        "padding_invariance",
        padded,
        unpadded,
        scale=unpadded,
        dtype=dtype,
        failure=lambda diff, tol: (
            f"the most padded row ({n_pad} pads) differs from itself unpadded by {diff:.3g} (tolerance {tol:.2g}); "
            "the attention mask is misread"
        ),
    )
    return f"row with {n_pad} pads equals itself unpadded (max diff {diff:.2g})"


def check_packing_isolation(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> str:
    """The probe's two shortest rows packed into one row (`position_ids` restarting at the second)
    give each row's logits alone: the model derives the block mask from packed positions, and
    the second sequence does not attend to the first."""
    from lora_sweep.data import PackingCollator

    mask = batch["attention_mask"].bool()
    order = torch.argsort(mask.sum(dim=1))[:2].tolist()
    rows = [batch["input_ids"][r][mask[r]] for r in order]
    if len(rows) < 2:
        return "skipped: the probe batch has one row, nothing to pack"
    items = [{"input_ids": ids, "labels": ids} for ids in rows]
    packed = PackingCollator(0, width=sum(len(ids) for ids in rows))(items)
    inputs = {k: packed[k].to(rows[0].device) for k in ("input_ids", "position_ids")}
    together, dtype = _logits(model, inputs)
    apart = [
        _logits(model, {"input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None]})[0][0] for ids in rows
    ]
    diff = _require_close(
        "packing_isolation",
        together[0],
        torch.cat(apart),
        scale=together,
        dtype=dtype,
        failure=lambda diff, tol: (
            f"two sequences packed in one row differ from each alone by {diff:.3g} (tolerance {tol:.2g}): "
            "this model does not separate packed sequences by position_ids; set data.packing=false"
        ),
    )
    sizes = " + ".join(str(len(ids)) for ids in rows)
    return f"2 packed sequences ({sizes} tokens) equal each alone (max diff {diff:.2g})"


def check_label_logits(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[bool, str]:
    """Whether the model, asked for the logits of the labelled positions only (`logits_to_keep`
    with a boolean mask, `lora_sweep.loss.summed_loss`), gives exactly those of its full forward.
    Never fails a trial: a model without the argument, or a transformers release that reads it
    otherwise, trains on full logits, and the detail says why."""
    base = cast(Any, model).get_base_model()  # a peft model
    if not accepts_logits_to_keep(model):
        return False, f"full logits: {type(base).__name__}.forward takes no logits_to_keep"
    keep = label_positions(batch["labels"])
    full, dtype = _logits(model, batch)
    want = full[keep]
    try:
        got = label_logits(model, model_inputs(batch), keep).float()
    except (IndexError, RuntimeError, TypeError, ValueError) as err:
        return False, f"full logits: logits_to_keep with a boolean mask failed ({type(err).__name__}: {err})"
    if got.shape != want.shape:
        return False, f"full logits: logits_to_keep gave shape {tuple(got.shape)}, not {tuple(want.shape)}"
    diff = float((got - want).abs().max()) if len(want) else 0.0
    tol = _logit_tolerance(want if len(want) else full, dtype=dtype)
    if not diff <= tol:
        return False, f"full logits: the labelled positions' logits alone differ by {diff:.3g} (tolerance {tol:.2g})"
    return True, (
        f"logits of the {len(want)} labelled positions only, of {keep.numel()} (max diff {diff:.2g} from full logits)"
    )


def check_initial_loss(value: float, vocab_size: int) -> None:
    upper = 2.0 * math.log(vocab_size) + 1.0
    if not math.isfinite(value) or not 1e-3 < value < upper:
        raise SelfCheckError(
            "initial_loss",
            f"initial loss {value:.4g} is not plausible (expected finite, between 0.001 and {upper:.3g} = 2 ln|V| + 1)",
        )


def check_lora_b_gradients(model: nn.Module) -> float:
    """The total norm of the lora_B gradients after a first backward; refuses zero or non-finite."""
    grads = [p.grad for name, p in model.named_parameters() if "lora_B" in name and p.grad is not None]
    if not grads:
        raise SelfCheckError("lora_b_gradients", "no lora_B parameter received a gradient")
    norm = float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])))
    if not math.isfinite(norm) or norm == 0.0:
        raise SelfCheckError("lora_b_gradients", f"lora_B gradient norm is {norm} after the first backward")
    return norm


def _first_backward_detail(value: float, norm: float, vocab_size: int, where: str = "") -> str:
    return f"initial loss {value:.4f} (ln|V| = {math.log(vocab_size):.3f}); lora_B grad norm {norm:.3g}{where}"


def check_first_backward(model: nn.Module, batch: Mapping[str, torch.Tensor], vocab_size: int) -> str:
    loss = model(**batch).loss
    value = float(loss.detach())
    check_initial_loss(value, vocab_size)
    loss.backward()
    try:
        norm = check_lora_b_gradients(model)
    finally:
        model.zero_grad(set_to_none=True)
    return _first_backward_detail(value, norm, vocab_size)


class FirstStepCheck:
    """The `first_backward` check run on the training loop's own first step (after its backward,
    before its optimizer step) instead of on an extra forward/backward of the probe batch: the
    same checks at no extra compute. Reads only; the detail lands in `details["first_backward"]`."""

    def __init__(self, details: dict[str, str], vocab_size: int) -> None:
        self.details, self.vocab_size = details, vocab_size

    def __call__(self, model: nn.Module, loss_value: float) -> None:
        check_initial_loss(loss_value, self.vocab_size)
        norm = check_lora_b_gradients(model)
        self.details["first_backward"] = _first_backward_detail(
            loss_value, norm, self.vocab_size, " (on the first training step)"
        )


def _cached(detail: str) -> str:
    return detail if detail.startswith("cached: ") else f"cached: {detail}"


def model_level_details(report: SelfCheckReport) -> dict[str, str]:
    """The details of the base model's checks in `report` (`MODEL_LEVEL_CHECKS`, and
    `PACKING_CHECK` when it ran), for `run_self_check(model_checks=...)` on later trials."""
    return {k: report.details[k] for k in (*MODEL_LEVEL_CHECKS, PACKING_CHECK) if k in report.details}


def run_self_check(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    vocab_size: int,
    model_checks: Mapping[str, str] | None = None,
    first_backward: bool = True,
    packing: bool = False,
) -> SelfCheckReport:
    """Run every check on the peft-wrapped `model` with a padded probe `batch` already on its device.

    `model_checks`: the details of the `MODEL_LEVEL_CHECKS` this base model already passed in
    this process; they are reported (marked cached) instead of run again (`label_logits`, the
    decision of `check_label_logits`, is then the caller's to keep beside them). The per-trial
    checks (labels, trainable parameters, first backward through the fresh adapter) always run;
    `first_backward=False` leaves the last to the training loop's first step (`FirstStepCheck`).
    `packing`: the trial trains on packed rows; `check_packing_isolation` runs too (or is
    reported from `model_checks` when this base model passed it already), through the
    model's configured attention (transformers' block mask from packed positions, what a GPU
    trains with; the CPU's per-sequence attention, `lora_sweep.precision`, is tested apart).
    Raises `SelfCheckError` naming the first failed check.
    """
    start = time.perf_counter()
    report = SelfCheckReport()
    was_training = model.training
    devices = [batch["input_ids"].device] if batch["input_ids"].is_cuda else []
    with torch.random.fork_rng(devices=devices):
        report.details["labels_ignore_padding"] = check_labels_ignore_padding(batch)
        report.details["only_lora_trainable"] = check_only_lora_trainable(model)
        if model_checks is not None and all(k in model_checks for k in MODEL_LEVEL_CHECKS):
            for name in MODEL_LEVEL_CHECKS:
                report.details[name] = _cached(model_checks[name])
        else:
            try:
                report.details["kv_expansion"] = verify_kv_expansion(cast(Any, model).get_base_model())
            except ModelError as err:
                raise SelfCheckError("kv_expansion", str(err)) from err
            model.eval()
            with torch.no_grad():
                report.details["eager_matches_sdpa"] = check_eager_matches_sdpa(model, batch)
                report.details["padding_invariance"] = check_padding_invariance(model, batch)
                report.label_logits, report.details["label_logits"] = check_label_logits(model, batch)
        if packing and model_checks is not None and PACKING_CHECK in model_checks:
            report.details[PACKING_CHECK] = _cached(model_checks[PACKING_CHECK])
        elif packing:
            model.eval()
            with torch.no_grad():
                report.details[PACKING_CHECK] = check_packing_isolation(model, batch)
        model.train()
        if first_backward:
            report.details["first_backward"] = check_first_backward(model, batch, vocab_size)
    model.train(was_training)
    report.seconds = time.perf_counter() - start
    return report
