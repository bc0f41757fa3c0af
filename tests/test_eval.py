"""The validation split and the held-out loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_sweep.data import Example, tokenize_records
from lora_sweep.errors import DataError
from lora_sweep.evaluate import eval_batches, evaluate_loss
from lora_sweep.split import MIN_VAL_RECORDS, split_records, val_count


def _records(n: int) -> list[dict[str, str]]:
    return [{"instruction": f"task {i}", "input": "", "output": f"answer {i % 7}"} for i in range(n)]


def test_split_is_deterministic_disjoint_and_independent_of_order() -> None:
    records = _records(50)
    train, val = split_records(records, val_size=0.2, seed=0)
    assert len(val) == 10 and len(train) == 40
    as_text = lambda rs: {json.dumps(r, sort_keys=True) for r in rs}  # noqa: E731
    assert not as_text(train) & as_text(val)
    again_train, again_val = split_records(list(reversed(records)), val_size=0.2, seed=0)
    assert as_text(again_val) == as_text(val) and as_text(again_train) == as_text(train)
    _, other_val = split_records(records, val_size=0.2, seed=1)
    assert as_text(other_val) != as_text(val)  # the split seed moves it; nothing else does
    assert train == [r for r in records if json.dumps(r, sort_keys=True) in as_text(train)]  # file order kept


def test_identical_records_land_on_one_side() -> None:
    records = _records(20) + _records(20)  # every record twice
    train, val = split_records(records, val_size=5, seed=0)
    texts = {json.dumps(r, sort_keys=True) for r in val}
    assert all(json.dumps(r, sort_keys=True) not in texts for r in train)
    assert len(val) >= 5 and len(val) % 2 == 0


def test_val_count_floor_and_refusals() -> None:
    assert val_count(400, 0.1) == 40
    assert val_count(10, 0.1) == MIN_VAL_RECORDS  # the floor
    assert val_count(10, 3) == 3
    with pytest.raises(DataError, match="data.val_size=10 leaves 0 training"):
        val_count(10, 10)
    with pytest.raises(DataError, match="leaves"):
        val_count(3, 0.5)  # the floor of 4 leaves nothing to train on
    with pytest.raises(DataError):
        val_count(10, 0)


def test_eval_loss_equals_one_sequence_at_a_time(tiny_ckpt: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_ckpt)
    model = AutoModelForCausalLM.from_pretrained(tiny_ckpt, attn_implementation="sdpa")
    records = [{"instruction": "word " * n, "input": "", "output": "reply " * (n % 5 + 1)} for n in range(1, 30, 3)]
    examples = tokenize_records(records, tokenizer, template="plain", max_length=64, mask_prompt=True)
    lengths = {len(e.input_ids) for e in examples}
    assert len(lengths) > 3  # batches really pad
    batches = eval_batches(examples, tokenizer.pad_token_id, tokens_per_batch=128)
    assert 1 < len(batches) < len(examples)
    model.train()
    result = evaluate_loss(model, batches, torch.device("cpu"))
    assert model.training  # mode restored

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for e in examples:
            ids, labels = torch.tensor([e.input_ids]), torch.tensor([e.labels])
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * n  # the model's own mean
            count += n
    assert result.label_tokens == count
    assert result.loss == pytest.approx(total / count, abs=1e-5)
    # a mean of batch means would differ: the batches hold different numbers of labels
    means = []
    with torch.no_grad():
        for batch in batches:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            means.append(float(out.loss))
    assert abs(sum(means) / len(means) - result.loss) > 1e-4


@pytest.mark.parametrize(("packed", "label_logits_only"), [(False, True), (True, False), (True, True)])
def test_packed_rows_and_label_logits_give_the_padded_loss(
    tiny_ckpt: Path, packed: bool, label_logits_only: bool
) -> None:
    """The trial's fast paths (packed rows under the CPU's per-sequence attention, logits of the
    labelled positions only) give the plain padded evaluation's loss over the same labels."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_sweep.precision import FP32_SDPA, attends_per_sequence, mixed_precision

    tokenizer = AutoTokenizer.from_pretrained(tiny_ckpt)
    model = AutoModelForCausalLM.from_pretrained(tiny_ckpt, attn_implementation="sdpa")
    records = [{"instruction": "word " * n, "input": "", "output": "reply " * (n % 5 + 1)} for n in range(1, 30, 3)]
    examples = tokenize_records(records, tokenizer, template="plain", max_length=64, mask_prompt=True)
    cpu = torch.device("cpu")
    assert attends_per_sequence(model, cpu)
    padded = evaluate_loss(model, eval_batches(examples, tokenizer.pad_token_id, tokens_per_batch=128), cpu)
    batches = eval_batches(examples, tokenizer.pad_token_id, tokens_per_batch=128, packed=packed)
    if packed:
        assert "attention_mask" not in batches[0] and len(batches) < len(examples)  # rows hold several sequences
        assert sum(int(b["real_tokens"].sum()) for b in batches) == sum(len(e.input_ids) for e in examples)
    with mixed_precision(model, "fp32", cpu) as autocast:
        assert model.config._attn_implementation == FP32_SDPA
        fast = evaluate_loss(model, batches, cpu, autocast=autocast, label_logits_only=label_logits_only)
    assert fast.label_tokens == padded.label_tokens
    assert fast.loss == pytest.approx(padded.loss, abs=1e-5)


def test_packed_eval_rows_fill_first_fit_decreasing() -> None:
    from lora_sweep.evaluate import packed_eval_rows

    lengths = [5, 40, 12, 33, 7, 40, 90]
    rows = packed_eval_rows(lengths, 80)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert rows[0] == [6]  # longer than a row: alone
    assert all(sum(lengths[i] for i in row) <= 80 for row in rows[1:])
    assert len(rows) == 3  # 90 | 40 40 | 33 12 7 5


def test_eval_batches_respect_the_token_budget() -> None:
    examples = [Example(input_ids=tuple(range(n)), labels=tuple(range(n))) for n in (5, 40, 12, 33, 7, 40)]
    batches = eval_batches(examples, 0, tokens_per_batch=80)
    assert all(b["input_ids"].numel() <= 80 for b in batches)
    assert sum(int(b["attention_mask"].sum()) for b in batches) == sum(len(e.input_ids) for e in examples)
