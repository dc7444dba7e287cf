"""Tests for budgeted selection: exact knapsack against brute force, baselines, ACFT, cold start, audit stacks."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ichal.selection import (
    Selection,
    SelectionInputError,
    acft_select,
    cheap_image_features,
    cold_start_select,
    draw_audit_stacks,
    knapsack_select,
    random_select,
    roi_select,
    select_with_audits,
    uncertainty_select,
)
from ichal.time_intervals import log_error_model, select_within_budget_at_confidence

_instances = st.integers(min_value=0, max_value=9).flatmap(
    lambda n: st.tuples(
        st.lists(st.floats(0.0, 10.0), min_size=n, max_size=n),
        st.lists(st.floats(0.0, 400.0), min_size=n, max_size=n),
        st.floats(0.0, 1500.0),
        st.sampled_from([1.0, 7.5, 10.0, 60.0]),
    )
)


def _brute_force_best(values, seconds, budget_seconds, resolution_seconds) -> float:
    # Whole steps of resolution_seconds that cover each time, and that the budget covers (exact in floats).
    weights = [math.ceil(s / resolution_seconds) for s in seconds]
    weights = [w + (w * resolution_seconds < s) for w, s in zip(weights, seconds)]
    capacity = math.floor(budget_seconds / resolution_seconds)
    capacity -= capacity * resolution_seconds > budget_seconds
    best = 0.0
    for size in range(len(values) + 1):
        for subset in itertools.combinations(range(len(values)), size):
            if sum(weights[i] for i in subset) <= capacity:
                best = max(best, math.fsum(values[i] for i in subset))
    return best


@settings(max_examples=300, deadline=None)
@given(_instances)
def test_knapsack_equals_brute_force_and_never_exceeds_budget(instance):
    values, seconds, budget_seconds, resolution_seconds = instance
    selection = knapsack_select(np.array(values), np.array(seconds), budget_seconds, resolution_seconds)
    chosen = selection.indices.tolist()
    assert len(set(chosen)) == len(chosen)
    assert math.fsum(seconds[i] for i in chosen) <= budget_seconds + 1e-9
    best = _brute_force_best(values, seconds, budget_seconds, resolution_seconds)
    assert selection.total_value == pytest.approx(best, abs=1e-9)
    assert selection.total_value == pytest.approx(math.fsum(values[i] for i in chosen))
    assert selection.total_seconds == pytest.approx(math.fsum(seconds[i] for i in chosen))


def test_knapsack_beats_uniform_cost_when_costs_differ():
    values = np.array([1.0, 0.6, 0.6, 0.6])
    seconds = np.array([300.0, 100.0, 100.0, 100.0])
    assert set(knapsack_select(values, seconds, 300.0).indices.tolist()) == {1, 2, 3}
    assert uncertainty_select(values, seconds, 300.0).indices.tolist() == [0]


def test_knapsack_orders_batch_by_value_per_second():
    selection = knapsack_select(np.array([1.0, 3.0, 2.0]), np.array([100.0, 100.0, 10.0]), 1000.0)
    assert selection.indices.tolist() == [2, 1, 0]


def test_knapsack_edge_cases():
    empty = knapsack_select(np.zeros(0), np.zeros(0), 100.0)
    assert empty.indices.size == 0 and empty.total_value == 0.0 and empty.total_seconds == 0.0
    # zero budget: only stacks predicted to take no time at all
    assert knapsack_select(np.array([1.0, 2.0]), np.array([0.0, 5.0]), 0.0).indices.tolist() == [0]
    # a stack longer than the budget is never chosen, however long
    assert knapsack_select(np.array([9.0, 1.0]), np.array([500.0, 50.0]), 100.0).indices.tolist() == [1]
    assert knapsack_select(np.array([9.0, 1.0]), np.array([1e300, 50.0]), 100.0).indices.tolist() == [1]
    # zero-value stacks are not chosen even if they fit
    assert knapsack_select(np.array([0.0, 1.0]), np.array([10.0, 10.0]), 100.0).indices.tolist() == [1]
    # a time just over a resolution step rounds up: 2 x 10.5 s needs 40 s of budget at 10 s resolution
    assert len(knapsack_select(np.ones(2), np.full(2, 10.5), 39.0).indices) == 1


def test_knapsack_ties_are_deterministic():
    values, seconds = np.ones(12), np.full(12, 60.0)
    first = knapsack_select(values, seconds, 300.0)
    assert len(first.indices) == 5
    for _ in range(3):
        assert knapsack_select(values, seconds, 300.0).indices.tolist() == first.indices.tolist()


def test_knapsack_refuses_a_choice_table_over_the_memory_limit():
    rng = np.random.default_rng(0)
    with pytest.raises(SelectionInputError, match="coarser resolution_seconds"):
        knapsack_select(rng.random(1000), rng.uniform(1, 1e4, 1000), 1e6, 1.0, max_table_bytes=2**20)


@pytest.mark.parametrize(
    "call",
    [
        lambda v, s, b: knapsack_select(v, s, b),
        lambda v, s, b: uncertainty_select(v, s, b),
        lambda v, s, b: acft_select(v, s, b, np.random.default_rng(0)),
        lambda v, s, b: random_select(s, b, np.random.default_rng(0), values=v),
        lambda v, s, b: roi_select(v, s, b),
        lambda v, s, b: cold_start_select(np.zeros((len(v), 3)), s, b, np.random.default_rng(0)),
    ],
)
def test_selectors_reject_bad_input(call):
    good_v, good_s = np.ones(3), np.full(3, 10.0)
    with pytest.raises(SelectionInputError, match="NaN"):
        call(good_v, np.array([1.0, np.nan, 2.0]), 100.0)
    with pytest.raises(SelectionInputError, match="seconds must be >= 0"):
        call(good_v, np.array([1.0, -1.0, 2.0]), 100.0)
    with pytest.raises(SelectionInputError, match="budget_seconds"):
        call(good_v, good_s, -5.0)
    with pytest.raises(SelectionInputError, match="budget_seconds"):
        call(good_v, good_s, float("nan"))
    with pytest.raises(SelectionInputError, match="shape"):
        call(np.ones(2), good_s, 100.0)


def test_values_must_be_finite_and_non_negative():
    with pytest.raises(SelectionInputError, match="NaN"):
        knapsack_select(np.array([np.nan]), np.ones(1), 10.0)
    with pytest.raises(SelectionInputError, match="values must be >= 0"):
        uncertainty_select(np.array([-1.0]), np.ones(1), 10.0)


def _fits_no_more(selection: Selection, seconds: np.ndarray, budget_seconds: float) -> bool:
    left = budget_seconds - selection.total_seconds
    rest = np.setdiff1d(np.arange(len(seconds)), selection.indices)
    return bool((seconds[rest] > left).all())


def test_random_select_fills_the_budget_in_random_order_reproducibly():
    rng = np.random.default_rng(1)
    seconds = rng.uniform(10, 600, 50)
    first = random_select(seconds, 3000.0, np.random.default_rng(7))
    again = random_select(seconds, 3000.0, np.random.default_rng(7))
    assert first.indices.tolist() == again.indices.tolist()
    assert first.total_seconds <= 3000.0 and first.total_value == 0.0
    assert _fits_no_more(first, seconds, 3000.0)
    assert first.indices.tolist() != sorted(first.indices.tolist())


def test_uncertainty_select_takes_values_descending_and_skips_what_does_not_fit():
    values = np.array([0.5, 0.9, 0.7, 0.1])
    seconds = np.array([150.0, 300.0, 250.0, 50.0])
    selection = uncertainty_select(values, seconds, 400.0)
    assert selection.indices.tolist() == [1, 3]  # 0.7 and 0.5 no longer fit after the 300 s stack
    assert selection.total_value == pytest.approx(1.0) and selection.total_seconds == pytest.approx(350.0)


def test_roi_select_takes_value_per_second_descending_while_it_fits():
    values = np.array([0.9, 0.5, 0.3, 0.2, 0.0])
    seconds = np.array([300.0, 100.0, 30.0, 400.0, 1.0])  # ratios 0.003, 0.005, 0.01, 0.0005, 0
    selection = roi_select(values, seconds, 420.0)
    # 30 s (0.01/s), then 100 s (0.005/s); the 300 s stack no longer fits, the 400 s one neither; the zero-value
    # stack is never taken although it would fit. By value alone (uncertainty) the 300 s stack comes first.
    assert selection.indices.tolist() == [2, 1]
    assert selection.total_seconds == pytest.approx(130.0) and selection.total_value == pytest.approx(0.8)
    assert uncertainty_select(values, seconds, 420.0).indices.tolist()[0] == 0


def test_roi_select_takes_free_stacks_first_and_never_exceeds_the_budget():
    rng = np.random.default_rng(3)
    values, seconds = rng.random(60), rng.uniform(5, 900, 60)
    seconds[7] = 0.0
    selection = roi_select(values, seconds, 2500.0)
    assert selection.indices[0] == 7
    assert selection.total_seconds <= 2500.0
    ratio = values[selection.indices[1:]] / seconds[selection.indices[1:]]
    assert (np.diff(ratio) <= 0).all(), "picked out of value-per-second order"
    assert _fits_no_more(selection, seconds, 2500.0)
    # A knapsack packs at least as much value into the same budget.
    assert knapsack_select(values, seconds, 2500.0, 1.0).total_value >= selection.total_value - 1e-9


def test_acft_select_with_omega_one_takes_the_top_batch():
    rng = np.random.default_rng(2)
    scores = rng.random(40)
    seconds = np.full(40, 60.0)
    selection = acft_select(scores, seconds, 600.0, np.random.default_rng(3), omega=1)
    assert set(selection.indices.tolist()) == set(np.argsort(-scores)[:10].tolist())


def test_acft_select_samples_from_the_top_omega_b_candidates_within_budget():
    scores = np.linspace(1.0, 0.0, 100)  # index order is score order
    seconds = np.full(100, 60.0)
    picks = set()
    for seed in range(20):
        selection = acft_select(scores, seconds, 300.0, np.random.default_rng(seed), omega=5)
        assert len(selection.indices) == 5 and selection.total_seconds <= 300.0
        picks |= set(selection.indices.tolist())
    assert max(picks) < 25 and len(picks) > 5  # b = 5, pool = 25, randomized draws


def test_cold_start_select_picks_one_stack_per_cluster_first():
    rng = np.random.default_rng(4)
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    features = np.concatenate([c + rng.normal(0, 0.1, (10, 2)) for c in centers])
    selection = cold_start_select(features, np.full(30, 100.0), 300.0, np.random.default_rng(5))
    assert sorted(int(i) // 10 for i in selection.indices) == [0, 1, 2]
    assert selection.total_seconds == pytest.approx(300.0)


def test_cold_start_select_stays_within_budget_and_handles_nothing_fitting():
    rng = np.random.default_rng(6)
    seconds = rng.uniform(50, 500, 60)
    selection = cold_start_select(rng.random((60, 5)), seconds, 1200.0, np.random.default_rng(0))
    assert selection.total_seconds <= 1200.0 and _fits_no_more(selection, seconds, 1200.0)
    assert cold_start_select(rng.random((3, 5)), np.full(3, 100.0), 50.0, rng).indices.size == 0


def test_cheap_image_features_describe_hu_content():
    image = np.full((6, 32, 32), -1000.0, dtype=np.float32)
    image[:, 4:28, 4:28] = 30.0  # brain
    image[5, 10:14, 10:14] = 70.0  # blood in the last (upper) slice
    features = cheap_image_features(image)
    assert features.shape == (22,)
    assert features[:16].sum() == pytest.approx(1.0)
    assert features[-3:].tolist() == [0.0, 0.0, 1.0]
    with pytest.raises(SelectionInputError, match="Z, Y, X"):
        cheap_image_features(np.zeros((4, 4)))


# -- audit stacks (issue 20) ---------------------------------------------------------------------
def test_audit_draws_are_reproducible_per_draw_number_and_differ_between_draws():
    first = draw_audit_stacks(50, 4, seed=0, draw_number=7)
    assert first.tolist() == draw_audit_stacks(50, 4, seed=0, draw_number=7).tolist()
    assert len(set(first.tolist())) == 4 and all(0 <= i < 50 for i in first)
    others = {tuple(draw_audit_stacks(50, 4, seed=0, draw_number=n).tolist()) for n in range(8, 18)}
    assert tuple(first.tolist()) not in others and len(others) == 10
    assert sorted(draw_audit_stacks(3, 5, seed=0, draw_number=1).tolist()) == [0, 1, 2]  # fewer stacks than asked
    assert draw_audit_stacks(10, 0, seed=0, draw_number=1).size == 0


def test_audit_draws_are_uniform_over_the_pool():
    counts = np.bincount(np.concatenate([draw_audit_stacks(10, 2, seed=3, draw_number=n) for n in range(5000)]),
                         minlength=10)
    assert counts.min() > 900 and counts.max() < 1100  # 1000 each expected


def _rest_by_value(values):
    def select_rest(rest, seconds, budget):
        return uncertainty_select(values[rest], seconds, budget).indices
    return select_rest


def test_audit_stacks_come_first_and_the_strategy_fills_the_budget_left():
    seconds = np.array([100.0, 200.0, 300.0, 50.0, 400.0])
    values = np.array([0.0, 0.0, 0.9, 0.8, 0.7])
    picked = select_with_audits(seconds, 650.0, np.array([1, 0]), _rest_by_value(values))
    assert picked.tolist() == [1, 0, 2, 3]  # audits 1 and 0 (300 s), then by value under the 350 s left


def test_audit_stacks_that_do_not_fit_are_left_out_in_draw_order_and_never_picked_by_the_strategy():
    seconds = np.array([400.0, 300.0, 50.0, 50.0])
    values = np.array([1.0, 1.0, 0.5, 0.5])
    picked = select_with_audits(seconds, 500.0, np.array([0, 1]), _rest_by_value(values))
    assert picked.tolist() == [0, 2, 3]  # the second audit would overrun: the rest fill 100 s
    assert select_with_audits(seconds, 100.0, np.array([0, 1]), _rest_by_value(values)).tolist() == [2, 3]  # no audit fits
    # Audit 2 would fit after audit 0 but comes after audit 1, which does not: draw order is kept (a prefix
    # of a random order is random), and a drawn stack is never the strategy's pick.
    assert select_with_audits(seconds, 500.0, np.array([0, 1, 2]), _rest_by_value(values)).tolist() == [0, 3]
    # Not drawn, stack 1 is the strategy's to pick.
    assert select_with_audits(seconds, 700.0, np.array([], dtype=int), _rest_by_value(values)).tolist() == [0, 1]


def test_a_worklist_with_audits_stays_within_the_budget_at_its_confidence():
    rng = np.random.default_rng(0)
    medians = rng.uniform(120.0, 900.0, 30)
    values = rng.uniform(0.0, 1.0, 30)
    errors = log_error_model([], 0.5)
    audit = np.array([4, 9])  # medians 754 s and 849 s

    def select(times, budget_seconds):
        return select_with_audits(times, budget_seconds, audit, _rest_by_value(values))

    leading = {}
    for budget in (600.0, 1800.0, 7200.0):
        picked, _, high = select_within_budget_at_confidence(select, medians, budget, errors, 0.8)
        assert 0 < high <= budget
        leading[budget] = [i for i in picked.tolist() if i in audit]
    # 600 s: no audit fits, the strategy's quick stacks do; 1800 s: only the first; 7200 s: both, first.
    assert leading == {600.0: [], 1800.0: [4], 7200.0: [4, 9]}
