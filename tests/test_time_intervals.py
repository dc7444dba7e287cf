"""ichal.time_intervals: conformal intervals from served stacks' log errors, batch totals, budgets at a confidence."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from ichal.selection import uncertainty_select
from ichal.time_intervals import (
    MIN_RESIDUALS,
    IntervalError,
    MAX_APPLIED_CONFIDENCE,
    MAX_CONFIDENCE_OFFSET,
    LogErrorModel,
    applied_confidence,
    batch_total_quantile,
    batch_outcomes,
    calibration_summary,
    check_confidence,
    confidence_offset,
    fit_log_error_model,
    recalibration_backtest,
    log_error_model,
    select_within_budget_at_applied_confidence,
    select_within_budget_at_confidence,
    worklist_summary,
)


def records_with_errors(errors: list[float], median: float = 100.0) -> list[dict]:
    return [{"seconds": median * math.exp(e), "at_serve": {"predicted_log_seconds": math.log(median), "predicted_from": "committee"}}
            for e in errors]


def test_log_errors_come_from_what_was_predicted_at_serve_time():
    site_median = {"predicted_log_seconds": 3.0, "predicted_from": "site median"}
    records = records_with_errors([0.5, -0.25]) + [{"seconds": 50.0}, {"seconds": 60.0, "at_serve": {"predicted_seconds": 9.0}},
                                                   {"seconds": 70.0, "at_serve": site_median}]
    model = log_error_model(records, fallback_std=0.4)
    np.testing.assert_allclose(sorted(model.residuals), [-0.25, 0.5])
    assert not model.empirical  # 2 < MIN_RESIDUALS: the lognormal fallback speaks


def test_conformal_intervals_cover_new_errors_at_the_nominal_rate():
    rng = np.random.default_rng(0)
    calibration = LogErrorModel(rng.normal(0.3, 0.6, 200), fallback_std=0.1)
    low, high = calibration.interval(0.8)
    fresh = rng.normal(0.3, 0.6, 20000)
    coverage = float(((fresh >= low) & (fresh <= high)).mean())
    assert 0.77 <= coverage <= 0.86
    # The bias of the served stacks (here: times 35% longer than predicted) moves the interval and the mean.
    assert low < 0.3 < high
    assert calibration.mean_factor() == pytest.approx(math.exp(0.3 + 0.18), rel=0.1)


def test_without_enough_errors_the_interval_is_the_lognormal_of_the_fallback_spread():
    model = LogErrorModel(np.zeros(MIN_RESIDUALS - 1), fallback_std=0.5)
    low, high = model.interval(0.8)
    assert high == pytest.approx(0.5 * 1.2815515, rel=1e-6) and low == pytest.approx(-high)


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, True, None, "0.8"])
def test_confidence_must_be_a_probability(bad):
    with pytest.raises(IntervalError, match="confidence"):
        check_confidence(bad)


def test_the_batch_total_quantile_grows_with_the_confidence_and_is_the_sum_without_spread():
    medians = np.array([60.0, 120.0, 300.0])
    rng = lambda: np.random.default_rng(1)  # noqa: E731
    spread = LogErrorModel(np.random.default_rng(2).normal(0, 0.5, 100), fallback_std=0.0)
    assert batch_total_quantile(medians, spread, 0.5, rng()) < batch_total_quantile(medians, spread, 0.9, rng())
    none = LogErrorModel(np.zeros(0), fallback_std=0.0)
    assert batch_total_quantile(medians, none, 0.9, rng()) == pytest.approx(480.0)


def test_a_budget_at_confidence_holds_for_simulated_batches_where_the_expected_one_does_not():
    rng = np.random.default_rng(3)
    medians = rng.lognormal(math.log(120), 0.8, 200)
    values = rng.random(200)
    errors = LogErrorModel(rng.normal(0.0, 0.6, 300), fallback_std=0.0)
    budget = 3600.0

    def select(times, budget_seconds):
        return np.asarray(uncertainty_select(values, times, budget_seconds).indices, dtype=int)

    picked, factor, total_high = select_within_budget_at_confidence(select, medians, budget, errors, 0.8)
    assert factor > 1.0 and total_high <= budget
    expected = select(medians * errors.mean_factor(), budget)  # the batch a budget "in expectation" picks

    def share_over_budget(indices):
        draws = (medians[indices][None, :] * np.exp(rng.normal(0.0, 0.6, (5000, len(indices))))).sum(axis=1)
        return float((draws > budget).mean())

    assert share_over_budget(picked) <= 0.22
    assert share_over_budget(expected) > 0.3


def standard_errors(n: int, std: float) -> np.ndarray:
    """n log errors of mean 0 and sample standard deviation exactly `std` (normal quantiles, no sampling noise)."""
    z = norm.ppf((np.arange(n) + 0.5) / n)
    return std * z / z.std(ddof=1)


def test_a_young_fit_widens_the_batch_total_beyond_independent_errors():
    # Same spread, 12 residuals vs. 400: with 12 the mean and spread are uncertain and shared by the batch's
    # 30 stacks (their errors do not average away), so the 0.8-quantile of the total must be higher.
    medians = np.full(30, 100.0)
    young = LogErrorModel(standard_errors(12, 0.6), fallback_std=0.0, tail="normal")
    settled = LogErrorModel(standard_errors(400, 0.6), fallback_std=0.0, tail="normal")
    young_high = batch_total_quantile(medians, young, 0.8, np.random.default_rng(0))
    settled_high = batch_total_quantile(medians, settled, 0.8, np.random.default_rng(0))
    assert young_high > 1.11 * settled_high  # 1.13 measured; 1.08 if each stack drew its own fit
    # The settled fit is close to independent lognormal errors: mean 3000 e^0.18, spread of the sum ~ 400 s.
    assert settled_high == pytest.approx(3000 * math.exp(0.18) + 0.84 * 400, rel=0.05)


def test_a_batch_is_found_when_the_first_bracket_is_too_narrow():
    # Most stacks took what was predicted, a few 20x longer: the conformal 0.8-quantile of one stack is 0 (factor 1),
    # but the fit's mean and spread make a batch of ten run long, so the first bracket (2x) picks a batch that may overrun.
    errors = LogErrorModel(np.r_[np.zeros(17), np.full(3, 3.0)], fallback_std=0.0)
    medians = np.full(10, 60.0)
    budget = 1200.0
    assert errors.quantile(0.8) == 0.0
    assert batch_total_quantile(medians, errors, 0.8, np.random.default_rng(0)) > budget  # the premise

    def select(times, budget_seconds):
        return np.flatnonzero(np.cumsum(times) <= budget_seconds)

    picked, factor, total_high = select_within_budget_at_confidence(select, medians, budget, errors, 0.8)
    assert 0 < len(picked) < 10 and total_high <= budget and factor > 2.0


def test_a_stack_is_found_when_the_first_bracket_picks_nothing():
    # The first, widest inflation leaves no stack within the budget: the search goes on below it.
    errors = LogErrorModel(np.zeros(0), fallback_std=0.6)
    medians = np.full(10, 528.0)  # 0.8-quantile 1140 s alone; inflated x4.3 at the start: 2270 s
    picked, _, total_high = select_within_budget_at_confidence(
        lambda times, budget: np.flatnonzero(np.cumsum(times) <= budget), medians, 1500.0, errors, 0.8)
    assert picked.tolist() == [0] and total_high <= 1500.0


def test_nothing_fits_when_even_the_quickest_stack_may_overrun():
    errors = LogErrorModel(np.zeros(0), fallback_std=0.5)
    picked, _, _ = select_within_budget_at_confidence(
        lambda times, budget: np.flatnonzero(times <= budget)[:1], np.array([3000.0]), 60.0, errors, 0.8)
    assert picked.size == 0


def test_the_calibration_summary_counts_errors_and_interval_coverage():
    served = {"predicted_log_seconds": math.log(100.0), "predicted_seconds_low": 50.0, "predicted_seconds_high": 200.0, "confidence": 0.8}
    records = [{"seconds": s, "at_serve": served} for s in (60.0, 100.0, 150.0, 400.0)] + [{"seconds": 70.0}]
    summary = calibration_summary(records)
    assert summary["n"] == 4 and summary["interval_coverage"] == 0.75 and summary["interval_confidences"] == [0.8]
    assert summary["median_log_error"] == pytest.approx(np.median(np.log([0.6, 1.0, 1.5, 4.0])))
    assert summary["median_abs_log_error"] > 0
    assert calibration_summary([{"seconds": 5.0}])["n"] == 0


def worklist_records(worklist_id: str, seconds: dict[str, float], budget: float, predicted: float) -> list[dict]:
    """Time records of a worklist served (snapshot as the app keeps it) and labeled with `seconds`."""
    items = [{"id": image, "predicted_seconds": predicted / len(seconds)} for image in seconds]
    worklist = {"id": worklist_id, "items": items, "predicted_seconds": predicted, "high_seconds": 1.5 * predicted,
                "budget_seconds": budget, "confidence": 0.8}
    return [{"image": image, "seconds": s, "at_serve": worklist_summary({"predicted_log_seconds": math.log(predicted / len(seconds)),
                                                                        "worklist": worklist})}
            for image, s in seconds.items()]


def test_a_time_record_keeps_its_worklist_as_ids_only():
    summary = worklist_summary({"value": 1.0, "worklist": {"id": "w", "items": [{"id": "a", "value": 3}, {"id": "b"}]}})
    assert summary == {"value": 1.0, "worklist": {"id": "w", "ids": ["a", "b"]}}
    assert worklist_summary({"value": 1.0}) == {"value": 1.0}


def test_batches_count_only_worklists_labeled_through_and_compare_measured_to_predicted():
    over = worklist_records("w1", {"a": 300.0, "b": 500.0}, budget=600.0, predicted=400.0)     # 800 s: +100%, over budget
    within = worklist_records("w2", {"c": 100.0, "d": 200.0}, budget=600.0, predicted=400.0)   # 300 s: -25%
    cut_short = worklist_records("w3", {"e": 100.0, "f": 100.0}, budget=600.0, predicted=200.0)[:1]
    outcomes = {b["worklist_id"]: b for b in batch_outcomes(over + within + cut_short)}
    assert set(outcomes) == {"w1", "w2"}
    assert outcomes["w1"]["measured_seconds"] == 800.0 and outcomes["w2"]["n_stacks"] == 2
    summary = calibration_summary(over + within + cut_short)
    assert summary["batches"] == 2 and summary["share_over_budget"] == 0.5
    assert summary["median_batch_error"] == pytest.approx(np.median([1.0, -0.25]))
    assert summary["n"] == 5


def test_when_every_stack_fits_even_inflated_the_worklist_is_the_whole_pool_at_once():
    calls = []

    def select(times, budget):
        calls.append(1)
        return uncertainty_select(np.ones(len(times)), times, budget).indices

    errors = LogErrorModel(np.zeros(0), fallback_std=0.3)
    picked, _, total_high = select_within_budget_at_confidence(select, np.full(5, 10.0), 1e6, errors, 0.8)
    assert sorted(picked) == [0, 1, 2, 3, 4] and total_high < 1e6 and len(calls) == 1


def test_recalibration_removes_a_young_committees_bias_and_the_knapsacks_selection_effect():
    """Predictions 2x too low with noise on top (a young committee's masks): a knapsack-like pick of the
    stacks predicted quickest under-predicts them further (winner's curse); the recalibrated medians
    do not, on fresh stacks."""
    rng = np.random.default_rng(3)

    def stacks(n):
        true_log = rng.normal(math.log(300.0), 0.5, n)
        return true_log - math.log(2.0) + rng.normal(0.0, 0.5, n), true_log

    model = fit_log_error_model(*stacks(400), fallback_std=0.4)
    assert model.empirical and 0.3 < model.slope < 0.7 and model.intercept > 0
    predicted_log, true_log = stacks(4000)
    picked = np.argsort(predicted_log)[:400]  # the cheapest-looking tenth
    raw_error = float(np.mean(true_log[picked] - predicted_log[picked]))
    corrected_error = float(np.mean(true_log[picked] - model.adjust(predicted_log[picked])))
    assert raw_error > 1.0 and abs(corrected_error) < 0.15
    # Too few pairs: no recalibration, the raw errors are the residuals.
    few = fit_log_error_model(np.zeros(3), np.ones(3), fallback_std=0.4)
    assert (few.intercept, few.slope) == (0.0, 1.0) and not few.empirical


def test_the_backtest_predicts_each_stack_only_from_stacks_saved_before_it():
    rng = np.random.default_rng(4)
    true_log = rng.normal(5.5, 0.6, 60)
    biased = true_log - 1.0 + rng.normal(0.0, 0.2, 60)  # a young committee: 2.7x too quick, little noise
    result = recalibration_backtest(biased, true_log)
    assert result["n"] == 60 - 10
    assert result["raw_median_abs_log_error"] > 0.9 and result["recalibrated_median_abs_log_error"] < 0.3
    # An exact line (slope 0.5, intercept 2.75) is recovered from every prefix: zero error after the 10th stack.
    line = recalibration_backtest(true_log, 0.5 * true_log + 2.75)
    assert line["n"] == 50 and line["recalibrated_median_abs_log_error"] < 1e-9 < line["raw_median_abs_log_error"]


def test_a_recalibration_that_the_backtest_finds_worse_is_not_used():
    rng = np.random.default_rng(5)
    true_log = rng.normal(5.5, 0.6, 40)
    exact = true_log + rng.normal(0.0, 0.05, 40)  # already calibrated: a fitted line only adds noise
    exact[:10] += 1.5  # ... except that the first stacks were far off, which would drag an early line away
    model = fit_log_error_model(exact, true_log, fallback_std=0.3)
    backtest = recalibration_backtest(exact, true_log)
    assert backtest["recalibrated_median_abs_log_error"] > backtest["raw_median_abs_log_error"]
    assert (model.intercept, model.slope) == (0.0, 1.0)
    np.testing.assert_allclose(model.residuals, true_log - exact)


def test_a_bootstrap_tail_keeps_the_right_tail_of_skewed_errors_in_the_batch_total():
    """Residuals mostly near zero with a few stacks 10x over (a young committee): the batch total's upper
    quantile is higher with the residuals resampled than with normal errors of the same variance; with
    normal residuals the two agree. An unknown tail is an error."""
    skewed = np.r_[np.full(27, -0.25), np.full(3, math.log(10.0)) - 0.25]
    medians = np.full(6, 100.0)
    high = {tail: batch_total_quantile(medians, LogErrorModel(skewed, 0.0, tail=tail), 0.8, np.random.default_rng(0))
            for tail in ("normal", "bootstrap")}
    assert high["bootstrap"] > 1.2 * high["normal"]
    symmetric = np.random.default_rng(1).normal(0.0, 0.5, 400)
    near = [batch_total_quantile(medians, LogErrorModel(symmetric, 0.0, tail=tail), 0.8, np.random.default_rng(2))
            for tail in ("normal", "bootstrap")]
    assert abs(near[0] - near[1]) < 0.05 * near[0]
    with pytest.raises(IntervalError, match="tail"):
        LogErrorModel(skewed, 0.0, tail="cauchy")


def outcome(over: bool, confidence: float = 0.8) -> dict:
    return {"measured_seconds": 120.0 if over else 80.0, "budget_seconds": 100.0, "confidence": confidence}


def test_each_overrun_raises_the_applied_confidence_and_each_worklist_within_lowers_it_never_below_the_asked():
    assert confidence_offset([]) == 0.0
    assert confidence_offset([outcome(True)], step=0.1) == pytest.approx(0.08)
    assert confidence_offset([outcome(True), outcome(False)], step=0.1) == pytest.approx(0.06)
    # Bounded at every step: a run within budget does not bank credit against later overruns.
    assert confidence_offset([outcome(False)] * 20 + [outcome(True)], step=0.1) == pytest.approx(0.08)
    assert confidence_offset([outcome(True)] * 50, step=0.1) == pytest.approx(MAX_CONFIDENCE_OFFSET)
    assert applied_confidence(0.8, 0.08) == pytest.approx(0.88)
    assert applied_confidence(0.8, 0.2) == MAX_APPLIED_CONFIDENCE
    assert confidence_offset([outcome(True)] * 3, step=0.0) == 0.0
    with pytest.raises(IntervalError, match="confidence"):
        confidence_offset([outcome(True, confidence=1.0)])
    with pytest.raises(IntervalError, match="step"):
        confidence_offset([outcome(True)], step=float("nan"))


def test_the_adaptive_confidence_brings_a_too_narrow_models_share_over_budget_down_to_the_asked():
    """Worklists whose true log error is twice as wide as the model believes: budgeted at the model's 0.8-quantile
    a third of them overrun; with the offset learned from the earlier ones, the long-run share is 1 - 0.8."""
    rng = np.random.default_rng(0)
    true_errors = rng.normal(0.0, 1.0, size=600)

    def share_over(step: float) -> float:
        outcomes = []
        for error in true_errors:
            level = applied_confidence(0.8, confidence_offset(outcomes, step))
            outcomes.append(outcome(bool(error > 0.5 * norm.ppf(level))))
        return float(np.mean([o["measured_seconds"] > o["budget_seconds"] for o in outcomes]))

    assert share_over(0.0) > 0.3
    assert abs(share_over(0.15) - 0.2) < 0.03


def test_a_raised_confidence_that_fits_nothing_falls_back_to_the_asked_one():
    """One stack whose 0.8-quantile fits the budget and whose 0.99-quantile does not: at the raised 0.99 nothing
    would be served (and with no worklist labeled, the raise would never come down), so the asked 0.8 is used."""
    errors = LogErrorModel(np.r_[np.zeros(17), np.full(3, 3.0)], fallback_std=0.0)
    medians = np.array([60.0])
    at = {level: batch_total_quantile(medians, errors, level, np.random.default_rng(0)) for level in (0.8, 0.99)}
    budget = (at[0.8] + at[0.99]) / 2

    def select(times, budget_seconds):
        return np.flatnonzero(np.cumsum(times) <= budget_seconds)

    assert not len(select_within_budget_at_confidence(select, medians, budget, errors, 0.99)[0])
    picked, high, used = select_within_budget_at_applied_confidence(select, medians, budget, errors, 0.8, 0.99)
    assert picked.tolist() == [0] and used == 0.8 and high == pytest.approx(at[0.8])
    picked, _, used = select_within_budget_at_applied_confidence(select, medians, 10 * at[0.99], errors, 0.8, 0.99)
    assert picked.tolist() == [0] and used == 0.99
