"""Experiment bookkeeping: budgets, disjoint batches, pool partition, resumability, reports, selectors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from ichal.experiment import (
    ExperimentConfig,
    ExperimentError,
    foreground_random_select,
    load_records,
    main,
    make_data,
    run_protocol,
)
from ichal.experiment_plots import pick_time_diagnosis, plot_paired_differences, time_calibration
from ichal.metrics import PairedDifference
from ichal.time_intervals import applied_confidence, confidence_offset

MINI = ExperimentConfig(name="mini", pool_count=16, test_count=3, size=32, rounds=2, members=2, iterations=4,
                        batch_size=4, coreset_seed_fraction=0.125)


METHODS = ("random", "cost_sensitive")  # the resumed run: selectors are independent of each other


class Interrupt(RuntimeError):
    pass


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(1)
    return make_data(MINI, progress=False)


@pytest.fixture(scope="module")
def cost_run(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("cost")
    return out, run_protocol("cost", MINI, out, [0], data=data, progress=False)


def _by_cell(records):
    return {(r["method"], r["seed"], r["round"]): r for r in records}


def test_cost_rounds_respect_the_predicted_budget_and_label_each_stack_once(cost_run, data):
    out, records = cost_run
    cells = _by_cell(records)
    pool_ids = set(data.pool_ids)
    budget = MINI.budget_fraction * data.true_seconds(data.pool_ids)
    assert {m for m, _, _ in cells} == {"random", "uncertainty", "cost_sensitive", "acft", "foreground_random"}
    for (method, seed, round_index), record in cells.items():
        labeled = record["labeled_ids"]
        assert len(labeled) == len(set(labeled)) and set(labeled) <= pool_ids
        if round_index == 0:
            assert len(labeled) == MINI.pool_count // 2
            continue
        previous = set(cells[(method, seed, round_index - 1)]["labeled_ids"])
        picked = record["picked_ids"]
        assert len(picked) == len(set(picked)) == record["n_picked"]
        assert not previous & set(picked), "a stack was labeled twice"
        assert set(labeled) == previous | set(picked)
        assert record["budget"] == pytest.approx(budget)
        # The batch's total stays within the budget at the configured confidence, not only on average.
        assert record["picked_high_seconds"] <= budget + 1e-6 and record["budget_confidence"] == MINI.budget_confidence
        assert 0 <= record["picked_in_interval"] <= len(picked)
        # What each round predicted at pick time is kept for the next round's recalibration.
        earlier = cells[(method, seed, round_index - 1)].get("pick_history")
        if round_index == 1:  # the seed set's cross-fitted errors: each seed stack predicted by a committee that never saw it
            crossfit = json.loads((out / "cost" / f"seed{seed}" / "shared" / "crossfit.json").read_text())
            earlier = crossfit["history"]
            assert sorted(h["id"] for h in earlier) == sorted(cells[(method, seed, 0)]["labeled_ids"])
            assert sorted(sum(crossfit["folds"], [])) == sorted(h["id"] for h in earlier)
        assert record["pick_history"][:len(earlier)] == earlier
        assert [h["id"] for h in record["pick_history"][len(earlier):]] == picked
        assert record["recalibration"]["n"] == len(earlier)
        assert record["picked_true_seconds"] == pytest.approx(data.true_seconds(picked))
        assert (record["picked_oracle_seconds"] > 0) == bool(picked)
        assert record["labeled_hours"] == pytest.approx(data.true_seconds(labeled) / 3600)
        for level in ("pixel_ap", "region_ap", "frame_ap", "stack_ap"):
            value = record["metrics"][level]
            assert np.isnan(value) or 0.0 <= value <= 1.0


def test_coreset_doubles_the_labeled_set_every_round(tmp_path, data):
    records = run_protocol("coreset", MINI, tmp_path, [3], methods=["random", "uncertainty"], data=data,
                           progress=False)
    cells = _by_cell(records)
    assert cells[("full_pool", 3, 0)]["n_labeled"] == MINI.pool_count
    for method in ("random", "uncertainty"):
        assert [cells[(method, 3, r)]["n_labeled"] for r in range(3)] == [2, 4, 8]
        assert cells[(method, 3, 2)]["n_picked"] == 4
    report = (tmp_path / "coreset_table.md").read_text()
    assert "uniform-cost QBC" in report and "whole pool" in report
    assert (tmp_path / "coreset_ap.png").stat().st_size > 10_000
    assert len((tmp_path / "coreset_results.csv").read_text().splitlines()) == 1 + len(records)


def test_an_interrupted_run_resumes_to_the_same_results(tmp_path, cost_run, data):
    _, reference = cost_run
    finished = []

    def interrupt_after_three(record):
        finished.append(record)
        if len(finished) == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_protocol("cost", MINI, tmp_path, [0], methods=METHODS, data=data, progress=False,
                     on_record=interrupt_after_three)
    with pytest.raises(ExperimentError, match="--resume"):
        run_protocol("cost", MINI, tmp_path, [0], methods=METHODS, data=data, progress=False)
    redone = []
    records = run_protocol("cost", MINI, tmp_path, [0], methods=METHODS, data=data, progress=False, resume=True,
                           on_record=redone.append)
    assert len(redone) == 1 + len(METHODS) * MINI.rounds - len(finished)  # round 0: one cell shared by all
    assert not {(r["method"], r["round"]) for r in redone} & {(r["method"], r["round"]) for r in finished}
    got = _by_cell(records)
    expected = {cell: record for cell, record in _by_cell(reference).items() if cell[0] in METHODS}
    assert expected.keys() == got.keys()
    for cell, record in expected.items():
        assert got[cell]["labeled_ids"] == record["labeled_ids"]
        assert got[cell]["metrics"]["stack_ap"] == pytest.approx(record["metrics"]["stack_ap"], nan_ok=True)


def test_resuming_refuses_a_different_config_or_pool(cost_run, data):
    out, records = cost_run
    with pytest.raises(ExperimentError, match="iterations"):
        run_protocol("cost", dataclasses.replace(MINI, iterations=5), out, [0], resume=True, data=data, progress=False)
    changed = dataclasses.replace(data, pool=[*data.pool[1:], data.pool[0]])
    with pytest.raises(ExperimentError, match="data_fingerprint"):
        run_protocol("cost", MINI, out, [0], resume=True, data=changed, progress=False)
    assert load_records(out, "cost") == records
    # Where a run computes is not part of what it computes: a run started elsewhere resumes here.
    assert run_protocol("cost", dataclasses.replace(MINI, device="cuda"), out, [0], resume=True, data=data,
                        progress=False) == records


def test_foreground_random_takes_predicted_positives_first():
    rng = np.random.default_rng(0)
    stack_score = np.array([0.9, 0.1, 0.8, 0.2, 0.7])
    seconds = np.array([10.0, 1.0, 10.0, 1.0, 100.0])
    selection = foreground_random_select(stack_score, seconds, 22.0, rng)
    assert set(selection.indices[:2].tolist()) == {0, 2}  # the 100 s positive does not fit
    assert set(selection.indices[2:].tolist()) == {1, 3}
    assert selection.total_seconds == pytest.approx(22.0)


def test_cli_rejects_unknown_protocol_and_bad_seeds(tmp_path):
    with pytest.raises(SystemExit):
        main(["both", "--out", str(tmp_path)])
    with pytest.raises(ExperimentError, match="seeds"):
        run_protocol("cost", MINI, tmp_path, [1, 1], progress=False)


def test_cli_rejects_a_round_count_below_one(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["cost", "--out", str(tmp_path), "--rounds", "0", "--seeds", "0"])
    assert "rounds must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["cost", "--out", str(tmp_path), "--lookalike-fraction", "1.5", "--seeds", "0"])
    assert "lookalike_fraction must be in [0, 1], got 1.5" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "a rejected run wrote into its folder"


def test_cli_refuses_cuda_where_torch_sees_none(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv in (["hours", "--device", "cuda"], ["cost", "--config", "full"]):
        with pytest.raises(SystemExit):
            main([*argv, "--out", str(tmp_path), "--seeds", "0"])
        assert "torch sees no CUDA device" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "a rejected run wrote into its folder"


def test_paired_differences_plot_is_a_png_and_refuses_mismatched_metrics(tmp_path):
    def differences(gain: float) -> list[PairedDifference]:
        return [PairedDifference(metric, 0.8, 0.8 + gain, gain, gain - 0.01, gain + 0.01) for metric in ("pixel_ap", "dice")]

    path = tmp_path / "pairs.png"
    plot_paired_differences([differences(0.05), differences(-0.05), differences(0.0)], differences(0.0),
                            ("60 training stacks", "200 training stacks"), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="same metrics"):
        plot_paired_differences([differences(0.05)[:1]], differences(0.0), ("a", "b"), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_each_cost_round_is_budgeted_at_the_confidence_its_earlier_rounds_overruns_call_for(cost_run):
    """As the app does: round 1 at the asked confidence, each later round raised by the earlier batches that took
    longer than the budget (`ichal.time_intervals.confidence_offset`), from the batches' true seconds, unless
    nothing fits at the raised one."""
    _, records = cost_run
    for method in {r["method"] for r in records}:
        outcomes: list[dict] = []
        for record in sorted((r for r in records if r["method"] == method and r["round"] > 0), key=lambda r: r["round"]):
            expected = applied_confidence(MINI.budget_confidence, confidence_offset(outcomes, MINI.confidence_step))
            # At the asked confidence instead when nothing fits at the raised one.
            assert record["applied_confidence"] in (pytest.approx(expected), MINI.budget_confidence)
            if record["n_picked"]:
                outcomes.append({"measured_seconds": record["picked_true_seconds"], "budget_seconds": record["budget"],
                                 "confidence": MINI.budget_confidence})
            assert record["batch_outcomes"] == outcomes


def test_time_calibration_reports_each_methods_batches_before_and_after(cost_run):
    out, records = cost_run
    rows = {r["method"]: r for r in time_calibration(records)}
    with_batches = {r["method"] for r in records if r["round"] > 0 and r["n_picked"]}
    assert set(rows) == with_batches
    for method, row in rows.items():
        batches = [r for r in records if r["method"] == method and r["round"] > 0 and r["n_picked"]]
        assert row["batches"] == len(batches) and row["stacks"] == sum(r["n_picked"] for r in batches)
        assert 0.0 <= row["coverage"] <= 1.0 and 0.0 <= row["over_budget"] <= 1.0
        true, raw = batches[0]["picked_true_seconds"], batches[0]["picked_raw_predicted_seconds"]
        if len(batches) == 1:
            assert row["batch_error_raw"] == pytest.approx((true - raw) / raw)
    table, diagnosis = (out / "cost_time_calibration.md").read_text().split("\n\n")
    assert table.count("\n") == 1 + len(rows) and diagnosis.startswith("Pick-time predictor over")


def test_time_calibration_figures_on_a_made_up_run():
    def batch(true, predicted, raw, budget, hits, n, picked_raw, pool_raw):
        return {"method": "m", "round": 1, "n_picked": n, "picked_true_seconds": true, "picked_predicted_seconds": predicted,
                "picked_raw_predicted_seconds": raw, "budget": budget, "picked_in_interval": hits, "budget_confidence": 0.8,
                "log_error": {"picked_raw": picked_raw, "pool_raw": pool_raw, "picked_recalibrated": 0.1,
                              "pool_recalibrated": 0.0, "picked_abs_recalibrated": [0.2] * n},
                "recalibration": {"empirical": False}}
    # The second batch budgeted at a raised confidence; the first comes from a run before that rule (none recorded).
    rows = time_calibration([batch(300.0, 200.0, 100.0, 250.0, 2, 2, 1.0, 0.5),
                             batch(100.0, 200.0, 100.0, 250.0, 1, 3, 0.7, 0.5) | {"applied_confidence": 0.92}])
    assert len(rows) == 1
    row = rows[0]
    assert row["batch_error_raw"] == pytest.approx(np.median([2.0, 0.0]))
    assert row["batch_error"] == pytest.approx(np.median([0.5, -0.5]))
    assert row["batches_within"] == 0.0  # both batches 50% off
    close = time_calibration([batch(205.0, 200.0, 100.0, 250.0, 2, 2, 1.0, 0.5), batch(300.0, 200.0, 100.0, 250.0, 2, 2, 1.0, 0.5)])
    assert close[0]["batches_within"] == 0.5
    assert row["over_budget"] == 0.5 and row["coverage"] == pytest.approx(3 / 5)
    assert row["applied_confidence"] == pytest.approx(0.86)
    assert row["selection_effect_raw"] == pytest.approx(0.35) and row["selection_effect"] == pytest.approx(0.1)


def test_pick_time_diagnosis_counts_each_revealed_stack_once_and_splits_short_from_long():
    crossfit = [{"id": "a", "predicted_log_seconds": np.log(100.0), "true_seconds": 50.0, "source": "crossfit"},
                {"id": "b", "predicted_log_seconds": np.log(100.0), "true_seconds": 400.0, "source": "crossfit"}]
    records = [
        {"seed": 0, "method": "random", "pick_history": crossfit + [
            {"id": "c", "predicted_log_seconds": np.log(200.0), "true_seconds": 800.0}]},
        {"seed": 0, "method": "uncertainty", "pick_history": crossfit + [
            {"id": "d", "predicted_log_seconds": np.log(300.0), "true_seconds": 30.0}]},
        {"seed": 0, "method": "random", "round": 0},
    ]
    diagnosis = pick_time_diagnosis(records, short_seconds=120.0)
    assert diagnosis["n"] == 4 and diagnosis["n_short"] == 2  # the shared seed-set stacks once, not per method
    assert diagnosis["median_log_error_short"] == pytest.approx(np.median([np.log(0.5), np.log(0.1)]))
    assert diagnosis["median_log_error_long"] == pytest.approx(np.median([np.log(4.0), np.log(4.0)]))
    assert -1.0 <= diagnosis["correlation"] <= 1.0
    assert pick_time_diagnosis(records[2:])["n"] == 0
