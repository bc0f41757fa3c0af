"""Sample answers: a few fixed validation prompts answered by greedy decoding after a
completed trial, by the trained model and by its base model, kept in the run directory.

The prompts are the first `train.sample_prompts` validation records ordered by a hash of
their content, so every trial of a sweep answers the same ones whatever the file order.
An instruction record's prompt is its template's prompt after the tokenizer's own prefix
(`data.added_prefix`), exactly as training tokenizes it; a conversation's is every turn
before its last assistant turn, rendered with the chat template and its generation prompt.
The reference answer is the record's output (the last assistant turn).

Answers are greedy (`do_sample=False`), in eval mode, without gradients, under the trial's
precision and a forked RNG: they draw nothing from the generators the trial uses, so a
trial's results are the same with or without samples. The base model answers on the cached
base model itself before the trial's adapter is injected (`prepare_samples`), once per
cached model, prompt set, length and precision setting (`CachedModel.base_samples`; a sweep
worker does it in its warm-up). Not with the adapter disabled after training: PiSSA and
OLoRA move part of each targeted weight into the adapter, so the model without it is not
the base model; nor on the adapted model before training, which is the base model only up
to rounding for those inits and DoRA. The trained model answers after training, adapter
attached (`write_samples`). One JSON object per prompt goes to `<run_dir>/samples.jsonl`
(`SAMPLE_FIELDS`). torch is imported only where answers are generated, so
`lora_sweep.analysis` reads samples without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_sweep.results import write_text

if TYPE_CHECKING:
    import torch

    from lora_sweep.cache import CachedModel
    from lora_sweep.config import RunConfig

log = logging.getLogger(__name__)

__all__ = [
    "SAMPLES_FILENAME",
    "SAMPLES_MIMETYPE",
    "SAMPLE_FIELDS",
    "Answer",
    "Prompt",
    "SamplePrompts",
    "generate_answers",
    "prepare_samples",
    "read_samples",
    "sample_prompts",
    "write_samples",
]

SAMPLES_FILENAME = "samples.jsonl"
SAMPLES_MIMETYPE = "application/jsonl"
SAMPLE_FIELDS = ("index", "prompt", "reference", "answer", "tokens", "finished", "base_answer", "base_tokens")
"""The keys of each line of `samples.jsonl`: the prompt as the model saw it (special tokens
included), the reference answer, the trained model's answer, its generated tokens (an EOS
that ended it included), whether it ended by EOS rather than `train.sample_max_new_tokens`,
and the base model's answer and tokens (null when they could not be generated)."""


@dataclass(frozen=True)
class Prompt:
    """One sample prompt: its text, token ids and reference answer."""

    text: str
    input_ids: tuple[int, ...]
    reference: str


@dataclass(frozen=True)
class SamplePrompts:
    """The prompts of a trial, the tokenizer that decodes their answers and the base model's
    answers (None when they could not be generated)."""

    prompts: tuple[Prompt, ...]
    tokenizer: Any
    base: tuple[Answer, ...] | None = None
    base_seconds: float = 0.0  # spent generating `base` for this trial (0: from the cache)

    @property
    def key(self) -> tuple:
        """Identifies the prompts as tokenized (base answers are cached by it)."""
        return tuple(p.input_ids for p in self.prompts)


@dataclass(frozen=True)
class Answer:
    """A generated answer: its text, tokens generated, and whether EOS ended it."""

    text: str
    tokens: int
    finished: bool


