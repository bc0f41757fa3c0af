"""What trials in one process share: the base model, the tokenizer, the records and the
tokenized examples, held by one explicit `TrialCache`.

Every trial still gets a fresh LoRA adapter, optimizer, data order and seed. The base model
is handed out with `checkout_model`, the adapter injected into it by the trial, and taken back
with `give_back`, which removes the adapter with peft's `unload()` (measured: ~3 ms on the
default, the base weights bit-identical afterwards, no hooks or attributes left behind), so a
sweep costs no second copy of the weights. `end_trial` is the one release path after every
trial, completed, failed or out of memory: `give_back`, then `release` (garbage collection and,
on CUDA, the allocator's cached blocks back to the driver, so the next trial, or another
worker on the same GPU, starts from a clean pool). Whoever runs trials holds one cache and
passes it; `clear` forgets everything and frees the memory.
"""

from __future__ import annotations

import gc
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lora_sweep import data as data_lib
from lora_sweep.chat import load_conversations, tokenize_conversations
from lora_sweep.config import DataConfig, ModelConfig
from lora_sweep.datafiles import check_data_file
from lora_sweep.evaluate import EvalResult
from lora_sweep.lora import restore_base_weights
from lora_sweep.model import attn_implementation_for, load_model, load_tokenizer
from lora_sweep.split import split_records

if TYPE_CHECKING:
    from peft import PeftModel

    from lora_sweep.samples import Answer

log = logging.getLogger(__name__)

MAX_MODELS = 1  # a sweep fine-tunes one base model; keep one copy of its weights
MAX_DATASETS = 8  # tokenized datasets (a sweep varies max_length over a few values)
MAX_FILES = 2  # data files: the training file and a separate validation file


@dataclass
class CachedModel:
    """A patched base model without an adapter, the model-level self-checks it passed, its
    held-out losses by (validation set, precision) and its sample answers by (prompts,
    length, precision): every trial of a sweep starts from this model, so the base model is
    evaluated and sampled once."""

    model: nn.Module
    checked: dict[str, str] | None = None
    label_logits: bool = False  # with `checked`: the loss may read the labelled positions' logits only
    in_use: bool = False
    base_evals: dict[tuple, EvalResult] = field(default_factory=dict)
    base_samples: dict[tuple, list[Answer]] = field(default_factory=dict)  # lora_sweep.samples


def fingerprint(path: Path) -> tuple:
    """A file or directory identified by its resolved path and its files' sizes and mtimes."""
    path = Path(path).resolve()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return (str(path),) + tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def examples_key(records_key: tuple, tokenizer_key: tuple, cfg: DataConfig, max_length: int) -> tuple:
    """What identifies records as tokenized: the file, the tokenizer, and every data setting
    that changes the tokens or labels (`TrialCache.examples` caches by it, a base evaluation too)."""
    return (records_key, tokenizer_key, cfg.template, max_length, cfg.mask_prompt, cfg.train_on)


