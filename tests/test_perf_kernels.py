"""CPU kernel choices for speed: fp32 attention under bf16 autocast, and the fast LoRA dropout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lora_sweep.config import LoraSettings, ModelConfig, TrainConfig
from lora_sweep.dropout import FastDropout, use_fast_dropout
from lora_sweep.lora import apply_lora
from lora_sweep.model import load_model
from lora_sweep.precision import (
    CAUSAL_SDPA,
    FP32_SDPA,
    causal_sdpa_mask,
    is_right_padded,
    mixed_precision,
    register_causal_sdpa,
    register_fp32_sdpa,
)
from lora_sweep.train import train_loop

CPU = torch.device("cpu")


def _batch(vocab: int = 384) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _model(ckpt: Path, attn: str = "sdpa") -> torch.nn.Module:
    model = load_model(ckpt, ModelConfig(name="local", path=str(ckpt), attn_implementation=attn), CPU)
    torch.manual_seed(0)
    return apply_lora(model, LoraSettings(r=4, alpha=8.0, dropout=0.0))


class _SdpaDtypes(TorchDispatchMode):
    """Records the query dtype of every SDPA forward kernel call, as the kernel gets it: below
    autocast, which casts the inputs after any Python-level wrapper has seen them."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if "scaled_dot_product" in name and "backward" not in name:
            self.seen.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


