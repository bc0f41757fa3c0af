"""Shared fixtures: the real config composed with tiny overrides, and tiny checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from lora_sweep.cli import config_dir

REPO = Path(__file__).resolve().parents[1]
# The real Alpaca seed tasks are not ours to ship (CC BY-NC): they are reached only through this
# explicit path (CI sets it), and exactly one test uses them (see `seed_tasks_path`).
SEED_TASKS_ENV = "LORA_SWEEP_SEED_TASKS"

# Small enough for 2 CPU cores: a few steps, short sequences, small batches.
TINY = ["train.max_steps=6", "train.warmup_steps=1", "train.batch_size=4", "data.max_length=64", "train.log_every=3"]


@pytest.fixture
def compose_cfg() -> Iterator[Callable[..., DictConfig]]:
    """Compose the project's real config with overrides; clears GlobalHydra afterwards."""

    def _compose(*overrides: str) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))

    yield _compose
    GlobalHydra.instance().clear()


@dataclass(frozen=True)
class AlpacaFiles:
    """One set of Alpaca-format records written as a JSON list and as JSONL."""

    records: list[dict[str, str]]
    json_path: Path
    jsonl_path: Path


@pytest.fixture(scope="session")
def alpaca_files(tmp_path_factory: pytest.TempPathFactory) -> AlpacaFiles:
    """An Alpaca-format data set the project makes itself: every 10th embedded sanity sample
    (40 records, with and without `input`), so the `data=alpaca` path is tested on a file that
    needs nothing outside the repository."""
    from lora_sweep.embedded import SANITY_SAMPLES_PATH

    samples = json.loads(SANITY_SAMPLES_PATH.read_text())
    records = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in samples[::10]]
    assert any(r["input"] for r in records) and any(not r["input"] for r in records)  # both prompt forms
    out = tmp_path_factory.mktemp("alpaca")
    json_path, jsonl_path = out / "alpaca_data.json", out / "alpaca_data.jsonl"
    json_path.write_text(json.dumps(records, indent=1))
    jsonl_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return AlpacaFiles(records=records, json_path=json_path, jsonl_path=jsonl_path)


def seed_tasks_path() -> Path:
    """The real seed tasks at `$LORA_SWEEP_SEED_TASKS`, called in a test's body: the test is
    skipped when the variable is unset and fails when it names no file (a CI that sets it must
    not silently lose the test)."""
    value = os.environ.get(SEED_TASKS_ENV, "")
    if not value:
        pytest.skip(f"{SEED_TASKS_ENV} is not set (the path of alpaca_seed_tasks.json; .ci/run sets it)")
    path = Path(value)
    if not path.is_file():
        pytest.fail(f"{SEED_TASKS_ENV}={value} is not a file", pytrace=False)
    return path


def _train_tokenizer(texts: list[str], out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # like Llama's: the tokenizer itself puts <s> before a text
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>").save_pretrained(
        out
    )


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init Llama with GQA (4 query heads, 2 KV heads) and its own BPE tokenizer,
    saved with save_pretrained: the same path a user's local checkpoint takes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_sweep.embedded import SANITY_SAMPLES_PATH

    out = tmp_path_factory.mktemp("tiny_ckpt")
    records = json.loads(SANITY_SAMPLES_PATH.read_text())
    _train_tokenizer([r["instruction"] + " " + r["input"] + " " + r["output"] for r in records], out)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=384,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def nan_ckpt(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with NaN embeddings: loads fine, then fails the self-check."""
    import shutil

    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("nan_ckpt")
    for name in os.listdir(tiny_ckpt):
        shutil.copy(tiny_ckpt / name, out / name)
    model = AutoModelForCausalLM.from_pretrained(tiny_ckpt)
    with torch.no_grad():
        model.get_input_embeddings().weight.fill_(float("nan"))
    model.save_pretrained(out)
    return out


def one_worker(args: tuple[str, ...] | list[str]) -> list[str]:
    """A sweep's arguments with one worker unless they choose: the default `n_jobs: auto` runs
    one worker per core, whose trials finish in a timing-dependent order; tests that count
    trials or compare results need the reproducible single-worker sweep."""
    args = list(args)
    if ("-m" in args or "--multirun" in args) and not any(a.startswith("hydra.sweeper.n_jobs=") for a in args):
        args.append("hydra.sweeper.n_jobs=1")
    return args


def sweeps_once(base: Path, *sweeps: list[str]) -> Path:
    """`base/results` after the sweeps `python -m lora_sweep -m results_dir=base/results ARGS`
    (each a list of ARGS, run in order with the default workers), made once per `base`: a
    later call finds them done. For session fixtures that share real sweep results."""
    results = base / "results"
    done = base / "done"
    if done.is_file():
        return results
    base.mkdir(parents=True, exist_ok=True)
    for args in sweeps:
        proc = subprocess.run(
            [sys.executable, "-m", "lora_sweep", "-m", f"results_dir={results}", *args],
            cwd=base,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    done.write_text("ok")
    return results


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `python -m lora_sweep ARGS` in a subprocess, as a user would (a sweep: one worker
    unless `hydra.sweeper.n_jobs` is given, see `one_worker`)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "lora_sweep", *one_worker(args)],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        env=env,
        timeout=timeout,
    )
