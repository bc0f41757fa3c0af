"""Conversation records -> token examples, rendered with the tokenizer's chat template.

Records are `{"messages": [{"role", "content"}, ...]}` (OpenAI style), ShareGPT's
`{"conversations": [{"from", "value"}, ...]}` (roles mapped) or Alpaca instruction records
(one user turn, one assistant turn). Each conversation is rendered once, tokenized once, and
every token gets an assistant flag:

- a template with `{% generation %}` tags marks the assistant text itself; transformers'
  `apply_chat_template(return_assistant_tokens_mask=True)` turns the marks into the flags;
- most shipped templates (Llama 3, Qwen 3, Mistral, ...) have no tags. Then assistant turn i
  is the text between the rendering of turns < i with the generation prompt and the rendering
  of turns <= i; both must be prefixes of the whole conversation's rendering, and the turn's
  content must lie between them, or the template is refused (it renders earlier turns
  differently once later ones follow, e.g. Qwen 3 dropping earlier reasoning), since the
  flags would then be wrong.

A token is flagged when its characters overlap assistant text (transformers' own rule for
generation tags), so both paths agree on a token that straddles a boundary. The template
decides BOS: the rendered text is tokenized without added special tokens, as
`apply_chat_template` does, so BOS is never doubled.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lora_sweep.data import IGNORE_INDEX, Example
from lora_sweep.datafiles import read_records
from lora_sweep.errors import DataError, first_line

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}
# transformers' own test for generation tags (`{% generation %}` with optional whitespace control)
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

Conversation = dict[str, list[dict[str, str]]]


def load_conversations(path: Path) -> list[Conversation]:
    """Read and validate conversation records into `{"messages": [{"role", "content"}]}` each."""
    raw = read_records(Path(path))
    if not raw:
        raise DataError(f"{path} holds no records; add at least one {{'messages': [...]}} record")
    return [normalize_record(f"{path} record {i}", record) for i, record in enumerate(raw)]


def normalize_record(where: str, record: Any) -> Conversation:
    """One record as `{"messages": [...]}` with roles system/user/assistant/tool; raises
    `DataError` naming the record and the problem."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where} must be a JSON object with 'messages', found {type(record).__name__}")
    if "messages" in record:
        messages = _messages(where, record["messages"], role_key="role", content_key="content", roles=None)
    elif "conversations" in record:
        messages = _messages(where, record["conversations"], role_key="from", content_key="value", roles=SHAREGPT_ROLES)
    elif "instruction" in record and "output" in record:
        messages = _from_instruction(where, record)
    else:
        raise DataError(
            f"{where} has none of 'messages' (role/content), 'conversations' (ShareGPT from/value) or "
            f"'instruction'/'output'; found keys: {', '.join(sorted(map(str, record))) or 'none'}"
        )
    if messages[0]["role"] not in ("system", "user"):
        raise DataError(f"{where} starts with a {messages[0]['role']} turn; a conversation starts with system or user")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise DataError(f"{where} has no assistant turn with content; there is nothing to learn from it")
    return {"messages": messages}


def _messages(
    where: str, value: Any, *, role_key: str, content_key: str, roles: Mapping[str, str] | None
) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: '{'messages' if roles is None else 'conversations'}' must be a non-empty list")
    messages = []
    for turn, message in enumerate(value):
        at = f"{where} turn {turn}"
        if not isinstance(message, Mapping) or role_key not in message or content_key not in message:
            raise DataError(f"{at} must be an object with '{role_key}' and '{content_key}'")
        role, content = message[role_key], message[content_key]
        if roles is not None:
            if role not in roles:
                raise DataError(f"{at} has the unknown ShareGPT role {role!r}; known: {', '.join(roles)}")
            role = roles[role]
        elif role not in ROLES:
            raise DataError(f"{at} has the role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{at} '{content_key}' must be a string, found {type(content).__name__}")
        messages.append({"role": role, "content": content})
    return messages


