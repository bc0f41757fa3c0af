"""The Hydra job: validate the composed config, run one trial, append its CSV row.

Single run: bad input prints one line and exits 2 with nothing written; a failed trial
writes its row and exits 1. Under a sweep the job never exits the process: it reports an
intermediate value to its trial (the held-out improvement at each evaluation, or with
`train.prune_on=objective` the objective so far every `report_every` steps; see
`_pruning_hook`), stops when the pruner says so, and returns the trial's row as a mapping
(status, metrics, constraint) for the sweeper to record.
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lora_sweep.artifacts import upload
from lora_sweep.cache import TrialCache
from lora_sweep.config import RunConfig
from lora_sweep.errors import EXIT_BAD_INPUT, EXIT_FAILED, INPUT_ERRORS, error_message
from lora_sweep.metrics import compute_metrics, eval_summary
from lora_sweep.results import PAYLOAD_CSV_KEY, append_row, results_csv_path
from lora_sweep.samples import SAMPLES_FILENAME, SAMPLES_MIMETYPE
from lora_sweep.sweep.context import TrialReporter, current_trial_context
from lora_sweep.sweep.faults import crash_point
from lora_sweep.sweep.objective import STATE_OF_STATUS
from lora_sweep.sweep_hooks import keep_adapter
from lora_sweep.train import EvalPoint, StepHook, StepRecord
from lora_sweep.trial import EVAL_METRICS, run_trial

log = logging.getLogger("lora_sweep")


def _is_multirun() -> bool:
    return HydraConfig.get().mode == RunMode.MULTIRUN


def _discard_run_dir(run_dir: Path) -> None:
    """Remove the run directory Hydra created for a run refused as bad input (nothing of value in it)."""
    if run_dir.is_dir() and not any(p.name in ("result.json", "steps.csv") for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


def run_job(cfg: DictConfig, *, cache: TrialCache) -> dict[str, Any]:
    """Run one trial from a composed Hydra config and record it; `cache` holds what the
    process's earlier trials loaded (a sweep worker runs many jobs in one process)."""
    multirun = _is_multirun()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    context = current_trial_context() if multirun else None
    reporter = TrialReporter(context) if context is not None else None
    sweep_fields: dict[str, Any] = {}
    if context is not None:
        sweep_fields = {"study_name": context.study_name, "trial_number": context.trial_number}
    try:
        run_cfg = RunConfig.from_mapping(cast("dict[str, Any]", OmegaConf.to_container(cfg, resolve=True)))
        on_step = _pruning_hook(reporter, run_cfg) if reporter is not None else None
        result = run_trial(
            run_cfg, run_dir, cache=cache, on_step=on_step, config_yaml=OmegaConf.to_yaml(cfg, resolve=True)
        )
    except INPUT_ERRORS as err:
        if multirun:
            raise  # the sweeper records the trial FAIL with this reason
        print(error_message(err), file=sys.stderr)
        _discard_run_dir(run_dir)
        sys.exit(EXIT_BAD_INPUT)
    if context is not None:
        sweep_fields["state"] = STATE_OF_STATUS[result.status]
    row = result.csv_row(run_cfg, **sweep_fields)
    csv_path = results_csv_path(run_cfg.results_dir)
    payload = dict(row, constraint=result.metrics.get("constraint", 1.0))
    if reporter is not None:
        if result.adapter_dir is not None:  # which adapters stay, this one among them, before its row says so
            train = run_cfg.train
            payload.update(
                keep_adapter(
                    reporter, payload, mode=train.save_adapter, keep=train.keep_adapters, results_dir=csv_path.parent
                )
            )
            row["adapter_dir"] = payload["adapter_dir"]
        # first: a sweep killed after this still finishes the trial, and writes the row if missing
        reporter.record_result(dict(payload, **{PAYLOAD_CSV_KEY: str(csv_path)}))
        crash_point("after_record")
    append_row(csv_path, row)
    if reporter is not None:  # what the sweeper stores as the trial's user attrs
        payload = study_attrs(payload, run_cfg, HydraConfig.get().overrides.task)
    samples = result.run_dir / SAMPLES_FILENAME
    if reporter is not None and samples.is_file():  # shown with its trial by optuna-dashboard --artifact-dir
        try:
            upload(run_cfg.results_dir, reporter.trial, samples, mimetype=SAMPLES_MIMETYPE)
        except Exception as err:  # noqa: BLE001 - the trial is recorded; its samples stay in its run directory
            log.warning("samples not uploaded as an artifact: %s", err)
    metrics = result.metrics
    log.info(
        "%s: stability_index=%s quality=%s final_loss=%s in %.1f s (%.0f real tokens/s); row appended to %s",
        result.status,
        _fmt(metrics.get("stability_index")),
        _fmt(metrics.get("quality")),
        _fmt(metrics.get("final_loss")),
        result.duration_s,
        result.tokens_per_s,
        csv_path,
    )
    if result.status != "success":
        log.warning("%s: %s", result.status, result.reason)
    if result.status == "failed" and not multirun:
        sys.exit(EXIT_FAILED)
    return payload


