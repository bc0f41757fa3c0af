"""Side-by-side trial throughput: our loop vs the seed's naive loop vs HF Trainer (default, tuned).

One process, one model, one dataset, one batch size, step count and seed. Rounds are
interleaved (A B C D, A B C D, ...) and medians reported, so a machine under load slows
every variant alike and the ratios stay meaningful.

    .venv/bin/python benchmarks/bench_trial.py                 # ~15 min on 2 quiet CPU cores
    .venv/bin/python benchmarks/bench_trial.py --quick         # a smoke run (~1-2 min)
    .venv/bin/python benchmarks/bench_trial.py --data /path/to/alpaca_seed_tasks.json

Model: an ~8M-parameter random-init Llama with GQA (10 layers, hidden 256, 4 query / 2 KV
heads), the size of DESIGN.md's throughput measurements, built in a temp dir with the
embedded tokenizer. LoRA as the CLI's default (`lora=default`, peft's Llama targets; r 8, alpha 16, dropout 0.05, q_proj
and v_proj) for every variant.

Batching: `ours` is the trial exactly as the CLI's defaults batch it (`data.packing`,
`data.group_by_length` as conf/data sets them); each other batching is a row of its own
(`ours_uniform`, `ours_grouped`, `ours_packed`: opt-in techniques), all compared on real
(non-padding) tokens per second of training. The same work on both sides: the default trial
also measures its held-out loss (every `train.eval_every` steps and after the last), which no
baseline does, so its throughput is taken on the loop's time less those evaluations; a line
prints it with them counted, and the sweep's overhead counts them. A last section runs the
default trial on a ~52M-parameter Llama, where matmuls dominate, for MFU against the fp32 and
bf16 ceilings of its shapes.

Data (`--data PATH`, see `benchmark_records`; the data used is printed): an Alpaca-format file,
by default `$LORA_SWEEP_SEED_TASKS` when it is set (Stanford Alpaca's 175 seed tasks, what
BENCHMARKS.md's figures were measured on; not shipped, their license forbids it), else 175
records the benchmark generates from the embedded sanity samples in the same shape. Plain
template; the records with 20-400 tokens are kept (the issue's "8-sample batches of
20-400-token texts"; `--max-text-tokens 512` keeps all, truncated at 512).

The overhead figure comes from the real default sweep (`python -m lora_sweep -m`, a
subprocess): per trial, Optuna's ask-to-tell wall time against the training loop's own
optimizer-step time.

Last line: `vs_trainer=<x> vs_trainer_tuned=<t> vs_naive=<y> mfu=<z> overhead=<w>
framework_overhead=<f>` (f: the overhead without held-out evaluation and sample answers).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from lora_sweep import data as data_lib  # noqa: E402
from lora_sweep.cache import TrialCache  # noqa: E402
from lora_sweep.config import LoraSettings, ModelConfig, RunConfig, TrainConfig  # noqa: E402
from lora_sweep.lora import apply_lora  # noqa: E402
from lora_sweep.model import load_model, load_tokenizer, offline_hub  # noqa: E402
from lora_sweep.precision import native_bf16, resolve_precision  # noqa: E402
from lora_sweep.train import train_loop  # noqa: E402

SEED_TASKS_ENV = "LORA_SWEEP_SEED_TASKS"  # the real seed tasks, reached only through an explicit path
LR, WARMUP, SEED, BATCH, MAX_LENGTH = 1e-3, 2, 0, 8, 512
MIN_TEXT_TOKENS = 20
LORA = LoraSettings(r=8, alpha=16.0, dropout=0.05)  # conf/lora/default.yaml on Llama
NO_DROPOUT = LoraSettings(r=8, alpha=16.0, dropout=0.0)


# -------------------------------------------------------------------------------------- data
GENERATED_IN_RANGE, GENERATED_LONG = 140, 35  # the seed tasks' shape: 140 of 175 in 20-400 tokens


def _generated_targets() -> list[int]:
    """Token lengths (plain template) the generated records aim at: 140 spread over 30-380,
    skewed short like the seed tasks (median ~180 once reached), and 35 longer ones (400-3800)."""
    import random

    in_range = [round(30 + 350 * ((k + 0.5) / GENERATED_IN_RANGE) ** 1.4) for k in range(GENERATED_IN_RANGE)]
    long = [round(400 * 9.5 ** ((k + 0.5) / GENERATED_LONG)) for k in range(GENERATED_LONG)]
    targets = in_range + long
    random.Random(0).shuffle(targets)  # a fixed order: batches mix lengths as a real file does
    return targets


def generated_records(tokenizer) -> list[dict[str, str]]:
    """175 Alpaca records made deterministically of the embedded sanity samples, each joining
    consecutive samples (instructions, inputs and outputs) until it reaches its target length:
    a data set the benchmark makes itself, in the shape of the seed tasks."""
    from lora_sweep.embedded import SANITY_SAMPLES_PATH

    samples = data_lib.load_records(SANITY_SAMPLES_PATH)

    def merged(parts: list[dict[str, str]]) -> dict[str, str]:
        return {
            "instruction": " ".join(p["instruction"] for p in parts),
            "input": "\n".join(p["input"] for p in parts if p["input"]),
            "output": "\n".join(p["output"] for p in parts),
        }

    def n_tokens(record: dict[str, str]) -> int:
        text = data_lib.format_prompt(record, "plain") + record["output"]
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 2  # BOS, EOS

    records, cursor = [], 0
    for target in _generated_targets():
        parts: list[dict[str, str]] = []
        skipped = 0
        while True:
            sample = samples[cursor % len(samples)]
            cursor += 1
            if target > 400:  # beyond the band the exact length matters less: measured every 10 parts
                parts.append(sample)  # (re-tokenizing a growing record at every part is quadratic)
                if len(parts) % 10 == 0 and n_tokens(merged(parts)) >= target:
                    break
                continue
            if parts and n_tokens(merged(parts + [sample])) > 400 and skipped < len(samples):
                skipped += 1
                continue  # would leave the 20-400 band: try the next (shorter) sample instead
            parts.append(sample)
            if n_tokens(merged(parts)) >= target or skipped >= len(samples):
                break
        records.append(merged(parts))
    return records


def benchmark_records(data: str | None, tokenizer, tmp: Path) -> tuple[list[dict[str, str]], str]:
    """The benchmark's records and a line saying where they came from: `--data`, else
    `$LORA_SWEEP_SEED_TASKS` when set, else `generated_records` (written to `tmp` so that every
    variant reads a file, as a user's run does). An explicit path that is missing is an error."""
    if data or os.environ.get(SEED_TASKS_ENV):
        path = Path(data or os.environ[SEED_TASKS_ENV])
        source = "--data" if data else f"${SEED_TASKS_ENV}"
        try:
            records = data_lib.load_records(path)
        except data_lib.DataError as err:  # an explicit path that fails is the user's to fix, not a fallback
            raise SystemExit(f"{source}: {err}") from err
        return records, f"{path} ({source}, {len(records)} records)"
    path = tmp / "generated_seed_task_shaped.json"
    path.write_text(json.dumps(generated_records(tokenizer), indent=1))
    records = data_lib.load_records(path)
    return records, (
        f"{len(records)} records generated from the embedded sanity samples ({path}; "
        f"set --data or ${SEED_TASKS_ENV} for the seed tasks the published figures used)"
    )


def add_data_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help=f"Alpaca JSON/JSONL file (default: ${SEED_TASKS_ENV} when set, else a generated data "
        "set of the seed tasks' shape, made of the embedded sanity samples)",
    )


