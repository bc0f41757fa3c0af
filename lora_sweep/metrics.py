"""Scalar summaries of one training run, computed from its per-step loss and grad norm.

Pure and light (numpy only) so the trainer, the sweep objective, pruners and tests
all share exactly one definition.

Definitions. Steps t = 1..T; L_t training loss, g_t pre-clip total grad norm,
l_t = ln L_t (L clamped below at ``LOG_FLOOR``), W = warm-up steps.

* ``avg_loss`` = mean L_t; ``initial_loss`` = L_1; ``final_loss`` = mean L_t over
  the last ceil(0.1 T) steps (at least one).
* ``loss_slope`` = OLS slope of l_t against tau = t / T (0.0 when T < 2), i.e. change
  in log-loss per whole run: scale-free and independent of T.
* ``grad_mean`` / ``grad_std`` = mean / population std (ddof=0) of g_t over t > W
  (all steps when T <= W).
* ``drawup`` D = max_t (l_t - min_{s<=t} l_s): the worst log-loss rebound.
* ``spike_rate`` S = fraction of the t with t > W and t >= 2 for which
  l_t - median(l_{max(1,t-9)..t-1}) > ln 1.5 (0 when no such t).
* ``grad_volatility`` V_g = population std over t > max(W, 1) of
  ln g_t - ln g_{t-1} (g clamped below at ``LOG_FLOOR``; 0 with < 2 differences).
* ``stability_index`` = exp(-D) (1 - S) / (1 + V_g) in [0, 1], higher is better,
  forced to 0 by the divergence gate (first match wins):
    1. a non-finite L_t or g_t (first such step; loss is reported before grad);
    2. D > ln 3 (step = where the running drawup first exceeds ln 3);
    3. collapse to the uniform predictor: final_loss >= 0.95 ln |V| AND final_loss >=
       initial_loss (the run ended at chance level without improving on its start; step = T;
       only when ``vocab_size`` is given). A model that starts at or above chance level (a
       random-init checkpoint starts at ~ln |V|; a small model on foreign text above it) and
       whose loss falls is not judged collapsed, however high it still is.
* ``quality`` = max(0, ln(initial_loss / final_loss)) * stability_index.
* ``improvement`` = 1 - final_loss / initial_loss; ``learned`` = improvement >=
  min_improvement; ``constraint`` = min_improvement - improvement (Optuna
  convention: feasible when <= 0).

With a non-finite value at step k, every descriptive metric (losses, slope, grad
stats, D, S, V_g, improvement) is computed over the finite prefix 1..k-1 (NaN when
it is empty); stability_index = quality = 0, learned = False and constraint is
made strictly positive (>= 1) so it always reads as infeasible.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "COLLAPSE_FRACTION",
    "DRAWUP_LIMIT",
    "LOG_FLOOR",
    "SPIKE_RATIO",
    "SPIKE_WINDOW",
    "TrialMetrics",
    "compute_metrics",
    "drawup_exceed_step",
    "eval_summary",
    "final_window",
    "grad_volatility",
    "log_clamped",
    "max_drawup",
    "ols_slope",
    "spike_rate",
    "stability_from_parts",
]

DRAWUP_LIMIT: float = math.log(3.0)
"""A log-loss rebound beyond this (loss tripled from its running minimum) is divergence."""
SPIKE_RATIO: float = math.log(1.5)
"""A step whose log-loss exceeds the recent median by more than this is a spike."""
SPIKE_WINDOW: int = 9
"""Number of preceding steps whose median is the spike baseline."""
COLLAPSE_FRACTION: float = 0.95
"""final_loss >= this * ln(vocab_size), with no improvement on the initial loss, means the
model collapsed to uniform."""
LOG_FLOOR: float = 1e-12
"""Values are clamped to at least this before taking logs (a loss or norm of 0)."""
FINAL_FRACTION: float = 0.1
"""final_loss averages over this trailing fraction of the steps."""
NONFINITE_CONSTRAINT: float = 1.0
"""Lower bound of ``constraint`` for runs with a non-finite value (always infeasible)."""


@dataclass(frozen=True)
class TrialMetrics:
    """Summary of one run; see the module docstring for each field's definition."""

    steps: int
    avg_loss: float
    initial_loss: float
    final_loss: float
    loss_slope: float
    grad_mean: float
    grad_std: float
    drawup: float
    spike_rate: float
    grad_volatility: float
    stability_index: float
    quality: float
    improvement: float
    learned: bool
    constraint: float
    diverged: bool
    divergence_step: int | None
    divergence_reason: str

    def to_dict(self) -> dict[str, object]:
        """Plain dict (builtin scalars only) for JSON, CSV rows and Optuna user attrs."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- helpers
# All helpers expect finite input; compute_metrics cuts a run at its first
# non-finite value before calling them. Indices in docstrings are 1-based steps.


def log_clamped(values: float | Sequence[float] | np.ndarray) -> np.ndarray:
    """ln(max(v, LOG_FLOOR)) elementwise, so a 0 loss or norm stays finite."""
    return np.log(np.maximum(np.asarray(values, dtype=np.float64), LOG_FLOOR))


def final_window(steps: int) -> int:
    """Number of trailing steps final_loss averages: ceil(0.1 T), at least 1."""
    return max(1, math.ceil(FINAL_FRACTION * steps))


def ols_slope(values: Sequence[float] | np.ndarray, horizon: int | None = None) -> float:
    """OLS slope of values[t-1] against tau = t / horizon (horizon defaults to len).

    Using run fraction rather than step index makes the slope comparable across
    runs of different length. 0.0 for fewer than two points.
    """
    y = np.asarray(values, dtype=np.float64)
    n = y.size
    if n < 2:
        return 0.0
    tau = np.arange(1, n + 1, dtype=np.float64) / float(horizon or n)
    dt = tau - tau.mean()
    return float(np.dot(dt, y - y.mean()) / np.dot(dt, dt))


def _running_drawup(losses: Sequence[float] | np.ndarray) -> np.ndarray:
    """l_t - min_{s<=t} l_s for every step."""
    log_l = log_clamped(losses)
    return log_l - np.minimum.accumulate(log_l)


def max_drawup(losses: Sequence[float] | np.ndarray) -> float:
    """D = max_t (l_t - min_{s<=t} l_s) of log-loss; 0.0 for an empty series."""
    if len(losses) == 0:
        return 0.0
    return float(_running_drawup(losses).max())


def drawup_exceed_step(losses: Sequence[float] | np.ndarray, limit: float = DRAWUP_LIMIT) -> int | None:
    """First 1-based step whose running drawup exceeds ``limit``, else None."""
    if len(losses) == 0:
        return None
    over = np.flatnonzero(_running_drawup(losses) > limit)
    return int(over[0]) + 1 if over.size else None


def spike_rate(losses: Sequence[float] | np.ndarray, warmup_steps: int) -> float:
    """S: fraction of steps t > W, t >= 2 whose log-loss beats the median of the
    previous (up to) SPIKE_WINDOW log-losses by more than SPIKE_RATIO."""
    log_l = log_clamped(losses)
    n = log_l.size
    first = max(warmup_steps + 1, 2)  # first eligible 1-based step
    if first > n:
        return 0.0
    baseline = np.empty(n)  # baseline[t-1] = median of the window before step t
    for t in range(2, min(SPIKE_WINDOW, n) + 1):  # steps 2..9 see a short window
        baseline[t - 1] = np.median(log_l[: t - 1])
    if n > SPIKE_WINDOW:  # steps t >= 10 see the full window l_{t-9}..l_{t-1}
        windows = np.lib.stride_tricks.sliding_window_view(log_l[:-1], SPIKE_WINDOW)
        baseline[SPIKE_WINDOW:] = np.median(windows, axis=1)
    excess = log_l[first - 1 :] - baseline[first - 1 :]
    return float(np.count_nonzero(excess > SPIKE_RATIO) / excess.size)


def grad_volatility(grad_norms: Sequence[float] | np.ndarray, warmup_steps: int) -> float:
    """V_g: population std of ln g_t - ln g_{t-1} over t > max(W, 1); 0 with < 2 diffs."""
    diffs = np.diff(log_clamped(grad_norms))  # diffs[i] belongs to step t = i + 2
    diffs = diffs[max(warmup_steps, 1) - 1 :]
    if diffs.size < 2:
        return 0.0
    return float(diffs.std())


def stability_from_parts(drawup: float, spike_rate: float, grad_volatility: float) -> float:
    """exp(-D) (1 - S) / (1 + V_g), before any divergence gate."""
    return math.exp(-drawup) * (1.0 - spike_rate) / (1.0 + grad_volatility)


# ------------------------------------------------------------------- compute_metrics


@dataclass(frozen=True)
class _Descriptive:
    """Metrics that only describe the (finite part of the) curve."""

    avg_loss: float
    initial_loss: float
    final_loss: float
    loss_slope: float
    grad_mean: float
    grad_std: float
    drawup: float
    spike_rate: float
    grad_volatility: float


_NAN = float("nan")
_EMPTY = _Descriptive(*([_NAN] * 9))


def _describe(losses: np.ndarray, grads: np.ndarray, warmup_steps: int) -> _Descriptive:
    """Descriptive metrics of finite arrays; all NaN when they are empty."""
    n = losses.size
    if n == 0:
        return _EMPTY
    post = grads[warmup_steps:] if n > warmup_steps else grads
    return _Descriptive(
        avg_loss=float(losses.mean()),
        initial_loss=float(losses[0]),
        final_loss=float(losses[-final_window(n) :].mean()),
        loss_slope=ols_slope(log_clamped(losses)),
        grad_mean=float(post.mean()),
        grad_std=float(post.std()),
        drawup=max_drawup(losses),
        spike_rate=spike_rate(losses, warmup_steps),
        grad_volatility=grad_volatility(grads, warmup_steps),
    )


def _first_nonfinite(losses: np.ndarray, grads: np.ndarray) -> tuple[int, str] | None:
    """(1-based step, reason) of the first non-finite loss or grad norm, if any."""
    bad_loss = np.flatnonzero(~np.isfinite(losses))
    bad_grad = np.flatnonzero(~np.isfinite(grads))
    loss_at = int(bad_loss[0]) if bad_loss.size else None
    grad_at = int(bad_grad[0]) if bad_grad.size else None
    if loss_at is not None and (grad_at is None or loss_at <= grad_at):
        return loss_at + 1, f"non-finite loss at step {loss_at + 1}"
    if grad_at is not None:
        return grad_at + 1, f"non-finite grad norm at step {grad_at + 1}"
    return None


def _gate(losses: np.ndarray, desc: _Descriptive, vocab_size: int | None) -> tuple[int, str] | None:
    """(step, reason) for the drawup or collapse gate on an all-finite run, if hit."""
    if desc.drawup > DRAWUP_LIMIT:
        step = drawup_exceed_step(losses)
        assert step is not None  # the running drawup's max is desc.drawup, so some step exceeds the limit
        return step, (f"loss drawup {desc.drawup:.3f} > ln 3 ({DRAWUP_LIMIT:.3f}); first exceeded at step {step}")
    if vocab_size is not None:
        uniform = math.log(vocab_size)
        # got worse towards uniform: a high final loss alone also marks a model that began there
        if desc.final_loss >= COLLAPSE_FRACTION * uniform and desc.final_loss >= desc.initial_loss:
            return losses.size, (
                f"collapse to uniform: final loss {desc.final_loss:.4f} >= "
                f"{COLLAPSE_FRACTION} * ln({vocab_size}) = {COLLAPSE_FRACTION * uniform:.4f} "
                f"and not below the initial loss {desc.initial_loss:.4f}"
            )
    return None


def _improvement(desc: _Descriptive) -> float:
    """1 - final/initial; NaN when undefined (empty prefix or zero initial loss)."""
    if not desc.initial_loss > 0.0:
        return _NAN
    return 1.0 - desc.final_loss / desc.initial_loss


def _validate(losses: np.ndarray, grads: np.ndarray, warmup_steps: int, vocab_size: int | None) -> None:
    if losses.ndim != 1 or grads.ndim != 1:
        raise ValueError("losses and grad_norms must be one-dimensional sequences")
    if losses.size == 0:
        raise ValueError("compute_metrics needs at least one step; got empty losses")
    if losses.size != grads.size:
        raise ValueError(
            f"losses and grad_norms differ in length ({losses.size} vs {grads.size}); they must have one entry per step"
        )
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if vocab_size is not None and vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2 when given, got {vocab_size}")


def compute_metrics(
    losses: Sequence[float],
    grad_norms: Sequence[float],
    *,
    warmup_steps: int,
    vocab_size: int | None = None,
    min_improvement: float = 0.05,
) -> TrialMetrics:
    """Summarise a run (see the module docstring). Raises ValueError on empty or
    mismatched input."""
    loss_arr = np.asarray(losses, dtype=np.float64)
    grad_arr = np.asarray(grad_norms, dtype=np.float64)
    _validate(loss_arr, grad_arr, warmup_steps, vocab_size)

    nonfinite = _first_nonfinite(loss_arr, grad_arr)
    if nonfinite is not None:
        k = nonfinite[0] - 1  # length of the finite prefix
        desc = _describe(loss_arr[:k], grad_arr[:k], warmup_steps)
        gate: tuple[int, str] | None = nonfinite
    else:
        desc = _describe(loss_arr, grad_arr, warmup_steps)
        gate = _gate(loss_arr, desc, vocab_size)

    improvement = _improvement(desc)
    constraint = min_improvement - improvement
    if gate is None:
        stability = stability_from_parts(desc.drawup, desc.spike_rate, desc.grad_volatility)
        gain = float(log_clamped(desc.initial_loss) - log_clamped(desc.final_loss))
        quality = max(0.0, gain) * stability
    else:
        stability = quality = 0.0
    if nonfinite is not None:  # never feasible, even if the prefix had improved
        constraint = max(np.nan_to_num(constraint, nan=0.0), NONFINITE_CONSTRAINT)

    return TrialMetrics(
        steps=int(loss_arr.size),
        **dataclasses.asdict(desc),
        stability_index=float(stability),
        quality=float(quality),
        improvement=float(improvement),
        learned=bool(nonfinite is None and improvement >= min_improvement),
        constraint=float(constraint),
        diverged=gate is not None,
        divergence_step=None if gate is None else int(gate[0]),
        divergence_reason="" if gate is None else gate[1],
    )


def eval_summary(
    points: Sequence[tuple[int, float]], *, final_loss: float, min_improvement: float, finite_run: bool = True
) -> dict[str, object]:
    """Held-out metrics from the evaluations ``(step, loss)`` of a run (step 0 first: the base
    model), judged the way the sweep ranks trials: a run *learned* when its last held-out loss
    is at least ``min_improvement`` below the base model's.

    * ``eval_loss`` = the last evaluation's loss (the final step's, unless the run stopped early);
      ``eval_loss_base`` = step 0's; ``eval_improvement`` = 1 - eval_loss / eval_loss_base;
    * ``best_eval_loss`` / ``best_eval_step`` = the lowest loss of any evaluation and its step;
    * ``generalization_gap`` = eval_loss - final_loss (held-out minus training loss at the end);
    * ``learned`` = eval_improvement >= min_improvement; ``constraint`` = min_improvement -
      eval_improvement (feasible when <= 0), at least ``NONFINITE_CONSTRAINT`` for a run that
      hit a non-finite value (``finite_run=False``).

    Every value is NaN (``learned`` False, ``constraint`` infeasible) without a finite base
    evaluation and at least one later one.
    """
    base = points[0][1] if points and points[0][0] == 0 else _NAN
    later = [(step, loss) for step, loss in points if step > 0]
    last = later[-1][1] if later else _NAN
    improvement = 1.0 - last / base if math.isfinite(base) and base > 0 and math.isfinite(last) else _NAN
    finite = [(step, loss) for step, loss in points if math.isfinite(loss)]
    best_step, best_loss = min(finite, key=lambda point: point[1]) if finite else (None, _NAN)
    constraint = min_improvement - improvement if math.isfinite(improvement) else NONFINITE_CONSTRAINT
    if not finite_run:
        constraint = max(constraint, NONFINITE_CONSTRAINT)
    return {
        "eval_loss": float(last),
        "eval_loss_base": float(base),
        "eval_improvement": float(improvement),
        "best_eval_loss": float(best_loss),
        "best_eval_step": best_step,
        "generalization_gap": float(last - final_loss) if math.isfinite(last) else _NAN,
        "learned": bool(finite_run and math.isfinite(improvement) and improvement >= min_improvement),
        "constraint": float(constraint),
    }
