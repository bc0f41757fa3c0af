"""The best trial's adapter, ready to use: `<results_dir>/best/` at the end of a sweep
(`sweep_hooks.LoraSweepHooks.on_sweep_end`) and wherever `lora-sweep best --out DIR` puts it.

    DIR/adapter_config.json, adapter_model.safetensors   the adapter: PeftModel.from_pretrained(base, DIR)
    DIR/config.yaml                                      the trial's resolved config (its run directory's)
    DIR/README.md                                        model card: base model, data, hyperparameters,
                                                         metrics, the command that reproduces it
    DIR/best.json                                        the same facts for scripts (study, trial, values)
    DIR/merged/                                          with merge: merge_and_unload() + save_pretrained,
                                                         and the tokenizer: AutoModelForCausalLM.from_pretrained

The directory is built beside DIR (`DIR.tmp-<pid>-<host>-<random>`, fsync'd) and renamed into
place after the old one is renamed away, so DIR is the old export or the new one, never half of
either (a kill in the instant between the two renames leaves none; the next export cleans up).
Which trial is best is the caller's choice (the study's ranking: `lora_sweep.sweep_hooks.best_trial`).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from lora_sweep import adapters
from lora_sweep.config import RunConfig
from lora_sweep.errors import InputError
from lora_sweep.sweep.context import recorded
from lora_sweep.sweep.runner import app_command, launch_prefix

BEST_DIRNAME = "best"
BEST_MANIFEST = "best.json"
MERGED_DIRNAME = "merged"
APP_PREFIX = ("python", "-m", "lora_sweep")  # how the card's replay command starts, whatever started the sweep

# What the card lists, in its order (keys of `RunConfig.flat_values` and of the trial's results row).
CARD_HYPERPARAMETERS = (
    "lora.r",
    "lora.alpha",
    "lora.dropout",
    "lora.use_rslora",
    "lora.use_dora",
    "lora.init",
    "train.lr",
    "train.max_steps",
    "train.batch_size",
    "train.grad_accum_steps",
    "train.warmup_steps",
    "train.lr_scheduler",
    "train.weight_decay",
    "train.max_grad_norm",
    "train.seed",
    "data.max_length",
    "data.template",
)
CARD_METRICS = (
    "eval_loss",
    "eval_loss_base",
    "eval_improvement",
    "best_eval_loss",
    "stability_index",
    "quality",
    "final_loss",
    "steps_completed",
    "precision",
)


class BestError(InputError):
    """The best trial cannot be exported (no adapter, no config); the message says why and what to do."""


def trial_value(trial: Any, key: str) -> Any:
    """A value of the trial's results row: its user attr, else its recorded job result (the
    sweeper does not store a user attr equal to a param), else its param."""
    for source in (trial.user_attrs, recorded(trial), trial.params):
        if key in source:
            return source[key]
    return None


def trial_run_dir(trial: Any) -> Path | None:
    """The trial's run directory: where its job ran (`run_dir`), or the job directory the sweeper
    gave it (a trial that failed before its job recorded anything)."""
    value = trial_value(trial, "run_dir") or trial.user_attrs.get("job_dir")
    return Path(str(value)) if value else None


def replay_command(study: Any, trial: Any) -> str:
    """The single run that reproduces `trial`, as the sweep summary prints it: the app, the
    sweep's own config flags (`-cp`/`-cn`, from the study's `sweep.command`) and the trial's
    overrides (its fixed values and params)."""
    argv = shlex.split(str(study.user_attrs.get("sweep.command", "")))
    flags = app_command(argv)[len(launch_prefix(argv)) :] if argv else []
    return shlex.join([*APP_PREFIX, *flags, *shlex.split(str(trial.user_attrs.get("overrides", "")))])


def export_best(study: Any, trial: Any, out: Path, *, merge: bool = False) -> Path:
    """Write trial `trial`'s adapter, config, model card and manifest (and with `merge` the
    merged model) to `out`, replacing an earlier export there. Raises `BestError` when the trial
    has no adapter or config, or `out` is a directory this did not write; `ModelError` when the
    base checkpoint for `merge` is gone."""
    out = Path(out).absolute()
    run_dir = trial_run_dir(trial)
    adapter = adapters.complete_adapter(run_dir) if run_dir is not None else None
    if run_dir is None or adapter is None:
        where = run_dir / adapters.ADAPTER_DIRNAME if run_dir is not None else "its run directory"
        raise BestError(
            f"trial {trial.number} has no adapter in {where} (train.save_adapter=none, or it was "
            "deleted); rerun the trial with its replay command"
        )
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise BestError(f"trial {trial.number} has no config.yaml in {run_dir}")
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / BEST_MANIFEST).is_file())):
        raise BestError(f"{out} exists and was not written by lora-sweep best; choose another --out")
    cfg = _load_config(config_path)
    adapters.clean_leftovers(out.parent, names=(out.name,))
    tmp = adapters.make_tmp_dir(out.parent, out.name)
    try:
        for path in adapter.iterdir():
            if path.is_file() and path.name != "README.md":  # peft's card template: ours replaces it
                shutil.copy2(path, tmp / path.name)
        shutil.copy2(config_path, tmp / "config.yaml")
        facts = _facts(study, trial, cfg, adapter, out, merged=merge)
        (tmp / BEST_MANIFEST).write_text(json.dumps(facts, indent=2, default=str) + "\n")
        (tmp / "README.md").write_text(model_card(facts))
        if merge:
            merge_adapter(cfg, tmp, tmp / MERGED_DIRNAME)
        adapters.fsync_tree(tmp)
        if out.exists():
            adapters.discard(out)  # renamed aside first: a kill here leaves no half export under `out`
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def merge_adapter(cfg: RunConfig, adapter: Path, out: Path) -> None:
    """The base checkpoint with `adapter` merged into its weights (peft's `merge_and_unload`),
    saved with `save_pretrained` beside the checkpoint's own tokenizer: a plain transformers
    model, loaded by `AutoModelForCausalLM.from_pretrained(out)` without peft."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from lora_sweep.model import resolve_model_dir

    hf_logging.disable_progress_bar()  # one line of output, not a bar per load and save
    model_dir = resolve_model_dir(cfg.model)
    base = AutoModelForCausalLM.from_pretrained(
        str(model_dir),
        dtype=getattr(torch, cfg.model.dtype),
        local_files_only=True,
        trust_remote_code=cfg.model.trust_remote_code,
        use_kernels=False,  # no compiled code from the Hub (see lora_sweep.model.load_model)
    )
    merged = cast(Any, PeftModel.from_pretrained(base, str(adapter))).merge_and_unload()
    merged.save_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(
        str(model_dir), local_files_only=True, trust_remote_code=cfg.model.trust_remote_code
    )
    tokenizer.save_pretrained(str(out))


def _load_config(path: Path) -> RunConfig:
    from omegaconf import OmegaConf

    return RunConfig.from_mapping(cast("dict[str, Any]", OmegaConf.to_container(OmegaConf.load(path), resolve=True)))


def _facts(study: Any, trial: Any, cfg: RunConfig, adapter: Path, out: Path, *, merged: bool) -> dict[str, Any]:
    """What the card and the manifest say about the trial."""
    from lora_sweep.model import resolve_model_dir  # imports torch: not for every reader of best.py

    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    flat = cfg.flat_values()
    return {
        "study_name": study.study_name,
        "trial_number": trial.number,
        "objectives": dict(zip(study.metric_names or [], trial.values or [], strict=False)),
        "base_model": str(adapter_config.get("base_model_name_or_path") or resolve_model_dir(cfg.model)),
        "model": cfg.model.path or cfg.model.name,
        "data": cfg.data.path or cfg.data.name,
        "validation": cfg.data.val_path
        or f"data.val_size={cfg.data.val_size} of the data (data.val_seed={cfg.data.val_seed})",
        "adapted_modules": trial_value(trial, "adapted_modules"),
        "hyperparameters": {key: flat[key] for key in CARD_HYPERPARAMETERS if key in flat},
        "metrics": {key: trial_value(trial, key) for key in CARD_METRICS},
        "replay": replay_command(study, trial),
        "run_dir": str(adapter.parent),
        "dir": str(out),
        "merged": str(out / MERGED_DIRNAME) if merged else None,
    }


def model_card(facts: Mapping[str, Any]) -> str:
    """The README.md of an export: what the adapter is, how it was chosen and made, how to load it."""
    objectives = ", ".join(f"{k} = {_cell(v)}" for k, v in facts["objectives"].items())
    lines = [
        f"# LoRA adapter: trial {facts['trial_number']} of study `{facts['study_name']}`",
        "",
        f"The sweep's best trial ({objectives}): the best by the objective among the feasible trials "
        "that learned at least half as much on the held-out records as the sweep's best learner.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{facts['base_model']}` ({facts['model']}) |",
        f"| data | `{facts['data']}` |",
        f"| held-out records | {facts['validation']} |",
        f"| adapted modules | {facts['adapted_modules']} |",
        f"| run directory | `{facts['run_dir']}` |",
        "",
        "## Hyperparameters",
        "",
        "| key | value |",
        "|---|---|",
        *(f"| `{k}` | {_cell(v)} |" for k, v in facts["hyperparameters"].items()),
        "",
        "## Metrics",
        "",
        "eval_* on the held-out records, which no trial trained on; see the project README's column table.",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| `{k}` | {_cell(v)} |" for k, v in facts["metrics"].items()),
        "",
        "## Reproduce",
        "",
        "```bash",
        facts["replay"],
        "```",
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{facts["base_model"]}")',
        f'model = PeftModel.from_pretrained(base, "{facts["dir"]}")',
        "```",
    ]
    if facts.get("merged"):
        lines += [
            "",
            f"The merged model (adapter folded into the weights, no peft needed) is in `{facts['merged']}`:",
            f'`AutoModelForCausalLM.from_pretrained("{facts["merged"]}")`.',
        ]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)
