"""The dashboard page without a server: an empty state says what to do, data becomes chart series (issue 20)."""

from __future__ import annotations

import pytest

from ichal.dashboard import dashboard_data, render_page
from ichal.learning_curve import AuditPoint, CurvePoint, advice_from_curves


def curve_records(values):
    return [{"model_version": f"v{i}", "hours": float(i + 1), "stacks": 3, "metrics": {"pixel_ap": v, "stack_ap": None, "dice": v}}
            for i, v in enumerate(values)]


def audit_records(gains):
    """Stored audit points of consecutive trainings v{i} -> v{i+1}, an hour apart, gaining `gains` in pixel AP and Dice."""
    return [{"old_version": f"v{i}", "new_version": f"v{i + 1}", "old_hours": float(i + 1), "new_hours": float(i + 2),
             "stacks": 2, "old_metrics": {"pixel_ap": 0.5, "stack_ap": None, "dice": 0.5},
             "new_metrics": {"pixel_ap": 0.5 + g, "stack_ap": None, "dice": 0.5 + g}, "images": [f"ct_{i}a", f"ct_{i}b"]}
            for i, g in enumerate(gains)]


def data_of(records, label_times=(), reviews=(), busy=False, audits=()):
    points = [CurvePoint(r["model_version"], r["hours"], r["stacks"], r["metrics"]) for r in records]
    advice = advice_from_curves(points, [AuditPoint.of(r) for r in audits])
    return dashboard_data(records, list(audits), advice, label_times, reviews, [], [], busy)


def test_an_empty_dashboard_says_what_is_missing_and_does_not_reload():
    page = render_page(data_of([]), "now")
    assert "not enough batches yet" in page
    assert "no batch scored yet: save labels, then train" in page and "no measured time yet" in page
    assert "no audit gain yet: label a worklist's audit stacks, then train" in page
    assert "source: prequential (biased on actively picked stacks)" in page
    assert 'http-equiv="refresh"' not in page
    assert 'id="series-' not in page


def test_curve_calibration_and_annotators_become_series_and_a_busy_page_reloads():
    times = [{"image": f"ct_{i}", "client": "ann", "seconds": 300.0 + i, "at_serve": {"predicted_seconds": 240.0}}
             for i in range(3)]
    reviews = [{"image": "ct_9", "client": "rev", "seconds": 20.0}]
    data = data_of(curve_records([0.2, 0.3, 0.4, 0.5]), times, reviews, busy=True)
    assert [a["client"] for a in data["annotators"]] == ["ann", "rev"]
    assert data["annotators"][1]["review_hours"] == 20.0 / 3600 and data["annotators"][1]["labeling_hours"] == 0
    assert data["calibration"]["stacks"][0] == {"image": "ct_0", "client": "ann", "predicted_minutes": 4.0, "measured_minutes": 5.0}
    page = render_page(data, "now")
    assert "keep labeling: +0.100 pixel AP per hour" in page
    for series in ("series-pixel_ap", "series-dice", "series-stacks", "series-annotators-0", "series-annotators-1"):
        assert f'id="{series}"' in page
    assert 'id="series-stack_ap"' not in page  # no batch had a stack AP
    assert 'http-equiv="refresh"' in page


def test_audit_points_become_the_chained_gain_chart_and_the_advice_once_there_are_a_window_of_them():
    data = data_of(curve_records([0.5, 0.4, 0.3, 0.2]), audits=audit_records([0.05, 0.05, 0.05, 0.05]))
    assert data["stopping"]["source"] == "audit: 4 points, 8 stacks"
    assert len(data["stopping"]["audit_points"]) == 4
    chained = data["stopping"]["audit_curve"]
    assert [p["hours"] for p in chained] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert [p["cumulative_gain"]["dice"] for p in chained] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    assert "stack_ap" not in chained[1]["cumulative_gain"]  # undefined on every point
    page = render_page(data, "now")
    assert "keep labeling: +0.050 pixel AP per hour" in page and "source: audit: 4 points, 8 stacks" in page
    assert 'id="series-audit-pixel_ap"' in page and 'id="series-audit-dice"' in page
    assert 'id="series-audit-stack_ap"' not in page
    # Fewer points than the window: the chart is drawn, the advice stays with the (labelled) prequential curve.
    early = data_of(curve_records([0.5, 0.4, 0.3, 0.2]), audits=audit_records([0.05]))
    assert early["stopping"]["source"].startswith("prequential") and early["stopping"]["gain"]["per_hour"] < 0
    assert 'id="series-audit-dice"' in render_page(early, "now")
