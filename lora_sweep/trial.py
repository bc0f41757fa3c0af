"""One trial: prepare data and model, self-check, train, measure. Returns a result with a status.

A bad input (config, data, checkpoint, LoRA targets) raises `InputError` before anything is
trained, so the caller can refuse it without writing a row. Anything that goes wrong after
that (a failed self-check, an exception, out of memory) ends the trial with status `failed`
and a reason instead of crashing; divergence ends it `diverged`, a pruning request `pruned`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import resource
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from lora_sweep import data as data_lib
from lora_sweep.config import ConfigError, RunConfig
from lora_sweep.lora import LoraTargetError, apply_lora, count_parameters
from lora_sweep.metrics import compute_metrics
from lora_sweep.model import ModelError, load_model, load_tokenizer, resolve_device, resolve_model_dir
from lora_sweep.precision import resolve_precision
from lora_sweep.results import write_json, write_step_log
from lora_sweep.selfcheck import MODEL_LEVEL_CHECKS, FirstStepCheck, run_self_check
from lora_sweep.train import LoopResult, StepHook, train_loop

log = logging.getLogger(__name__)

STATUSES = ("success", "diverged", "failed", "pruned")
# Bad input: refused before training, no row written.
INPUT_ERRORS = (ConfigError, data_lib.DataError, ModelError, LoraTargetError)


@dataclass
class Prepared:
    """What a trial trains on: the adapted model, its batches and a probe batch."""

    model: torch.nn.Module
    loader: torch.utils.data.DataLoader
    probe: dict[str, torch.Tensor]
    vocab_size: int
    trainable_params: int
    device: torch.device
    cached: "_CachedModel | None" = None
    cache_hit: bool = False


@dataclass
class TrialResult:
    """The outcome of one trial; `metrics` is empty when it failed before training."""

    status: str
    reason: str
    run_id: str
    run_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    steps_completed: int = 0
    duration_s: float = 0.0
    tokens_per_s: float = 0.0
    real_tokens: int = 0
    peak_mem_mb: float = 0.0
    trainable_params: int = 0
    device: str = ""
    self_check: dict[str, str] = field(default_factory=dict)
    precision: str = ""
    cache_hit: bool = False
    train_seconds: float = 0.0
    step_seconds: float = 0.0
    timestamp_utc: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def csv_row(self, cfg: RunConfig, *, study_name: str = "", trial_number: int | None = None, state: str = "") -> dict[str, Any]:
        """One row of the results CSV (schema: `lora_sweep.results.CSV_COLUMNS`)."""
        metric_keys = ("avg_loss", "initial_loss", "final_loss", "loss_slope", "grad_mean", "grad_std", "drawup",
                       "spike_rate", "grad_volatility", "stability_index", "quality", "improvement", "learned",
                       "divergence_step")
        row: dict[str, Any] = {
            "timestamp_utc": self.timestamp_utc,
            "run_id": self.run_id,
            "study_name": study_name,
            "trial_number": trial_number,
            "state": state,
            "status": self.status,
            "reason": self.reason,
            "model": cfg.model.path or cfg.model.name,
            "data": cfg.data.path or cfg.data.name,
            "lora.r": cfg.lora.r,
            "lora.alpha": cfg.lora.alpha,
            "lora.dropout": cfg.lora.dropout,
            "lora.target_modules": cfg.lora.targets_label,
            "lora.use_rslora": cfg.lora.use_rslora,
            "train.lr": cfg.train.lr,
            "train.max_steps": cfg.train.max_steps,
            "train.batch_size": cfg.train.batch_size,
            "train.seed": cfg.train.seed,
            "train.warmup_steps": cfg.train.warmup_steps,
            "train.lr_scheduler": cfg.train.lr_scheduler,
            "train.weight_decay": cfg.train.weight_decay,
            "train.max_grad_norm": cfg.train.max_grad_norm,
            "data.max_length": cfg.data.max_length,
            "steps_completed": self.steps_completed,
            "duration_s": round(self.duration_s, 3),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "real_tokens": self.real_tokens,
            "peak_mem_mb": round(self.peak_mem_mb, 1),
            "trainable_params": self.trainable_params,
            "device": self.device,
            "run_dir": str(self.run_dir),
        }
        row.update({key: self.metrics.get(key) for key in metric_keys})
        return row

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status, "reason": self.reason, "run_id": self.run_id, "run_dir": str(self.run_dir),
            "metrics": self.metrics, "steps_completed": self.steps_completed, "duration_s": self.duration_s,
            "tokens_per_s": self.tokens_per_s, "real_tokens": self.real_tokens, "peak_mem_mb": self.peak_mem_mb,
            "trainable_params": self.trainable_params, "device": self.device, "self_check": self.self_check,
            "precision": self.precision, "cache_hit": self.cache_hit, "train_seconds": self.train_seconds,
            "step_seconds": self.step_seconds, "timestamp_utc": self.timestamp_utc,
        }


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a trial is reproducible on one machine."""
    from transformers import set_seed

    set_seed(seed)


