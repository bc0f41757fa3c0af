"""Build the embedded tiny Llama checkpoint (``tiny_llama/``), deterministically.

Why: sweeps, tests and demos need a real causal LM that loads offline in well under a
second and fine-tunes in seconds on a laptop CPU. This script generates its own
pre-training corpus (template English, number sequences, word lists over the same
vocabulary as the sanity samples, but never their instruction -> response mappings),
trains a byte-level BPE tokenizer on it, and pre-trains a small GQA ``LlamaForCausalLM``
for a couple of minutes, so that the checkpoint already knows the text statistics and
LoRA fine-tuning on ``sanity_samples.json`` has something real (and only that) to learn.

Run ``python -m lora_sweep.embedded.make_tiny_llama`` to (re)write ``tiny_llama/``.
Everything is seeded and runs with a pinned thread count and deterministic algorithms, so
a rerun on the same platform and library versions reproduces the files byte for byte.
"""

from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lora_sweep.embedded.make_sanity_samples import (
    ADJECTIVES,
    COLOURS,
    NOUNS,
    VERBS,
)

SEED = 0
OUTPUT_DIR = Path(__file__).parent / "tiny_llama"

VOCAB_SIZE = 2048
MODEL_MAX_LENGTH = 1024
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
# The chat template: the plain instruction sections the model is fine-tuned with, one per turn.
# `{% generation %}` marks the assistant text, so assistant-only loss needs no prefix rendering.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' -%}{{- message.content + '\\n\\n' -}}"
    "{%- elif message.role == 'user' -%}{{- '### Instruction:\\n' + message.content + '\\n\\n' -}}"
    "{%- elif message.role == 'assistant' -%}{{- '### Response:\\n' -}}"
    "{% generation %}{{- message.content + eos_token -}}{% endgeneration %}{{- '\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '### Response:\\n' -}}{%- endif -%}"
)

NUM_DOCUMENTS = 16_000
SEQ_LEN = 256
BATCH_SIZE = 16
TRAIN_STEPS = 450
PEAK_LR = 3e-3
WARMUP_STEPS = 40
# Fixed intra-op thread count: CPU kernels reduce in a thread-count-dependent order, so
# pinning it (rather than using all cores) keeps reruns bit-identical.
NUM_THREADS = 2

EXTRA_WORDS: tuple[str, ...] = (
    "word",
    "words",
    "number",
    "numbers",
    "list",
    "letter",
    "letters",
    "text",
    "order",
    "colour",
    "fruit",
    "first",
    "last",
    "small",
    "large",
    "count",
    "name",
    "write",
    "each",
)
# Capitalised imperatives and question words, used in generic prose only.
IMPERATIVES: tuple[str, ...] = (
    "Reverse",
    "Sort",
    "Add",
    "Repeat",
    "Count",
    "Name",
    "List",
    "Spell",
    "Write",
    "Find",
    "Take",
    "Paint",
    "Open",
    "Close",
    "Move",
    "Follow",
    "Watch",
    "Help",
    "Clean",
    "Build",
)
# Markdown-like section headers, so the "### Header:" layout is familiar. The Alpaca
# headers (Instruction/Input/Response) are deliberately not among them: adapting to the
# prompt template is part of what the LoRA fine-tune should visibly learn.
HEADERS: tuple[str, ...] = (
    "Story",
    "Notes",
    "Numbers",
    "Words",
    "Title",
    "Question",
    "Answer",
    "Summary",
    "Example",
    "List",
    "Text",
    "Colours",
)
# Capitalised nouns seen only inside prose, so the template words are whole tokens.
TITLE_WORDS: tuple[str, ...] = HEADERS + ("Instruction", "Input", "Response")


# ---------------------------------------------------------------- corpus
def _sentence(rng: random.Random) -> str:
    """A template-grammar sentence; varied shapes so the LM learns English-like structure."""
    n1, n2 = rng.choice(NOUNS), rng.choice(NOUNS)
    adj, verb, colour = rng.choice(ADJECTIVES), rng.choice(VERBS), rng.choice(COLOURS)
    shape = rng.randrange(10)
    if shape == 0:
        return f"The {adj} {n1} {verb} the {n2}."
    if shape == 1:
        return f"A {colour} {n1} is near the {n2}."
    if shape == 2:
        return f"The {n1} and the {n2} are {adj}."
    if shape == 3:
        return f"Every {n1} {verb} a {colour} {n2}."
    if shape == 4:
        return f"There are {rng.randint(2, 30)} {n1}s in the {n2}."
    if shape == 5:
        return f"The {rng.choice(EXTRA_WORDS)} {rng.choice(EXTRA_WORDS)} is {adj}."
    if shape == 6:
        return f"{rng.choice(IMPERATIVES)} the {adj} {n1} and the {colour} {n2}."
    if shape == 7:
        return f"What is the {rng.choice(EXTRA_WORDS)} of the {adj} {n1}?"
    if shape == 8:
        return f"The {rng.choice(TITLE_WORDS)} has a {adj} {n1}."
    return f"The {n1} {verb} {rng.randint(1, 99)} {colour} {n2}s."


def _prose(rng: random.Random) -> str:
    """Several sentences, mostly sentence case, sometimes all lower/upper case."""
    text = " ".join(_sentence(rng) for _ in range(rng.randint(1, 8)))
    style = rng.random()
    if style < 0.15:
        return text.lower()
    if style < 0.25:
        return text.upper()
    return text


