"""A CPU dropout whose mask costs a quarter of the random draws of `nn.Dropout`'s.

On the CPU, `nn.Dropout` draws one Bernoulli sample per element from a serial generator:
with LoRA's dropout on the input of every adapted projection this was 11 % of a training
step (8M Llama, 2 threads; BENCHMARKS.md). Here one 64-bit draw gives four 16-bit uniform
lanes, each compared with a threshold, so p is rounded to a multiple of 1/65536 (0.05 ->
0.0500031) and the kept values are scaled by 1 / (1 - that p), which keeps the expectation
exact. The draws come from torch's default generator, so a seeded run is reproducible.
"""

from __future__ import annotations

import torch
from torch import nn

_LANES = 65536  # 16-bit lanes


class FastDropout(nn.Module):
    """Inverted dropout with 16-bit-resolution masks; the identity in eval mode or with p = 0."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.dropped = round(p * _LANES)  # lanes below this are dropped
        self.scale = _LANES / (_LANES - self.dropped)

    @property
    def effective_p(self) -> float:
        return self.dropped / _LANES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.dropped == 0:
            return x
        words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device)
        words.random_(-(2**63), None)  # all 64 bits uniform
        lanes = words.view(torch.int16)[: x.numel()].view(x.shape)
        keep = lanes >= self.dropped - _LANES // 2  # int16 lanes are uniform on [-32768, 32767]
        return x * (keep.to(x.dtype) * self.scale)

    def extra_repr(self) -> str:
        return f"p={self.p} (effective {self.effective_p:.7f})"


def use_fast_dropout(model: nn.Module) -> int:
    """Replace every `nn.Dropout` inside a peft LoRA layer's `lora_dropout` with `FastDropout`
    (same p). Returns how many were replaced. Meant for CPU models; CUDA's dropout is fast."""
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if type(dropout) is nn.Dropout and dropout.p > 0:
                dropouts[name] = FastDropout(dropout.p)
                replaced += 1
    return replaced