# ----------------------------------------------------------------------------------- helpers
class PeakRss:
    """Peak resident memory above the level at entry, sampled every 5 ms (CPU), or CUDA max allocated."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_mb, self._stop = device, 0.0, threading.Event()

    @staticmethod
    def _rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def __enter__(self) -> PeakRss:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device) / 2**20
            return self
        self._base = self._rss_mb()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._rss_mb() - self._base)
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20 - self._base
            return
        self._stop.set()
        self._thread.join()


def matmul_ceiling(
    shapes: list[tuple[int, int, int]], dtype: torch.dtype, device: torch.device, seconds: float = 1.0
) -> float:
    """Best GFLOP/s of torch.matmul over `shapes` (m, k, n) in `dtype`."""
    best = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        for _ in range(3):
            a @ b
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / len(shapes):
            a @ b
            reps += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - start) / 1e9)
    return best


def build_model_dir(
    out: Path,
    head_dim: int = 64,
    *,
    hidden: int = 256,
    layers: int = 10,
    intermediate: int = 688,
    kv_ratio: int = 2,
    vocab_size: int | None = None,
) -> Path:
    """A random-init GQA Llama with the embedded tokenizer, saved with save_pretrained: by default
    the ~8M-parameter benchmark model (`benchmarks/gpu_check.sh` builds a larger one).
    `vocab_size`: rows of the embedding and LM head (default: the tokenizer's; more are never
    fed, but cost their logits as a real vocabulary of that size does).

    `hidden` split into heads of `head_dim` (64 as in TinyLlama, SmolLM and Llama 3.2 1B; real
    checkpoints use 64 or 128), with `kv_ratio` times fewer key/value heads than query heads.
    The parameter count and matmul FLOPs do not depend on `head_dim`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_sweep.embedded import TINY_LLAMA_DIR

    tokenizer = load_tokenizer(TINY_LLAMA_DIR, ModelConfig(name="tiny_llama", path=None))
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // head_dim,
        num_key_value_heads=hidden // head_dim // kv_ratio,
        head_dim=head_dim,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def flops_per_batch(lengths: list[int], model_cfg) -> float:
    """Useful training FLOPs on the real tokens of a batch with a LoRA adapter: forward (2N per
    token) + backward to the activations (2N; frozen weights need no weight gradient), plus
    causal attention scores and values (fwd 2*2*d per key seen, bwd twice that)."""
    h, layers, inter = model_cfg.hidden_size, model_cfg.num_hidden_layers, model_cfg.intermediate_size
    kv = model_cfg.num_key_value_heads * (model_cfg.head_dim or h // model_cfg.num_attention_heads)
    n_matmul = layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + model_cfg.vocab_size * h
    total = 0.0
    for n in lengths:
        total += 4 * n_matmul * n + 3 * 4 * layers * h * n * (n + 1) / 2
    return total


# batchings of our trial, as overrides of the CLI config (each explicit, whatever the default is)
BATCHINGS: dict[str, tuple[str, ...]] = {
    "uniform": ("data.group_by_length=false", "data.packing=false"),
    "grouped": ("data.group_by_length=true", "data.packing=false"),
    "packed": ("data.group_by_length=false", "data.packing=true"),
}


def batching_mode(group_by_length: bool, packing: bool) -> str:
    return "packed" if packing else "grouped" if group_by_length else "uniform"


def sample_lengths(batch: dict[str, torch.Tensor]) -> list[int]:
    """Real-token length of every sequence in a padded or a packed batch."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum(dim=1).tolist()
    from lora_sweep.precision import packed_segments

    position_ids, real = batch["position_ids"], batch["real_tokens"]
    spans = packed_segments(position_ids) or [[(0, position_ids.shape[1])] for _ in range(len(position_ids))]
    lengths = [int(real[r, a:b].sum()) for r, row in enumerate(spans) for a, b in row]
    return [n for n in lengths if n]


def batching_flops(examples: list, collator, mode: str, steps: int, model_cfg) -> float:
    """Useful FLOPs of `steps` batches of `mode` drawn from `examples` with the trial's seed."""
    loader = data_lib.make_dataloader(
        data_lib.SanityDataset(examples),
        collator,
        batch_size=BATCH,
        seed=SEED,
        group_by_length=mode == "grouped",
        packing=mode == "packed",
    )
    batches = data_lib.infinite_batches(loader)
    return sum(flops_per_batch(sample_lengths(next(batches)), model_cfg) for _ in range(steps))


def fresh_lora_model(model_dir: Path, device: torch.device, lora: LoraSettings = LORA) -> torch.nn.Module:
    model = load_model(model_dir, ModelConfig(name="local", path=str(model_dir)), device)
    torch.manual_seed(SEED)
    return apply_lora(model, lora)


# ---------------------------------------------------------------------------------- variants
class Run:
    def __init__(
        self,
        name: str,
        real_tokens: int,
        seconds: float,
        losses: list[float],
        peak_mb: float,
        flops: float,
        precision: str,
        eval_seconds: float = 0.0,
    ) -> None:
        self.name, self.real_tokens, self.seconds, self.losses = name, real_tokens, seconds, losses
        self.peak_mb, self.flops, self.precision = peak_mb, flops, precision
        self.eval_seconds = eval_seconds  # held-out evaluations inside the run, not part of `seconds`

    @property
    def tps(self) -> float:
        """Real tokens per second of training (the baselines evaluate nothing)."""
        return self.real_tokens / self.seconds

    @property
    def tps_with_evals(self) -> float:
        """Real tokens per second with the run's held-out evaluations counted as well."""
        return self.real_tokens / (self.seconds + self.eval_seconds)


def run_ours(
    compose: Callable,
    model_dir: Path,
    data_path: Path,
    steps: int,
    results: Path,
    tag: str,
    *extra: str,
    cache: TrialCache,
) -> Run:
    """Our trial exactly as the CLI runs it: the composed Hydra config through `run_trial`, with
    the process's one `cache` (warm after the first call, as in a sweep worker).

    Its seconds are the training loop's (hooks, reports and logging included) less its held-out
    evaluations, which no baseline does; they are kept apart (`Run.eval_seconds`) and counted
    in the sweep's overhead."""
    from omegaconf import OmegaConf

    from lora_sweep.trial import run_trial

    cfg = compose(
        "model=local",
        f"model.path={model_dir}",
        "data=alpaca",
        f"data.path={data_path}",
        "data.template=plain",
        f"data.max_length={MAX_LENGTH}",
        f"train.batch_size={BATCH}",
        f"train.max_steps={steps}",
        f"train.seed={SEED}",
        f"train.lr={LR}",
        f"train.warmup_steps={WARMUP}",
        f"lora.r={LORA.r}",
        f"lora.alpha={LORA.alpha}",
        f"lora.dropout={LORA.dropout}",
        f"results_dir={results}",
        f"train.log_every={steps}",
        *extra,
    )
    run_cfg = RunConfig.from_mapping(OmegaConf.to_container(cfg, resolve=True))
    with PeakRss(torch.device("cpu") if not torch.cuda.is_available() else torch.device("cuda")) as mem:
        result = run_trial(run_cfg, results / "runs" / tag, cache=cache)
    steps_csv = (results / "runs" / tag / "steps.csv").read_text().splitlines()[1:]
    losses = [float(line.split(",")[1]) for line in steps_csv]
    return Run(
        "ours",
        result.real_tokens,
        result.train_seconds - result.eval_seconds,
        losses,
        mem.peak_mb,
        0.0,
        result.precision,
        eval_seconds=result.eval_seconds,
    )


def naive_batches(model_dir: Path, texts: list[str], seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """The seed's pipeline: pad every sample to max_length, labels = input_ids.clone()."""
    tokenizer = load_tokenizer(model_dir, ModelConfig(name="local", path=str(model_dir)))
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    items = [
        {"input_ids": i, "attention_mask": m, "labels": i.clone()}
        for i, m in zip(enc["input_ids"], enc["attention_mask"], strict=True)
    ]
    loader = torch.utils.data.DataLoader(
        items, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    while True:
        yield from loader


def run_naive(model_dir: Path, texts: list[str], steps: int, device: torch.device, model_cfg) -> Run:
    model = fresh_lora_model(model_dir, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    batches = naive_batches(model_dir, texts, SEED)
    losses, real, flops = [], 0, 0.0
    model.train()
    with PeakRss(device) as mem:
        start = time.perf_counter()
        for _ in range(steps):
            batch = next(batches)
            lengths = batch["attention_mask"].sum(dim=1).tolist()
            real += sum(lengths)
            flops += flops_per_batch(lengths, model_cfg)
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(float(loss))
        seconds = time.perf_counter() - start
    return Run("naive", real, seconds, losses, mem.peak_mb, flops, "fp32")


class _Timer:
    """A TrainerCallback timing train() from its first to its last step and recording losses."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            def __init__(self) -> None:
                self.start = self.end = 0.0
                self.losses: list[float] = []

            def on_train_begin(self, args, state, control, **kw):
                self.start = time.perf_counter()

            def on_train_end(self, args, state, control, **kw):
                self.end = time.perf_counter()

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    self.losses.append(float(logs["loss"]))

        return Timer()


class CountingCollator:
    """Wraps a collator and records the real-token lengths of every batch it builds, in order."""

    def __init__(self, inner: Callable) -> None:
        self.inner, self.batches = inner, []

    def __call__(self, items):
        batch = self.inner(items)
        self.batches.append(batch["attention_mask"].sum(dim=1).tolist())
        return batch


def run_trainer(
    name: str,
    model_dir: Path,
    examples: list,
    steps: int,
    device: torch.device,
    model_cfg,
    *,
    tuned: bool,
    bf16: bool,
    loader: torch.utils.data.DataLoader | None = None,
    constant_lr: bool = False,
    out: Path,
    lora: LoraSettings = LORA,
) -> Run:
    """HF Trainer + peft. Default: what a user writes (random sampler, DataCollatorForLanguageModeling
    with dynamic padding, labels = input_ids with pads set to -100). Tuned: + length grouping and bf16
    where we use it. `loader`: feed exactly these batches (the loss-agreement check)."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tokenizer = load_tokenizer(model_dir, ModelConfig(name="local", path=str(model_dir)))
    model = fresh_lora_model(model_dir, device, lora)
    collator = CountingCollator(DataCollatorForLanguageModeling(tokenizer, mlm=False))
    dataset = [{"input_ids": list(e.input_ids)} for e in examples]
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=BATCH,
        max_steps=steps,
        learning_rate=LR,
        seed=SEED,
        data_seed=SEED,
        warmup_steps=0 if constant_lr else WARMUP,
        lr_scheduler_type="constant" if constant_lr else "cosine",
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=device.type == "cpu",
        bf16=bf16,
        train_sampling_strategy="group_by_length" if tuned else "random",
    )
    timer = _Timer()

    class FixedBatches(Trainer):
        def get_train_dataloader(self):
            return loader

    cls = FixedBatches if loader is not None else Trainer
    trainer = cls(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[timer])
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)  # the per-step log dicts; timing is unaffected
    trainer.remove_callback(ProgressCallback)
    with PeakRss(device) as mem:
        trainer.train()
    if loader is not None:
        lengths = [list(b) for b in collator.batches[:steps]]
    else:
        lengths = collator.batches[:steps]
    real = sum(sum(b) for b in lengths)
    flops = sum(flops_per_batch(b, model_cfg) for b in lengths)
    return Run(name, real, timer.end - timer.start, timer.losses, mem.peak_mb, flops, "bf16" if bf16 else "fp32")


# ------------------------------------------------------------------------------ sections
def loss_agreement(
    model_dir: Path, examples: list, collator, steps: int, device: torch.device, model_cfg, out: Path
) -> float:
    """Our loop vs Trainer on identical batches (fp32, constant lr, same LoRA init, no dropout so that
    both draw no random numbers): max |dloss|."""
    ours_model = fresh_lora_model(model_dir, device, NO_DROPOUT)
    loader = data_lib.make_dataloader(
        data_lib.SanityDataset(examples), collator, batch_size=BATCH, seed=SEED, group_by_length=True
    )
    cfg = TrainConfig(
        lr=LR, max_steps=steps, batch_size=BATCH, seed=SEED, warmup_steps=0, lr_scheduler="constant", log_every=steps
    )
    ours = [s.loss for s in train_loop(ours_model, data_lib.infinite_batches(loader), cfg, device).steps]
    loader2 = data_lib.make_dataloader(
        data_lib.SanityDataset(examples), collator, batch_size=BATCH, seed=SEED, group_by_length=True
    )
    theirs = run_trainer(
        "trainer_same_batches",
        model_dir,
        examples,
        steps,
        device,
        model_cfg,
        tuned=False,
        bf16=False,
        loader=loader2,
        constant_lr=True,
        out=out,
        lora=NO_DROPOUT,
    ).losses
    print(f"  ours    : {' '.join(f'{x:.4f}' for x in ours)}")
    print(f"  Trainer : {' '.join(f'{x:.4f}' for x in theirs)}")
    return max(abs(a - b) for a, b in zip(ours, theirs, strict=False))


def default_sweep_overhead(results: Path, n_trials: int | None) -> tuple[float, float, list[str]]:
    """Run the default sweep as a user does (`python -m lora_sweep -m`, a fresh process) and
    return overhead = 1 - (optimizer-step time) / (trial wall time), summed over all its trials,
    the framework's own share of it (without held-out evaluation and sample answers), and the
    lines to print.

    Trial wall time is Optuna's ask-to-tell time (datetime_start -> datetime_complete): Hydra's
    job set-up, base-model load on the first trial, self-check, the per-step pruning hook and
    storage writes, metrics, CSV row. Optimizer-step time is the loop's own `step_seconds`
    (data -> update, without hooks and logging), from each trial's result.json. Process start
    (imports) precedes the first ask and is reported apart.
    """
    import json

    import optuna

    cmd = [sys.executable, "-m", "lora_sweep", "-m", f"results_dir={results}"]
    if n_trials is not None:
        cmd.append(f"hydra.sweeper.n_trials={n_trials}")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
    process_wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"default sweep failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    backend = optuna.storages.journal.JournalFileBackend(str(results / "optuna_journal.log"))
    storage = optuna.storages.JournalStorage(backend)
    study = optuna.load_study(study_name="lora_sweep", storage=storage)
    rows, lines, spans = [], [], []
    parts: dict[str, float] = collections.defaultdict(float)  # where the non-step time went
    for t in study.get_trials(deepcopy=False):
        if t.datetime_start is None or t.datetime_complete is None or "run_dir" not in t.user_attrs:
            continue  # penalty records are not runs
        wall = (t.datetime_complete - t.datetime_start).total_seconds()
        result = json.loads((Path(t.user_attrs["run_dir"]) / "result.json").read_text())
        step_s, train_s = result["step_seconds"], result["train_seconds"]
        rows.append((wall, step_s))
        parts["held-out evals"] += result.get("eval_seconds", 0.0)
        parts["sample answers"] += result.get("sample_seconds", 0.0)
        parts["adapter save"] += result.get("adapter_seconds", 0.0)
        parts["self-check"] += float(result["self_check"].get("seconds", 0.0) or 0.0)
        parts["loop extras (hook, reports, logging)"] += train_s - step_s - result.get("eval_seconds", 0.0)
        spans.append((t.datetime_start, t.datetime_complete))
        lines.append(
            f"  trial {t.number:2d} {t.state.name:8s}: {result['steps_completed']:2d} steps, "
            f"wall {wall:5.2f} s, optimizer steps {step_s:5.2f} s, "
            f"loop extras (hook, reports, logging) {train_s - step_s:5.3f} s, "
            f"self-check {result['self_check'].get('seconds', '-')} s, overhead {1 - step_s / wall:.3f}"
        )
    total_wall, total_step = sum(w for w, _ in rows), sum(st for _, st in rows)
    later = rows[1:]
    span = (max(end for _, end in spans) - min(begin for begin, _ in spans)).total_seconds()  # workers overlap
    lines.append(
        f"  process wall {process_wall:.1f} s for {len(rows)} trials, {span:.1f} s from the first ask "
        f"to the last tell ({process_wall - span:.1f} s before and after: imports, worker start, study, "
        f"summary); overhead on trials 2..N alone: "
        f"{1 - sum(st for _, st in later) / max(sum(w for w, _ in later), 1e-9):.3f}"
    )
    known = sum(parts.values())
    parts["the rest (job set-up, model and data, metrics, CSV, study)"] = total_wall - total_step - known
    lines.append(
        "  overhead by part, as a share of the trials' wall time: "
        + ", ".join(f"{name} {seconds / total_wall:.3f}" for name, seconds in parts.items())
    )
    measured = parts["held-out evals"] + parts["sample answers"]  # work the user sets, not the framework's
    framework = (total_wall - total_step - measured) / total_wall
    lines.append(
        f"  the framework's own overhead (without the held-out evals and sample answers, set by "
        f"data.val_size, train.eval_every, train.sample_prompts): {framework:.3f}"
    )
    return 1 - total_step / total_wall, framework, lines


LARGE = {"hidden": 768, "layers": 8, "intermediate": 2048, "kv_ratio": 2}  # ~52M parameters


def large_mfu(comp: Callable, tmp: Path, data_path: Path, steps: int, device: torch.device, cache: TrialCache) -> None:
    """Our default trial on a ~52M-parameter Llama (`LARGE`) in fp32 and, where the device has
    native bf16, in bf16 (the line `auto` would pick is marked), with MFU against the fp32 and
    bf16 matmul ceilings of the model's own shapes, measured between them."""
    from transformers import AutoConfig

    model_dir = build_model_dir(tmp / "llama_large", **LARGE)
    model_cfg = AutoConfig.from_pretrained(model_dir)
    base = load_model(model_dir, ModelConfig(name="local", path=str(model_dir)), device)
    n_params = sum(p.numel() for p in base.parameters())
    auto = resolve_precision("auto", device, base)
    del base
    h, inter, kv = model_cfg.hidden_size, model_cfg.intermediate_size, h_kv(model_cfg)
    t = 2048
    shapes = [(t, h, inter), (t, inter, h), (t, h, h), (t, h, kv), (t, h, model_cfg.vocab_size)]
    results = tmp / "results_large"
    run_ours(comp, model_dir, data_path, WARMUP + 1, results, "large_warmup", cache=cache)
    ceilings = {
        "fp32": matmul_ceiling(shapes, torch.float32, device),
        "bf16": matmul_ceiling(shapes, torch.bfloat16, device),
    }
    tokenizer = load_tokenizer(model_dir, ModelConfig(name="local", path=str(model_dir)))
    records = data_lib.load_records(data_path)
    examples = data_lib.tokenize_records(records, tokenizer, template="plain", max_length=MAX_LENGTH, mask_prompt=False)
    defaults = comp()
    mode = batching_mode(bool(defaults.data.group_by_length), bool(defaults.data.packing))
    flops = batching_flops(examples, data_lib.Collator(tokenizer.pad_token_id), mode, steps, model_cfg)
    # each precision the device runs natively, whatever `auto` picks at this size (on a GPU it
    # keeps fp32 below precision.BF16_CUDA_MIN_PARAMS; the bf16 row shows what that gives up)
    for tag in ("fp32", "bf16") if native_bf16(device) else ("fp32",):
        extra = (f"train.precision={tag}",)
        run = run_ours(comp, model_dir, data_path, steps, results, f"large_{tag}", *extra, cache=cache)
        gflops = flops / run.seconds / 1e9
        print(
            f"  {n_params / 1e6:.1f}M params, {run.precision}{' (auto)' if tag == auto else ''}: "
            f"{run.tps:.0f} real tok/s, "
            f"{gflops:.0f} GFLOP/s = MFU {gflops / ceilings[run.precision]:.1%} of the {run.precision} ceiling "
            f"({ceilings[run.precision]:.0f} GFLOP/s; fp32 {ceilings['fp32']:.0f}, bf16 {ceilings['bf16']:.0f})"
        )
    ceilings["fp32"] = max(ceilings["fp32"], matmul_ceiling(shapes, torch.float32, device))
    print(f"  fp32 ceiling re-measured after the runs: {ceilings['fp32']:.0f} GFLOP/s (the machine's drift)")


def h_kv(model_cfg) -> int:
    return model_cfg.num_key_value_heads * (
        model_cfg.head_dim or model_cfg.hidden_size // model_cfg.num_attention_heads
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=22, help="optimizer steps per variant and round (22 x 8 = one epoch)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians reported)")
    parser.add_argument(
        "--sweep-trials",
        type=int,
        default=None,
        help="trials of the default sweep for the overhead (default: the sweep's own n_trials, 20)",
    )
    parser.add_argument(
        "--max-text-tokens",
        type=int,
        default=400,
        help="keep the records of at most this many tokens (512 = all, truncated at 512)",
    )
    add_data_argument(parser)
    parser.add_argument(
        "--head-dim",
        type=int,
        default=64,
        choices=(32, 64, 128),
        help="attention head size of the 8M model (hidden 256 = heads x head-dim)",
    )
    parser.add_argument(
        "--large-steps", type=int, default=8, help="steps of the ~52M-parameter MFU section (0: skip it)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 6 steps, 1 round, 4 trials")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds, args.sweep_trials, args.large_steps = 6, 1, 4, WARMUP + 1
    offline_hub()
    logging.disable(logging.WARNING)
    from hydra import compose, initialize_config_dir
    from transformers import AutoConfig

    from lora_sweep.cli import config_dir

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx = initialize_config_dir(config_dir=str(config_dir()), version_base="1.3")
    ctx.__enter__()

    def comp(*overrides: str):
        return compose(config_name="config", overrides=list(overrides))

    tmp = Path(tempfile.mkdtemp(prefix="bench_trial_"))
    model_dir = build_model_dir(tmp / "llama8m", args.head_dim)
    model_cfg = AutoConfig.from_pretrained(model_dir)
    tokenizer = load_tokenizer(model_dir, ModelConfig(name="local", path=str(model_dir)))
    all_records, data_source = benchmark_records(args.data, tokenizer, tmp)
    print(f"data: {data_source}")
    full = data_lib.tokenize_records(all_records, tokenizer, template="plain", max_length=10**6, mask_prompt=False)
    records = [
        r for r, e in zip(all_records, full, strict=True) if MIN_TEXT_TOKENS <= len(e.input_ids) <= args.max_text_tokens
    ]
    if len(records) < 2 * BATCH:
        raise SystemExit(f"only {len(records)} records have {MIN_TEXT_TOKENS}-{args.max_text_tokens} tokens")
    data_path = tmp / "benchmark_data_selected.json"  # what `ours` reads through data.path, like a user's file
    data_path.write_text(json.dumps(records))
    examples = data_lib.tokenize_records(records, tokenizer, template="plain", max_length=MAX_LENGTH, mask_prompt=False)
    texts = [data_lib.format_prompt(r, "plain") + r["output"] + tokenizer.eos_token for r in records]
    lengths = [len(e.input_ids) for e in examples]
    collator = data_lib.Collator(tokenizer.pad_token_id)
    base = load_model(model_dir, ModelConfig(name="local", path=str(model_dir)), device)
    n_params = sum(p.numel() for p in base.parameters())
    precision = resolve_precision("auto", device, base)
    del base

    print(
        f"machine: {torch.get_num_threads()} torch threads, {os.cpu_count()} cpus, device {device}, "
        f"torch {torch.__version__}, bf16 native={torch.ops.mkldnn._is_mkldnn_bf16_supported()}"
    )
    heads = f"{model_cfg.num_attention_heads}q/{model_cfg.num_key_value_heads}kv"
    print(
        f"model: random-init Llama (GQA {heads} of head_dim "
        f"{args.head_dim}, 10 layers, hidden 256) {n_params / 1e6:.2f}M params; "
        f"LoRA r={LORA.r} on q_proj,v_proj; precision auto -> {precision}"
    )
    print(
        f"data: {len(examples)} of {len(all_records)} records ({MIN_TEXT_TOKENS}-{args.max_text_tokens} "
        f"tokens), plain template, max_length {MAX_LENGTH}: "
        f"{min(lengths)}-{max(lengths)} tokens, median {statistics.median(lengths):.0f}; "
        f"batch {BATCH}, {args.steps} steps x {args.rounds} interleaved rounds, seed {SEED}"
    )

    t = 2048  # ~ tokens of one batch
    shapes = [(t, 256, 688), (t, 256, 256), (t, 256, model_cfg.vocab_size), (1024, 1024, 1024)]
    ceilings: dict[str, list[float]] = {"fp32": [], "bf16": []}

    def measure_ceiling() -> None:  # once per round: under load the ceiling moves with the variants
        ceilings["fp32"].append(matmul_ceiling(shapes, torch.float32, device))
        ceilings["bf16"].append(matmul_ceiling(shapes, torch.bfloat16, device))

    # `ours` is the CLI's default batching; each other batching is a row of its own (opt-in)
    defaults = comp()
    default_mode = batching_mode(bool(defaults.data.group_by_length), bool(defaults.data.packing))
    batchings = {"ours": default_mode} | {f"ours_{m}": m for m in BATCHINGS if m != default_mode}
    print(
        f"batching: default {default_mode} ({BATCHINGS[default_mode] or 'no override'}); opt-in rows: "
        + ", ".join(f"{k} ({' '.join(BATCHINGS[m]) or 'default'})" for k, m in batchings.items() if k != "ours")
    )

    # our FLOPs: the batches each batching draws from these examples (seeded as the trial)
    flops_of = {
        mode: batching_flops(examples, collator, mode, args.steps, model_cfg) for mode in set(batchings.values())
    }

    results = tmp / "results"
    runs: dict[str, list[Run]] = {k: [] for k in (*batchings, "ours_fp32", "naive", "trainer", "trainer_tuned")}
    bf16 = precision == "bf16"
    cache = TrialCache()
    # load + cache the base model once, as a sweep worker has
    run_ours(comp, model_dir, data_path, 3, results, "warmup", cache=cache)
    for rnd in range(args.rounds):
        measure_ceiling()
        for name, mode in batchings.items():
            run = run_ours(
                comp, model_dir, data_path, args.steps, results, f"{name}{rnd}", *BATCHINGS[mode], cache=cache
            )
            run.flops = flops_of[mode]
            runs[name].append(run)
        if bf16:
            run = run_ours(
                comp, model_dir, data_path, args.steps, results, f"ours_fp32_{rnd}", "train.precision=fp32", cache=cache
            )
            run.flops = flops_of[default_mode]
            runs["ours_fp32"].append(run)
        runs["naive"].append(run_naive(model_dir, texts, args.steps, device, model_cfg))
        runs["trainer"].append(
            run_trainer(
                "trainer", model_dir, examples, args.steps, device, model_cfg, tuned=False, bf16=False, out=tmp / "hf"
            )
        )
        runs["trainer_tuned"].append(
            run_trainer(
                "trainer_tuned",
                model_dir,
                examples,
                args.steps,
                device,
                model_cfg,
                tuned=True,
                bf16=bf16,
                out=tmp / "hf",
            )
        )
        print(f"round {rnd + 1}: " + ", ".join(f"{k} {v[-1].tps:.0f}" for k, v in runs.items() if v) + " real tok/s")

    med = {k: statistics.median(r.tps for r in v) for k, v in runs.items() if v}
    ceiling = {k: statistics.median(v) for k, v in ceilings.items()}
    print(
        f"matmul ceiling (best of model-shaped and 1024^3 shapes, median of rounds): fp32 {ceiling['fp32']:.0f} "
        f"GFLOP/s, bf16 {ceiling['bf16']:.0f} GFLOP/s (per round: fp32 "
        + ", ".join(f"{x:.0f}" for x in ceilings["fp32"])
        + "; bf16 "
        + ", ".join(f"{x:.0f}" for x in ceilings["bf16"])
        + ")"
    )
    print()
    print(
        f"{'variant':<15} {'prec':<5} {'real tok/s':>10} {'x naive':>8} {'GFLOP/s':>8} {'MFU':>6} "
        f"{'peak MB':>8} {'loss 1st':>9} {'loss last5':>10}"
    )
    for name, rs in runs.items():
        if not rs:
            continue
        r = rs[0]
        gflops = statistics.median(x.flops / x.seconds for x in rs) / 1e9
        mfu = gflops / ceiling[r.precision]
        last5 = statistics.mean(r.losses[-5:])
        print(
            f"{name:<15} {r.precision:<5} {med[name]:>10.0f} {med[name] / med['naive']:>8.2f} {gflops:>8.1f} "
            f"{mfu:>6.1%} {statistics.median(x.peak_mb for x in rs):>8.0f} {r.losses[0]:>9.4f} {last5:>10.4f}"
        )
    print("(naive's loss includes pad positions: labels = input_ids.clone(); the others' are real-token losses)")
    with_evals = statistics.median(r.tps_with_evals for r in runs["ours"])
    print(
        f"ours with its held-out evaluations counted as well "
        f"({statistics.median(r.eval_seconds for r in runs['ours']):.3f} s of each trial; no baseline evaluates): "
        f"{with_evals:.0f} real tok/s = {with_evals / med['trainer']:.2f}x trainer, "
        f"{with_evals / med['trainer_tuned']:.2f}x trainer_tuned, {with_evals / med['naive']:.2f}x naive"
    )

    print("\nloss agreement, our loop vs Trainer on identical batches (fp32, constant lr, same LoRA init):")
    diff = loss_agreement(model_dir, examples, collator, min(args.steps, 8), device, model_cfg, tmp / "hf")
    print(f"  max |loss difference| = {diff:.2e} -> {'AGREE' if diff < 1e-3 else 'DISAGREE'}")
    first = {k: v[0].losses[0] for k, v in runs.items() if v and k != "naive"}
    print(
        "  first-step losses (same init, different first batches): "
        + ", ".join(f"{k} {x:.4f}" for k, x in first.items())
    )

    print("\nthe default sweep, `python -m lora_sweep -m` in a fresh process (embedded 976K model, 60 steps):")
    overhead, framework_overhead, lines = default_sweep_overhead(tmp / "sweep", args.sweep_trials)
    print("\n".join(lines))
    print(f"  overhead (all trials) = {overhead:.3f}, the framework's own {framework_overhead:.3f}")

    for name in batchings:
        if name != "ours":
            print(f"opt-in {name}: {med[name] / med['ours']:.2f}x the default's real tok/s")
    if args.large_steps:
        print(f"\nMFU where matmuls dominate: a larger random Llama, our default trial, {args.large_steps} steps:")
        large_mfu(comp, tmp, data_path, args.large_steps, device, cache)
    ours_run = runs["ours"]
    mfu = statistics.median(x.flops / x.seconds for x in ours_run) / 1e9 / ceiling[ours_run[0].precision]
    ctx.__exit__(None, None, None)
    print(
        f"\nvs_trainer={med['ours'] / med['trainer']:.2f} vs_trainer_tuned={med['ours'] / med['trainer_tuned']:.2f} "
        f"vs_naive={med['ours'] / med['naive']:.2f} mfu={mfu:.3f} overhead={overhead:.3f} "
        f"framework_overhead={framework_overhead:.3f}"
    )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
