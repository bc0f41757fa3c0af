"""What lora_sweep plugs into its (app-agnostic) sweeper: ``hydra.sweeper.hooks``; and the
study's ranking of its trials, which picks the summary's best and decides which trials' adapters
stay on disk (`retain_adapters`)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_sweep import adapters
from lora_sweep.artifacts import artifact_dir
from lora_sweep.best import BEST_DIRNAME, BEST_MANIFEST, export_best, trial_run_dir
from lora_sweep.results import CSV_COLUMNS, PAYLOAD_CSV_KEY, append_row
from lora_sweep.sweep.context import recorded
from lora_sweep.sweep.hooks import SweepHooks
from lora_sweep.sweep.objective import ObjectiveSpec, outcome_from_return
from lora_sweep.sweep.study import ATTR_PENALTY_FOR, is_counted

if TYPE_CHECKING:
    from lora_sweep.sweep.context import TrialReporter

log = logging.getLogger(__name__)

# The metrics a trial returns that can be a sweep's objective, with their directions.
OBJECTIVES: dict[str, str] = {
    "stability_index": "maximize",
    "quality": "maximize",
    "final_loss": "minimize",
    "eval_loss": "minimize",
    "best_eval_loss": "minimize",
    "eval_improvement": "maximize",
}
LEARNED_SHARE = 0.5
"""The summary's best trial learned at least this share of the largest held-out improvement
of any completed trial (see `LoraSweepHooks.best_trials`)."""


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _feasible(trial: Any) -> bool:
    return all(value <= 0 for value in (trial.constraints or {}).values())


def _completed(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if is_counted(t) and t.values is not None
    ]


def learner_bar(gains: Iterable[float | None], share: float = LEARNED_SHARE) -> float | None:
    """The held-out improvement a trial needs to count among the learners: `share` of the largest
    finite one in `gains` (the completed trials'); None (no bar) when none is positive."""
    finite = [g for g in gains if g is not None and math.isfinite(g)]
    top = max(finite, default=None)
    return share * top if top is not None and top > 0 else None


def learners(study: Any, trials: Sequence[Any] | None = None) -> list[Any]:
    """Completed, feasible trials whose held-out improvement clears `learner_bar` (all feasible
    ones when no trial reports one); among `trials` (default: the study's completed ones)."""
    completed = _completed(study) if trials is None else list(trials)
    bar = learner_bar(_number(t.user_attrs.get("eval_improvement")) for t in completed)
    chosen = []
    for trial in completed:
        gain = _number(trial.user_attrs.get("eval_improvement"))
        if _feasible(trial) and (bar is None or (gain is not None and gain >= bar)):
            chosen.append(trial)
    return chosen


def _by_objective(study: Any, trials: list[Any]) -> Any:
    from optuna.study import StudyDirection

    sign = 1.0 if study.direction == StudyDirection.MAXIMIZE else -1.0
    return max(trials, key=lambda t: (sign * t.values[0], -t.number))


def ranked(study: Any, trials: Sequence[Any]) -> list[Any]:
    """Completed `trials` best first, by the rule that picks the summary's best: with one
    objective the learners (`learners`) by the objective, then the other feasible trials, then
    the infeasible ones, each by the objective (ties: the earlier trial); with several, the
    feasible trials by Pareto front (the front itself first), then the infeasible ones, each by
    trial number."""
    signs = _signs(study)
    if len(signs) == 1:
        chosen = {t.number for t in learners(study, trials)}
        return sorted(
            trials, key=lambda t: (t.number in chosen, _feasible(t), signs[0] * t.values[0], -t.number), reverse=True
        )
    feasible = [t for t in trials if _feasible(t)]
    level = _front_levels(feasible, signs)
    infeasible = sorted((t for t in trials if not _feasible(t)), key=lambda t: t.number)
    return sorted(feasible, key=lambda t: (level[t.number], t.number)) + infeasible


def _signs(study: Any) -> list[float]:
    """+1 for each objective the study maximizes, -1 for each it minimizes."""
    from optuna.study import StudyDirection

    return [1.0 if d == StudyDirection.MAXIMIZE else -1.0 for d in study.directions]


def _front_levels(trials: Sequence[Any], signs: Sequence[float]) -> dict[int, int]:
    """Trial number -> its non-domination level (0: the Pareto front)."""

    def dominates(a: Any, b: Any) -> bool:
        pairs = [(s * x, s * y) for s, x, y in zip(signs, a.values, b.values, strict=True)]
        return all(x >= y for x, y in pairs) and any(x > y for x, y in pairs)

    level: dict[int, int] = {}
    rest, depth = list(trials), 0
    while rest:
        front = [t for t in rest if not any(dominates(o, t) for o in rest if o is not t)]
        level.update((t.number, depth) for t in front)
        rest, depth = [t for t in rest if t.number not in level], depth + 1
    return level


def kept_numbers(study: Any, trials: Sequence[Any], keep: int) -> set[int]:
    """The completed trials whose adapters `train.save_adapter=best_k` keeps: the best `keep` by
    `ranked`, and always the current best (with several objectives, the whole Pareto front)."""
    order = ranked(study, trials)
    kept = {t.number for t in order[:keep]}
    if len(study.directions) > 1:
        signs = _signs(study)
        kept |= {n for n, level in _front_levels([t for t in order if _feasible(t)], signs).items() if level == 0}
    return kept


@dataclass(frozen=True)
class _Told:
    """A trial whose job has returned but which is not told yet, as the ranking will see it once
    it is: its values, constraints and user attrs as the sweeper will record them."""

    number: int
    values: list[float]
    constraints: dict[str, float]
    user_attrs: dict[str, Any]


def _as_told(number: int, payload: Mapping[str, Any], spec: ObjectiveSpec) -> _Told | None:
    outcome = outcome_from_return(dict(payload), spec)  # what `tell` will make of it
    if outcome.state != "complete" or outcome.values is None:
        return None
    return _Told(number, list(outcome.values), dict(outcome.constraints), dict(outcome.user_attrs))


def retain_adapters(
    study: Any, results_dir: Path, *, mode: str, keep: int, current: tuple[int, Mapping[str, Any]] | None = None
) -> set[int]:
    """Delete the adapters (and their archive artifacts) that the study's ranking no longer keeps;
    returns the numbers of the trials it keeps. Call it under `adapters.lock(results_dir)`.

    Judged are the completed trials, the trials whose job has returned and recorded its result
    but which are not told yet, and `current` (trial number, the job's return mapping): a job
    runs this before its trial is recorded. `mode` is `train.save_adapter`: `best_k` keeps
    `kept_numbers`, `all` every judged trial. The adapter of a finished trial that is not kept
    (pruned, failed, stale, or out of the best k) is deleted; trials still running are left alone.
    """
    from optuna.trial import TrialState

    spec = ObjectiveSpec(tuple(study.metric_names or ()) or None, tuple(d.name.lower() for d in study.directions))
    judged: list[Any] = []
    candidates: list[tuple[Any, Path]] = []
    for frozen in study.get_trials(deepcopy=False):
        if ATTR_PENALTY_FOR in frozen.user_attrs or frozen.state == TrialState.WAITING:
            continue
        payload = current[1] if current is not None and frozen.number == current[0] else recorded(frozen)
        if frozen.state == TrialState.RUNNING and not payload:
            continue  # still training, or saving its adapter right now
        run_dir = Path(str(payload["run_dir"])) if payload.get("run_dir") else trial_run_dir(frozen)
        if run_dir is not None:
            candidates.append((frozen, run_dir))
        if frozen.state == TrialState.COMPLETE:
            if is_counted(frozen) and frozen.values is not None:
                judged.append(frozen)
        elif frozen.state == TrialState.RUNNING and (told := _as_told(frozen.number, payload, spec)) is not None:
            judged.append(told)
    kept = {t.number for t in judged} if mode == "all" else kept_numbers(study, judged, keep)
    ranked_numbers = {t.number for t in judged}
    for frozen, run_dir in candidates:
        adapter = run_dir / adapters.ADAPTER_DIRNAME
        if frozen.number in kept or not adapter.exists():
            continue
        adapters.remove_archives(results_dir, study, frozen)  # first: a kill between leaves the adapter, retried
        adapters.discard(adapter)
        why = f"not among the best {keep}" if frozen.number in ranked_numbers else "its trial did not complete"
        log.info("[trial %d] adapter deleted: %s", frozen.number, why)
    return kept


def keep_adapter(
    reporter: TrialReporter, payload: Mapping[str, Any], *, mode: str, keep: int, results_dir: Path
) -> dict[str, Any]:
    """After a sweep trial's job, before its row and record: run `retain_adapters` with this
    trial among the judged, and while its adapter is kept upload its zip archive as an artifact
    of the trial. Returns what its row and record say: `adapter_dir` (empty when not kept) and
    `adapter_artifact_id`. The lock serializes the workers of every sweep on `results_dir`."""
    number = reporter.context.trial_number
    try:
        with adapters.lock(results_dir):
            kept = retain_adapters(reporter.study, results_dir, mode=mode, keep=keep, current=(number, payload))
            adapter = adapters.complete_adapter(Path(str(payload["run_dir"])))
            if number not in kept or adapter is None:
                return {"adapter_dir": ""}
            artifact_id = adapters.upload_archive(results_dir, reporter.trial, adapter, number=number)
    except Exception as err:  # noqa: BLE001 - the trial itself is fine; the next pass retries
        log.warning("[trial %d] adapter retention or upload failed: %s", number, err)
        left = adapters.complete_adapter(Path(str(payload["run_dir"])))
        return {"adapter_dir": str(left) if left is not None else ""}
    return {"adapter_dir": str(adapter), adapters.ATTR_ARTIFACT: artifact_id}


def best_trial(study: Any) -> Any | None:
    """The trial whose adapter is "the best" (`lora-sweep best`, `<results_dir>/best/`): the
    summary's best (`LoraSweepHooks.best_trials`); with several objectives, the earliest trial of
    the Pareto front. None when no completed trial qualifies."""
    best = HOOKS.best_trials(study)
    if best is None:
        front = [t for t in study.best_trials if is_counted(t)]
        return min(front, key=lambda t: t.number) if front else None
    return best[0] if best else None


def _adapter_settings(study: Any) -> tuple[Path, str, int] | None:
    """(results_dir, train.save_adapter, train.keep_adapters) of the study's latest trial whose
    job recorded its result; None when none did."""
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number, reverse=True):
        result = recorded(trial)
        if result.get(PAYLOAD_CSV_KEY) and result.get("train.save_adapter"):
            mode, keep = str(result["train.save_adapter"]), int(result.get("train.keep_adapters") or 1)
            return Path(str(result[PAYLOAD_CSV_KEY])).parent, mode, keep
    return None


