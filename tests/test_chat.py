"""Chat data: conversation records rendered with the tokenizer's chat template, the loss on
exactly the assistant tokens (with and without `{% generation %}` tags), templates refused
where the labels could not be exact, and `data=chat` on the embedded default."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from lora_sweep import chat
from lora_sweep.data import IGNORE_INDEX
from lora_sweep.embedded import SANITY_CHAT_PATH, SANITY_SAMPLES_PATH, TINY_LLAMA_DIR
from lora_sweep.errors import DataError
from lora_sweep.results import read_rows
from tests.conftest import TINY, run_cli

CONVERSATION = [
    {"role": "system", "content": "Answer with the result only."},
    {"role": "user", "content": "Add 2 and 3."},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "Now reverse: cat dog"},
    {"role": "assistant", "content": "dog cat"},
]
# The embedded template without its generation tags: the prefix-rendering path.
UNTAGGED = (
    (TINY_LLAMA_DIR / "chat_template.jinja")
    .read_text()
    .replace("{% generation %}", "")
    .replace("{% endgeneration %}", "")
)
# Qwen 3's habit, reduced: the last assistant turn is rendered with an (empty) reasoning block,
# earlier ones without, so a turn renders differently once later turns follow.
NOT_PREFIX_PRESERVING = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{{- '<|assistant|>' + ('<think></think>' if loop.last else '') + m.content + eos_token -}}"
    "{%- else -%}{{- '<|' + m.role + '|>' + m.content -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)
# Llama 3's convention: the template writes BOS itself, and the tokenizer would add one too.
BOS_IN_TEMPLATE = (
    "{{- bos_token -}}{%- for m in messages -%}{{- m.role + ': ' + m.content + eos_token -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'assistant: ' -}}{%- endif -%}"
)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY_LLAMA_DIR))


def _with_template(tokenizer: Any, template: str) -> Any:
    import copy

    other = copy.deepcopy(tokenizer)
    other.chat_template = template
    return other


def _labelled_runs(tokenizer: Any, ids: tuple[int, ...], labels: tuple[int, ...]) -> list[str]:
    """The decoded text of each maximal run of labelled tokens."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(ids, labels, strict=True):
        labelled = label != IGNORE_INDEX
        if labelled:
            assert label == token  # a label is the token itself (the model shifts)
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = labelled
    return [tokenizer.decode(run) for run in runs]


def _checkpoint_with_template(tmp_path: Path, template: str | None) -> Path:
    """The embedded checkpoint with another chat template (None: without one)."""
    target = tmp_path / "ckpt"
    shutil.copytree(TINY_LLAMA_DIR, target)
    if template is None:
        (target / "chat_template.jinja").unlink()
    else:
        (target / "chat_template.jinja").write_text(template)
    return target


