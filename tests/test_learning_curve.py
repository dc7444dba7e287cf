"""The stopping rule on made-up curves: rising, plateau, noisy; the chained audit curve and which curve
the advice reads (issue 20)."""

from __future__ import annotations

import numpy as np
import pytest

from ichal.learning_curve import (
    PREQUENTIAL_SOURCE,
    AuditPoint,
    CurveError,
    CurvePoint,
    StoppingRule,
    advice_from_curves,
    audit_curve,
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



def audit_chain(hours, gains, stacks=4, metric="pixel_ap"):
    """Audit points of consecutive trainings: committee v{i} at hours[i] -> v{i+1} at hours[i+1], gaining gains[i]
    (old metric 0.5 each time: only the paired difference matters)."""
    return [AuditPoint(f"v{i}", f"v{i + 1}", float(hours[i]), float(hours[i + 1]), stacks,
                       {metric: 0.5}, {metric: None if g is None else 0.5 + float(g)})
            for i, g in enumerate(gains)]


def test_an_audit_point_gains_new_minus_old_and_none_where_either_is_undefined():
    point = AuditPoint("a", "b", 1.0, 2.0, 3, {"pixel_ap": 0.25, "stack_ap": None, "dice": 0.5},
                       {"pixel_ap": 0.375, "stack_ap": 0.5, "dice": 0.25})
    assert point.gains() == {"pixel_ap": 0.125, "stack_ap": None, "dice": -0.25}
    stored = {"old_version": "a", "new_version": "b", "old_hours": 1.0, "new_hours": 2.0, "stacks": 3, "ts": 9.0,
              "old_metrics": point.old_metrics, "new_metrics": point.new_metrics, "images": ["x"]}
    assert AuditPoint.of(stored) == point


def test_the_audit_curve_starts_at_zero_and_chains_the_paired_gains():
    chained = audit_curve(audit_chain([1, 2, 4, 5], [0.1, -0.05, None]))
    assert [p.hours for p in chained] == [1.0, 2.0, 4.0, 5.0]
    assert [p.model_version for p in chained] == ["v0", "v1", "v2", "v3"]
    assert [p.value("pixel_ap") for p in chained[:3]] == pytest.approx([0.0, 0.1, 0.05])
    assert np.isnan(chained[3].value("pixel_ap"))  # undefined gain: no value, and nothing added
    assert audit_curve([]) == []


def test_a_metric_undefined_at_one_point_keeps_its_running_sum_for_the_next():
    chained = audit_curve(audit_chain([1, 2, 3, 4], [0.1, None, 0.2]))
    assert chained[3].value("pixel_ap") == pytest.approx(0.3)


def test_a_rising_audit_curve_keeps_labeling_with_its_gain_per_hour():
    advice = stopping_advice(audit_curve(audit_chain(range(1, 7), [0.05, 0.052, 0.048, 0.05, 0.051])))
    assert advice.verdict == "keep_labeling" and advice.gain.per_hour == pytest.approx(0.05, abs=0.002)
    assert advice.message.startswith("keep labeling: +0.05")


def test_an_audit_curve_of_tiny_gains_says_plateau():
    gains = [0.08, 0.06, 0.001, -0.001, 0.0005, 0.0, -0.0005, 0.001]
    advice = stopping_advice(audit_curve(audit_chain(range(1, 10), gains)))
    assert advice.verdict == "plateau" and advice.message.startswith("plateau since ")
    assert 3.0 <= advice.plateau_since_hours <= 5.0  # the elbow, after the two large gains


def test_a_noisy_audit_curve_says_no_clear_gain_yet():
    gains = np.random.default_rng(4).normal(0, 0.1, 5)
    advice = stopping_advice(audit_curve(audit_chain(range(1, 7), gains)))
    assert advice.verdict == "keep_labeling" and advice.gain.low < 0 < advice.gain.high
    assert advice.message.startswith("keep labeling: no clear gain yet, ")


def test_the_advice_reads_the_audit_curve_once_it_has_a_window_of_points_and_says_so():
    prequential = curve([1, 2, 3, 4, 5], [0.5, 0.4, 0.3, 0.2, 0.1])  # falling: actively picked batches
    audits = audit_chain(range(1, 6), [0.05, 0.05, 0.05, 0.05], stacks=2)
    before = advice_from_curves(prequential, audits[:3])
    assert before.source == PREQUENTIAL_SOURCE and before.gain.per_hour == pytest.approx(-0.1)
    after = advice_from_curves(prequential, audits)
    assert after.source == "audit: 4 points, 8 stacks" and after.gain.per_hour == pytest.approx(0.05)
    assert after.to_dict()["source"] == after.source