def _describe(study: Any, trial: Any) -> str:
    attrs = trial.user_attrs
    parts = [f"trial {trial.number}"]
    for key in ("stability_index", "eval_loss", "eval_improvement"):
        value = _number(attrs.get(key))
        if value is not None:
            parts.append(f"{key}={value:.4g}")
    return " ".join(parts)


class LoraSweepHooks(SweepHooks):
    """Objectives of a LoRA trial, the study beside the results, and the CSV row of a trial
    finished after its sweep died."""

    objectives = OBJECTIVES

    def storage_dir(self, app_cfg: Any) -> str | None:
        """The study lives beside the results CSV: ``<results_dir>/optuna_journal.log``."""
        try:
            results_dir = app_cfg.get("results_dir")
        except Exception:  # noqa: BLE001 - an interpolation that does not resolve outside a job
            return None
        return str(results_dir) if results_dir else None

    def dashboard_args(self, app_cfg: Any) -> list[str]:
        """The trials' artifacts (samples, adapters): ``--artifact-dir <results_dir>/artifacts``."""
        results_dir = self.storage_dir(app_cfg)
        return ["--artifact-dir", str(artifact_dir(Path(results_dir)).absolute())] if results_dir else []

    def best_trials(self, study: Any) -> list[Any] | None:
        """The best by the objective among the trials that learned: feasible (held-out loss at
        least `train.min_improvement` below the base model's) AND at least `LEARNED_SHARE` of the
        largest held-out improvement of the sweep. A stability objective alone rewards a run
        that barely moved; this keeps "best" to runs that learned about as much as the best
        learner. Multi-objective studies keep Optuna's Pareto front (None)."""
        if len(study.directions) > 1:
            return None
        chosen = learners(study)
        return [_by_objective(study, chosen)] if chosen else []

    def summary_lines(self, study: Any) -> list[str]:
        """How the best was chosen, and the lowest-held-out-loss trial when it is another one."""
        if len(study.directions) > 1:
            return []
        best = self.best_trials(study) or []
        lowest = [t for t in _completed(study) if _feasible(t) and _number(t.user_attrs.get("eval_loss")) is not None]
        lines = []
        if best:
            metric = study.metric_names[0] if study.metric_names else "objective"
            lines.append(
                f"best by {metric} among the trials that learned (held-out improvement >= "
                f"{LEARNED_SHARE:g} x the sweep's largest): {_describe(study, best[0])}"
            )
        if lowest:
            low = min(lowest, key=lambda t: (float(t.user_attrs["eval_loss"]), t.number))
            if not best or low.number != best[0].number:
                lines.append(f"lowest held-out loss: {_describe(study, low)}")
        settings = _adapter_settings(study)
        if best and settings is not None:  # what `on_sweep_end` exported, if it is this best
            manifest = settings[0] / BEST_DIRNAME / BEST_MANIFEST
            try:
                exported = json.loads(manifest.read_text()).get("trial_number")
            except (OSError, ValueError):
                exported = None
            if exported == best[0].number:
                lines.append(f"its adapter, config and model card: {manifest.parent} (merged: lora-sweep best --merge)")
        return lines

    def on_sweep_end(self, study: Any) -> None:
        """A last retention pass, once every worker has stopped (no trial is judged twice or
        missed by a race between workers), then the best trial's adapter, config and model card
        to `<results_dir>/best/` (`lora_sweep.best`). A failure is logged, never raised: every
        trial is recorded by now, and `lora-sweep best` exports on demand."""
        settings = _adapter_settings(study)
        if settings is None or settings[1] == "none":
            return
        results_dir, mode, keep = settings
        try:
            with adapters.lock(results_dir):
                retain_adapters(study, results_dir, mode=mode, keep=keep)
                for sweep_dir in {d.parent for t in study.get_trials(deepcopy=False) if (d := trial_run_dir(t))}:
                    adapters.clean_leftovers(sweep_dir)  # what killed trials left in their run directories
                best = best_trial(study)
                if best is None:
                    return
                run_dir = trial_run_dir(best)
                if run_dir is None or adapters.complete_adapter(run_dir) is None:
                    log.warning("the best trial %d has no adapter to export", best.number)
                    return
                out = export_best(study, best, results_dir / BEST_DIRNAME)
            log.info("best trial %d: adapter, config and model card in %s", best.number, out)
        except Exception as err:  # noqa: BLE001 - the sweep's results are complete without it
            log.warning("best adapter not exported (%s); run lora-sweep best --results-dir %s", err, results_dir)

    def on_recovered(self, recorded: Mapping[str, Any]) -> None:
        """Append the trial's results row unless its job wrote it before the sweep died (the
        job records the CSV path with its result)."""
        csv_path = recorded.get(PAYLOAD_CSV_KEY)
        if csv_path:
            append_row(Path(str(csv_path)), {k: recorded.get(k) for k in CSV_COLUMNS}, once=True)


HOOKS = LoraSweepHooks()
