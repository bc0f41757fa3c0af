"""Gradient accumulation: batch_size b x grad_accum_steps k trains exactly as batch_size b*k.

The loss of a step is the mean over all its label tokens, so micro-batches of different label
counts add up to the full batch's gradient; a mean of micro-batch means would not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_sweep import data as d
from lora_sweep.config import LoraSettings, ModelConfig, TrainConfig
from lora_sweep.lora import apply_lora
from lora_sweep.loss import label_count, loss_sum
from lora_sweep.model import load_model
from lora_sweep.results import read_rows
from lora_sweep.sweep.space import parse_search_space
from lora_sweep.train import accumulate_gradients, train_loop
from tests.conftest import TINY, run_cli

CPU = torch.device("cpu")
# fp32 on the CPU: only the summation order differs (measured: max abs 6e-9, 5e-7 of the largest entry)
RTOL, ATOL = 1e-5, 1e-7


def _examples(n: int, *, seed: int = 0) -> list[d.Example]:
    """`n` sequences of different lengths (6-45 tokens) with a masked prompt of varying
    length, so micro-batches hold different numbers of labels."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        length = 6 + (i * 7) % 40
        ids = torch.randint(3, 384, (length,), generator=generator).tolist()  # past the special ids
        prompt = 1 + (i * 3) % (length - 2)
        examples.append(d.Example(input_ids=tuple(ids), labels=tuple([d.IGNORE_INDEX] * prompt + ids[prompt:])))
    return examples


