"""One trial: prepare data and model, self-check, train, measure. Returns a result with a status.

A bad input (config, data, checkpoint, LoRA targets) raises one of `INPUT_ERRORS` before
anything is trained, so the caller can refuse it without writing a row. Anything that goes
wrong after that (a failed self-check, an exception, out of memory) ends the trial with status
`failed` and a reason instead of crashing; divergence ends it `diverged`, a pruning request
`pruned`. What a trial reuses from earlier ones comes from the `TrialCache` it is given.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from lora_sweep import data as data_lib
from lora_sweep.adapters import save_adapter
from lora_sweep.cache import CachedModel, TrialCache, examples_key
from lora_sweep.chat import assistant_mask_batch, check_assistant_labels, check_conversations
from lora_sweep.config import RunConfig
from lora_sweep.embedded import SANITY_CHAT_PATH, SANITY_SAMPLES_PATH
from lora_sweep.errors import INPUT_ERRORS, ConfigError
from lora_sweep.evaluate import EVAL_TOKENS_PER_BATCH, EvalResult, eval_batches, evaluate_loss
from lora_sweep.lora import (
    adapted_modules,
    apply_lora,
    base_weights_to_restore,
    check_rank,
    count_parameters,
    initial_adapter_state,
)
from lora_sweep.memory import peak_memory_mb, reset_peak_memory
from lora_sweep.metrics import TrialMetrics, compute_metrics, eval_summary
from lora_sweep.model import (
    check_max_length,
    load_model_config,
    model_skeleton,
    position_limit,
    resolve_attn_implementation,
    resolve_device,
    resolve_model_dir,
)
from lora_sweep.precision import allow_tf32, attends_per_sequence, resolve_precision
from lora_sweep.results import COLUMN_DOCS, ResultsError, check_appendable, write_json, write_step_log
from lora_sweep.samples import SAMPLES_FILENAME, SamplePrompts, prepare_samples, write_samples
from lora_sweep.selfcheck import FirstStepCheck, SelfCheckError, model_level_details, run_self_check
from lora_sweep.sweep.objective import OOM_PREFIX, failure_reason, is_out_of_memory
from lora_sweep.train import EVAL_LOG_COLUMNS, LoopResult, StepHook, train_loop

if TYPE_CHECKING:
    from peft import PeftModel

log = logging.getLogger(__name__)

EVAL_METRICS = (
    "eval_loss",
    "eval_loss_base",
    "eval_improvement",
    "best_eval_loss",
    "best_eval_step",
    "generalization_gap",
)
# The metrics that are results columns (the rest, e.g. `constraint`, only go to result.json).
METRIC_COLUMNS: tuple[str, ...] = tuple(
    name for name in (*(f.name for f in fields(TrialMetrics)), *EVAL_METRICS) if name in COLUMN_DOCS
)
EVAL_CONTEXT_CAP = 2048  # held-out sequences of a long-context model: enough to judge, affordable to run


@dataclass
class Prepared:
    """What a trial trains on: the adapted model, its batches and a probe batch."""

    model: PeftModel
    loader: torch.utils.data.DataLoader
    probe: dict[str, torch.Tensor]
    vocab_size: int
    trainable_params: int
    adapted_modules: list[str]
    device: torch.device
    cached: CachedModel
    eval_batches: list[dict[str, torch.Tensor]]
    eval_key: tuple  # identifies the validation set as tokenized (base evaluations are cached by it)
    probe_assistant: torch.Tensor | None = None  # chat: the probe's assistant tokens ([B, S] bool)
    restore: dict[str, torch.Tensor] = field(default_factory=dict)  # base weights the init changed
    initial_adapter: dict[str, torch.Tensor] | None = None  # PiSSA / OLoRA: converted at save time
    cache_hit: bool = False
    samples: SamplePrompts | None = None  # answered after a completed trial (train.sample_prompts)


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
    adapted_modules: list[str] = field(default_factory=list)
    device: str = ""
    self_check: dict[str, str] = field(default_factory=dict)
    precision: str = ""
    attn_implementation: str = ""
    cache_hit: bool = False
    train_seconds: float = 0.0
    step_seconds: float = 0.0
    eval_seconds: float = 0.0
    sample_seconds: float = 0.0
    adapter_dir: Path | None = None  # <run_dir>/adapter when saved (a sweep may delete it later)
    adapter_seconds: float = 0.0
    timestamp_utc: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def csv_row(
        self, cfg: RunConfig, *, study_name: str = "", trial_number: int | None = None, state: str = ""
    ) -> dict[str, Any]:
        """One row of the results CSV (schema: `lora_sweep.results.CSV_COLUMNS`): the run, every
        config value (`RunConfig.flat_values`), the outcome."""
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
        }
        row.update(cfg.flat_values())
        row.update({key: self.metrics.get(key) for key in METRIC_COLUMNS})
        row.update(
            {
                "steps_completed": self.steps_completed,
                "duration_s": round(self.duration_s, 3),
                "tokens_per_s": round(self.tokens_per_s, 1),
                "real_tokens": self.real_tokens,
                "peak_mem_mb": round(self.peak_mem_mb, 1),
                "eval_seconds": round(self.eval_seconds, 3),
                "sample_seconds": round(self.sample_seconds, 3),
                "trainable_params": self.trainable_params,
                "adapted_modules": ",".join(self.adapted_modules),
                "precision": self.precision,
                "attn_implementation": self.attn_implementation,
                "device": self.device,
                "run_dir": str(self.run_dir),
                "adapter_dir": str(self.adapter_dir) if self.adapter_dir is not None else "",
            }
        )
        return row

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "reason": self.reason,
            "run_id": self.run_id,
            "run_dir": str(self.run_dir),
            "metrics": self.metrics,
            "steps_completed": self.steps_completed,
            "duration_s": self.duration_s,
            "tokens_per_s": self.tokens_per_s,
            "real_tokens": self.real_tokens,
            "peak_mem_mb": self.peak_mem_mb,
            "trainable_params": self.trainable_params,
            "adapted_modules": self.adapted_modules,
            "device": self.device,
            "self_check": self.self_check,
            "precision": self.precision,
            "attn_implementation": self.attn_implementation,
            "cache_hit": self.cache_hit,
            "train_seconds": self.train_seconds,
            "step_seconds": self.step_seconds,
            "eval_seconds": self.eval_seconds,
            "sample_seconds": self.sample_seconds,
            "adapter_dir": str(self.adapter_dir) if self.adapter_dir is not None else "",
            "adapter_seconds": self.adapter_seconds,
            "timestamp_utc": self.timestamp_utc,
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
    """`data.path`, or the embedded sanity samples (as conversations for the chat template)."""
    if cfg.data.path:
        return Path(cfg.data.path)
    return SANITY_CHAT_PATH if cfg.data.template == "chat" else SANITY_SAMPLES_PATH


def model_label(cfg: RunConfig) -> str:
    """The checkpoint as messages name it."""
    return f"model.path={cfg.model.path}" if cfg.model.path else "the embedded tiny Llama"


def split_data(cfg: RunConfig, cache: TrialCache) -> tuple[tuple, list[Any], tuple, list[Any]]:
    """(train key, train records, validation key, validation records): `data.val_path`'s records,
    or `data.val_size` split off the training file (`lora_sweep.split`, the same split in every
    trial). Raises `DataError` when either side would be empty."""
    chat = cfg.data.template == "chat"
    records_key, records = cache.records(data_path(cfg), chat=chat)
    if cfg.data.val_path:
        val_key, val_records = cache.records(Path(cfg.data.val_path), chat=chat)
        return records_key, records, val_key, val_records
    size = cfg.data.val_size
    train, val = cache.split(records_key, records, val_size=int(size) if size >= 1 else size, seed=cfg.data.val_seed)
    split = ("split", size, cfg.data.val_seed)
    return (*records_key, "train", *split), train, (*records_key, "val", *split), val


def eval_max_length(cfg: RunConfig, model_config: Any) -> int:
    """Tokens per held-out sequence: `data.eval_max_length`, else the model's context (capped),
    never `data.max_length`, which a sweep may search: every trial is judged on the same tokens."""
    if cfg.data.eval_max_length is not None:
        return cfg.data.eval_max_length
    limit = position_limit(model_config)
    return min(limit[1], EVAL_CONTEXT_CAP) if limit is not None else EVAL_CONTEXT_CAP


def check_inputs(cfg: RunConfig, cache: TrialCache) -> None:
    """The cheap input checks, run before a run or a sweep starts (a sweep refuses them before
    its study): the data file, the checkpoint directory, its config and tokenizer, the chat
    template against a sample of the conversations, `data.max_length` against the model's
    positions, `model.attn_implementation` against the model class, the LoRA targets and rank
    against the model's layers (on a weightless skeleton), the device, the results directory.
    Raises one of `INPUT_ERRORS`."""
    # through the cache, so the trial that follows in this process does not load them again
    _, train_records, _, _ = split_data(cfg, cache)  # also: neither side of the split empty
    model_dir = resolve_model_dir(cfg.model)
    model_config = load_model_config(model_dir, cfg.model)
    check_max_length(cfg.data.max_length, model_config)
    if cfg.data.eval_max_length is not None:
        check_max_length(cfg.data.eval_max_length, model_config, key="data.eval_max_length")
    tokenizer, _ = cache.tokenizer(model_dir, cfg.model)  # e.g. neither pad nor EOS token
    if cfg.data.template == "chat":  # no template, or one whose assistant tokens cannot be told
        check_conversations(train_records, tokenizer, train_on=cfg.data.train_on, model=model_label(cfg))
    skeleton = model_skeleton(model_config, cfg.model)
    resolve_attn_implementation(skeleton, cfg.model.attn_implementation)  # e.g. sdpa where the model has none
    check_rank(skeleton, cfg.lora)
    resolve_device(cfg.train.device)
    try:
        check_appendable(cfg.results_dir)
    except ResultsError as err:
        raise ConfigError(str(err)) from err


def warm_up(cfg: RunConfig, cache: TrialCache) -> None:
    """What a long-lived sweep worker does once, before its first trial: load the base model
    (and tokenize the data) into `cache`, run the model-level self-checks, and (in `prepare`)
    let the base model answer the sample prompts.

    Bad input (one of `INPUT_ERRORS`, e.g. a rank too large for the model) is raised, so the
    sweep refuses it before its study is touched; anything else that fails here is left for the
    trial to run again and report.
    """
    try:
        with prepared_trial(cfg, cache) as prepared:
            entry = prepared.cached
            if cfg.model.self_check and entry.checked is None:
                report = run_self_check(
                    prepared.model,
                    prepared.probe,
                    vocab_size=prepared.vocab_size,
                    first_backward=False,
                    packing=cfg.data.packing,
                )
                entry.checked = model_level_details(report)
                entry.label_logits = report.label_logits
    except INPUT_ERRORS:
        raise
    except Exception as err:  # noqa: BLE001 - the first trial records the same error as its failure
        log.debug("warm-up stopped: %s", err)
    # Imports, the model and the tokenizer leave ~10^6 objects that live as long as the worker.
    # Collected once here and frozen, they are never traversed again: without this, the next
    # full collection (~0.2 s at that size) fell inside the worker's first trial, and each later
    # one would scan them all again.
    gc.collect()
    gc.freeze()


def prepare(cfg: RunConfig, cache: TrialCache) -> Prepared:
    """Load and validate everything the trial needs. Raises one of `INPUT_ERRORS` on bad input.

    Reuses what an earlier trial loaded into `cache`; the adapter, data order and seed are
    always fresh. The caller must give the model back (`prepared_trial` does).
    """
    # data first: it is the cheapest to validate
    train_key, train_records, val_key, val_records = split_data(cfg, cache)
    model_dir = resolve_model_dir(cfg.model)
    device = resolve_device(cfg.train.device)
    tokenizer, tok_key = cache.tokenizer(model_dir, cfg.model)
    examples = cache.examples(train_key, train_records, tokenizer, tok_key, cfg.data, model=model_label(cfg))
    # training batches are right-padded whatever the checkpoint's default padding side
    collator = data_lib.Collator(
        tokenizer.pad_token_id,
        padding_side="right",
        pad_to=cfg.data.max_length if cfg.data.padding == "max_length" else None,
    )
    dataset = data_lib.SanityDataset(examples)
    probe_rows = probe_indices(examples, cfg.train.batch_size)
    probe = collator([dataset[i] for i in probe_rows])
    probe_assistant = assistant_mask_batch([examples[i] for i in probe_rows], probe["input_ids"].shape[1])

    # model: seeded after loading and before the adapter is created, so LoRA A's init is
    # reproducible and the same whether the base model was loaded now or cached
    entry, hit = cache.checkout_model(model_dir, cfg.model, device)
    model, restore = None, {}
    try:  # whatever fails from here on, the base model goes back to the cache without the adapter
        check_max_length(cfg.data.max_length, entry.model.config)  # a searched max_length
        eval_length = eval_max_length(cfg, entry.model.config)
        samples = None
        if cfg.train.sample_prompts:  # the base model answers before an adapter changes it (PiSSA, OLoRA)
            prompt_tokens = eval_length - cfg.train.sample_max_new_tokens
            samples = prepare_samples(
                cfg, val_records, tokenizer, entry, device=device, max_prompt_tokens=max(1, prompt_tokens)
            )
        seed_everything(cfg.train.seed)
        restore = base_weights_to_restore(entry.model, cfg.lora)  # PiSSA / OLoRA change W
        model = apply_lora(entry.model, cfg.lora)
        trainable, _ = count_parameters(model)
        val_examples = cache.examples(
            val_key,
            val_records,
            tokenizer,
            tok_key,
            cfg.data,
            max_length=eval_length,
            length_key="data.eval_max_length",
            model=model_label(cfg),
        )
        eval_key = examples_key(val_key, tok_key, cfg.data, eval_length)
        tokens_per_batch = EVAL_TOKENS_PER_BATCH.get(device.type, EVAL_TOKENS_PER_BATCH["cuda"])
        packed_eval = attends_per_sequence(entry.model, device)
        loader = data_lib.make_dataloader(
            dataset,
            collator,
            batch_size=cfg.train.batch_size,
            seed=cfg.train.seed,
            group_by_length=cfg.data.group_by_length,
            packing=cfg.data.packing,
        )
        return Prepared(
            model=model,
            loader=loader,
            probe={k: v.to(device) for k, v in probe.items()},
            vocab_size=int(cast(Any, model.get_base_model()).config.vocab_size),  # a transformers model
            trainable_params=trainable,
            adapted_modules=adapted_modules(model),
            device=device,
            cached=entry,
            eval_batches=cache.eval_batches(
                (eval_key, tokens_per_batch, packed_eval),
                lambda: eval_batches(
                    val_examples, tokenizer.pad_token_id, tokens_per_batch=tokens_per_batch, packed=packed_eval
                ),
            ),
            eval_key=eval_key,
            probe_assistant=probe_assistant,
            restore=restore,
            initial_adapter=initial_adapter_state(model, cfg.lora),
            cache_hit=hit,
            samples=samples,
        )
    except BaseException:
        cache.end_trial(entry, adapted=model, restore=restore)
        raise


@contextlib.contextmanager
def prepared_trial(cfg: RunConfig, cache: TrialCache) -> Iterator[Prepared]:
    """`prepare`, and end the trial afterwards through `TrialCache.end_trial` (also on error):
    the base model back without the trial's adapter, optimizer state or gradients, and the
    memory freed."""
    prepared = prepare(cfg, cache)
    try:
        yield prepared
    finally:
        cache.end_trial(prepared.cached, adapted=prepared.model, restore=prepared.restore)


def oom_reason(err: BaseException, cfg: RunConfig) -> str:
    """``out of memory (train.batch_size=B x data.max_length=L): <the error's first line>``."""
    shape = f"train.batch_size={cfg.train.batch_size} x data.max_length={cfg.data.max_length}"
    detail = failure_reason(err).removeprefix(OOM_PREFIX).lstrip(": ")
    return f"{OOM_PREFIX} ({shape}): {detail}"[:2000]