def _from_instruction(where: str, record: Mapping[str, Any]) -> list[dict[str, str]]:
    fields = {k: record.get(k) or "" for k in ("instruction", "input", "output")}
    for key, value in fields.items():
        if not isinstance(value, str):
            raise DataError(f"{where} field '{key}' must be a string, found {type(value).__name__}")
    user = fields["instruction"] + (f"\n\n{fields['input']}" if fields["input"].strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": fields["output"]}]


def has_generation_tags(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template marks assistant text with `{% generation %}`."""
    template = tokenizer.chat_template
    return isinstance(template, str) and bool(_GENERATION_TAG.search(template))


def check_chat_tokenizer(tokenizer: Any, *, model: str) -> None:
    """Refuse a tokenizer that cannot render and flag conversations (one line each)."""
    if not tokenizer.chat_template:
        raise DataError(
            f"the tokenizer of {model} has no chat template; use data.template=alpaca, or save one with the "
            "checkpoint (tokenizer.chat_template, written as chat_template.jinja)"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"the tokenizer of {model} is not a fast (tokenizers) tokenizer; assistant tokens need its character "
            "offsets: save the checkpoint with a tokenizer.json"
        )


def _apply_template(tokenizer: Any, messages: Sequence[Mapping[str, str]], *, where: str, **options: Any) -> Any:
    """`tokenizer.apply_chat_template` whose failures are one `DataError` naming `where`."""
    try:
        return tokenizer.apply_chat_template(list(messages), **options)
    except Exception as err:  # noqa: BLE001 - jinja's raise_exception and template bugs alike
        raise DataError(f"the chat template refused {where}: {first_line(err)}") from err


def render(tokenizer: Any, messages: Sequence[Mapping[str, str]], *, where: str, prompt: bool = False) -> str:
    """The conversation as the template writes it (`prompt`: followed by the generation prompt)."""
    return _apply_template(tokenizer, messages, where=where, tokenize=False, add_generation_prompt=prompt)


def assistant_spans(tokenizer: Any, messages: Sequence[Mapping[str, str]], *, where: str) -> tuple[str, list[range]]:
    """(rendered conversation, character ranges of its assistant turns), by prefix rendering.

    Raises `DataError` when the template does not render the conversation prefix by prefix
    (the ranges would not be exact).
    """
    text = render(tokenizer, messages, where=where)
    spans: list[range] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], where=where, prompt=True)
        through = render(tokenizer, messages[: i + 1], where=where)
        exact = text.startswith(through) and through.startswith(before) and (not spans or len(before) >= spans[-1].stop)
        if not exact or message["content"].strip() not in through[len(before) :]:
            raise DataError(
                f"the chat template does not render {where} prefix by prefix (assistant turn {i} renders "
                "differently once later turns follow), so its assistant tokens cannot be masked exactly; use a "
                "template with {% generation %} tags, or data.train_on=all"
            )
        spans.append(range(len(before), len(through)))
    return text, spans


def _flags(offsets: Sequence[tuple[int, int]], spans: Sequence[range]) -> list[bool]:
    """Per token: does its character range overlap an assistant span (transformers' rule)."""
    flags, span = [], 0
    for start, end in offsets:
        while span < len(spans) and start >= spans[span].stop:
            span += 1
        flags.append(span < len(spans) and end > spans[span].start)
    return flags


def encode_conversation(
    tokenizer: Any, messages: Sequence[Mapping[str, str]], *, where: str, need_flags: bool = True
) -> tuple[list[int], list[bool] | None]:
    """(token ids, assistant flag per token) of one conversation; the flags are None only when
    `need_flags` is False and the template cannot give exact ones."""
    if has_generation_tags(tokenizer):
        out = _apply_template(
            tokenizer, messages, where=where, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, flags = list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
        if not any(flags):
            raise DataError(
                f"the chat template's {{% generation %}} tags mark no text of {where}; wrap the assistant "
                "content in them, or remove them to use prefix rendering"
            )
        return ids, flags
    try:
        text, spans = assistant_spans(tokenizer, messages, where=where)
    except DataError:
        if need_flags:
            raise
        return tokenizer(render(tokenizer, messages, where=where), add_special_tokens=False)["input_ids"], None
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoded["input_ids"]), _flags(encoded["offset_mapping"], spans)


def describe(messages: Sequence[Mapping[str, str]]) -> str:
    """A conversation as messages name it: by the start of its first user turn (a split's
    index would not be the file's)."""
    first = next((m["content"] for m in messages if m["role"] == "user"), messages[0]["content"])
    text = " ".join(first.split())
    return f"the conversation {text[:40] + '...' if len(text) > 40 else text!r}"


def check_conversations(
    records: Sequence[Conversation], tokenizer: Any, *, train_on: str, model: str, sample: int = 16
) -> None:
    """The cheap up-front check of a chat data set against the template: the tokenizer, and a
    sample (the first records and those with the most assistant turns, where a template that
    is not prefix-preserving shows) rendered and flagged. Raises `DataError`."""
    check_chat_tokenizer(tokenizer, model=model)

    def turns(index: int) -> int:
        return sum(m["role"] == "assistant" for m in records[index]["messages"])

    busiest = sorted(range(len(records)), key=lambda i: -turns(i))[: sample // 2]
    for index in sorted(set(range(min(len(records), sample // 2))) | set(busiest)):
        messages = records[index]["messages"]
        encode_conversation(tokenizer, messages, where=describe(messages), need_flags=train_on == "assistant")


def tokenize_conversations(
    records: Sequence[Conversation],
    tokenizer: Any,
    *,
    max_length: int,
    train_on: str,
    key: str = "data.max_length",
    model: str = "the model",
) -> list[Example]:
    """Tokenize, flag, truncate to `max_length` and label conversations.

    `train_on="assistant"` labels the assistant tokens only, `"all"` every token. A
    conversation left with no labelled assistant token after truncation is dropped and the
    drops are logged; `key` names the length setting in messages.
    """
    check_chat_tokenizer(tokenizer, model=model)
    examples, dropped = [], 0
    for record in records:
        messages = record["messages"]
        ids, flags = encode_conversation(
            tokenizer, messages, where=describe(messages), need_flags=train_on == "assistant"
        )
        ids = ids[:max_length]
        flags = flags[:max_length] if flags is not None else None
        if flags is not None and not any(flags[1:]):  # position 0 is never a target
            dropped += 1
            continue
        if train_on == "assistant":
            assert flags is not None
            labels = [t if f else IGNORE_INDEX for t, f in zip(ids, flags, strict=True)]
        else:
            labels = list(ids)
        examples.append(
            Example(
                input_ids=tuple(ids),
                labels=tuple(labels),
                assistant_mask=tuple(flags) if flags is not None else None,
            )
        )
    if dropped:
        log.warning(
            "dropped %d of %d conversations with no assistant token within %s=%d",
            dropped,
            len(records),
            key,
            max_length,
        )
    if not examples:
        raise DataError(f"no conversation has an assistant token within {key}={max_length} tokens; raise {key}")
    return examples


def assistant_mask_batch(examples: Sequence[Example], width: int) -> torch.Tensor | None:
    """The examples' assistant flags right-padded to `width` ([B, S] bool), or None when an
    example has none (instruction records, or a template without exact flags)."""
    if any(e.assistant_mask is None for e in examples):
        return None
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, example in enumerate(examples):
        assert example.assistant_mask is not None
        mask[row, : len(example.assistant_mask)] = torch.tensor(example.assistant_mask, dtype=torch.bool)
    return mask


def check_assistant_labels(labels: torch.Tensor, assistant: torch.Tensor, *, train_on: str) -> str:
    """The self-check of a chat batch: every row has a labelled assistant token, and with
    `train_on="assistant"` no label lies on system, user or template text. Returns a detail
    line; raises `ValueError` with the problem."""
    labelled = labels != IGNORE_INDEX
    per_row = (labelled & assistant).sum(dim=1)
    if bool((per_row == 0).any()):
        row = int((per_row == 0).nonzero()[0])
        raise ValueError(f"row {row} of the probe batch has no labelled assistant token")
    stray = int((labelled & ~assistant).sum())
    if train_on == "assistant" and stray:
        raise ValueError(f"{stray} labels lie on system, user or template tokens (data.train_on=assistant)")
    return f"{int(per_row.sum())} assistant tokens labelled in {labels.shape[0]} rows" + (
        "" if train_on == "assistant" else f", {stray} other tokens (data.train_on=all)"
    )
