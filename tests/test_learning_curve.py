"""The prequential curve's stopping rule on made-up curves: rising, plateau, noisy (issue 20)."""

from __future__ import annotations

import numpy as np
import pytest

from ichal.learning_curve import (
    CurveError,
    CurvePoint,
    StoppingRule,
    gain_per_hour,
    plateau_start,
    stopping_advice,
)


def curve(hours, values, stacks=5, metric="pixel_ap"):
    return [CurvePoint(f"v{i}", float(h), stacks, {metric: float(v)}) for i, (h, v) in enumerate(zip(hours, values))]


def test_gain_per_hour_recovers_a_straight_line_with_a_zero_width_interval():
    gain = gain_per_hour([1, 2, 3, 4], [0.1, 0.13, 0.16, 0.19], [1, 1, 1, 1])
    assert gain.per_hour == pytest.approx(0.03)
    assert gain.low == pytest.approx(0.03) and gain.high == pytest.approx(0.03)


def test_gain_per_hour_interval_covers_the_true_slope_on_noisy_lines():
    rng = np.random.default_rng(0)
    hours = np.arange(1.0, 9.0)
    covered = sum(
        (g := gain_per_hour(hours, 0.02 * hours + rng.normal(0, 0.02, len(hours)), np.ones(len(hours)))).low <= 0.02 <= g.high
        for _ in range(400))
    assert 0.85 <= covered / 400 <= 0.95  # a 90% interval


def test_rising_curve_says_keep_labeling_with_its_gain():
    hours = [2, 3, 4, 5, 6, 7]
    advice = stopping_advice(curve(hours, [0.2, 0.25, 0.31, 0.35, 0.41, 0.45]))
    assert advice.verdict == "keep_labeling"
    assert advice.gain.per_hour == pytest.approx(0.05, abs=0.01)
    assert advice.message.startswith("keep labeling: +0.0")
    assert advice.plateau_since_hours is None


def test_plateau_is_found_at_its_elbow():
    hours = np.arange(1.0, 11.0)
    values = np.minimum(0.1 * hours, 0.6) + np.array([0, 0, 0, 0, 0, 0.002, -0.002, 0.001, -0.001, 0.002])
    advice = stopping_advice(curve(hours, values))
    assert advice.verdict == "plateau"
    assert advice.plateau_since_hours == pytest.approx(6.0)
    assert advice.message.startswith("plateau since 6.0 h: further labels buy little")
    assert advice.gain.high < advice.rule.min_gain_per_hour


def test_noisy_flat_curve_keeps_labeling_until_the_interval_is_narrow():
    rng = np.random.default_rng(3)
    hours = np.arange(1.0, 7.0)
    values = 0.5 + rng.normal(0, 0.08, len(hours))
    advice = stopping_advice(curve(hours, values))
    assert advice.verdict == "keep_labeling"  # too noisy to say the gain is small
    assert advice.gain.low < 0 < advice.gain.high
    assert advice.message.startswith("keep labeling: no clear gain yet, ")
    # Many more batches on the same flat curve narrow the interval (with a wider window) until it stops.
    hours = np.arange(1.0, 41.0)
    values = 0.5 + rng.normal(0, 0.08, len(hours))
    assert stopping_advice(curve(hours, values), StoppingRule(window=30)).verdict == "plateau"


def test_too_few_batches_say_so():
    advice = stopping_advice(curve([1, 2, 3], [0.1, 0.2, 0.3]))
    assert advice.verdict == "not_enough_batches"
    assert advice.message.startswith("not enough batches yet")
    assert advice.gain is None


def test_batches_without_the_metric_do_not_count():
    points = curve([1, 2, 3, 4], [0.1, 0.2, 0.3, 0.4])
    points[1] = CurvePoint("v1", 2.0, 5, {"pixel_ap": float("nan")})
    assert stopping_advice(points).verdict == "not_enough_batches"
    assert stopping_advice(points, StoppingRule(window=3)).verdict == "keep_labeling"


def test_bad_rules_and_points_are_refused_by_name():
    with pytest.raises(CurveError, match="window"):
        stopping_advice([], StoppingRule(window=2))
    with pytest.raises(CurveError, match="metric"):
        stopping_advice([], StoppingRule(metric="accuracy"))
    with pytest.raises(CurveError, match="hours"):
        stopping_advice([CurvePoint("v", -1.0, 3, {"pixel_ap": 0.5})])


def test_plateau_start_is_none_on_a_rising_curve():
    assert plateau_start(curve(range(1, 9), [0.1 * h for h in range(1, 9)]), StoppingRule()) is None