class _SdpaMasks(TorchDispatchMode):
    """Records, for every SDPA forward kernel call, (explicit mask given, is_causal)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bool, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if "scaled_dot_product" in name and "backward" not in name:
            kwargs = kwargs or {}
            mask = kwargs.get("attn_mask", args[6] if len(args) > 6 else None)
            causal = kwargs.get("is_causal", args[4] if len(args) > 4 else False)
            self.seen.append((mask is not None, bool(causal)))
        return func(*args, **(kwargs or {}))


def _left_padded(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    mask = batch["attention_mask"].flip(1)
    ids = batch["input_ids"].flip(1)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


# --------------------------------------------------------------------------- attention precision
def test_bf16_on_cpu_runs_attention_in_fp32_and_restores_the_model(tiny_ckpt: Path) -> None:
    model = _model(tiny_ckpt)
    cfg = TrainConfig(lr=1e-3, batch_size=3, max_steps=2, warmup_steps=1, log_every=2)
    with _SdpaDtypes() as spy:
        result = train_loop(model, iter([_batch()] * 2), cfg, CPU, precision="bf16")
    assert len(result.steps) == 2 and all(torch.isfinite(torch.tensor(s.loss)) for s in result.steps)
    assert spy.seen and set(spy.seen) == {torch.float32}  # autocast would have made them bf16
    assert model.get_base_model().config._attn_implementation == "sdpa"  # the cached model is given back as it was


def test_plain_autocast_would_run_attention_in_bf16(tiny_ckpt: Path) -> None:
    """The reason for the switch: under CPU autocast, the SDPA kernel gets bf16 inputs."""
    model = _model(tiny_ckpt)
    with _SdpaDtypes() as spy, torch.autocast("cpu", dtype=torch.bfloat16):
        model(**_batch())
    assert set(spy.seen) == {torch.bfloat16}


def test_fp32_attention_equals_sdpa_in_fp32_and_tracks_it_under_autocast(tiny_ckpt: Path) -> None:
    register_fp32_sdpa()
    model, batch = _model(tiny_ckpt), _batch()
    real = batch["attention_mask"].bool()
    base = model.get_base_model()
    with torch.no_grad():
        sdpa = model(**batch).logits[real]
        base.set_attn_implementation(FP32_SDPA)
        assert torch.equal(model(**batch).logits[real], sdpa)  # fp32 in, fp32 out: the same kernel
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(**batch).logits.float()[real]
        base.set_attn_implementation("sdpa")
    assert float((mixed - sdpa).abs().max()) < 0.1  # only the bf16 matmuls differ


def test_eager_models_are_left_alone_and_fp32_sdpa_uses_ours_without_autocast(tiny_ckpt: Path) -> None:
    eager = _model(tiny_ckpt, attn="eager")
    with mixed_precision(eager, "bf16", CPU):
        assert eager.get_base_model().config._attn_implementation == "eager"
    sdpa = _model(tiny_ckpt)
    batch = _batch()
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        reference = sdpa(**batch).logits[real]
        with mixed_precision(sdpa, "fp32", CPU) as autocast:
            # ours in fp32 too: the causal kernel for right padding, per-sequence packed attention
            assert sdpa.get_base_model().config._attn_implementation == FP32_SDPA
            with autocast():
                assert not torch.is_autocast_enabled("cpu")
                ours = sdpa(**batch).logits[real]
    assert sdpa.get_base_model().config._attn_implementation == "sdpa"
    assert torch.allclose(ours, reference, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="fp32 or bf16"):
        with mixed_precision(sdpa, "fp16", CPU):
            pass


def test_gpu_implementation_drops_the_mask_for_right_padding_only(tiny_ckpt: Path) -> None:
    """CAUSAL_SDPA (what a CUDA trial trains with) is transformers' SDPA with no mask for a
    right-padded batch, the explicit mask otherwise; checked on the CPU kernels."""
    register_causal_sdpa()
    model = _model(tiny_ckpt)
    base = model.get_base_model()
    for batch, want in ((_batch(), (False, True)), (_left_padded(_batch()), (True, False))):
        real = batch["attention_mask"].bool()
        with torch.no_grad():
            reference = model(**batch).logits[real]
            base.set_attn_implementation(CAUSAL_SDPA)
            with _SdpaMasks() as spy:
                ours = model(**batch).logits[real]
            base.set_attn_implementation("sdpa")
        assert set(spy.seen) == {want}
        assert torch.allclose(ours, reference, atol=1e-5, rtol=1e-5)


def test_attention_implementation_is_restored_when_training_raises(tiny_ckpt: Path) -> None:
    model = _model(tiny_ckpt)

    def broken_batches():
        yield _batch()
        raise RuntimeError("data loader died")

    with pytest.raises(RuntimeError, match="data loader died"):
        cfg = TrainConfig(lr=1e-3, batch_size=3, max_steps=3, warmup_steps=1, log_every=3)
        train_loop(model, broken_batches(), cfg, CPU, precision="bf16")
    assert model.get_base_model().config._attn_implementation == "sdpa"


# ------------------------------------------------------------------------------------ dropout
def test_fast_dropout_drops_p_and_keeps_the_expectation() -> None:
    torch.manual_seed(0)
    drop = FastDropout(0.05).train()
    x = torch.full((1000, 1000), 2.0)
    y = drop(x)
    dropped = float((y == 0).float().mean())
    assert abs(drop.effective_p - 0.05) <= 1 / 65536
    assert abs(dropped - drop.effective_p) < 0.002  # 1M draws: std ~0.0002
    assert abs(float(y.mean()) - 2.0) < 0.01
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, 2.0 * drop.scale))
    # every one of the four 16-bit lanes of a 64-bit draw is used: no stripe of the mask is biased
    per_lane = (y.flatten()[: 4 * (y.numel() // 4)].view(-1, 4) == 0).float().mean(dim=0)
    assert torch.all((per_lane - 0.05).abs() < 0.004)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_fast_dropout_matches_other_rates(p: float) -> None:
    torch.manual_seed(1)
    y = FastDropout(p).train()(torch.ones(200_000))
    assert abs(float((y == 0).float().mean()) - p) < 0.01
    assert abs(float(y.mean()) - 1.0) < 0.03


def test_fast_dropout_is_reproducible_differentiable_and_off_in_eval() -> None:
    drop = FastDropout(0.3).train()
    x = torch.randn(7, 13, requires_grad=True)
    torch.manual_seed(5)
    a = drop(x)
    torch.manual_seed(5)
    b = drop(x)
    assert torch.equal(a, b)
    a.sum().backward()
    expected = torch.where(a != 0, torch.full_like(a, drop.scale), torch.zeros_like(a))
    assert torch.allclose(x.grad, expected)
    assert drop.eval()(x) is x
    assert FastDropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        FastDropout(1.0)


def test_lora_on_cpu_gets_fast_dropout_and_unloads_cleanly(tiny_ckpt: Path) -> None:
    base = load_model(tiny_ckpt, ModelConfig(name="local", path=str(tiny_ckpt)), CPU)
    names_before = [n for n, _ in base.named_modules()]
    model = apply_lora(base, LoraSettings(r=4, alpha=8.0, dropout=0.05))
    dropouts = [m for m in model.modules() if isinstance(m, FastDropout)]
    assert len(dropouts) == 2 * 2  # q_proj and v_proj in each of the 2 layers
    assert not any(type(m) is torch.nn.Dropout and m.p > 0 for m in model.modules())
    assert use_fast_dropout(model) == 0  # idempotent
    restored = model.unload()
    assert [n for n, _ in restored.named_modules()] == names_before


# --------------------------------------------------------------------------- causal kernel for right padding
def test_causal_mask_is_skipped_only_for_right_padded_training_batches() -> None:
    right = _batch()["attention_mask"].bool()
    left = right.flip(1)
    hole = torch.ones(2, 6, dtype=torch.bool)
    hole[0, 2] = False
    assert is_right_padded(right) and not is_right_padded(left) and not is_right_padded(hole)

    def mask(attention_mask: torch.Tensor, **extra) -> torch.Tensor | None:
        n = attention_mask.shape[1]
        return causal_sdpa_mask(
            batch_size=attention_mask.shape[0], q_length=n, kv_length=n, attention_mask=attention_mask, **extra
        )

    assert mask(right) is None  # SDPA's is_causal covers it
    for other in (mask(left), mask(hole), mask(right, local_size=4), mask(right, allow_is_causal_skip=False)):
        assert other is not None and other.shape == (other.shape[0], 1, other.shape[2], other.shape[3])
    from transformers.masking_utils import sliding_window_causal_mask_function

    assert mask(right, mask_function=sliding_window_causal_mask_function(4)) is not None


def test_bf16_training_uses_the_causal_kernel_on_right_padding_only(tiny_ckpt: Path) -> None:
    cfg = TrainConfig(lr=1e-3, batch_size=3, max_steps=1, warmup_steps=0, log_every=1)
    for batch, want in ((_batch(), (False, True)), (_left_padded(_batch()), (True, False))):
        with _SdpaMasks() as spy:
            train_loop(_model(tiny_ckpt), iter([batch]), cfg, CPU, precision="bf16")
        assert spy.seen and set(spy.seen) == {want}


def test_causal_kernel_gives_the_masked_result_on_real_tokens(tiny_ckpt: Path) -> None:
    """Several kernel blocks long: the real tokens' logits and the loss match the explicit mask."""
    register_fp32_sdpa()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 384, (4, 300), generator=g)
    mask = torch.ones_like(ids)
    for row, length in enumerate((300, 211, 97, 40)):
        mask[row, length:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    model, real = _model(tiny_ckpt), mask.bool()
    base = model.get_base_model()
    with torch.no_grad():
        masked = model(**batch)
        base.set_attn_implementation(FP32_SDPA)
        with _SdpaMasks() as spy:
            causal = model(**batch)
        base.set_attn_implementation("sdpa")
    assert set(spy.seen) == {(False, True)}
    assert torch.allclose(causal.logits[real], masked.logits[real], atol=1e-5, rtol=1e-5)
    assert abs(float(causal.loss) - float(masked.loss)) < 1e-5