def _content_rank(record: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _chat_prompt(record: Mapping[str, Any], tokenizer: Any) -> tuple[str, list[int], str]:
    messages = list(record["messages"])
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    from lora_sweep.chat import describe, render

    # the template writes its own special tokens (BOS): tokenized without added ones, as in training
    text = render(tokenizer, messages[:last], where=describe(messages), prompt=True)
    return text, tokenizer(text, add_special_tokens=False)["input_ids"], messages[last]["content"]


def _instruction_prompt(record: Mapping[str, str], tokenizer: Any, template: str) -> tuple[str, list[int], str]:
    from lora_sweep import data as data_lib

    ids = data_lib.prompt_token_ids(record, tokenizer, template=template, prefix=data_lib.added_prefix(tokenizer))
    return tokenizer.decode(ids), ids, record["output"]


def sample_prompts(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    template: str,
    count: int,
    max_prompt_tokens: int,
) -> SamplePrompts:
    """The `count` sample prompts of the validation `records` (conversations when `template`
    is `chat`); a prompt longer than `max_prompt_tokens` keeps its last tokens (the end of
    the prompt, where the answer starts)."""
    by_rank = {_content_rank(record): record for record in records}  # identical records: one prompt
    chosen = [by_rank[rank] for rank in sorted(by_rank)[:count]]
    prompts = []
    for record in chosen:
        if template == "chat":
            text, ids, reference = _chat_prompt(record, tokenizer)
        else:
            text, ids, reference = _instruction_prompt(record, tokenizer, template)
        if len(ids) > max_prompt_tokens:
            ids = ids[len(ids) - max_prompt_tokens :]
            text = tokenizer.decode(ids)
        prompts.append(Prompt(text=text, input_ids=tuple(ids), reference=reference))
    return SamplePrompts(prompts=tuple(prompts), tokenizer=tokenizer)


def generate_answers(
    model: torch.nn.Module,
    prompts: SamplePrompts,
    *,
    device: torch.device,
    max_new_tokens: int,
    precision: str = "fp32",
) -> list[Answer]:
    """Greedy answers of `model` to the prompts, all in one left-padded batch (one decoding step
    per new token for the lot, not per prompt), in eval mode without gradients under
    `precision`; the model's mode and every RNG are restored."""
    import torch

    from lora_sweep.precision import mixed_precision

    tokenizer = prompts.tokenizer
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if not prompts.prompts:
        return []
    width = max(len(p.input_ids) for p in prompts.prompts)
    ids = torch.full((len(prompts.prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts.prompts):  # left padding: every prompt ends where decoding starts
        ids[row, width - len(prompt.input_ids) :] = torch.tensor(prompt.input_ids)
        mask[row, width - len(prompt.input_ids) :] = 1
    was_training = model.training
    model.eval()
    try:
        # greedy decoding draws no random numbers; the fork guarantees it for any model's generate
        with (
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type),
            torch.no_grad(),
            mixed_precision(model, precision, device) as autocast,
            autocast(),
        ):
            out = model.generate(  # type: ignore[operator]  # a transformers or peft model
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                eos_token_id=eos,
            )
    finally:
        model.train(was_training)
    answers = []
    for new in out[:, width:].tolist():
        finished = eos in new
        new = new[: new.index(eos) + 1] if finished else new  # a finished row is padded after its EOS
        answers.append(Answer(text=tokenizer.decode(new, skip_special_tokens=True), tokens=len(new), finished=finished))
    return answers


def prepare_samples(
    cfg: RunConfig,
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    entry: CachedModel,
    *,
    device: torch.device,
    max_prompt_tokens: int,
) -> SamplePrompts | None:
    """The trial's sample prompts (from the validation `records`) with the base model's answers:
    from `entry` when an earlier trial generated them, else generated now on `entry.model`,
    which must not carry an adapter yet, and kept there. None, with a warning, when the
    prompts cannot be built (samples never stop a trial)."""
    from lora_sweep.precision import resolve_precision

    max_new_tokens = cfg.train.sample_max_new_tokens
    try:
        prompts = sample_prompts(
            records,
            tokenizer,
            template=cfg.data.template,
            count=cfg.train.sample_prompts,
            max_prompt_tokens=max_prompt_tokens,
        )
    except Exception as err:  # noqa: BLE001 - e.g. a chat template that refuses a record: the trial says so later
        log.warning("no samples: the prompts could not be built: %s", err)
        return None
    key = (prompts.key, max_new_tokens, cfg.train.precision)
    if key in entry.base_samples:
        return SamplePrompts(prompts=prompts.prompts, tokenizer=tokenizer, base=tuple(entry.base_samples[key]))
    start = time.perf_counter()
    precision = resolve_precision(cfg.train.precision, device, entry.model)
    try:
        base = generate_answers(entry.model, prompts, device=device, max_new_tokens=max_new_tokens, precision=precision)
    except Exception as err:  # noqa: BLE001 - the trial's own answers are still worth writing
        log.warning("no base-model answers to the sample prompts: %s", err)
        return prompts
    entry.base_samples[key] = base
    return SamplePrompts(
        prompts=prompts.prompts, tokenizer=tokenizer, base=tuple(base), base_seconds=time.perf_counter() - start
    )


def write_samples(
    path: Path,
    model: torch.nn.Module,
    prompts: SamplePrompts,
    *,
    device: torch.device,
    max_new_tokens: int,
    precision: str,
) -> float:
    """Answer `prompts` with the trained `model` and write `path` (JSON lines, `SAMPLE_FIELDS`,
    with the base model's answers of `prepare_samples`) atomically; returns the seconds the
    samples cost this trial (the base model's answers included when it generated them)."""
    start = time.perf_counter()
    trained = generate_answers(model, prompts, device=device, max_new_tokens=max_new_tokens, precision=precision)
    base = prompts.base if prompts.base is not None else (None,) * len(trained)
    lines = []
    for index, (prompt, answer, base_answer) in enumerate(zip(prompts.prompts, trained, base, strict=True)):
        row = {
            "index": index,
            "prompt": prompt.text,
            "reference": prompt.reference,
            "answer": answer.text,
            "tokens": answer.tokens,
            "finished": answer.finished,
            "base_answer": base_answer.text if base_answer is not None else None,
            "base_tokens": base_answer.tokens if base_answer is not None else None,
        }
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    write_text(path, "".join(lines))
    return prompts.base_seconds + time.perf_counter() - start


def read_samples(path: Path) -> list[dict[str, Any]]:
    """The lines of a `samples.jsonl`, as written by `write_samples`."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
