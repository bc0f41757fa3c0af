"""Precision decisions from the device's capabilities (no GPU needed), TF32 on CUDA only, and
fp16 base weights refused up front."""

from __future__ import annotations

import pytest
import torch

from lora_sweep.config import ModelConfig
from lora_sweep.errors import ConfigError
from lora_sweep.precision import BF16_CPU_MIN_PARAMS, BF16_CUDA_MIN_PARAMS, allow_tf32, choose_precision


@pytest.mark.parametrize(
    "device_type,caps,expected",
    [
        ("cuda", {"cuda_bf16": True, "n_params": BF16_CUDA_MIN_PARAMS}, "bf16"),  # Ampere and newer (A100, H200)
        ("cuda", {"cuda_bf16": True, "n_params": BF16_CUDA_MIN_PARAMS - 1}, "fp32"),  # launch-bound: TF32 wins
        ("cuda", {"cuda_bf16": False, "n_params": 10**9}, "fp32"),  # e.g. a V100 or T4: no bf16
        ("cpu", {"cpu_bf16": True, "n_params": BF16_CPU_MIN_PARAMS}, "bf16"),
        ("cpu", {"cpu_bf16": True, "n_params": BF16_CPU_MIN_PARAMS - 1}, "fp32"),  # tiny: casts cost more
        ("cpu", {"cpu_bf16": False, "n_params": 10**9}, "fp32"),
        ("mps", {"cuda_bf16": True, "cpu_bf16": True, "n_params": 10**9}, "fp32"),
    ],
)
def test_auto_follows_the_device_capabilities(device_type: str, caps: dict, expected: str) -> None:
    assert choose_precision("auto", device_type=device_type, **caps) == expected


def test_an_explicit_precision_is_kept() -> None:
    assert choose_precision("fp32", device_type="cuda", cuda_bf16=True) == "fp32"
    assert choose_precision("bf16", device_type="cpu") == "bf16"


def test_tf32_is_allowed_on_cuda_only() -> None:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        assert not allow_tf32(torch.device("cpu"))
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert allow_tf32(torch.device("cuda", 0))  # the flags only; no CUDA needed to set them
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_fp16_base_weights_are_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError) as err:
        ModelConfig(name="local", path="/ckpt", dtype="float16")
    message = str(err.value)
    assert "\n" not in message and message.startswith("model.dtype=float16 cannot be trained here")
    assert "model.dtype=bfloat16" in message and "train.precision=bf16" in message
    assert ModelConfig(name="local", path="/ckpt", dtype="bfloat16").dtype == "bfloat16"
