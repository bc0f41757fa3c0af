"""Tests for lora_sweep.metrics on synthetic curves; expectations come from the
definitions (re-derived here with plain Python) or from invariance properties."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from lora_sweep.metrics import (
    COLLAPSE_FRACTION,
    DRAWUP_LIMIT,
    SPIKE_RATIO,
    SPIKE_WINDOW,
    TrialMetrics,
    compute_metrics,
    drawup_exceed_step,
    grad_volatility,
    max_drawup,
    ols_slope,
    spike_rate,
    stability_from_parts,
)


def exp_curve(steps: int, start: float = 4.0, end: float = 1.0) -> np.ndarray:
    """Clean exponential descent from ``start`` to ``end`` (log-linear in t / T)."""
    tau = np.arange(1, steps + 1) / steps
    return start * (end / start) ** tau


def smooth_grads(steps: int) -> np.ndarray:
    return np.linspace(2.0, 1.0, steps)


# ------------------------------------------------------------- reference formulas


def ref_spike_rate(losses, warmup: int) -> float:
    log_l = [math.log(x) for x in losses]
    eligible = [t for t in range(1, len(log_l) + 1) if t > warmup and t >= 2]
    if not eligible:
        return 0.0
    hits = 0
    for t in eligible:
        window = log_l[max(1, t - SPIKE_WINDOW) - 1 : t - 1]
        hits += log_l[t - 1] - statistics.median(window) > SPIKE_RATIO
    return hits / len(eligible)


def ref_volatility(grads, warmup: int) -> float:
    diffs = [math.log(grads[t - 1]) - math.log(grads[t - 2]) for t in range(2, len(grads) + 1) if t > max(warmup, 1)]
    return statistics.pstdev(diffs) if len(diffs) >= 2 else 0.0


# --------------------------------------------------------------------- clean runs


def test_clean_exponential_descent_scores_high() -> None:
    m = compute_metrics(exp_curve(200), smooth_grads(200), warmup_steps=10, vocab_size=32000)
    assert isinstance(m, TrialMetrics)
    assert not m.diverged and m.divergence_step is None and m.divergence_reason == ""
    assert m.stability_index > 0.8
    assert m.loss_slope < 0
    assert m.loss_slope == pytest.approx(math.log(1.0 / 4.0), rel=1e-9)
    assert m.drawup == 0.0 and m.spike_rate == 0.0
    assert m.quality > 0 and m.learned and m.constraint < 0


def test_hand_computed_tiny_example() -> None:
    losses = [4.0, 2.0, 3.0, 1.0]
    grads = [1.0, 2.0, 1.0, 4.0]
    m = compute_metrics(losses, grads, warmup_steps=1)
    logs = [math.log(x) for x in losses]
    # T = 4: final window = ceil(0.4) = 1 step.
    assert m.steps == 4
    assert m.avg_loss == pytest.approx(2.5)
    assert m.initial_loss == 4.0 and m.final_loss == 1.0
    # OLS slope over tau = (0.25, 0.5, 0.75, 1.0).
    tau = [0.25, 0.5, 0.75, 1.0]
    tbar, lbar = sum(tau) / 4, sum(logs) / 4
    slope = sum((a - tbar) * (b - lbar) for a, b in zip(tau, logs, strict=True)) / sum((a - tbar) ** 2 for a in tau)
    assert m.loss_slope == pytest.approx(slope)
    # Grad stats over t > W = 1: (2, 1, 4).
    assert m.grad_mean == pytest.approx(7 / 3)
    assert m.grad_std == pytest.approx(statistics.pstdev([2.0, 1.0, 4.0]))
    # D: running min of l is (ln4, ln2, ln2, ln1); drawup at t=3 is ln(3/2).
    assert m.drawup == pytest.approx(math.log(1.5))
    # S over t = 2, 3, 4: t=3 has l_3 - median(l_1, l_2) = ln3 - (ln4 + ln2)/2 < ln 1.5.
    excess3 = logs[2] - (logs[0] + logs[1]) / 2
    assert excess3 < SPIKE_RATIO
    assert m.spike_rate == 0.0
    # V_g over t > max(W, 1) = 1: diffs ln2, -ln2, ln4 -> population std.
    diffs = [math.log(2), -math.log(2), math.log(4)]
    assert m.grad_volatility == pytest.approx(statistics.pstdev(diffs))
    si = math.exp(-math.log(1.5)) * (1 - 0.0) / (1 + statistics.pstdev(diffs))
    assert m.stability_index == pytest.approx(si)
    assert m.quality == pytest.approx(math.log(4.0) * si)
    assert m.improvement == pytest.approx(0.75)
    assert m.constraint == pytest.approx(0.05 - 0.75)
    assert m.learned is True


def test_final_loss_uses_last_ten_percent_rounded_up() -> None:
    losses = list(range(30, 9, -1))  # T = 21 -> ceil(2.1) = 3 trailing steps
    m = compute_metrics(losses, [1.0] * 21, warmup_steps=0)
    assert m.final_loss == pytest.approx(sum(losses[-3:]) / 3)


# ------------------------------------------------------------------------- spikes


def test_spikes_raise_spike_rate_and_lower_index() -> None:
    clean = exp_curve(200)
    spiky = clean.copy()
    spiky[[50, 100, 150]] *= 2.0  # ln 2 > ln 1.5 above a locally smooth baseline
    grads = smooth_grads(200)
    m_clean = compute_metrics(clean, grads, warmup_steps=10)
    m_spiky = compute_metrics(spiky, grads, warmup_steps=10)
    assert m_clean.spike_rate == 0.0
    assert m_spiky.spike_rate == pytest.approx(3 / 190)
    assert m_spiky.spike_rate == pytest.approx(ref_spike_rate(spiky, 10))
    assert m_spiky.stability_index < m_clean.stability_index
    assert not m_spiky.diverged


def test_spike_rate_matches_reference_on_random_curves() -> None:
    rng = np.random.default_rng(0)
    for steps in (1, 2, 5, 9, 10, 11, 60):
        for warmup in (0, 1, 4, 70):
            losses = np.exp(rng.normal(0.0, 0.4, steps))
            assert spike_rate(losses, warmup) == pytest.approx(ref_spike_rate(losses, warmup))


def test_warmup_steps_excluded_from_spikes_volatility_and_grad_stats() -> None:
    steps, warmup = 100, 20
    losses = exp_curve(steps)
    losses[5] *= 2.0  # spike inside warm-up
    grads = np.ones(steps)
    # Wild warm-up norms that settle to g_20 = 1, so even the diff ln g_21 - ln g_20 is 0.
    grads[:warmup] = np.geomspace(100.0, 1.0, warmup) * (1 + (np.arange(warmup) % 2 == 0))
    m = compute_metrics(losses, grads, warmup_steps=warmup)
    assert m.spike_rate == 0.0
    assert m.grad_mean == 1.0 and m.grad_std == 0.0
    assert m.grad_volatility == 0.0  # first counted diff is ln g_21 - ln g_20 = 0
    m0 = compute_metrics(losses, grads, warmup_steps=0)
    assert m0.spike_rate > 0 and m0.grad_volatility > 0 and m0.grad_mean > 1.0


def test_grad_stats_use_all_steps_when_run_is_shorter_than_warmup() -> None:
    grads = [1.0, 2.0, 3.0]
    m = compute_metrics([3.0, 2.0, 1.0], grads, warmup_steps=10)
    assert m.grad_mean == pytest.approx(2.0)
    assert m.grad_std == pytest.approx(statistics.pstdev(grads))
    assert m.spike_rate == 0.0 and m.grad_volatility == 0.0


# --------------------------------------------------------------------- volatility


def test_noisy_grad_norms_raise_volatility() -> None:
    rng = np.random.default_rng(1)
    losses = exp_curve(300)
    smooth = smooth_grads(300)
    noisy = smooth * np.exp(rng.normal(0.0, 0.5, 300))
    m_smooth = compute_metrics(losses, smooth, warmup_steps=10)
    m_noisy = compute_metrics(losses, noisy, warmup_steps=10)
    assert m_noisy.grad_volatility > m_smooth.grad_volatility + 0.3
    assert m_noisy.grad_volatility == pytest.approx(ref_volatility(noisy, 10))
    assert m_noisy.stability_index < m_smooth.stability_index


def test_grad_volatility_edge_cases() -> None:
    assert grad_volatility([1.0], 0) == 0.0
    assert grad_volatility([1.0, 2.0], 0) == 0.0  # one difference only
    assert grad_volatility([1.0, 2.0, 1.0], 0) == pytest.approx(math.log(2))
    assert grad_volatility([0.0, 1.0, 0.0], 0) > 0  # zero norm is clamped, stays finite


# -------------------------------------------------------------------------- slope


def test_slope_is_scale_free() -> None:
    losses = exp_curve(120) * (1 + 0.1 * np.sin(np.arange(120)))
    grads = smooth_grads(120)
    a = compute_metrics(losses, grads, warmup_steps=0).loss_slope
    b = compute_metrics(losses * 37.5, grads, warmup_steps=0).loss_slope
    assert a == pytest.approx(b, rel=1e-12)


def test_slope_is_length_free() -> None:
    def curve(steps: int) -> np.ndarray:
        tau = np.arange(1, steps + 1) / steps
        return 3.0 * np.exp(-2.0 * tau) + 0.5  # not log-linear

    s50 = compute_metrics(curve(50), smooth_grads(50), warmup_steps=0).loss_slope
    s200 = compute_metrics(curve(200), smooth_grads(200), warmup_steps=0).loss_slope
    assert s50 < 0
    assert s50 == pytest.approx(s200, rel=0.03)


def test_ols_slope_helper() -> None:
    assert ols_slope([]) == 0.0
    assert ols_slope([5.0]) == 0.0
    assert ols_slope([0.0, 1.0]) == pytest.approx(2.0)  # tau = 0.5, 1.0
    assert ols_slope([0.0, 1.0], horizon=4) == pytest.approx(4.0)  # tau = 0.25, 0.5
    assert compute_metrics([2.0], [1.0], warmup_steps=0).loss_slope == 0.0


# ----------------------------------------------------------------------- divergence


def test_drawup_above_ln3_gates_to_zero_with_step() -> None:
    losses = list(exp_curve(100))
    # From the running minimum at step 40, climb 1.5x per step: ln 3 is passed at
    # the third step of the climb (1.5^3 = 3.375 > 3 > 1.5^2).
    base = losses[39]
    for i in range(1, 6):
        losses[39 + i] = base * 1.5**i
    m = compute_metrics(losses, smooth_grads(100), warmup_steps=0)
    assert m.drawup == pytest.approx(math.log(1.5**5))
    assert m.drawup > DRAWUP_LIMIT
    assert m.diverged and m.stability_index == 0.0 and m.quality == 0.0
    assert m.divergence_step == 43 == drawup_exceed_step(losses)
    assert "drawup" in m.divergence_reason and "step 43" in m.divergence_reason
    assert f"{m.drawup:.3f}" in m.divergence_reason


def test_drawup_just_below_limit_does_not_gate() -> None:
    losses = [3.0, 1.0, 2.9, 1.0]
    m = compute_metrics(losses, [1.0] * 4, warmup_steps=0)
    assert max_drawup(losses) == pytest.approx(math.log(2.9))
    assert not m.diverged and m.stability_index > 0
    assert drawup_exceed_step(losses) is None


def test_nan_loss_gates_and_uses_finite_prefix() -> None:
    losses = list(exp_curve(50))
    grads = list(smooth_grads(50))
    losses[30] = float("nan")
    m = compute_metrics(losses, grads, warmup_steps=5)
    prefix = compute_metrics(losses[:30], grads[:30], warmup_steps=5)
    assert m.diverged and m.divergence_step == 31
    assert m.divergence_reason == "non-finite loss at step 31"
    assert m.stability_index == 0.0 and m.quality == 0.0 and m.learned is False
    assert m.constraint > 0
    assert m.steps == 50
    for field in (
        "avg_loss",
        "initial_loss",
        "final_loss",
        "loss_slope",
        "grad_mean",
        "grad_std",
        "drawup",
        "spike_rate",
        "grad_volatility",
        "improvement",
    ):
        assert getattr(m, field) == getattr(prefix, field), field


def test_inf_grad_norm_gates() -> None:
    grads = list(smooth_grads(40))
    grads[12] = float("inf")
    m = compute_metrics(exp_curve(40), grads, warmup_steps=0)
    assert m.diverged and m.divergence_step == 13
    assert m.divergence_reason == "non-finite grad norm at step 13"
    assert m.stability_index == 0.0 and m.quality == 0.0 and not m.learned


def test_nonfinite_first_step_gives_nan_descriptives() -> None:
    m = compute_metrics([float("nan"), 1.0], [1.0, 1.0], warmup_steps=0)
    assert m.divergence_step == 1
    assert math.isnan(m.avg_loss) and math.isnan(m.drawup) and math.isnan(m.improvement)
    assert m.stability_index == 0.0 and not m.learned and m.constraint > 0


def test_loss_reported_before_grad_at_same_step() -> None:
    m = compute_metrics([1.0, float("inf")], [1.0, float("nan")], warmup_steps=0)
    assert m.divergence_reason == "non-finite loss at step 2"


def test_collapse_to_uniform_gates() -> None:
    vocab = 1000
    uniform = math.log(vocab)
    losses = np.full(50, uniform * 1.02)  # flat at chance level
    m = compute_metrics(losses, np.ones(50), warmup_steps=0, vocab_size=vocab)
    assert m.diverged and m.divergence_step == 50 and m.stability_index == 0.0
    assert "collapse" in m.divergence_reason
    # Same curve without vocab_size: no gate.
    assert not compute_metrics(losses, np.ones(50), warmup_steps=0).diverged
    # Final loss just under the threshold: no gate.
    below = np.full(50, COLLAPSE_FRACTION * uniform * 0.999)
    assert not compute_metrics(below, np.ones(50), warmup_steps=0, vocab_size=vocab).diverged
    # A run that rose from a good loss to chance level collapsed (drawup ln(1.9) < ln 3 alone
    # would not catch it).
    rising = np.linspace(uniform / 1.9, uniform, 50)
    m = compute_metrics(rising, np.ones(50), warmup_steps=0, vocab_size=vocab)
    assert m.diverged and "collapse" in m.divergence_reason


def test_collapse_gate_spares_a_model_that_starts_above_chance_and_improves() -> None:
    """A random-init checkpoint starts at ~ln |V|, a small model on foreign text above it (measured:
    10.6 against ln 1950 = 7.58, falling to 7.32): its loss fell, so it did not collapse."""
    vocab = 1950
    uniform = math.log(vocab)
    from_above = np.linspace(10.6, 7.32, 60)
    m = compute_metrics(from_above, np.ones(60), warmup_steps=5, vocab_size=vocab)
    assert m.final_loss >= COLLAPSE_FRACTION * uniform and not m.diverged and m.stability_index > 0
    from_chance = np.linspace(uniform, 0.96 * uniform, 60)  # random init, still near uniform
    assert not compute_metrics(from_chance, np.ones(60), warmup_steps=5, vocab_size=vocab).diverged


# ---------------------------------------------------------- quality / constraints


def test_quality_learned_and_constraint() -> None:
    grads = smooth_grads(100)
    good = compute_metrics(exp_curve(100, 4.0, 2.0), grads, warmup_steps=0)
    assert good.quality == pytest.approx(math.log(good.initial_loss / good.final_loss) * good.stability_index)
    assert good.improvement == pytest.approx(1 - good.final_loss / good.initial_loss)
    assert good.learned and good.constraint == pytest.approx(0.05 - good.improvement)

    flat = compute_metrics(exp_curve(100, 4.0, 3.9), grads, warmup_steps=0)
    assert 0 < flat.improvement < 0.05
    assert not flat.learned and flat.constraint > 0
    assert compute_metrics(exp_curve(100, 4.0, 3.9), grads, warmup_steps=0, min_improvement=0.01).learned

    worse = compute_metrics(exp_curve(100, 2.0, 2.2), grads, warmup_steps=0)
    assert worse.quality == 0.0 and worse.improvement < 0 and not worse.learned


def test_stability_from_parts_formula() -> None:
    assert stability_from_parts(0.0, 0.0, 0.0) == 1.0
    assert stability_from_parts(0.5, 0.2, 0.25) == pytest.approx(math.exp(-0.5) * 0.8 / 1.25)


def test_to_dict_has_builtin_scalars() -> None:
    d = compute_metrics(exp_curve(20), smooth_grads(20), warmup_steps=2).to_dict()
    assert set(d) == set(TrialMetrics.__dataclass_fields__)
    for key, value in d.items():
        assert value is None or type(value) in (int, float, bool, str), (key, type(value))


# ------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("losses", "grads", "match"),
    [([], [], "empty"), ([1.0, 2.0], [1.0], "length"), ([1.0], [1.0, 2.0], "length")],
)
def test_bad_input_raises(losses, grads, match) -> None:
    with pytest.raises(ValueError, match=match):
        compute_metrics(losses, grads, warmup_steps=0)


def test_bad_parameters_raise() -> None:
    with pytest.raises(ValueError, match="warmup_steps"):
        compute_metrics([1.0], [1.0], warmup_steps=-1)
    with pytest.raises(ValueError, match="vocab_size"):
        compute_metrics([1.0], [1.0], warmup_steps=0, vocab_size=1)
