"""Per-hour protocol (issue 18): per-seed pools, 5%-of-true-time budgets, oracle and ROI selectors, the
CSV, parallel workers that resume to a one-process run's records, and P1 on made-up curves."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import t as student_t

from ichal.experiment import (
    PROTOCOL_METHODS,
    ExperimentConfig,
    ExperimentError,
    Task,
    make_data,
    next_runnable_task,
    protocol_data_config,
    run_protocol,
)
from ichal.experiment_hours import (
    curve_at_hours,
    curve_band,
    hours_to_reach,
    matched_hours_differences,
    p1_hours,
    p1_table,
    paired_mean_interval,
    paired_ratio_interval,
)

MINI = ExperimentConfig(name="mini_hours", pool_count=12, test_count=3, size=32, rounds=2, members=2, iterations=4,
                        batch_size=4, hours_seed_fraction=0.25, hours_budget_fraction=0.15)
SEEDS = (0, 1)
ISSUE_COLUMNS = ("seed", "method", "round", "labeled_true_hours", "batch_predicted_seconds", "batch_true_seconds",
                 "pixel_ap", "frame_ap", "stack_ap", "dice")


@pytest.fixture(scope="module")
def hours_run(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("hours")
    return out, run_protocol("hours", MINI, out, list(SEEDS), progress=False)


@pytest.fixture(scope="module")
def seed_data():
    return {seed: make_data(protocol_data_config("hours", MINI, seed), progress=False) for seed in SEEDS}


def _by_cell(records):
    return {(r["method"], r["seed"], r["round"]): r for r in records}


def test_each_seed_labels_its_own_pool_within_five_percent_budgets(hours_run, seed_data):
    out, records = hours_run
    cells = _by_cell(records)
    assert {m for m, _, _ in cells} == {*PROTOCOL_METHODS["hours"], "full_pool"}
    fingerprints = {seed: json.loads((out / "hours" / f"seed{seed}" / "data.json").read_text()) for seed in SEEDS}
    assert fingerprints[0]["data_fingerprint"] != fingerprints[1]["data_fingerprint"]
    assert fingerprints[0]["data_fingerprint"] == seed_data[0].fingerprint()
    for (method, seed, round_index), record in cells.items():
        data = seed_data[seed]
        labeled = record["labeled_ids"]
        assert len(labeled) == len(set(labeled)) and set(labeled) <= set(data.pool_ids)
        assert record["labeled_hours"] == pytest.approx(data.true_seconds(labeled) / 3600)
        if method == "full_pool":
            assert len(labeled) == MINI.pool_count
            continue
        if round_index == 0:
            assert len(labeled) == round(MINI.hours_seed_fraction * MINI.pool_count)
            continue
        previous = set(cells[(method, seed, round_index - 1)]["labeled_ids"])
        picked = record["picked_ids"]
        assert not previous & set(picked), "a stack was labeled twice"
        assert set(labeled) == previous | set(picked)
        budget = MINI.hours_budget_fraction * data.true_seconds(data.pool_ids)
        assert record["budget"] == pytest.approx(budget)
        assert record["picked_true_seconds"] == pytest.approx(data.true_seconds(picked))
        if method == "oracle_cost":
            # The knapsack on TRUE seconds: exactly within budget, and no unpicked stack fits what is left
            # (times rounded up to the knapsack's 10 s steps, the budget down).
            assert record["picked_true_seconds"] <= budget
            steps = lambda ids: sum(math.ceil(data.true_seconds([i]) / MINI.knapsack_resolution_seconds) for i in ids)
            left = math.floor(budget / MINI.knapsack_resolution_seconds) - steps(picked)
            rest = set(data.pool_ids) - set(labeled)
            assert all(steps([i]) > left for i in rest)
        else:
            assert record["picked_high_seconds"] <= budget + 1e-6


def test_hours_csv_has_a_row_per_seed_method_round_with_the_issue_columns(hours_run):
    out, records = hours_run
    with (out / "hours_results.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert set(ISSUE_COLUMNS) <= set(rows[0])
    assert len(rows) == len(SEEDS) * (len(PROTOCOL_METHODS["hours"]) * (MINI.rounds + 1) + 1)
    cells = _by_cell(records)
    for row in rows:
        record = cells[(row["method"], int(row["seed"]), int(row["round"]))]
        assert float(row["labeled_true_hours"]) == pytest.approx(record["labeled_hours"])
        if int(row["round"]) > 0:
            assert float(row["batch_true_seconds"]) == pytest.approx(record["picked_true_seconds"])
            assert float(row["batch_predicted_seconds"]) == pytest.approx(record["picked_predicted_seconds"])
    for name in ("hours_ap.png", "hours_gain.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "cost_sensitive / uncertainty" in (out / "hours_p1.md").read_text()
    assert "| cost_sensitive - uncertainty |" in (out / "hours_p1.md").read_text()


def test_two_workers_resume_to_the_records_of_one_process(tmp_path, hours_run):
    _, reference = hours_run
    methods = ("roi",)
    first = run_protocol("hours", MINI, tmp_path, list(SEEDS), methods=methods, progress=False, workers=2)
    expected = {cell: r for cell, r in _by_cell(reference).items() if cell[0] in (*methods, "full_pool")}

    def same(records):
        got = _by_cell(records)
        assert got.keys() == expected.keys()
        for cell, record in expected.items():
            assert got[cell]["labeled_ids"] == record["labeled_ids"], cell
            assert got[cell]["metrics"]["pixel_ap"] == pytest.approx(record["metrics"]["pixel_ap"], nan_ok=True)

    same(first)
    # A worker killed inside a cell leaves no record (written last, atomically): the cell is computed again.
    lost = [tmp_path / "hours" / "seed0" / "roi" / "round1.json", tmp_path / "hours" / "seed0" / "roi" / "round2.json",
            tmp_path / "hours" / "seed1" / "roi" / "round2.json"]
    for path in lost:
        path.unlink()
    redone = []
    same(run_protocol("hours", MINI, tmp_path, list(SEEDS), methods=methods, progress=False, workers=2,
                      resume=True, on_record=redone.append))
    assert sorted((r["seed"], r["method"], r["round"]) for r in redone) == [(0, "roi", 1), (0, "roi", 2), (1, "roi", 2)]
    # A seed whose pool the generator no longer gives is refused.
    data_file = tmp_path / "hours" / "seed1" / "data.json"
    data_file.write_text(json.dumps(json.loads(data_file.read_text()) | {"data_fingerprint": "0" * 16}))
    with pytest.raises(ExperimentError, match="seed 1"):
        run_protocol("hours", MINI, tmp_path, list(SEEDS), methods=methods, progress=False, resume=True)


def test_tasks_run_seed_after_seed():
    tasks = [Task("hours", MINI, None, seed, method) for seed in (0, 1, 2) for method in (None, "random", "roi")]
    # Nothing ready: the first seed's shared cells, then (a second worker) the next seed's.
    assert next_runnable_task(tasks, set()) == tasks[0]
    assert next_runnable_task(tasks[1:], set()) == tasks[3]
    # Seed 0 ready: its chains come before any later seed's shared cells.
    assert next_runnable_task(tasks[1:3] + tasks[4:], {0}) == tasks[1]
    assert next_runnable_task(tasks[4:], {0}) == tasks[6]
    assert next_runnable_task(tasks[4:6], {1}) == tasks[4]
    assert next_runnable_task([], {0, 1, 2}) is None


@pytest.mark.parametrize("workers", [1, 2])
def test_no_task_starts_after_the_deadline_and_resume_finishes(tmp_path, hours_run, capsys, workers):
    _, reference = hours_run
    methods = ("random",)
    assert run_protocol("hours", MINI, tmp_path, list(SEEDS), methods=methods, progress=False, workers=workers,
                        stop_starting_after=0) == []
    assert "4 of 4 (seed, method) tasks not started; continue with --resume" in capsys.readouterr().err
    assert not list(tmp_path.rglob("round*.json"))
    finished = run_protocol("hours", MINI, tmp_path, list(SEEDS), methods=methods, progress=False,
                            workers=workers, resume=True, stop_starting_after=3600)
    expected = {cell: r["labeled_ids"] for cell, r in _by_cell(reference).items() if cell[0] in (*methods, "full_pool")}
    assert {cell: r["labeled_ids"] for cell, r in _by_cell(finished).items()} == expected
    assert "not started" not in capsys.readouterr().err
    with pytest.raises(ExperimentError, match="stop_starting_after"):
        run_protocol("hours", MINI, tmp_path, list(SEEDS), resume=True, stop_starting_after=-1)


def test_hours_generates_its_own_data_per_seed(tmp_path, seed_data):
    with pytest.raises(ExperimentError, match="per-hour seeds generate their own pools"):
        run_protocol("hours", MINI, tmp_path, [0], data=seed_data[0], progress=False)
    assert protocol_data_config("hours", MINI, 0).data_seed != protocol_data_config("hours", MINI, 1).data_seed
    assert protocol_data_config("cost", MINI, 3) == MINI


def test_hours_to_reach_interpolates_the_first_crossing():
    assert hours_to_reach([1.0, 2.0, 3.0], [0.5, 0.7, 0.8], 0.76) == pytest.approx(2.6)
    assert hours_to_reach([1.0, 2.0, 3.0], [0.5, 0.9, 0.6], 0.7) == pytest.approx(1.5)  # first crossing counts
    assert hours_to_reach([1.0, 2.0], [0.8, 0.9], 0.7) == 1.0  # the seed set already reaches it
    assert hours_to_reach([1.0, 2.0], [0.5, 0.6], 0.7) == math.inf
    assert hours_to_reach([1.0, 2.0, 4.0], [0.5, float("nan"), 0.9], 0.7) == pytest.approx(2.5)


def _record(method, seed, round_index, hours, pixel, stack=0.5):
    return {"method": method, "seed": seed, "round": round_index, "labeled_hours": hours,
            "metrics": {"pixel_ap": pixel, "stack_ap": stack, "frame_ap": pixel, "dice": pixel}}


def test_p1_hours_use_each_seeds_own_whole_pool_target():
    records = [_record("full_pool", 0, 0, 9.0, 0.8), _record("full_pool", 1, 0, 9.0, 0.6)]
    for seed in (0, 1):
        records += [_record("cost_sensitive", seed, r, h, ap) for r, (h, ap) in enumerate([(1, 0.5), (2, 0.7), (3, 0.8)])]
        records += [_record("random", seed, r, h, ap) for r, (h, ap) in enumerate([(1, 0.5), (2, 0.55), (3, 0.56)])]
    hours = p1_hours(records, "pixel_ap")
    assert hours["cost_sensitive"][0] == pytest.approx(2.6)  # target 0.76
    assert hours["cost_sensitive"][1] == pytest.approx(1.35)  # target 0.57
    assert hours["random"][0] == math.inf and hours["random"][1] == math.inf
    table = p1_table(records, {}, fractions=(0.95,))
    assert "2/2 reached" in table and "0/2 reached" in table
    # At a lower target random reaches seed 1 (0.51 at 1.2 h) but not seed 0 (0.68).
    lower = p1_table(records, {}, fractions=(0.95, 0.85)).split("Target: ")
    assert len(lower) == 3 and lower[2].startswith("85%") and "1/2 reached" in lower[2] and "1/2 reached" not in lower[1]


def test_paired_ratio_interval_of_median_hours():
    denominator = np.array([2.0, 4.0, 6.0, 3.0, 5.0])
    exact = paired_ratio_interval(0.5 * denominator, denominator)
    assert exact == {"ratio": pytest.approx(0.5), "low": pytest.approx(0.5), "high": pytest.approx(0.5), "undefined": 0.0}
    noisy = paired_ratio_interval(denominator * np.array([0.3, 0.6, 0.5, 0.4, 0.7]), denominator)
    assert noisy["low"] < noisy["ratio"] < noisy["high"] and noisy["high"] < 1.0
    # Never reached (inf) on fewer than half the seeds: the median, so the ratio, stays finite.
    censored = paired_ratio_interval([1.0, 2.0, math.inf], [2.0, 4.0, 6.0])
    assert censored["ratio"] == pytest.approx(0.5) and censored["high"] == math.inf
    assert math.isnan(paired_ratio_interval([math.inf] * 3, [math.inf] * 3)["ratio"])
    with pytest.raises(ValueError, match="one value per seed"):
        paired_ratio_interval([1.0, 2.0], [1.0])


def test_curve_band_is_the_t_interval_over_seeds_and_never_extrapolates():
    grid = np.array([0.5, 1.0, 1.5, 2.0, 3.0])
    curves = [([1.0, 2.0], [0.4, 0.6]), ([1.0, 2.0], [0.6, 0.8])]
    mean, low, high = curve_band(curves, grid)
    assert np.isnan(mean[[0, 4]]).all()
    assert mean[1:4] == pytest.approx([0.5, 0.6, 0.7])
    half = student_t.ppf(0.975, 1) * np.std([0.4, 0.6], ddof=1) / np.sqrt(2)
    assert high[1:4] - mean[1:4] == pytest.approx([half] * 3)
    assert mean[1:4] - low[1:4] == pytest.approx([half] * 3)


def test_curve_at_hours_interpolates_inside_and_is_nan_outside():
    assert curve_at_hours([1.0, 2.0, 4.0], [0.4, 0.6, 0.7], 3.0) == pytest.approx(0.65)
    assert math.isnan(curve_at_hours([1.0, 2.0], [0.4, 0.6], 2.5))
    assert math.isnan(curve_at_hours([1.0, 2.0], [0.4, 0.6], 0.5))
    assert math.isnan(curve_at_hours([1.0, 2.0], [float("nan")] * 2, 1.5))


def test_paired_mean_interval_covers_the_mean_and_counts_positive_seeds():
    result = paired_mean_interval([0.02, 0.03, 0.01, 0.04, 0.02])
    assert result["mean"] == pytest.approx(0.024) and 0.0 < result["low"] < result["mean"] < result["high"]
    assert result["positive"] == 5 and result["n"] == 5
    mixed = paired_mean_interval([0.05, -0.04, 0.03, -0.05])
    assert mixed["low"] < 0.0 < mixed["high"] and mixed["positive"] == 2
    with pytest.raises(ValueError, match="one per seed"):
        paired_mean_interval([0.1, float("nan")])


def test_matched_hours_compare_on_the_hours_both_methods_covered():
    records = []
    for seed, lift in ((0, 0.05), (1, 0.03), (2, 0.04)):
        # `cost_sensitive` spends 3 h and sits `lift` above `random` at every hour; `random` spends only 2 h,
        # then rises steeply. Compared at 2 h (random's end), never at 3 h, where random has no point.
        records += [_record("random", seed, r, h, ap) for r, (h, ap) in enumerate([(1, 0.4), (2, 0.5)])]
        records += [_record("cost_sensitive", seed, r, h, ap + lift)
                    for r, (h, ap) in enumerate([(1, 0.4), (2, 0.5), (3, 0.6)])]
    result = matched_hours_differences(records, "pixel_ap", "cost_sensitive", "random")
    assert result["hours"] == {0: 2.0, 1: 2.0, 2: 2.0}
    assert result["at_end"]["mean"] == pytest.approx(0.04) and result["at_end"]["positive"] == 3
    assert result["mean_over_hours"]["mean"] == pytest.approx(0.04)
    reverse = matched_hours_differences(records, "pixel_ap", "random", "cost_sensitive")
    assert reverse["at_end"]["mean"] == pytest.approx(-0.04) and reverse["at_end"]["high"] < 0.0
    assert matched_hours_differences(records, "pixel_ap", "cost_sensitive", "uncertainty") == {}
    assert "| cost_sensitive - random | +0.040" in p1_table(records, {})
