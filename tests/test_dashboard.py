"""The dashboard page without a server: an empty state says what to do, data becomes chart series (issue 20)."""

from __future__ import annotations

from ichal.dashboard import dashboard_data, render_page
from ichal.learning_curve import CurvePoint, stopping_advice


def curve_records(values):
    return [{"model_version": f"v{i}", "hours": float(i + 1), "stacks": 3, "metrics": {"pixel_ap": v, "stack_ap": None, "dice": v}}
            for i, v in enumerate(values)]


def data_of(records, label_times=(), reviews=(), busy=False):
    points = [CurvePoint(r["model_version"], r["hours"], r["stacks"], r["metrics"]) for r in records]
    return dashboard_data(records, stopping_advice(points), label_times, reviews, [], [], busy)


def test_an_empty_dashboard_says_what_is_missing_and_does_not_reload():
    page = render_page(data_of([]), "now")
    assert "not enough batches yet" in page
    assert "no batch scored yet: save labels, then train" in page and "no measured time yet" in page
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