def _lora_model(ckpt: Path) -> torch.nn.Module:
    """The tiny checkpoint with a seeded LoRA adapter whose B is random too: at init B = 0,
    and A would get no gradient to compare."""
    base = load_model(ckpt, ModelConfig(name="local", path=str(ckpt), attn_implementation="sdpa"), CPU)
    torch.manual_seed(0)
    model = apply_lora(base, LoraSettings(r=4, alpha=8.0, dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    model.train()
    return model


def _lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def _max_diffs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(max abs diff, max diff relative to b's largest entry of that tensor) over all tensors."""
    abs_diff = max(float((a[k] - b[k]).abs().max()) for k in b)
    rel_diff = max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in b)
    return abs_diff, rel_diff


def test_accumulated_gradient_equals_the_full_batch_not_a_mean_of_means(tiny_ckpt: Path) -> None:
    model = _lora_model(tiny_ckpt)
    collate = d.Collator(pad_token_id=2)  # right padding, each batch to its own longest
    items = d.SanityDataset(_examples(8))
    full = collate([items[i] for i in range(8)])
    micro = [collate([items[i], items[i + 1]]) for i in range(0, 8, 2)]
    counts = [label_count(b["labels"]) for b in micro]
    assert len(set(counts)) > 1 and sum(counts) == label_count(full["labels"])
    assert len({b["input_ids"].shape[1] for b in micro}) > 1  # each padded to its own longest

    loss_full, tokens_full = accumulate_gradients(model, [full], device=CPU)
    grads_full = _lora_grads(model)
    loss_accum, tokens_accum = accumulate_gradients(model, micro, device=CPU)
    grads_accum = _lora_grads(model)
    for batch in micro:  # the naive way: each micro-batch's own mean, averaged
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        (loss_sum(model(**inputs).logits, batch["labels"]) / label_count(batch["labels"]) / len(micro)).backward()
    grads_naive = _lora_grads(model)

    assert tokens_full == tokens_accum == sum(counts)
    assert float(loss_accum) == pytest.approx(float(loss_full), rel=1e-6)
    with torch.no_grad():  # the same loss as the model's own (transformers' ForCausalLMLoss)
        assert float(loss_full) == pytest.approx(float(model(**full).loss), rel=1e-6)
    assert all(float(g.abs().max()) > 0 for g in grads_full.values())  # A and B both have gradients
    for name, grad in grads_full.items():
        torch.testing.assert_close(grads_accum[name], grad, rtol=RTOL, atol=ATOL, msg=name)
    accum_abs, accum_rel = _max_diffs(grads_accum, grads_full)
    naive_abs, naive_rel = _max_diffs(grads_naive, grads_full)
    print(
        f"accum vs full: max abs {accum_abs:.2e}, rel {accum_rel:.2e}; naive: abs {naive_abs:.2e}, rel {naive_rel:.2e}"
    )
    # the test can fail: a mean of micro-batch means is far outside the tolerance
    assert naive_rel > 1e-2 and naive_abs > 1000 * max(accum_abs, ATOL)
    with pytest.raises(AssertionError):
        for name, grad in grads_full.items():
            torch.testing.assert_close(grads_naive[name], grad, rtol=RTOL, atol=ATOL)


def _sequences(batches: list[dict[str, torch.Tensor]]) -> list[list[int]]:
    """The unpadded sequences of batches, in order."""
    return [
        row[mask.bool()].tolist()
        for b in batches
        for row, mask in zip(b["input_ids"], b["attention_mask"], strict=True)
    ]


def test_train_loop_accumulating_2x4_matches_8x1(tiny_ckpt: Path) -> None:
    dataset = d.SanityDataset(_examples(40, seed=1))  # 40 = 5 full steps of 8: no epoch boundary inside a step
    collate = d.Collator(pad_token_id=2)
    orders, steps, weights = {}, {}, {}
    for batch_size, accum in ((8, 1), (2, 4)):
        drawn = d.infinite_batches(d.make_dataloader(dataset, collate, batch_size=batch_size, seed=3))
        orders[batch_size] = _sequences([next(drawn) for _ in range(3 * 8 // batch_size)])
        cfg = TrainConfig(lr=1e-2, max_steps=3, batch_size=batch_size, grad_accum_steps=accum, seed=3, device="cpu")
        batches = d.infinite_batches(d.make_dataloader(dataset, collate, batch_size=batch_size, seed=3))
        model = _lora_model(tiny_ckpt)
        steps[batch_size] = train_loop(model, batches, cfg, CPU, precision="fp32").steps
        weights[batch_size] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # the same sequences in the same order: RandomSampler's permutation does not depend on the batch size
    assert orders[8] == orders[2] and len(orders[8]) == 24
    full, accum = steps[8], steps[2]
    assert len(full) == len(accum) == 3
    assert [s.real_tokens for s in accum] == [s.real_tokens for s in full]
    assert all(a.tokens <= f.tokens for a, f in zip(accum, full, strict=True))  # less padding, never more
    for a, f in zip(accum, full, strict=True):
        assert a.loss == pytest.approx(f.loss, rel=RTOL)
        assert a.grad_norm == pytest.approx(f.grad_norm, rel=1e-4)
    initial = {n: p for n, p in _lora_model(tiny_ckpt).named_parameters() if p.requires_grad}
    for name, weight in weights[8].items():  # both took the same three updates
        assert not torch.equal(weight, initial[name])
        torch.testing.assert_close(weights[2][name], weight, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_single_run_records_grad_accum_steps(tmp_path: Path) -> None:
    proc = run_cli("train.grad_accum_steps=2", f"results_dir={tmp_path}", *TINY, "train.max_steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = read_rows(tmp_path / "lora_tuning_results.csv").iloc[0]
    assert row["train.grad_accum_steps"] == 2 and row["train.batch_size"] == 4
    assert row["status"] in ("success", "diverged") and row["steps_completed"] == 3


def test_search_space_accepts_grad_accum_steps() -> None:
    from optuna.distributions import CategoricalDistribution

    space = parse_search_space({"train.grad_accum_steps": "choice(1,2)"})
    assert space.distributions == {"train.grad_accum_steps": CategoricalDistribution([1, 2])}


@pytest.mark.slow
def test_sweep_searches_grad_accum_steps(tmp_path: Path) -> None:
    """A sweep option whose `params` holds `train.grad_accum_steps: choice(1,2)`; the two
    enqueued trials take each value, and each row records the one it trained with."""
    options = tmp_path / "conf" / "sweep"
    options.mkdir(parents=True)
    (options / "accum.yaml").write_text(
        "# @package hydra.sweeper\n"
        "defaults:\n  - default\n  - _self_\n"
        "custom_search_space: null\n"
        "enqueue:\n  - {train.grad_accum_steps: 1}\n  - {train.grad_accum_steps: 2}\n"
        "params:\n  train.grad_accum_steps: choice(1,2)\n"
    )
    results = tmp_path / "results"
    proc = run_cli(
        "-m",
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        "sweep=accum",
        f"results_dir={results}",
        "hydra.sweeper.n_trials=2",
        # the default space's other parameters fixed: only grad_accum_steps is searched
        "lora.r=4",
        "train.lr=1e-3",
        *TINY,
        "train.max_steps=3",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_rows(results / "lora_tuning_results.csv")
    assert sorted(rows["train.grad_accum_steps"].tolist()) == [1, 2]
    assert set(rows["status"]) <= {"success", "diverged", "pruned"}
