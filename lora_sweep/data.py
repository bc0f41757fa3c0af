"""Instruction records -> token examples -> padded batches.

Labels are decided by the attention mask, never by the pad id: pad is often the same id as
EOS, and a real EOS must stay a label. A position's label is kept only when that position
and the one before it are real tokens (with left padding the first real token would
otherwise be "predicted" from a pad).
"""

from __future__ import annotations

import hashlib
import logging
import random
from array import array
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lora_sweep.datafiles import read_records
from lora_sweep.errors import DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
REQUIRED_FIELDS = ("instruction", "output")
OPTIONAL_FIELDS = ("input",)

# The Stanford Alpaca prompt, with and without the `input` block.
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
# The same sections without the preamble; the embedded tiny model is fine-tuned with this.
PLAIN_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PLAIN_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"

TEMPLATES = {
    "alpaca": (ALPACA_PROMPT_WITH_INPUT, ALPACA_PROMPT_NO_INPUT),
    "plain": (PLAIN_PROMPT_WITH_INPUT, PLAIN_PROMPT_NO_INPUT),
}


def load_records(path: Path) -> list[dict[str, str]]:
    """Read (any format `lora_sweep.datafiles` reads: JSON, JSONL, Parquet, a `save_to_disk`
    directory) and validate instruction records."""
    path = Path(path)
    raw = read_records(path)
    if not raw:
        raise DataError(f"{path} holds no records; add at least one {{'instruction', 'input', 'output'}} record")
    return [_validate_record(path, i, rec) for i, rec in enumerate(raw)]


def _validate_record(path: Path, index: int, record: Any) -> dict[str, str]:
    where = f"{path} record {index}"
    if not isinstance(record, Mapping):
        raise DataError(f"{where} must be a JSON object with 'instruction' and 'output', found {type(record).__name__}")
    for field in REQUIRED_FIELDS:
        if field not in record:
            raise DataError(f"{where} is missing the field '{field}' (each record needs 'instruction' and 'output')")
    clean = {}
    for field in REQUIRED_FIELDS + OPTIONAL_FIELDS:
        value = record.get(field, "")
        if value is None and field in OPTIONAL_FIELDS:
            value = ""
        if not isinstance(value, str):
            raise DataError(f"{where} field '{field}' must be a string, found {type(value).__name__}")
        clean[field] = value
    if not clean["output"].strip():
        raise DataError(f"{where} has an empty 'output'; there is nothing to learn from it")
    return clean


def format_prompt(record: Mapping[str, str], template: str) -> str:
    """The prompt part of a record (everything before the response)."""
    with_input, no_input = TEMPLATES[template]
    if record.get("input", "").strip():
        return with_input.format(instruction=record["instruction"], input=record["input"])
    return no_input.format(instruction=record["instruction"])


@dataclass(frozen=True)
class Example:
    """One tokenized record: unpadded ids and labels (IGNORE_INDEX on masked prompt tokens);
    for a conversation, which tokens are assistant text (`lora_sweep.chat`)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    assistant_mask: tuple[bool, ...] | None = None


def added_prefix(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer itself puts before a text (BOS for Llama and Gemma,
    nothing for GPT-2 or Qwen): BOS is added the way the checkpoint adds it, never twice."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def prompt_token_ids(record: Mapping[str, str], tokenizer: Any, *, template: str, prefix: list[int]) -> list[int]:
    """The prompt's tokens as training sees them: `prefix` (`added_prefix`), then the template."""
    return prefix + tokenizer(format_prompt(record, template), add_special_tokens=False)["input_ids"]


