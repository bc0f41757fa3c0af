"""Length-grouped batching: every example once per epoch, homogeneous batches, seeded order."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from lora_sweep import data as data_lib


def _lengths(n: int = 300, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(20, 400) for _ in range(n)]


def _epochs(sampler: data_lib.LengthGroupedBatchSampler, n: int) -> list[list[list[int]]]:
    return [list(sampler) for _ in range(n)]


@pytest.mark.parametrize(("n", "batch_size", "factor"), [(300, 8, 50), (300, 8, 4), (37, 5, 50), (3, 8, 50)])
def test_every_example_exactly_once_per_epoch(n: int, batch_size: int, factor: int) -> None:
    sampler = data_lib.LengthGroupedBatchSampler(_lengths(n), batch_size, seed=1, megabatch_factor=factor)
    for epoch in _epochs(sampler, 3):
        assert Counter(i for batch in epoch for i in batch) == Counter(range(n))
        assert len(epoch) == len(sampler)
        assert all(1 <= len(batch) <= batch_size for batch in epoch)


def test_batches_are_length_homogeneous() -> None:
    lengths = _lengths()
    sampler = data_lib.LengthGroupedBatchSampler(lengths, 8, seed=0)  # one mega-batch: globally sorted
    batches = list(sampler)
    spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches)
    # sorted into consecutive length ranges: no batch's range overlaps the next one's
    assert all(hi <= next_lo for (_, hi), (next_lo, _) in zip(spans, spans[1:], strict=False))

    def pad_fraction(batches: list[list[int]]) -> float:
        padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        return 1.0 - sum(lengths) / padded

    shuffled = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).split(8)
    assert pad_fraction(batches) < 0.05 < 0.3 < pad_fraction([b.tolist() for b in shuffled])


def test_order_depends_only_on_the_seed() -> None:
    lengths = _lengths()
    first = _epochs(data_lib.LengthGroupedBatchSampler(lengths, 8, seed=3, megabatch_factor=5), 2)
    again = _epochs(data_lib.LengthGroupedBatchSampler(lengths, 8, seed=3, megabatch_factor=5), 2)
    torch.manual_seed(12345)  # the global RNG plays no part
    random.seed(6789)
    third = _epochs(data_lib.LengthGroupedBatchSampler(lengths, 8, seed=3, megabatch_factor=5), 2)
    other = _epochs(data_lib.LengthGroupedBatchSampler(lengths, 8, seed=4, megabatch_factor=5), 2)
    assert first == again == third
    assert first != other
    assert first[0] != first[1]  # a new order every epoch


def test_grouped_loader_keeps_labels_and_masks() -> None:
    examples = [
        data_lib.Example(input_ids=tuple(range(1, n + 1)), labels=(-100,) * (n // 2) + tuple(range(n // 2 + 1, n + 1)))
        for n in _lengths(40)
    ]
    dataset = data_lib.SanityDataset(examples)
    collator = data_lib.Collator(0)
    grouped = data_lib.make_dataloader(dataset, collator, batch_size=4, seed=0, group_by_length=True)
    plain = data_lib.make_dataloader(dataset, collator, batch_size=4, seed=0, group_by_length=False)
    seen = 0
    for batch in grouped:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        assert ids.shape == mask.shape == labels.shape
        assert bool((labels[mask == 0] == -100).all())
        for row in range(ids.shape[0]):
            n = int(mask[row].sum())
            original = next(e for e in examples if e.input_ids == tuple(ids[row, :n].tolist()))
            # the same labels the collator gives this example in any batch
            alone = collator([dataset[examples.index(original)]])["labels"][0]
            assert labels[row, :n].tolist() == alone.tolist()
        assert ids.shape[1] == int(mask.sum(dim=1).max())  # padded to its own longest example
        seen += ids.shape[0]
    assert seen == len(examples)
    real = sum(len(e.input_ids) for e in examples)
    grouped_width = sum(b["input_ids"].numel() for b in grouped)
    plain_width = sum(b["input_ids"].numel() for b in plain)
    assert real <= grouped_width < plain_width