def probe_indices(examples: Sequence[data_lib.Example], batch_size: int) -> list[int]:
    """The longest and the shortest example plus the first others: a probe batch with padding."""
    lengths = [len(e.input_ids) for e in examples]
    chosen = [max(range(len(lengths)), key=lengths.__getitem__), min(range(len(lengths)), key=lengths.__getitem__)]
    chosen = list(dict.fromkeys(chosen))
    chosen += [i for i in range(len(examples)) if i not in chosen][: max(0, batch_size - len(chosen))]
    return chosen


def data_path(cfg: RunConfig) -> Path:
    """`data.path`, or the embedded sanity samples when it is null."""
    from lora_sweep.embedded import SANITY_SAMPLES_PATH

    return Path(cfg.data.path) if cfg.data.path else SANITY_SAMPLES_PATH


def check_inputs(cfg: RunConfig) -> None:
    """The cheap input checks (data file, checkpoint directory and tokenizer, device, results
    directory), run before a run or a sweep starts: a sweep refuses them before its study."""
    # through the cache, so the trial that follows in this process does not load them again
    _cached_records(data_path(cfg))
    _cached_tokenizer(resolve_model_dir(cfg.model), cfg)  # e.g. neither pad nor EOS token
    resolve_device(cfg.train.device)
    check_results_dir(cfg)


def warm_up(cfg: RunConfig) -> None:
    """What a long-lived sweep worker does once, before its first trial: load the base model
    (and tokenize the data) into the cross-trial cache and run the model-level self-checks.
    Anything that fails here is left for the trial to run again and report."""
    try:
        with prepared_trial(cfg) as prepared:
            entry = prepared.cached
            if cfg.model.self_check and entry is not None and entry.checked is None:
                report = run_self_check(prepared.model, prepared.probe, vocab_size=prepared.vocab_size,
                                        first_backward=False)
                entry.checked = {k: report.details[k] for k in MODEL_LEVEL_CHECKS}
    except Exception as err:  # noqa: BLE001 - the first trial records the same error as its failure
        log.debug("warm-up stopped: %s", err)
    # Imports, the model and the tokenizer leave ~10^6 objects that live as long as the worker.
    # Collected once here and frozen, they are never traversed again: without this, the next
    # full collection (~0.2 s at that size) fell inside the worker's first trial, and each later
    # one would scan them all again.
    gc.collect()
    gc.freeze()


def check_results_dir(cfg: RunConfig) -> None:
    """`results_dir` (or its nearest existing parent) and an existing CSV must be writable, and
    the CSV must have this version's header; checked without writing anything."""
    from lora_sweep.results import ResultsError, _check_existing

    existing = cfg.results_dir
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "is not a directory" if not existing.is_dir() else "is not writable"
        raise ConfigError(f"results_dir={cfg.results_dir}: {existing} {what}; choose a writable results_dir")
    if cfg.csv_path.exists() and not os.access(cfg.csv_path, os.W_OK):
        raise ConfigError(f"the results CSV {cfg.csv_path} is not writable; fix its permissions or choose another results_dir")
    try:
        with open(cfg.csv_path, "rb") as handle:
            complete_header = handle.readline().endswith(b"\n")  # else torn: the next append repairs it
        if complete_header:
            _check_existing(cfg.csv_path)
    except FileNotFoundError:
        pass
    except ResultsError as err:
        raise ConfigError(str(err)) from err


# ---------------------------------------------------------------------------------------
# Cross-trial cache (one process): the base model, the tokenizer, the records and the
# tokenized examples are kept between trials; every trial still gets a fresh LoRA adapter,
# optimizer, data order and seed. The base model is handed out with the adapter injected and
# taken back with `unload()` (measured: ~3 ms on the default, the base weights bit-identical
# afterwards, no hooks or attributes left behind), so it costs no second copy of the weights.
# ---------------------------------------------------------------------------------------


@dataclass
class _CachedModel:
    """A patched base model without an adapter, and the model-level self-checks it passed."""

    model: torch.nn.Module
    checked: dict[str, str] | None = None
    in_use: bool = False


_MAX_MODELS = 1  # a sweep fine-tunes one base model; keep one copy of its weights
_MAX_DATASETS = 8  # tokenized datasets (a sweep varies max_length over a few values)
_models: OrderedDict[tuple, _CachedModel] = OrderedDict()
_tokenizers: dict[tuple, Any] = {}
_records: dict[tuple, list[dict[str, str]]] = {}
_examples: OrderedDict[tuple, list[data_lib.Example]] = OrderedDict()


