"""The loss from the labelled positions' logits alone equals the loss from full logits, and the
self-check falls back to full logits wherever a model does not slice them as asked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lora_sweep import data as d
from lora_sweep.config import LoraSettings, ModelConfig
from lora_sweep.lora import apply_lora
from lora_sweep.loss import accepts_logits_to_keep, label_count, label_positions, loss_sum, summed_loss
from lora_sweep.model import load_model
from lora_sweep.selfcheck import check_label_logits
from tests.test_grad_accum import _examples, _lora_grads, _lora_model

CPU = torch.device("cpu")
# fp32 on the CPU: the same terms summed in another order
RTOL, ATOL = 1e-5, 1e-6


def _padded(examples: list[d.Example]) -> dict[str, torch.Tensor]:
    items = [d.SanityDataset(examples)[i] for i in range(len(examples))]
    return d.Collator(2, padding_side="right")(items)


def _packed(examples: list[d.Example]) -> dict[str, torch.Tensor]:
    items = [d.SanityDataset(examples)[i] for i in range(len(examples))]
    return d.PackingCollator(2, width=sum(len(e.input_ids) for e in examples) // 2 + 8)(items)


def _loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, sliced: bool) -> tuple[float, dict]:
    loss = summed_loss(model, d.model_inputs(batch), batch["labels"], label_logits_only=sliced)
    loss.backward()
    return float(loss.detach()), _lora_grads(model)


@pytest.mark.parametrize("collate", [_padded, _packed], ids=["padded", "packed"])
def test_label_logits_give_the_full_logits_loss_and_gradients(tiny_ckpt: Path, collate) -> None:
    model = _lora_model(tiny_ckpt)
    batch = collate(_examples(8))
    assert int(label_positions(batch["labels"]).sum()) == label_count(batch["labels"])
    keep = label_positions(batch["labels"])
    assert keep.float().mean() < 0.9  # prompts and padding: positions really are left out
    full, full_grads = _loss_and_grads(model, batch, sliced=False)
    sliced, sliced_grads = _loss_and_grads(model, batch, sliced=True)
    assert sliced == pytest.approx(full, rel=RTOL)
    for name, grad in full_grads.items():
        torch.testing.assert_close(sliced_grads[name], grad, rtol=RTOL, atol=ATOL)


def test_label_logits_loss_is_chunked_over_positions(tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _lora_model(tiny_ckpt)
    batch = _padded(_examples(8))
    with torch.no_grad():
        whole = float(summed_loss(model, d.model_inputs(batch), batch["labels"], label_logits_only=True))
        monkeypatch.setattr("lora_sweep.loss.LOSS_CHUNK_POSITIONS", 7)  # many chunks, a ragged last one
        chunked = float(summed_loss(model, d.model_inputs(batch), batch["labels"], label_logits_only=True))
    assert chunked == pytest.approx(whole, rel=RTOL)


def test_a_batch_without_labels_has_zero_loss_and_still_backpropagates(tiny_ckpt: Path) -> None:
    model = _lora_model(tiny_ckpt)
    batch = _padded(_examples(2))
    batch["labels"] = torch.full_like(batch["labels"], d.IGNORE_INDEX)
    loss = summed_loss(model, d.model_inputs(batch), batch["labels"], label_logits_only=True)
    assert float(loss.detach()) == 0.0
    loss.backward()  # part of the graph: a micro-batch without labels does not break a step


def _fresh(tiny_ckpt: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    return apply_lora(
        load_model(tiny_ckpt, ModelConfig(name="local", path=str(tiny_ckpt)), CPU), LoraSettings(r=4, alpha=8.0)
    )


def test_self_check_verifies_label_logits(tiny_ckpt: Path) -> None:
    model = _fresh(tiny_ckpt).eval()
    batch = _padded(_examples(4))
    with torch.no_grad():
        verified, detail = check_label_logits(model, batch)
    assert verified, detail
    assert detail.startswith(f"logits of the {label_count(batch['labels'])} labelled positions only, of ")


def test_a_forward_without_logits_to_keep_trains_on_full_logits(tiny_ckpt: Path) -> None:
    model = _fresh(tiny_ckpt).eval()
    base = model.get_base_model()
    original = base.forward

    def forward(input_ids: Any = None, attention_mask: Any = None, **kwargs: Any) -> Any:  # no logits_to_keep
        return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    base.forward = forward
    assert not accepts_logits_to_keep(model)
    with torch.no_grad():
        verified, detail = check_label_logits(model, _padded(_examples(4)))
    assert not verified
    assert detail == "full logits: LlamaForCausalLM.forward takes no logits_to_keep"


def _indexes_dim_1(keep: torch.Tensor) -> torch.Tensor:
    """What a release that slices `hidden_states[:, logits_to_keep, :]` does with a 2-D mask."""
    torch.zeros(2, 3, 4)[:, torch.zeros(2, 3, dtype=torch.bool), :]
    return keep


@pytest.mark.parametrize(
    ("misread", "reason"),
    [
        (lambda keep: 0, "logits_to_keep gave shape"),  # a release that ignores the mask: every position
        (lambda keep: torch.roll(keep, 1, dims=1), "the labelled positions' logits alone differ"),
        (lambda keep: keep.long(), "logits_to_keep gave shape"),  # read as 2-D positions
        (_indexes_dim_1, "logits_to_keep with a boolean mask failed (IndexError"),  # hidden[:, keep, :]
    ],
    ids=["ignored", "shifted", "positions", "fails"],
)
def test_a_model_that_misreads_the_mask_trains_on_full_logits(tiny_ckpt: Path, misread, reason: str) -> None:
    model = _fresh(tiny_ckpt).eval()
    base = model.get_base_model()
    original = base.forward

    def forward(*args: Any, logits_to_keep: Any = 0, **kwargs: Any) -> Any:
        if isinstance(logits_to_keep, torch.Tensor):
            logits_to_keep = misread(logits_to_keep)
        return original(*args, logits_to_keep=logits_to_keep, **kwargs)

    base.forward = forward
    with torch.no_grad():
        verified, detail = check_label_logits(model, _padded(_examples(4)))
    assert not verified
    assert detail.startswith("full logits: ") and reason in detail, detail


def test_full_logits_loss_is_transformers_own(tiny_ckpt: Path) -> None:
    """`loss_sum` over the label count is the loss transformers computes from `labels`."""
    model = _lora_model(tiny_ckpt)
    batch = _padded(_examples(4))
    with torch.no_grad():
        out = model(**d.model_inputs(batch), labels=batch["labels"])
        ours = loss_sum(out.logits, batch["labels"]) / label_count(batch["labels"])
    assert float(ours) == pytest.approx(float(out.loss), rel=RTOL)
