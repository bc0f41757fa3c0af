"""Loading, validation, templates, tokenization, labels and collate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_sweep import data as d
from lora_sweep.embedded import SANITY_SAMPLES_PATH
from tests.conftest import AlpacaFiles


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def test_load_json_list_and_jsonl_agree(tmp_path: Path) -> None:
    records = [{"instruction": "add", "input": "1 2", "output": "3"}, {"instruction": "hi", "output": "hello"}]
    as_list = d.load_records(_write(tmp_path, "a.json", json.dumps(records)))
    as_lines = d.load_records(_write(tmp_path, "a.jsonl", "\n".join(json.dumps(r) for r in records) + "\n"))
    assert as_list == as_lines
    assert as_list[1]["input"] == ""  # optional field defaults to empty


def test_shipped_data_loads() -> None:
    sanity = d.load_records(SANITY_SAMPLES_PATH)
    assert 200 <= len(sanity)
    assert any(r["input"] for r in sanity) and any(not r["input"] for r in sanity)


def test_alpaca_fixture_files_load_as_written(alpaca_files: AlpacaFiles) -> None:
    as_list = d.load_records(alpaca_files.json_path)
    assert as_list == alpaca_files.records and len(as_list) == 40
    assert d.load_records(alpaca_files.jsonl_path) == as_list
    with_input = next(r for r in as_list if r["input"])
    without = next(r for r in as_list if not r["input"])
    assert "### Input:\n" + with_input["input"] in d.format_prompt(with_input, "alpaca")
    assert "### Input" not in d.format_prompt(without, "alpaca")


@pytest.mark.parametrize(
    "content,message",
    [
        ('[{"instruction": "x"', "is not valid JSON"),
        ("[]", "holds no records"),
        ("", "is empty"),
        ('[{"instruction": "x", "input": ""}]', "record 0 is missing the field 'output'"),
        ('[{"instruction": "a", "output": "b"}, {"output": "b"}]', "record 1 is missing the field 'instruction'"),
        ('[{"instruction": "a", "output": 3}]', "field 'output' must be a string"),
        ('["just a string"]', "record 0 must be a JSON object"),
        ('{"instruction": "a", "output": "b"}\n{"instruction": ', "line 2 is not valid JSON"),
        ('{"a": 1}', "missing the field 'instruction'"),
        ('[{"instruction": "a", "output": "  "}]', "has an empty 'output'"),
        (b'[{"instruction": "caf\xe9", "output": "b"}]', "is not UTF-8 text"),
    ],
)
def test_bad_data_gives_one_clear_line(tmp_path: Path, content: str | bytes, message: str) -> None:
    with pytest.raises(d.DataError) as info:
        d.load_records(_write(tmp_path, "bad.json", content))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(d.DataError, match="data file not found"):
        d.load_records(tmp_path / "nope.json")


def test_alpaca_template_with_and_without_input() -> None:
    with_input = d.format_prompt({"instruction": "Sort", "input": "3 1 2", "output": ""}, "alpaca")
    without = d.format_prompt({"instruction": "Sort", "input": "", "output": ""}, "alpaca")
    assert "paired with an input" in with_input and "### Input:\n3 1 2" in with_input
    assert "### Input" not in without and "Below is an instruction" in without
    assert with_input.endswith("### Response:\n") and without.endswith("### Response:\n")


@pytest.fixture(scope="module")
def tokenizer(tiny_ckpt: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_ckpt)


RECORDS = [
    {"instruction": "Reverse the words", "input": "red green blue", "output": "blue green red"},
    {"instruction": "Say hi", "input": "", "output": "hi"},
]


def test_eos_appended_and_labelled_bos_prepended(tokenizer) -> None:
    ex = d.tokenize_records(RECORDS, tokenizer, template="plain", max_length=512, mask_prompt=False)
    for e in ex:
        assert e.input_ids[0] == tokenizer.bos_token_id and e.input_ids.count(tokenizer.bos_token_id) == 1
        assert e.input_ids[-1] == tokenizer.eos_token_id and e.labels[-1] == tokenizer.eos_token_id
        assert e.labels == e.input_ids


def test_bos_only_where_the_tokenizer_adds_one(tokenizer) -> None:
    """GPT-2 and Qwen tokenizers add no BOS (GPT-2's bos_token is its EOS): none is prepended."""
    import copy

    from tokenizers import processors

    no_bos = copy.deepcopy(tokenizer)
    no_bos.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    assert no_bos.bos_token_id is not None and d.added_prefix(no_bos) == []
    assert d.added_prefix(tokenizer) == [tokenizer.bos_token_id]
    [e] = d.tokenize_records(RECORDS[:1], no_bos, template="plain", max_length=512, mask_prompt=False)
    assert tokenizer.bos_token_id not in e.input_ids
    assert list(e.input_ids) == no_bos(d.format_prompt(RECORDS[0], "plain"), add_special_tokens=False)[
        "input_ids"
    ] + no_bos(RECORDS[0]["output"], add_special_tokens=False)["input_ids"] + [no_bos.eos_token_id]


def test_mask_prompt_trains_on_response_only(tokenizer) -> None:
    ex = d.tokenize_records(RECORDS, tokenizer, template="plain", max_length=512, mask_prompt=True)[0]
    prompt_len = 1 + len(tokenizer(d.format_prompt(RECORDS[0], "plain"), add_special_tokens=False)["input_ids"])
    assert all(label == d.IGNORE_INDEX for label in ex.labels[:prompt_len])
    assert list(ex.labels[prompt_len:]) == list(ex.input_ids[prompt_len:])
    decoded = tokenizer.decode([t for t in ex.labels if t != d.IGNORE_INDEX], skip_special_tokens=True)
    assert decoded == "blue green red"


def test_truncation_to_max_length(tokenizer) -> None:
    ex = d.tokenize_records(RECORDS, tokenizer, template="alpaca", max_length=10, mask_prompt=False)
    assert all(len(e.input_ids) == 10 for e in ex)


def test_all_masked_records_are_dropped_or_refused(tokenizer) -> None:
    with pytest.raises(d.DataError, match="no record has a response within"):
        d.tokenize_records(RECORDS, tokenizer, template="alpaca", max_length=10, mask_prompt=True)


def _examples(lengths: list[int], eos: int) -> list[dict[str, torch.Tensor]]:
    items = []
    for n in lengths:
        ids = torch.arange(10, 10 + n)
        ids[-1] = eos  # a real EOS at the end of every sample
        items.append({"input_ids": ids, "labels": ids.clone()})
    return items


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_pads_to_longest_and_masks_labels_by_attention_mask(side: str) -> None:
    eos = 1
    batch = d.Collator(pad_token_id=eos, padding_side=side)(_examples([5, 3, 7], eos))  # pad id == EOS id
    assert batch["input_ids"].shape == (3, 7)
    mask, labels = batch["attention_mask"], batch["labels"]
    assert mask.sum(dim=1).tolist() == [5, 3, 7]
    assert (labels[mask == 0] == d.IGNORE_INDEX).all()
    # every real EOS keeps its label although pad == EOS
    for row, n in enumerate([5, 3, 7]):
        last_real = 6 if side == "left" else n - 1
        assert labels[row, last_real] == eos
    if side == "left":  # the first real token is "predicted" from a pad: masked too
        assert labels[1, 4] == d.IGNORE_INDEX and labels[1, 5] != d.IGNORE_INDEX


def test_collate_max_length_padding_for_seed_parity() -> None:
    batch = d.Collator(pad_token_id=2, pad_to=16)(_examples([5, 3], 1))
    assert batch["input_ids"].shape == (2, 16)
    assert int(batch["attention_mask"].sum()) == 8


def test_dataloader_order_depends_only_on_seed() -> None:
    ds = d.SanityDataset([d.Example(input_ids=(i, i + 1), labels=(i, i + 1)) for i in range(20)])
    collate = d.Collator(pad_token_id=0)

    def order(seed: int) -> list[int]:
        return [int(b["input_ids"][0, 0]) for b in d.make_dataloader(ds, collate, batch_size=4, seed=seed)]

    assert order(3) == order(3)
    assert order(3) != order(4)
    loader = d.make_dataloader(ds, collate, batch_size=4, seed=3)
    assert sorted(x for b in loader for x in b["input_ids"][:, 0].tolist()) == list(range(20))