class TrialCache:
    """The cross-trial cache of one process; a fresh one starts every trial cold."""

    def __init__(self, *, max_models: int = MAX_MODELS, max_datasets: int = MAX_DATASETS) -> None:
        self.max_models = max_models
        self.max_datasets = max_datasets
        self._models: OrderedDict[tuple, CachedModel] = OrderedDict()
        self._tokenizers: dict[tuple, Any] = {}
        self._records: dict[tuple, list[Any]] = {}
        self._examples: OrderedDict[tuple, list[data_lib.Example]] = OrderedDict()
        self._splits: dict[tuple, tuple[list[Any], list[Any]]] = {}
        self._attn: dict[tuple, str] = {}
        self._eval_batches: OrderedDict[tuple, list[dict[str, torch.Tensor]]] = OrderedDict()

    @property
    def models(self) -> list[CachedModel]:
        """The cached base models, least recently used first."""
        return list(self._models.values())

    def records(self, path: Path, *, chat: bool = False) -> tuple[tuple, list[Any]]:
        """(key, records) of a data file: instruction records, or conversations with `chat`;
        raises `DataError` on a bad file."""
        check_data_file(path)  # before fingerprint() stats it
        key = (*fingerprint(path), "chat" if chat else "instruction")
        if key not in self._records:
            while len(self._records) >= MAX_FILES:
                self._records.pop(next(iter(self._records)))
            self._records[key] = load_conversations(path) if chat else data_lib.load_records(path)
        return key, self._records[key]

    def split(
        self, records_key: tuple, records: list[Any], *, val_size: float | int, seed: int
    ) -> tuple[list[Any], list[Any]]:
        """(train, validation) of a file's records (`lora_sweep.split.split_records`), computed
        once per file and setting: hashing every record costs ~2 ms a trial on the sanity data."""
        key = (records_key, val_size, seed)
        if key not in self._splits:
            while len(self._splits) >= MAX_FILES:
                self._splits.pop(next(iter(self._splits)))
            self._splits[key] = split_records(records, val_size=val_size, seed=seed)
        return self._splits[key]

    def eval_batches(
        self, key: tuple, build: Callable[[], list[dict[str, torch.Tensor]]]
    ) -> list[dict[str, torch.Tensor]]:
        """The held-out batches identified by `key` (the validation set as tokenized, and how it
        is batched), built by `build` on a miss. Trials only read them."""
        if key in self._eval_batches:
            self._eval_batches.move_to_end(key)
        else:
            self._eval_batches[key] = build()
            while len(self._eval_batches) > self.max_datasets:
                self._eval_batches.popitem(last=False)
        return self._eval_batches[key]

    def tokenizer(self, model_dir: Path, cfg: ModelConfig) -> tuple[Any, tuple]:
        """(tokenizer, key) of a checkpoint; raises `ModelError` when it cannot be used."""
        key = (fingerprint(model_dir), cfg.trust_remote_code)
        if key not in self._tokenizers:
            self._tokenizers.clear()
            self._tokenizers[key] = load_tokenizer(model_dir, cfg)
        return self._tokenizers[key], key

    def examples(
        self,
        records_key: tuple,
        records: list[Any],
        tokenizer: Any,
        tokenizer_key: tuple,
        cfg: DataConfig,
        *,
        max_length: int | None = None,
        length_key: str = "data.max_length",
        model: str = "the model",
    ) -> list[data_lib.Example]:
        """The records tokenized for `cfg` (template, mask_prompt or train_on, and `max_length`,
        by default `cfg.max_length`; `length_key` names that setting and `model` the checkpoint
        in messages)."""
        max_length = cfg.max_length if max_length is None else max_length
        key = examples_key(records_key, tokenizer_key, cfg, max_length)
        if key in self._examples:
            self._examples.move_to_end(key)
            return self._examples[key]
        if cfg.template == "chat":
            examples = tokenize_conversations(
                records, tokenizer, max_length=max_length, train_on=cfg.train_on, key=length_key, model=model
            )
        else:
            examples = data_lib.tokenize_records(
                records,
                tokenizer,
                template=cfg.template,
                max_length=max_length,
                mask_prompt=cfg.mask_prompt,
                key=length_key,
            )
        self._examples[key] = examples
        while len(self._examples) > self.max_datasets:
            self._examples.popitem(last=False)
        return examples

    def checkout_model(self, model_dir: Path, cfg: ModelConfig, device: torch.device) -> tuple[CachedModel, bool]:
        """(entry, hit): the base model for this checkpoint/dtype/attention/device, loaded on a
        miss, marked in use until `give_back`."""
        # by the implementation the model gets (`auto` resolved), so `auto` and its resolution share it
        checkpoint = fingerprint(model_dir)
        attn_key = (checkpoint, cfg.attn_implementation, cfg.trust_remote_code)
        if attn_key not in self._attn:  # reads the checkpoint's config.json: once per checkpoint
            self._attn[attn_key] = attn_implementation_for(model_dir, cfg)
        key = (checkpoint, cfg.dtype, self._attn[attn_key], cfg.trust_remote_code, str(device))
        entry = self._models.get(key)
        if entry is not None and not entry.in_use:
            self._models.move_to_end(key)
            entry.in_use = True
            return entry, True
        entry = CachedModel(model=load_model(model_dir, cfg, device), in_use=True)
        if key not in self._models:  # a model already in use (re-entrant call) is not replaced
            self._models[key] = entry
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)
        return entry, False

    def give_back(
        self, entry: CachedModel, adapted: PeftModel | None, *, restore: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Take a checked-out base model back: remove the trial's adapter (`adapted`, the peft
        model, or None when none was created) and its gradients, and copy back the weights its
        init changed (`restore`: `lora.base_weights_to_restore`). A model that cannot be
        restored is dropped, never reused."""
        try:
            if adapted is not None and adapted.unload() is not entry.model:
                raise RuntimeError("unload() did not return the base model")
            if restore:
                restore_base_weights(entry.model, restore)
            if any("lora_" in name for name, _ in entry.model.named_modules()):
                raise RuntimeError("LoRA layers are left in the base model")
            entry.model.zero_grad(set_to_none=True)
            entry.model.eval()  # as from_pretrained returns it
            entry.in_use = False
        except Exception as err:  # noqa: BLE001 - whatever went wrong, the model is not reused
            log.warning("dropping the cached base model: %s", err)
            for key, value in list(self._models.items()):
                if value is entry:
                    del self._models[key]

    def end_trial(
        self, entry: CachedModel, adapted: PeftModel | None, *, restore: dict[str, torch.Tensor] | None = None
    ) -> None:
        """What every trial ends with, whatever its outcome (an out-of-memory error included):
        the base model back without the adapter and gradients (`give_back`; the optimizer's state
        and the LoRA gradients were dropped when the training loop left, `train.released`), then
        the memory freed (`release`). After a warm-up the collection costs ~0.2 ms (the
        long-lived objects are frozen)."""
        self.give_back(entry, adapted, restore=restore)
        self.release()

    def release(self) -> None:
        """Free the memory no one holds any more (after every trial, see `end_trial`): collect
        reference cycles, and hand CUDA's cached blocks back to the driver (only when CUDA is
        initialised: a CPU process never starts it)."""
        gc.collect()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    def clear(self) -> None:
        """Forget every cached model, tokenizer and dataset (the next trial starts cold), and
        free their memory."""
        self._models.clear()
        self._tokenizers.clear()
        self._records.clear()
        self._examples.clear()
        self._splits.clear()
        self._attn.clear()
        self._eval_batches.clear()
        self.release()