def clear_cache() -> None:
    """Forget every cached model, tokenizer and dataset (the next trial starts cold)."""
    _models.clear()
    _tokenizers.clear()
    _records.clear()
    _examples.clear()


def _fingerprint(path: Path) -> tuple:
    """A file or directory identified by its resolved path and its files' sizes and mtimes."""
    path = path.resolve()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return (str(path),) + tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def _cached_records(path: Path) -> list[dict[str, str]]:
    key = _fingerprint(path)
    if key not in _records:
        _records.clear()
        _records[key] = data_lib.load_records(path)
    return _records[key]


def _cached_tokenizer(model_dir: Path, cfg: RunConfig) -> tuple[Any, tuple]:
    key = (_fingerprint(model_dir), cfg.model.trust_remote_code)
    if key not in _tokenizers:
        _tokenizers.clear()
        _tokenizers[key] = load_tokenizer(model_dir, cfg.model)
    return _tokenizers[key], key


def _cached_examples(records_key: tuple, records: list, tokenizer: Any, tok_key: tuple, cfg: RunConfig) -> list:
    key = (records_key, tok_key, cfg.data.template, cfg.data.max_length, cfg.data.mask_prompt)
    if key in _examples:
        _examples.move_to_end(key)
        return _examples[key]
    examples = data_lib.tokenize_records(
        records, tokenizer, template=cfg.data.template, max_length=cfg.data.max_length, mask_prompt=cfg.data.mask_prompt
    )
    _examples[key] = examples
    while len(_examples) > _MAX_DATASETS:
        _examples.popitem(last=False)
    return examples


def _checkout_model(model_dir: Path, cfg: RunConfig, device: torch.device) -> tuple[_CachedModel, bool]:
    """The cached base model for this checkpoint/dtype/attention/device (loaded on a miss)."""
    key = (_fingerprint(model_dir), cfg.model.dtype, cfg.model.attn_implementation, cfg.model.trust_remote_code, str(device))
    entry = _models.get(key)
    if entry is not None and not entry.in_use:
        _models.move_to_end(key)
        entry.in_use = True
        return entry, True
    entry = _CachedModel(model=load_model(model_dir, cfg.model, device), in_use=True)
    if key not in _models:  # a model already in use (re-entrant call) is not replaced
        _models[key] = entry
        while len(_models) > _MAX_MODELS:
            _models.popitem(last=False)
    return entry, False


def _release_model(prepared: Prepared) -> None:
    """Remove the trial's adapter and give the base model back to the cache (or drop it)."""
    entry = prepared.cached
    if entry is None:
        return
    prepared.cached = None
    try:
        base = prepared.model.unload()
        if base is not entry.model or any("lora_" in name for name, _ in base.named_modules()):
            raise RuntimeError("unload() did not restore the base model")
        base.zero_grad(set_to_none=True)
        base.eval()  # as from_pretrained returns it
        entry.in_use = False
    except Exception as err:  # noqa: BLE001 - a model that cannot be restored is never reused
        log.warning("dropping the cached base model: %s", err)
        for key, value in list(_models.items()):
            if value is entry:
                del _models[key]


def prepare(cfg: RunConfig) -> Prepared:
    """Load and validate everything the trial needs. Raises one of `INPUT_ERRORS` on bad input.

    Reuses what an earlier trial in this process loaded (see `clear_cache`); the adapter,
    data order and seed are always fresh. The caller must hand the model back with
    `_release_model` (`run_trial` does).
    """
    # data first: it is the cheapest to validate
    path = data_path(cfg)
    records = _cached_records(path)
    model_dir = resolve_model_dir(cfg.model)
    device = resolve_device(cfg.train.device)
    tokenizer, tok_key = _cached_tokenizer(model_dir, cfg)
    examples = _cached_examples(_fingerprint(path), records, tokenizer, tok_key, cfg)
    collator = data_lib.Collator(
        tokenizer.pad_token_id,
        padding_side=tokenizer.padding_side,
        pad_to=cfg.data.max_length if cfg.data.padding == "max_length" else None,
    )
    dataset = data_lib.SanityDataset(examples)
    probe = collator([dataset[i] for i in probe_indices(examples, cfg.train.batch_size)])

    # model: seeded after loading and before the adapter is created, so LoRA A's init is
    # reproducible and the same whether the base model was loaded now or cached
    entry, hit = _checkout_model(model_dir, cfg, device)
    try:
        seed_everything(cfg.train.seed)
        model = apply_lora(entry.model, cfg.lora)
    except BaseException:
        entry.in_use = False
        raise
    trainable, _ = count_parameters(model)
    loader = data_lib.make_dataloader(
        dataset, collator, batch_size=cfg.train.batch_size, seed=cfg.train.seed, group_by_length=cfg.data.group_by_length
    )
    return Prepared(
        model=model,
        loader=loader,
        probe={k: v.to(device) for k, v in probe.items()},
        vocab_size=int(model.get_base_model().config.vocab_size),
        trainable_params=trainable,
        device=device,
        cached=entry,
        cache_hit=hit,
    )