def study_attrs(payload: dict[str, Any], run_cfg: RunConfig, task_overrides: Sequence[str]) -> dict[str, Any]:
    """The trial's returned mapping without the config values its overrides did not set.

    The sweeper stores each returned scalar as a user attr, one storage write apiece (~0.7 ms
    on a journal file: ~90 a trial with the whole row). Config values the trial shares with
    every other one are the study's `sweep.base_config`, and in its CSV row and recorded job
    result; what the trial's overrides set (searched or given on the command line) stays."""
    overridden = {line.split("=", 1)[0].lstrip("+~") for line in task_overrides}
    shared = set(run_cfg.flat_values()) - overridden
    return {k: v for k, v in payload.items() if k not in shared}


def _pruning_hook(reporter: TrialReporter, run_cfg: RunConfig) -> StepHook:
    """Report an intermediate value to the trial; stop when the pruner says so.

    `train.prune_on=eval` (the default): at each held-out evaluation, the held-out improvement
    1 - eval_loss / eval_loss_base in a study that maximizes, the held-out loss in one that
    minimizes. A fast learner whose first steps are rough is then judged by what it learned,
    not by how smooth its start was. `objective`: every `hydra.sweeper.report_every` steps, the
    trial's own objective computed on the steps so far. Either way the value points in the
    study's direction, so the pruner reads "better" the right way.
    """
    names = reporter.context.objective_names
    objective = names[0] if names else "stability_index"
    maximize = reporter.direction == "maximize"
    every, last = reporter.context.report_every, run_cfg.train.max_steps

    def eval_so_far(history: list[StepRecord], evals: list[EvalPoint]) -> dict[str, object]:
        points = [(e.step, e.loss) for e in evals]  # NaN values until the first eval after step 0
        return eval_summary(points, final_loss=history[-1].loss, min_improvement=run_cfg.train.min_improvement)

    def objective_so_far(history: list[StepRecord], evals: list[EvalPoint]) -> float:
        if objective in EVAL_METRICS:
            return float(cast(float, eval_so_far(history, evals)[objective]))
        metrics = compute_metrics(
            [s.loss for s in history],
            [s.grad_norm for s in history],
            warmup_steps=run_cfg.train.warmup_steps,  # fewer steps than W: all steps count
            min_improvement=run_cfg.train.min_improvement,
        )
        return float(getattr(metrics, objective))

    def hook(history: list[StepRecord], evals: list[EvalPoint]) -> bool:
        step = history[-1].step
        crash_point("step")
        if run_cfg.train.prune_on == "eval":
            if len(evals) < 2 or evals[-1].step != step:
                return False  # held-out losses exist at eval steps only
            value = float(cast(float, eval_so_far(history, evals)["eval_improvement" if maximize else "eval_loss"]))
        else:
            if step % every and step != last:
                return False  # reports are storage writes: every `hydra.sweeper.report_every` steps
            value = objective_so_far(history, evals)
        if value == value:  # NaN is never reported; the final result decides such a trial
            reporter.report(value, step)
        # a trial that ran every step is finished: pruning it now would save nothing
        return step != last and reporter.should_prune()

    return hook


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