def _numbers(rng: random.Random) -> str:
    """A counting run (step 1/2/5/10, maybe descending) or random numbers 0-99."""
    if rng.random() < 0.5:
        start, step = rng.randint(0, 60), rng.choice((1, 1, 1, 2, 5, 10))
        seq = [start + i * step for i in range(rng.randint(3, 30))]
        if rng.random() < 0.3:
            seq.reverse()
    else:
        seq = [rng.randint(0, 99) for _ in range(rng.randint(3, 20))]
    return rng.choice((", ", " ")).join(map(str, seq))


def _word_list(rng: random.Random) -> str:
    """A list of vocabulary words, comma/space/newline separated."""
    words = [rng.choice(NOUNS + ADJECTIVES + COLOURS + EXTRA_WORDS) for _ in range(rng.randint(2, 25))]
    if rng.random() < 0.2:
        words = [w.upper() for w in words]
    return rng.choice((", ", " ", "\n")).join(words)


def _plain(rng: random.Random) -> str:
    """One unsectioned block of prose (weighted x2), numbers or words."""
    return rng.choice((_prose, _prose, _numbers, _word_list))(rng)


def _sections(rng: random.Random) -> str:
    """A '### Header:' document with independent random sections."""
    headers = rng.sample(HEADERS, rng.randint(1, 4))
    return "\n\n".join(f"### {h}:\n{_plain(rng)}" for h in headers)


def _document(rng: random.Random) -> str:
    """One pre-training document: plain prose/numbers/words, or a sectioned document."""
    if rng.random() < 0.35:
        return _sections(rng)
    return "\n\n".join(_plain(rng) for _ in range(rng.randint(1, 3)))


def make_corpus(seed: int = SEED, n: int = NUM_DOCUMENTS) -> list[str]:
    """Generate the pre-training documents from a single seeded RNG."""
    rng = random.Random(seed)
    return [_document(rng) for _ in range(n)]


# ---------------------------------------------------------------- tokenizer
def train_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE with <s>/</s>/<pad>; a post-processor prepends <s> like Llama does."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, tok.token_to_id(BOS))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="right",
        model_max_length=MODEL_MAX_LENGTH,
    )


# ---------------------------------------------------------------- model
def build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A ~1M-parameter Llama with grouped-query attention (4 query heads, 2 KV heads)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MODEL_MAX_LENGTH,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def pack(corpus: list[str], tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """Concatenate ``<s> doc </s>`` streams and cut into [N, SEQ_LEN] blocks (no padding)."""
    ids: list[int] = []
    for doc in corpus:
        ids.extend(tokenizer(doc)["input_ids"])  # <s> is added by the post-processor
        ids.append(tokenizer.eos_token_id)
    n_blocks = len(ids) // SEQ_LEN
    return torch.tensor(ids[: n_blocks * SEQ_LEN], dtype=torch.long).view(n_blocks, SEQ_LEN)


def lr_at(step: int) -> float:
    """Linear warm-up then cosine decay to 10% of the peak."""
    if step < WARMUP_STEPS:
        return PEAK_LR * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, TRAIN_STEPS - WARMUP_STEPS)
    return PEAK_LR * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def pretrain(model: LlamaForCausalLM, blocks: torch.Tensor, seed: int = SEED) -> float:
    """Plain AdamW loop over shuffled packed blocks; returns the mean loss of the last 20 steps."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    order = torch.randperm(len(blocks), generator=gen)
    cursor = 0
    recent: list[float] = []
    for step in range(TRAIN_STEPS):
        if cursor + BATCH_SIZE > len(order):
            order, cursor = torch.randperm(len(blocks), generator=gen), 0
        batch = blocks[order[cursor : cursor + BATCH_SIZE]]
        cursor += BATCH_SIZE
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-20:]
        if step % 100 == 0 or step == TRAIN_STEPS - 1:
            print(f"step {step:4d}  lr {lr_at(step):.2e}  loss {loss.item():.4f}", flush=True)
    return sum(recent) / len(recent)


def main() -> None:
    # `tokenizers` reads this when its (lazy) thread pool first starts: single-threaded BPE
    # training rules out any thread-timing influence on the merge order.
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(NUM_THREADS)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(SEED)
    random.seed(SEED)

    t0 = time.perf_counter()
    corpus = make_corpus()
    tokenizer = train_tokenizer(corpus)
    blocks = pack(corpus, tokenizer)
    print(f"corpus: {len(corpus)} docs, {blocks.numel()} tokens in {len(blocks)} blocks; vocab {len(tokenizer)}")

    model = build_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters")
    final_loss = pretrain(model, blocks)
    elapsed = time.perf_counter() - t0

    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(OUTPUT_DIR, safe_serialization=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(OUTPUT_DIR)
    for path in OUTPUT_DIR.iterdir():  # safetensors writes 0600; package data should be world-readable
        path.chmod(0o644)
    print(f"final pre-training loss (mean of last 20 steps): {final_loss:.4f}")
    print(f"parameters: {n_params}; wall time {elapsed:.1f}s; saved to {OUTPUT_DIR}")


if __name__ == "__main__":
    main()