def _status(loop: LoopResult, metrics: Mapping[str, Any]) -> tuple[str, str]:
    if loop.pruned:
        return "pruned", loop.stop_reason
    if loop.stop_reason:
        return "diverged", loop.stop_reason
    if metrics.get("diverged"):
        return "diverged", str(metrics.get("divergence_reason", ""))
    return "success", ""


def run_trial(
    cfg: RunConfig,
    run_dir: Path,
    *,
    cache: TrialCache | None = None,
    on_step: StepHook | None = None,
    config_yaml: str | None = None,
) -> TrialResult:
    """Run one trial and write its run directory (config, per-step log, result JSON).

    `cache` holds what earlier trials of this process loaded (None: a fresh one, a cold start).
    Raises one of `INPUT_ERRORS` on bad input (nothing written); every later problem becomes
    a `failed` result, and so does running out of memory while preparing (reason
    `out of memory (train.batch_size=B x data.max_length=L): ...`).
    Every trial ends with `TrialCache.end_trial`, which releases the memory it can.
    """
    cache = cache if cache is not None else TrialCache()
    start = time.perf_counter()
    run_dir = Path(run_dir).absolute()
    result = TrialResult(status="failed", reason="", run_id=run_dir.name, run_dir=run_dir)
    peak_was_reset = reset_peak_memory(resolve_device(cfg.train.device))
    try:
        with prepared_trial(cfg, cache) as prepared:  # its exit releases the memory (`end_trial`)
            _run_prepared(  # records every failure of its own in `result`
                cfg,
                prepared,
                result,
                run_dir,
                on_step=on_step,
                config_yaml=config_yaml,
                start=start,
                peak_was_reset=peak_was_reset,
            )
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        # out of memory before training (the model onto the device, the adapter): a failed
        # trial like one in the loop, and the worker goes on
        result.reason = oom_reason(err, cfg)
    else:
        return result
    cache.release()  # out of the except block: the error's frames no longer hold their tensors
    result.duration_s = time.perf_counter() - start
    log.error("trial failed: %s", result.reason)
    write_json(run_dir / "result.json", result.to_json())
    return result


