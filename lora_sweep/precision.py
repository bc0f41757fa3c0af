"""Mixed precision for the training forward: which precision, and the context that applies it.

bf16 here means autocast around the forward: matmuls run in bf16, weights, gradients and
AdamW state stay in their own dtype (fp32), and the loss is computed in fp32. On the CPU
attention is the exception: it runs in fp32 with autocast off, because the CPU's bf16
SDPA backward is about 2x slower than its fp32 one (measured with torch 2.13 on 2 threads,
AVX-512 BF16 + AMX, see BENCHMARKS.md), and autocast would otherwise cast fp32 inputs
straight back to bf16. A right-padded batch there runs SDPA with `is_causal=True` instead of
an explicit mask (`causal_sdpa_mask`: the same result on the real tokens, 1.02-1.05x per step
on the 8M benchmark model), fp32 trials included, and packed rows run one causal SDPA per
packed sequence. On CUDA bf16 attention is the fast path and stays in bf16; right-padded
batches get no mask there either, so SDPA may choose its flash kernel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from torch import nn

# bf16 autocast pays only once matmuls dominate: measured on 2 CPU threads (AVX-512 BF16),
# see BENCHMARKS.md. Below this many base-model parameters `auto` keeps fp32 on the CPU.
BF16_CPU_MIN_PARAMS = 4_000_000

# On a GPU a small model's step is bound by kernel launches, and autocast adds a cast per op:
# the default trial (8 packed rows of 512 tokens) on an H200 ran bf16/fp32 (fp32 with TF32
# matmuls) at 0.39x with 101M parameters, 0.88x with 273M, 1.57x with 725M, each bf16 trial
# the first bf16 work of its process (a bias against it); a warmed-up bf16 run at 102M gave
# 0.62x. The crossing lies at ~280-340M (BENCHMARKS.md "GPU: one NVIDIA H200"). Below this
# `auto` keeps fp32 (TF32 matmuls).
BF16_CUDA_MIN_PARAMS = 300_000_000

# The attention implementation name registered with transformers for fp32 SDPA under autocast.
FP32_SDPA = "lora_sweep_sdpa_fp32"
# transformers' SDPA attention unchanged, with `causal_sdpa_mask` (a GPU's training forward).
CAUSAL_SDPA = "lora_sweep_sdpa_causal"


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matmul instructions (AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def native_bf16(device: torch.device) -> bool:
    """Whether `device` runs bf16 matmuls natively: a CUDA GPU that supports bf16 (Ampere and
    newer), a CPU with AVX-512 BF16 or AMX."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type == "cpu" and cpu_supports_bf16()


def choose_precision(
    precision: str, *, device_type: str, cuda_bf16: bool = False, cpu_bf16: bool = False, n_params: int = 0
) -> str:
    """The decision of `resolve_precision`, from the device's capabilities (pure).

    `auto`: bf16 on a CUDA device that supports it (`cuda_bf16`: Ampere and newer) for a model
    of at least `BF16_CUDA_MIN_PARAMS` parameters (fp32 with TF32 matmuls below); on the CPU
    only with native bf16 matmuls (`cpu_bf16`) and at least `BF16_CPU_MIN_PARAMS` parameters;
    else fp32. Smaller models lose to autocast's per-op casts. `fp32`/`bf16` as given.
    """
    if precision != "auto":
        return precision
    if device_type == "cuda":
        return "bf16" if cuda_bf16 and n_params >= BF16_CUDA_MIN_PARAMS else "fp32"
    if device_type == "cpu" and cpu_bf16:
        return "bf16" if n_params >= BF16_CPU_MIN_PARAMS else "fp32"
    return "fp32"


def resolve_precision(precision: str, device: torch.device, model: nn.Module) -> str:
    """`fp32` or `bf16` (autocast; master weights and optimizer state stay in their dtype), as
    `choose_precision` decides for this device and model. Deterministic per config and
    machine, so a sweep's trials are comparable."""
    if precision != "auto":
        return precision
    bf16 = native_bf16(device)
    return choose_precision(
        precision,
        device_type=device.type,
        cuda_bf16=bf16 and device.type == "cuda",
        cpu_bf16=bf16 and device.type == "cpu",
        n_params=sum(p.numel() for p in model.parameters()),
    )