def tokenize_records(
    records: Sequence[Mapping[str, str]],
    tokenizer: Any,
    *,
    template: str,
    max_length: int,
    mask_prompt: bool,
    key: str = "data.max_length",
) -> list[Example]:
    """Tokenize prompt and response separately (so the boundary is exact), append EOS, truncate.

    The prompt starts with the special tokens the tokenizer adds itself (`added_prefix`).
    Records whose labels are all masked after truncation (prompt longer than max_length with
    mask_prompt) are dropped with a warning; `key` names the length setting in messages (the
    held-out set's is `data.eval_max_length`).
    """
    if tokenizer.eos_token_id is None:
        raise DataError(
            "the tokenizer has no EOS token; set tokenizer.eos_token in the checkpoint's tokenizer_config.json"
        )
    bos = added_prefix(tokenizer)
    examples, dropped = [], 0
    for record in records:
        prompt_ids = prompt_token_ids(record, tokenizer, template=template, prefix=bos)
        response_ids = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        input_ids = (prompt_ids + response_ids)[:max_length]
        prompt_labels = [IGNORE_INDEX] * len(prompt_ids) if mask_prompt else prompt_ids
        labels = (prompt_labels + response_ids)[:max_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            dropped += 1
            continue
        examples.append(Example(input_ids=tuple(input_ids), labels=tuple(labels)))
    if dropped:
        log.warning("dropped %d of %d records whose response lies beyond %s=%d", dropped, len(records), key, max_length)
    if not examples:
        raise DataError(
            f"no record has a response within {key}={max_length} tokens; raise {key} or set data.mask_prompt=false"
        )
    return examples


class SanityDataset(Dataset):
    """Tokenized examples; `__getitem__` returns unpadded 1-D tensors of length S."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        example = self.examples[index]
        return {
            "input_ids": torch.tensor(example.input_ids, dtype=torch.long),
            "labels": torch.tensor(example.labels, dtype=torch.long),
        }


def labels_from_mask(labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mask labels by the attention mask: padding, and any token whose predecessor is padding.

    The model predicts position i from position i-1, so a label is trainable only when both
    are real tokens. Works for right and left padding alike.
    """
    real = attention_mask.bool()
    keep = real.clone()
    keep[:, 1:] &= real[:, :-1]
    return labels.masked_fill(~keep, IGNORE_INDEX)


class Collator:
    """Pad a list of examples into a batch dict of [B, S] tensors.

    `pad_to=None` pads each batch to its own longest sample; an int pads to that length
    (parity with the original loop, which padded every sample to max_length).
    """

    def __init__(self, pad_token_id: int, *, padding_side: str = "right", pad_to: int | None = None) -> None:
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.pad_to = pad_to

    def __call__(self, items: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        width = self.pad_to or max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            span = slice(0, n) if self.padding_side == "right" else slice(width - n, width)
            input_ids[row, span] = item["input_ids"]
            labels[row, span] = item["labels"]
            attention_mask[row, span] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels_from_mask(labels, attention_mask),
        }


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of similar-length examples, in a shuffled order that depends only on `seed`.

    Each epoch: a random permutation of all indices, cut into mega-batches of
    `batch_size * megabatch_factor` indices; each mega-batch is sorted by length (longest
    first) and cut into batches; the batch order of the whole epoch is then shuffled. Every
    example appears exactly once per epoch (the last batch of a mega-batch may be short, as
    with `drop_last=False`). Per-batch padding then pads each batch only to its own longest
    example, so little compute goes to padding. One generator is drawn from epoch after
    epoch, so epoch 2 differs from epoch 1 and the whole sequence is fixed by the seed.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int, megabatch_factor: int = 50) -> None:
        if batch_size < 1 or megabatch_factor < 1:
            raise ValueError("batch_size and megabatch_factor must be >= 1")
        self.lengths = torch.tensor(list(lengths), dtype=torch.long)
        self.batch_size = batch_size
        self.megabatch = batch_size * megabatch_factor
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.lengths)
        full, rest = divmod(n, self.megabatch)
        return full * -(-self.megabatch // self.batch_size) + -(-rest // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        perm = torch.randperm(len(self.lengths), generator=self.generator)
        batches: list[list[int]] = []
        for mega in perm.split(self.megabatch):
            # stable sort: equal lengths keep their (random) permutation order
            order = torch.sort(self.lengths[mega], descending=True, stable=True).indices
            batches.extend(chunk.tolist() for chunk in mega[order].split(self.batch_size))
        for i in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[i]


class PackedBatchSampler(Sampler[list[int]]):
    """Micro-batches of `rows` rows of `width` tokens, filled with examples in a seeded random
    order; yields each micro-batch's indices row after row (what `PackingCollator` packs).

    Each epoch: a random permutation of all indices; for each micro-batch the next examples
    in that order go first-fit into its rows, and an example that fits no row waits (in
    order) for the next micro-batch, looking at most `window` examples ahead. Every example
    is trained on once per epoch and waits at most a few micro-batches, so the sample order
    stays random while the rows fill up. Examples must be at most `width` tokens long
    (`pack_shape` makes the width at least the longest example).

    First-fit yielded row by row is exactly what the collator's next-fit rebuilds: the first
    example of row k+1 fitted no earlier row when it was placed, and rows only fill up.
    """

    def __init__(self, lengths: Sequence[int], *, rows: int, width: int, seed: int, window: int = 64) -> None:
        if rows < 1 or width < 1 or window < 1:
            raise ValueError("rows, width and window must be >= 1")
        too_long = [n for n in lengths if n > width]
        if too_long:
            raise ValueError(f"{len(too_long)} examples are longer than the row width {width}")
        self.lengths = list(lengths)
        self.rows, self.width, self.window = rows, width, window
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[list[int]]:
        waiting = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        while waiting:
            space = [self.width] * self.rows
            packed: list[list[int]] = [[] for _ in range(self.rows)]
            deferred: list[int] = []
            for index in waiting[: self.window]:
                row = next((r for r, free in enumerate(space) if free >= self.lengths[index]), None)
                if row is None:
                    deferred.append(index)
                    continue
                packed[row].append(index)
                space[row] -= self.lengths[index]
            waiting = deferred + waiting[self.window :]
            yield [index for row_indices in packed for index in row_indices]


def packed_rows(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Next-fit: positions of `lengths` grouped into consecutive rows of at most `width` tokens."""
    rows: list[list[int]] = []
    free = 0
    for position, n in enumerate(lengths):
        if not rows or n > free:
            rows.append([])
            free = width
        rows[-1].append(position)
        free -= n
    return rows


class PackingCollator:
    """Concatenate examples into rows: `input_ids`, `position_ids` restarting at 0 for each
    example, `labels`, and `real_tokens` (a bool mask of the non-padding positions, not a model
    input). There is no attention mask: transformers derives the block-causal mask (no
    attention across examples) from the packed `position_ids`, and flash-attention's varlen
    kernels use them directly. Each example's first label is masked: it would be predicted
    from the end of the example before it. A row's tail is padding (a segment of its own,
    labels masked); the width is the fullest row's fill."""

    def __init__(self, pad_token_id: int, *, width: int) -> None:
        self.pad_token_id, self.width = pad_token_id, width

    def __call__(self, items: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        lengths = [len(item["input_ids"]) for item in items]
        rows = packed_rows(lengths, self.width)
        width = max(sum(lengths[i] for i in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        real = torch.zeros((len(rows), width), dtype=torch.bool)
        longest = max(lengths)
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                ids, n = items[i]["input_ids"], lengths[i]
                input_ids[r, start : start + n] = ids
                labels[r, start + 1 : start + n] = items[i]["labels"][1:]
                position_ids[r, start : start + n] = torch.arange(n)
                real[r, start : start + n] = True
                start += n
            # the tail is a segment of its own; its positions wrap at the longest example, so
            # they never pass what the examples use (learned position tables, dynamic RoPE)
            position_ids[r, start:] = torch.arange(width - start) % longest
        return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels, "real_tokens": real}


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys of a training batch the model takes (not `labels`, not `real_tokens`)."""
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


def real_token_count(batch: Mapping[str, torch.Tensor]) -> int:
    """Non-padding tokens of a padded (`attention_mask`) or packed (`real_tokens`) batch."""
    mask = batch["attention_mask"] if "attention_mask" in batch else batch["real_tokens"]
    return int(mask.sum())


# Longest packed row (unless one example is longer): a row attends over its whole width under
# a block mask (SDPA, eager), so its cost grows with the width squared; per-sequence attention
# (ours on the CPU, flash-attention varlen) does not care.
PACKED_ROW_TOKENS = 1024


def packing_window(batch_size: int) -> int:
    """How many waiting examples `PackedBatchSampler` looks at per micro-batch: enough for
    `batch_size` of them with room to choose."""
    return max(64, 4 * batch_size)


def pack_shape(lengths: Sequence[int], *, batch_size: int) -> tuple[int, int]:
    """(rows, width) of a packed micro-batch: the token budget of `batch_size` examples of mean
    length, in as few rows as `PACKED_ROW_TOKENS` allows, every row at least the longest example.

    A packed step should see `batch_size` examples on average, so the learning rate keeps its
    meaning; but first-fit leaves a gap at the end of each row, and short examples fill gaps
    more often than long ones, so the width is calibrated: one seeded epoch of the sampler is
    simulated (on at most 4096 of the lengths) and the width scaled by batch_size over the
    examples per micro-batch it gave, a few times, by at most 2x in all (a data set smaller than
    one micro-batch cannot fill it at any width). Uncalibrated rows as long as the longest
    example held 6.3-7 examples of 8 on the sanity samples and the seed tasks. Cached by a
    digest of the lengths: the calibration costs ~5 ms on the sanity data, and a sweep's trials
    pack the same few data sets.
    """
    if not lengths:
        raise ValueError("no examples to pack")
    key = (hashlib.blake2b(array("q", lengths).tobytes(), digest_size=16).digest(), batch_size)
    if key not in _PACK_SHAPES:
        while len(_PACK_SHAPES) >= 64:
            _PACK_SHAPES.pop(next(iter(_PACK_SHAPES)))
        _PACK_SHAPES[key] = _calibrated_pack_shape(lengths, batch_size)
    return _PACK_SHAPES[key]


_PACK_SHAPES: dict[tuple[bytes, int], tuple[int, int]] = {}  # `pack_shape`'s, by (digest, batch size)


def _calibrated_pack_shape(lengths: Sequence[int], batch_size: int) -> tuple[int, int]:
    longest, mean = max(lengths), sum(lengths) / len(lengths)
    budget = max(longest, round(batch_size * mean))
    rows = -(-budget // max(longest, PACKED_ROW_TOKENS))
    width = max(longest, -(-budget // rows))
    low, high = longest, 2 * width
    sample = list(lengths) if len(lengths) <= 4096 else random.Random(0).sample(list(lengths), 4096)
    window = packing_window(batch_size)
    for _ in range(4):
        epoch = PackedBatchSampler(sample, rows=rows, width=width, seed=0, window=window)
        per_batch = len(sample) / sum(1 for _ in epoch)
        calibrated = min(high, max(low, round(width * batch_size / per_batch)))
        if calibrated == width:
            break
        width = calibrated
    return rows, width


def make_dataloader(
    dataset: SanityDataset,
    collator: Collator,
    *,
    batch_size: int,
    seed: int,
    group_by_length: bool = False,
    packing: bool = False,
) -> DataLoader:
    """A shuffling DataLoader whose order depends only on `seed`.

    `group_by_length` batches similar lengths together (`LengthGroupedBatchSampler`); with
    per-batch padding it trains on far fewer pad tokens than a uniform shuffle. `packing`
    concatenates examples into rows (`pack_shape`, `PackedBatchSampler`, `PackingCollator`):
    almost no padding, and the same number of tokens in every step.
    """
    lengths = [len(e.input_ids) for e in dataset.examples]
    if packing:
        rows, width = pack_shape(lengths, batch_size=batch_size)
        packer = PackedBatchSampler(lengths, rows=rows, width=width, seed=seed, window=packing_window(batch_size))
        return DataLoader(dataset, batch_sampler=packer, collate_fn=PackingCollator(collator.pad_token_id, width=width))
    if group_by_length:
        sampler = LengthGroupedBatchSampler(lengths, batch_size, seed=seed)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collator)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collator, generator=generator)


def infinite_batches(loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    """Cycle through the loader epoch after epoch (a step-based loop needs no epoch logic)."""
    while True:
        yield from loader