def test_generation_tags_label_exactly_the_assistant_text(tokenizer: Any) -> None:
    assert chat.has_generation_tags(tokenizer)
    [example] = chat.tokenize_conversations(
        [{"messages": CONVERSATION}], tokenizer, max_length=256, train_on="assistant"
    )
    # token by token: the labelled runs are the assistant contents with their end of turn
    assert _labelled_runs(tokenizer, example.input_ids, example.labels) == ["5</s>", "dog cat</s>"]
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert example.input_ids == tuple(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert example.assistant_mask is not None
    assert [bool(f) for f in example.assistant_mask] == [label != IGNORE_INDEX for label in example.labels]


def test_prefix_rendering_labels_exactly_the_assistant_parts(tokenizer: Any) -> None:
    untagged = _with_template(tokenizer, UNTAGGED)
    assert not chat.has_generation_tags(untagged)
    [example] = chat.tokenize_conversations(
        [{"messages": CONVERSATION}], untagged, max_length=256, train_on="assistant"
    )
    text = untagged.apply_chat_template(CONVERSATION, tokenize=False)
    # the assistant part of turn i: between "turns < i + generation prompt" and "turns <= i"
    spans = []
    for i in (2, 4):
        before = untagged.apply_chat_template(CONVERSATION[:i], tokenize=False, add_generation_prompt=True)
        through = untagged.apply_chat_template(CONVERSATION[: i + 1], tokenize=False)
        assert text.startswith(through) and through.startswith(before)
        spans.append(range(len(before), len(through)))
    assert [text[span.start : span.stop] for span in spans] == ["5</s>\n\n", "dog cat</s>\n\n"]
    assert _labelled_runs(untagged, example.input_ids, example.labels) == ["5</s>\n\n", "dog cat</s>\n\n"]
    # token by token: a token is labelled exactly when its characters lie inside an assistant part
    offsets = untagged(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    for (start, end), label in zip(offsets, example.labels, strict=True):
        inside = any(start >= span.start and end <= span.stop for span in spans)
        assert inside == (label != IGNORE_INDEX), (start, end, text[start:end])


def test_both_paths_agree_on_the_assistant_content(tokenizer: Any) -> None:
    tagged = chat.tokenize_conversations([{"messages": CONVERSATION}], tokenizer, max_length=256, train_on="assistant")
    untagged = chat.tokenize_conversations(
        [{"messages": CONVERSATION}], _with_template(tokenizer, UNTAGGED), max_length=256, train_on="assistant"
    )
    # the same token sequence; the untagged path also labels the "\n\n" that ends each turn
    assert tagged[0].input_ids == untagged[0].input_ids
    extra = [
        tokenizer.decode([t])
        for t, a, b in zip(tagged[0].input_ids, tagged[0].labels, untagged[0].labels, strict=True)
        if a != b
    ]
    assert extra and set(extra) == {"\n"}


def test_a_template_that_is_not_prefix_preserving_is_refused_in_one_line(tokenizer: Any) -> None:
    odd = _with_template(tokenizer, NOT_PREFIX_PRESERVING)
    with pytest.raises(DataError) as info:
        chat.tokenize_conversations([{"messages": CONVERSATION}], odd, max_length=256, train_on="assistant")
    message = str(info.value)
    assert "does not render the conversation 'Add 2 and 3.' prefix by prefix" in message
    assert "assistant turn 2" in message
    assert "{% generation %}" in message and "data.train_on=all" in message and "\n" not in message
    # one assistant turn renders the same either way: nothing to refuse
    single = chat.tokenize_conversations([{"messages": CONVERSATION[:3]}], odd, max_length=256, train_on="assistant")
    assert _labelled_runs(odd, single[0].input_ids, single[0].labels) == ["<think></think>5</s>"]
    # training on every token needs no assistant flags
    [every] = chat.tokenize_conversations([{"messages": CONVERSATION}], odd, max_length=256, train_on="all")
    assert every.assistant_mask is None and every.labels == every.input_ids


def test_bos_comes_from_the_template_and_never_twice(tokenizer: Any) -> None:
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id  # the tokenizer adds BOS itself
    bos_template = _with_template(tokenizer, BOS_IN_TEMPLATE.replace("{{- bos_token -}}", ""))
    for tok, expected in ((_with_template(tokenizer, BOS_IN_TEMPLATE), 1), (bos_template, 0)):
        [example] = chat.tokenize_conversations([{"messages": CONVERSATION}], tok, max_length=256, train_on="all")
        assert example.input_ids.count(tokenizer.bos_token_id) == expected


def test_train_on_all_labels_every_token(tokenizer: Any) -> None:
    [example] = chat.tokenize_conversations([{"messages": CONVERSATION}], tokenizer, max_length=256, train_on="all")
    assert example.labels == example.input_ids
    assert example.assistant_mask is not None and 0 < sum(example.assistant_mask) < len(example.input_ids)


def test_conversations_truncated_to_no_assistant_token_are_dropped_and_counted(
    tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    long_prompt = {"messages": [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "ok"}]}
    short = {"messages": CONVERSATION[1:3]}
    with caplog.at_level(logging.WARNING, logger="lora_sweep.chat"):
        examples = chat.tokenize_conversations(
            [long_prompt, short, long_prompt], tokenizer, max_length=40, train_on="assistant"
        )
    assert len(examples) == 1
    assert "dropped 2 of 3 conversations with no assistant token within data.max_length=40" in caplog.text
    with pytest.raises(DataError, match="no conversation has an assistant token within data.max_length=40"):
        chat.tokenize_conversations([long_prompt], tokenizer, max_length=40, train_on="assistant")


def test_sharegpt_and_instruction_records_are_mapped(tmp_path: Path) -> None:
    records = [
        {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"instruction": "Add", "input": "2 3", "output": "5"},
        {"messages": CONVERSATION},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    loaded = chat.load_conversations(path)
    assert loaded[0] == {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assert loaded[1]["messages"] == [{"role": "user", "content": "Add\n\n2 3"}, {"role": "assistant", "content": "5"}]
    assert loaded[2] == {"messages": CONVERSATION}


@pytest.mark.parametrize(
    "record,message",
    [
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": [{"role": "user"}]}, "turn 0 must be an object with 'role' and 'content'"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "turn 0 has the role 'robot'"),
        ({"conversations": [{"from": "alien", "value": "x"}]}, "unknown ShareGPT role 'alien'"),
        ({"messages": [{"role": "user", "content": 3}]}, "'content' must be a string"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "has no assistant turn with content"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "starts with a assistant turn"),
        ({"text": "hi"}, "has none of 'messages'"),
    ],
)
def test_bad_conversation_records_get_one_line(tmp_path: Path, record: dict[str, Any], message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError) as info:
        chat.load_conversations(path)
    assert message in str(info.value) and "record 0" in str(info.value) and "\n" not in str(info.value)


def test_assistant_label_self_check_catches_labels_on_user_text() -> None:
    labels = torch.tensor([[IGNORE_INDEX, 5, 6, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 7, 8]])
    assistant = torch.tensor([[False, True, True, False], [False, False, True, True]])
    assert chat.check_assistant_labels(labels, assistant, train_on="assistant") == (
        "4 assistant tokens labelled in 2 rows"
    )
    leaked = labels.clone()
    leaked[0, 0] = 4
    with pytest.raises(ValueError, match="1 labels lie on system, user or template tokens"):
        chat.check_assistant_labels(leaked, assistant, train_on="assistant")
    none = labels.clone()
    none[1] = IGNORE_INDEX
    with pytest.raises(ValueError, match="row 1 of the probe batch has no labelled assistant token"):
        chat.check_assistant_labels(none, assistant, train_on="assistant")


def test_embedded_chat_sample_is_the_sanity_data_as_conversations() -> None:
    conversations = chat.load_conversations(SANITY_CHAT_PATH)
    samples = json.loads(SANITY_SAMPLES_PATH.read_text())
    answers = [m["content"] for c in conversations for m in c["messages"] if m["role"] == "assistant"]
    assert answers == [s["output"] for s in samples]
    assert any(len(c["messages"]) > 3 for c in conversations)  # multi-turn
    assert any(c["messages"][0]["role"] == "system" for c in conversations)


def test_data_chat_runs_on_the_embedded_default(tmp_path: Path) -> None:
    # assistant turns of the sanity samples are a few tokens each: batches of 16 keep the
    # per-step loss steady enough for the stability metrics over 6 steps (with 8, one seed in
    # four of a packed run drew a loss rise past ln 3 and was called diverged)
    run = run_cli("data=chat", f"results_dir={tmp_path}", *TINY, "train.batch_size=16")
    assert run.returncode == 0, run.stderr[-3000:]
    [result_path] = tmp_path.glob("runs/*/result.json")
    result = json.loads(result_path.read_text())
    assert result["status"] == "success", result["reason"]
    assert result["self_check"]["assistant_labels"].endswith("rows")
    rows = read_rows(tmp_path / "lora_tuning_results.csv")
    assert rows["data.template"].tolist() == ["chat"] and rows["data.train_on"].tolist() == ["assistant"]
    assert rows["eval_loss"].notna().all()


@pytest.mark.slow
def test_data_chat_sweeps(tmp_path: Path) -> None:
    from tests.scale_helpers import SWEEP_TINY

    run = run_cli(
        "-m", "data=chat", f"results_dir={tmp_path}", "hydra.sweeper.n_trials=2", *SWEEP_TINY, "train.batch_size=16"
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = read_rows(tmp_path / "lora_tuning_results.csv")
    assert len(rows) == 2 and set(rows["data.template"]) == {"chat"}
    # a sampled learning rate may diverge on 8 steps; a chat trial must never fail
    assert "failed" not in set(rows["status"]) and rows["eval_loss_base"].notna().all()
    for run_dir in rows["run_dir"]:
        assert "assistant_labels" in json.loads((Path(run_dir) / "result.json").read_text())["self_check"]


@pytest.mark.parametrize(
    "template,message",
    [
        (None, "has no chat template; use data.template=alpaca"),
        (NOT_PREFIX_PRESERVING, "does not render the conversation"),
    ],
)
def test_unusable_templates_are_refused_with_exit_2_and_nothing_written(
    tmp_path: Path, template: str | None, message: str
) -> None:
    ckpt = _checkpoint_with_template(tmp_path, template)
    results = tmp_path / "results"
    run = run_cli("data=chat", "model=local", f"model.path={ckpt}", f"results_dir={results}", *TINY)
    assert run.returncode == 2, run.stderr[-3000:]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], run.stderr
    assert not results.exists()