def _run_prepared(
    cfg: RunConfig,
    prepared: Prepared,
    result: TrialResult,
    run_dir: Path,
    *,
    on_step: StepHook | None,
    config_yaml: str | None,
    start: float,
    peak_was_reset: bool,
) -> bool:
    """Train and measure into `result`; returns whether the trial ran out of memory."""
    result.device, result.trainable_params = str(prepared.device), prepared.trainable_params
    result.adapted_modules = prepared.adapted_modules
    result.cache_hit = prepared.cache_hit
    precision = resolve_precision(cfg.train.precision, prepared.device, prepared.model)
    allow_tf32(prepared.device)
    result.precision = precision
    # what model.attn_implementation resolved to (`auto`: SDPA where the model has it)
    result.attn_implementation = str(cast(Any, prepared.model.get_base_model()).config._attn_implementation)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config_yaml is not None:
        (run_dir / "config.yaml").write_text(config_yaml)
    loop = LoopResult(steps=[])
    first_step_check = None
    label_logits_only = False  # full logits unless the self-check verified the model slices them
    out_of_memory = False
    try:
        if cfg.model.self_check:
            entry = prepared.cached
            cached_checks = entry.checked
            # the first-backward check runs on the loop's first step (no extra forward/backward)
            report = run_self_check(
                prepared.model,
                prepared.probe,
                vocab_size=prepared.vocab_size,
                model_checks=cached_checks,
                first_backward=False,
                packing=cfg.data.packing,
            )
            if cached_checks is None:
                entry.label_logits = report.label_logits
            entry.checked = {**(cached_checks or {}), **model_level_details(report)}
            label_logits_only = entry.label_logits
            if prepared.probe_assistant is not None:
                try:
                    report.details["assistant_labels"] = check_assistant_labels(
                        prepared.probe["labels"].cpu(), prepared.probe_assistant, train_on=cfg.data.train_on
                    )
                except ValueError as err:
                    raise SelfCheckError("assistant_labels", str(err)) from err
            result.self_check = dict(report.details, seconds=f"{report.seconds:.3f}")
            first_step_check = FirstStepCheck(result.self_check, prepared.vocab_size)
            log.info("self-check passed in %.2f s: %s", report.seconds, "; ".join(report.details.values()))
        model, base_key = prepared.model, (prepared.eval_key, precision)
        base_eval = prepared.cached.base_evals.get(base_key)

        def evaluate(autocast: Any) -> EvalResult:
            return evaluate_loss(
                model, prepared.eval_batches, prepared.device, autocast=autocast, label_logits_only=label_logits_only
            )

        loop = train_loop(
            model,
            data_lib.infinite_batches(prepared.loader),
            cfg.train,
            prepared.device,
            on_step=on_step,
            precision=precision,
            first_step_check=first_step_check,
            evaluate=evaluate,
            base_eval=base_eval,
            label_logits_only=label_logits_only,
        )
        if base_eval is None and loop.evals:  # step 0 is the base model (LoRA's B = 0 at init)
            prepared.cached.base_evals[base_key] = EvalResult(loop.evals[0].loss, 0, loop.evals[0].seconds)
        trial_metrics = compute_metrics(
            [s.loss for s in loop.steps],
            [s.grad_norm for s in loop.steps],
            warmup_steps=cfg.train.warmup_steps,
            vocab_size=prepared.vocab_size,
            min_improvement=cfg.train.min_improvement,
        )
        metrics = trial_metrics.to_dict()
        # learned and constraint are judged on the held-out loss
        finite_run = not (trial_metrics.diverged and "non-finite" in trial_metrics.divergence_reason)
        metrics.update(
            eval_summary(
                [(e.step, e.loss) for e in loop.evals],
                final_loss=trial_metrics.final_loss,
                min_improvement=cfg.train.min_improvement,
                finite_run=finite_run,
            )
        )
        result.metrics = metrics
        result.status, result.reason = _status(loop, metrics)
        if result.status == "success" and cfg.train.save_adapter != "none":  # before give_back unloads it
            result.adapter_dir, result.adapter_seconds = save_adapter(
                prepared.model, run_dir, initial=prepared.initial_adapter
            )
    except Exception as err:  # noqa: BLE001 - a trial reports failure instead of crashing the sweep
        out_of_memory = is_out_of_memory(err)
        result.status, result.reason = "failed", failure_reason(err)
        if out_of_memory:  # which shape did not fit: what to lower (or accumulate) next time
            result.reason = oom_reason(err, cfg)
        log.error("trial failed: %s", result.reason)
    if result.status == "success" and prepared.samples is not None:
        try:  # the trained adapter is still attached (the base model answered in `prepare`)
            result.sample_seconds = write_samples(
                run_dir / SAMPLES_FILENAME,
                prepared.model,
                prepared.samples,
                device=prepared.device,
                max_new_tokens=cfg.train.sample_max_new_tokens,
                precision=precision,
            )
        except Exception as err:  # noqa: BLE001 - samples show a finished trial; they do not change its result
            out_of_memory = out_of_memory or is_out_of_memory(err)
            log.warning("samples not written: %s", failure_reason(err))
    result.steps_completed = len(loop.steps)
    result.real_tokens = sum(s.real_tokens for s in loop.steps)
    result.train_seconds, result.step_seconds = loop.train_seconds, loop.step_seconds
    result.eval_seconds = loop.eval_seconds
    result.tokens_per_s = result.real_tokens / loop.train_seconds if loop.train_seconds > 0 else 0.0
    result.peak_mem_mb = peak_memory_mb(prepared.device, was_reset=peak_was_reset)
    result.duration_s = time.perf_counter() - start
    write_step_log(run_dir / "steps.csv", [s.to_dict() for s in loop.steps])
    write_step_log(run_dir / "evals.csv", [e.to_dict() for e in loop.evals], empty_header=EVAL_LOG_COLUMNS)
    write_json(run_dir / "result.json", result.to_json())
    return out_of_memory