def allow_tf32(device: torch.device) -> bool:
    """On CUDA, let fp32 matmuls and convolutions run on TF32 tensor cores (Ampere and newer;
    ~10 bits of mantissa in the products, fp32 accumulation): what is left in fp32 under bf16
    autocast, and all of an fp32 trial. Returns whether it was set (never on the CPU)."""
    if device.type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def packed_segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    """Per row, the (start, end) spans of the sequences packed into it (a new sequence wherever
    the position does not follow the one before), or None when no row holds more than one."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if not bool(starts[:, 1:].any()):
        return None
    width = position_ids.shape[1]
    spans = []
    for row in starts:
        begin = row.nonzero().flatten().tolist()
        spans.append(list(zip(begin, begin[1:] + [width], strict=True)))
    return spans


def sdpa_fp32_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' own SDPA attention (its mask handling and verified `repeat_kv`), computed in
    fp32 with autocast off; the output goes back in the query's dtype.

    Packed rows (`position_ids` restarting inside a row, `lora_sweep.data.PackingCollator`) run
    one causal SDPA per packed sequence instead of one over the whole row under a block mask:
    the CPU kernels cannot skip the masked blocks, so the row's attention would cost its width
    squared instead of the sum of its sequences' squares. Sliding-window layers keep the mask.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    # a sliding window (Mistral, Gemma's local layers) lives only in transformers' mask: keep it
    windowed = kwargs.get("sliding_window") is not None
    spans = None if windowed or position_ids is None or query.shape[2] == 1 else packed_segments(position_ids)
    with torch.autocast(query.device.type, enabled=False):
        query32, key32, value32 = query.float(), key.float(), value.float()
        if spans is None:
            out, weights = sdpa_attention_forward(module, query32, key32, value32, attention_mask, **kwargs)
            return out.to(query.dtype), weights
        rows = []
        for row_spans, q_row, k_row, v_row in zip(spans, query32, key32, value32, strict=True):
            sizes = [b - a for a, b in row_spans]  # split, not slices: one gradient concat, no zero fills
            parts = [
                sdpa_attention_forward(module, q[None], k[None], v[None], None, **{**kwargs, "is_causal": True})[0]
                for q, k, v in zip(
                    q_row.split(sizes, dim=1), k_row.split(sizes, dim=1), v_row.split(sizes, dim=1), strict=True
                )
            ]
            rows.append(torch.cat(parts, dim=1))  # [1, seq, heads, head_dim]
    return torch.cat(rows, dim=0).to(query.dtype), None


def attends_per_sequence(model: nn.Module, device: torch.device) -> bool:
    """Whether a packed row costs only its sequences' attention under `mixed_precision`: on the
    CPU, an SDPA model without a sliding window runs `FP32_SDPA`'s one causal SDPA per packed
    sequence; elsewhere a packed row attends over its whole width under a block mask."""
    base: Any = _transformers_model(model)
    if device.type != "cpu" or base is None or base.config._attn_implementation != "sdpa":
        return False
    return getattr(base.config, "sliding_window", None) is None


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """True when no row of a 2-D boolean mask has a real token after a padding position."""
    return not bool((~attention_mask[:, :-1] & attention_mask[:, 1:]).any())


def causal_sdpa_mask(**kwargs) -> torch.Tensor | None:
    """transformers' `sdpa_mask`, except that a right-padded training batch gets no mask at all:
    SDPA then runs with `is_causal=True` and skips the blocks above the diagonal.

    Exact for the real tokens: with padding only at the end of a row, the causal mask already
    keeps every real query off every padding key. Only the padding queries change (they see
    the real tokens before them), and their outputs carry no label. Anything else (left
    padding, a cache, sliding windows, packed sequences) goes to `sdpa_mask` unchanged.
    """
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    mask = kwargs.get("attention_mask")
    if (
        kwargs.get("allow_is_causal_skip", True)
        and mask is not None
        and mask.dtype == torch.bool
        and mask.dim() == 2
        and kwargs.get("mask_function", causal_mask_function) is causal_mask_function
        and kwargs.get("local_size") is None
        and kwargs.get("q_offset", 0) == 0
        and kwargs.get("kv_offset", 0) == 0
        and kwargs["q_length"] == kwargs["kv_length"] == mask.shape[-1]
        and is_right_padded(mask)
    ):
        return None
    return sdpa_mask(**kwargs)


def register_fp32_sdpa() -> None:
    """Make `FP32_SDPA` a valid `attn_implementation` (idempotent), with `causal_sdpa_mask`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(FP32_SDPA, sdpa_fp32_attention_forward)
    AttentionMaskInterface.register(FP32_SDPA, causal_sdpa_mask)


def register_causal_sdpa() -> None:
    """Make `CAUSAL_SDPA` a valid `attn_implementation` (idempotent): transformers' own SDPA
    attention, with `causal_sdpa_mask`, so a right-padded batch gets no mask and SDPA may pick
    its flash kernel (`is_causal=True`); packed rows keep transformers' block mask."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
    AttentionMaskInterface.register(CAUSAL_SDPA, causal_sdpa_mask)


def _transformers_model(model: nn.Module) -> nn.Module | None:
    """The transformers model under a peft wrapper (or the model itself), if it has one."""
    base = cast(Any, model).get_base_model() if hasattr(model, "get_base_model") else model
    return base if hasattr(base, "set_attn_implementation") else None


@contextlib.contextmanager
def mixed_precision(
    model: nn.Module, precision: str, device: torch.device
) -> Iterator[Callable[[], contextlib.AbstractContextManager]]:
    """For the whole training run: yields a factory of the per-forward autocast context.

    A model configured for SDPA trains with one of ours for the duration and gets its
    configured implementation back afterwards (the cached base model is shared by later
    trials): on the CPU `FP32_SDPA` (fp32 attention, no mask for right-padded batches, one
    causal SDPA per packed sequence), on CUDA `CAUSAL_SDPA` (no mask for right-padded batches,
    so SDPA can use its flash kernel).
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16 here, got {precision!r}")
    # a transformers model (duck-typed: torch types its attributes as Tensor | Module); None unless configured
    base: Any = _transformers_model(model) if device.type in ("cpu", "cuda") else None
    configured = base.config._attn_implementation if base is not None else None
    if configured == "sdpa":
        if device.type == "cpu":
            register_fp32_sdpa()
            base.set_attn_implementation(FP32_SDPA)
        else:
            register_causal_sdpa()
            base.set_attn_implementation(CAUSAL_SDPA)
    try:
        if precision == "fp32":
            yield contextlib.nullcontext
        else:
            yield lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    finally:
        if configured == "sdpa":
            base.set_attn_implementation(configured)