@contextlib.contextmanager
def prepared_trial(cfg: RunConfig) -> Iterator[Prepared]:
    """`prepare`, and give the base model back to the cache afterwards (also on error)."""
    prepared = prepare(cfg)
    try:
        yield prepared
    finally:
        _release_model(prepared)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def _status(loop: LoopResult, metrics: Mapping[str, Any]) -> tuple[str, str]:
    if loop.pruned:
        return "pruned", loop.stop_reason
    if loop.stop_reason:
        return "diverged", loop.stop_reason
    if metrics.get("diverged"):
        return "diverged", str(metrics.get("divergence_reason", ""))
    return "success", ""


def run_trial(cfg: RunConfig, run_dir: Path, *, on_step: StepHook | None = None, config_yaml: str | None = None) -> TrialResult:
    """Run one trial and write its run directory (config, per-step log, result JSON).

    Raises one of `INPUT_ERRORS` on bad input (nothing written); every later problem becomes
    a `failed` result.
    """
    start = time.perf_counter()
    run_dir = Path(run_dir).absolute()
    result = TrialResult(status="failed", reason="", run_id=run_dir.name, run_dir=run_dir)
    with prepared_trial(cfg) as prepared:
        _run_prepared(cfg, prepared, result, run_dir, on_step=on_step, config_yaml=config_yaml, start=start)
    return result


def _run_prepared(
    cfg: RunConfig, prepared: Prepared, result: TrialResult, run_dir: Path, *,
    on_step: StepHook | None, config_yaml: str | None, start: float,
) -> None:
    result.device, result.trainable_params = str(prepared.device), prepared.trainable_params
    result.cache_hit = prepared.cache_hit
    precision = resolve_precision(cfg.train.precision, prepared.device, prepared.model)
    result.precision = precision
    if prepared.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(prepared.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config_yaml is not None:
        (run_dir / "config.yaml").write_text(config_yaml)
    loop = LoopResult(steps=[])
    first_step_check = None
    try:
        if cfg.model.self_check:
            entry = prepared.cached
            cached_checks = entry.checked if entry is not None else None
            # the first-backward check runs on the loop's first step (no extra forward/backward)
            report = run_self_check(prepared.model, prepared.probe, vocab_size=prepared.vocab_size,
                                    model_checks=cached_checks, first_backward=False)
            if entry is not None and cached_checks is None:
                entry.checked = {k: report.details[k] for k in MODEL_LEVEL_CHECKS}
            result.self_check = dict(report.details, seconds=f"{report.seconds:.3f}")
            first_step_check = FirstStepCheck(result.self_check, prepared.vocab_size)
            log.info("self-check passed in %.2f s: %s", report.seconds, "; ".join(report.details.values()))
        loop = train_loop(prepared.model, data_lib.infinite_batches(prepared.loader), cfg.train, prepared.device,
                          on_step=on_step, precision=precision, first_step_check=first_step_check)
        metrics = compute_metrics(
            [s.loss for s in loop.steps],
            [s.grad_norm for s in loop.steps],
            warmup_steps=cfg.train.warmup_steps,
            vocab_size=prepared.vocab_size,
            min_improvement=cfg.train.min_improvement,
        ).to_dict()
        result.metrics = metrics
        result.status, result.reason = _status(loop, metrics)
    except Exception as err:  # noqa: BLE001 - a trial reports failure instead of crashing the sweep
        oom = isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        result.status = "failed"
        result.reason = f"out of memory: {first}" if oom else f"{type(err).__name__}: {first}"
        log.error("trial failed: %s", result.reason)
    result.steps_completed = len(loop.steps)
    result.real_tokens = sum(s.real_tokens for s in loop.steps)
    result.train_seconds, result.step_seconds = loop.train_seconds, loop.step_seconds
    result.tokens_per_s = result.real_tokens / loop.train_seconds if loop.train_seconds > 0 else 0.0
    result.peak_mem_mb = _peak_memory_mb(prepared.device)
    result.duration_s = time.perf_counter() - start
    write_step_log(run_dir / "steps.csv", [s.to_dict() for s in loop.steps])
    write_json(run_dir / "result.json", result.to_json())
