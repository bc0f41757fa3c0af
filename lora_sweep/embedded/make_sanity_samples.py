"""Generate the embedded sanity data set (``sanity_samples.json``), deterministically.

Each record is an Alpaca-shaped ``{"instruction", "input", "output"}`` dict whose output
is a pure function of the instruction and input (reverse, sort, add, copy, count, ...).
These mappings are cheap to learn, so a working LoRA fine-tune shows a clear loss drop
within a few dozen steps, while a broken one (bad lr, masking bug) does not.

The word lists below are shared with ``make_tiny_llama`` so the pre-trained model knows
the vocabulary, but never sees the instruction -> response mappings themselves.

Run ``python -m lora_sweep.embedded.make_sanity_samples`` to (re)write the file.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

SEED = 1234
NUM_SAMPLES = 400
OUTPUT_PATH = Path(__file__).parent / "sanity_samples.json"
CHAT_OUTPUT_PATH = Path(__file__).parent / "sanity_chat.jsonl"
SYSTEM_PROMPT = "Answer with the result only."

NOUNS: tuple[str, ...] = (
    "cat",
    "dog",
    "bird",
    "fish",
    "tree",
    "house",
    "river",
    "stone",
    "book",
    "door",
    "apple",
    "banana",
    "cherry",
    "grape",
    "lemon",
    "plum",
    "pear",
    "melon",
    "car",
    "boat",
    "ship",
    "train",
    "road",
    "hill",
    "lake",
    "cloud",
    "star",
    "moon",
    "sun",
    "rain",
    "table",
    "chair",
    "window",
    "garden",
    "flower",
    "horse",
    "mouse",
    "lamp",
    "cup",
    "box",
    "king",
    "queen",
    "child",
    "teacher",
    "farmer",
    "baker",
    "city",
    "forest",
    "field",
    "bridge",
)
VERBS: tuple[str, ...] = (
    "sees",
    "likes",
    "finds",
    "moves",
    "holds",
    "takes",
    "paints",
    "follows",
    "watches",
    "helps",
    "carries",
    "pushes",
    "pulls",
    "opens",
    "closes",
    "makes",
    "wants",
    "visits",
    "builds",
    "cleans",
)
ADJECTIVES: tuple[str, ...] = (
    "big",
    "small",
    "old",
    "new",
    "happy",
    "sad",
    "fast",
    "slow",
    "tall",
    "short",
    "warm",
    "cold",
    "bright",
    "dark",
    "quiet",
    "loud",
    "soft",
    "hard",
    "clean",
    "heavy",
)
COLOURS: tuple[str, ...] = ("red", "yellow", "green", "purple", "orange", "brown", "pink", "white")
# Fixed colour -> fruit mapping; the pre-training corpus never pairs these on purpose.
COLOUR_TO_FRUIT: dict[str, str] = {
    "red": "cherry",
    "yellow": "banana",
    "green": "pear",
    "purple": "grape",
    "orange": "melon",
    "brown": "plum",
    "pink": "apple",
    "white": "lemon",
}

Record = dict[str, str]
Task = Callable[[random.Random], Record]


def _words(rng: random.Random, lo: int, hi: int) -> list[str]:
    """Draw a random-length list of nouns/adjectives (repeats allowed)."""
    pool = NOUNS + ADJECTIVES
    return [rng.choice(pool) for _ in range(rng.randint(lo, hi))]


def _sentence(rng: random.Random) -> str:
    """One simple subject-verb-object sentence from the shared vocabulary."""
    return f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(NOUNS)}."


def reverse_words(rng: random.Random) -> Record:
    words = _words(rng, 3, 30)
    return {
        "instruction": "Reverse the order of the words.",
        "input": " ".join(words),
        "output": " ".join(reversed(words)),
    }


def sort_numbers(rng: random.Random) -> Record:
    nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 12))]
    return {
        "instruction": "Sort the numbers from smallest to largest.",
        "input": ", ".join(map(str, nums)),
        "output": ", ".join(map(str, sorted(nums))),
    }


def uppercase_word(rng: random.Random) -> Record:
    word = rng.choice(NOUNS + ADJECTIVES)
    return {
        "instruction": "Write the word in capital letters.",
        "input": word,
        "output": word.upper(),
    }


def add_numbers(rng: random.Random) -> Record:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    return {"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": str(a + b)}


def copy_text(rng: random.Random) -> Record:
    text = " ".join(_sentence(rng) for _ in range(rng.randint(1, 12)))
    return {"instruction": "Repeat the text exactly.", "input": text, "output": text}


def count_words(rng: random.Random) -> Record:
    words = _words(rng, 1, 15)
    return {
        "instruction": "Count the words in the list.",
        "input": ", ".join(words),
        "output": str(len(words)),
    }


def colour_to_fruit(rng: random.Random) -> Record:
    colour = rng.choice(COLOURS)
    return {
        "instruction": "Name the fruit of this colour.",
        "input": colour,
        "output": COLOUR_TO_FRUIT[colour],
    }


def last_word(rng: random.Random) -> Record:
    words = _words(rng, 2, 20)
    return {"instruction": "What is the last word?", "input": " ".join(words), "output": words[-1]}


def count_up(rng: random.Random) -> Record:
    """No-input task: the instruction alone determines the output."""
    start = rng.randint(1, 20)
    end = start + rng.randint(2, 25)
    return {
        "instruction": f"List the numbers from {start} to {end}.",
        "input": "",
        "output": ", ".join(str(i) for i in range(start, end + 1)),
    }


def spell_word(rng: random.Random) -> Record:
    """No-input task: spell a word letter by letter."""
    word = rng.choice(NOUNS)
    return {
        "instruction": f"Spell the word {word}.",
        "input": "",
        "output": " ".join(word),
    }


TASKS: tuple[Task, ...] = (
    reverse_words,
    sort_numbers,
    uppercase_word,
    add_numbers,
    copy_text,
    count_words,
    colour_to_fruit,
    last_word,
    count_up,
    spell_word,
)


def make_samples(seed: int = SEED, n: int = NUM_SAMPLES) -> list[Record]:
    """Round-robin over the tasks (balanced mix), then shuffle, all from one seeded RNG."""
    rng = random.Random(seed)
    samples = [TASKS[i % len(TASKS)](rng) for i in range(n)]
    rng.shuffle(samples)
    return samples


def make_chat_samples(samples: list[Record]) -> list[dict[str, list[dict[str, str]]]]:
    """The same records as `{"messages": [...]}` conversations: mostly one user turn and one
    assistant turn, every third with a system prompt, every fourth two exchanges (the next
    record as a follow-up question), so multi-turn masking is exercised on the default."""
    conversations: list[dict[str, list[dict[str, str]]]] = []
    i = 0
    while i < len(samples):
        turns = samples[i : i + 2] if i % 4 == 3 else samples[i : i + 1]
        messages = [{"role": "system", "content": SYSTEM_PROMPT}] if len(conversations) % 3 == 0 else []
        for record in turns:
            user = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
        conversations.append({"messages": messages})
        i += len(turns)
    return conversations


def main() -> None:
    samples = make_samples()
    OUTPUT_PATH.write_text(json.dumps(samples, indent=1, ensure_ascii=True) + "\n", encoding="utf-8")
    print(f"wrote {len(samples)} samples to {OUTPUT_PATH}")
    chats = make_chat_samples(samples)
    lines = "".join(json.dumps(chat, ensure_ascii=True) + "\n" for chat in chats)
    CHAT_OUTPUT_PATH.write_text(lines, encoding="utf-8")
    print(f"wrote {len(chats)} conversations to {CHAT_OUTPUT_PATH}")


if __name__ == "__main__":
    main()
