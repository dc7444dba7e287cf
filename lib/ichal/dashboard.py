"""The labeling dashboard (issue 20): its data as one JSON document and its page as plain HTML with charts
drawn on the server (matplotlib SVG, inline: nothing is fetched from elsewhere, machines are offline).

Charts: the prequential learning curve and the audit gain curve against labeled hours with the stopping
verdict, predicted against measured minutes per stack and per worklist, hours per annotator. Tables: the open worklists, training runs.
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402  (after the backend is chosen)

from ichal.learning_curve import CURVE_METRICS, METRIC_NAMES, AuditPoint, StoppingAdvice, audit_curve  # noqa: E402
from ichal.time_intervals import batch_outcomes  # noqa: E402

# While a training (or auto-labeling) runs, the page reloads itself this often.
REFRESH_SECONDS = 15


def dashboard_data(curve: Sequence[dict[str, Any]], audit_points: Sequence[dict[str, Any]], advice: StoppingAdvice,
                   label_times: Sequence[dict[str, Any]], review_times: Sequence[dict[str, Any]],
                   worklists: Sequence[dict[str, Any]], train_runs: Sequence[dict[str, Any]], busy: bool) -> dict[str, Any]:
    """Everything the page shows, JSON-ready. `curve`: stored prequential points; `audit_points`: stored audit
    points (training order), chained into `audit_curve`; `label_times`: radiologist time records (with `at_serve` when the stack was served); `review_times`: accepted machine labels;
    `worklists`: each annotator's open worklist (client, worklist, labeled ids); `busy`: a training runs."""
    stacks = [{"image": r["image"], "client": r["client"], "predicted_minutes": r["at_serve"]["predicted_seconds"] / 60.0,
               "measured_minutes": r["seconds"] / 60.0}
              for r in label_times if isinstance((r.get("at_serve") or {}).get("predicted_seconds"), (int, float))]
    batches = [{"worklist_id": b["worklist_id"], "stacks": b["n_stacks"], "predicted_minutes": b["predicted_seconds"] / 60.0,
                "measured_minutes": b["measured_seconds"] / 60.0, "budget_minutes": b["budget_seconds"] / 60.0}
               for b in batch_outcomes(label_times)]
    annotators: dict[str, dict[str, float]] = {}
    for kind, records in (("labeling_hours", label_times), ("review_hours", review_times)):
        for r in records:
            row = annotators.setdefault(r["client"], {"labeling_hours": 0.0, "review_hours": 0.0, "stacks": 0})
            row[kind] += r["seconds"] / 3600.0
            row["stacks"] += 1
    return {
        "busy": busy,
        "stopping": {**advice.to_dict(), "curve": list(curve), "audit_points": list(audit_points),
                     "audit_curve": [{"hours": p.hours, "stacks": p.stacks, "model_version": p.model_version,
                                      "cumulative_gain": p.metrics}
                                     for p in audit_curve([AuditPoint.of(r) for r in audit_points])]},
        "calibration": {"stacks": stacks, "worklists": batches},
        "annotators": [{"client": client, **row} for client, row in sorted(annotators.items())],
        "worklists": list(worklists),
        "train_runs": list(train_runs),
    }


def _svg(figure: Figure) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg")
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _figure(title: str) -> tuple[Figure, Any]:
    figure = Figure(figsize=(6.4, 3.6), dpi=100, layout="tight")
    axis = figure.add_subplot()
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.3)
    return figure, axis


def _no_data(axis: Any, text: str) -> None:
    axis.text(0.5, 0.5, text, ha="center", va="center", transform=axis.transAxes, color="grey")


def learning_curve_svg(data: dict[str, Any]) -> str:
    """Each curve metric against the labeled hours its committee was trained on; the elbow when there is one.
    Each series is an SVG group with id `series-<metric>`."""
    stopping = data["stopping"]
    figure, axis = _figure("prequential learning curve: each batch scored by the committee that picked it")
    points = sorted(stopping["curve"], key=lambda p: p["hours"])
    for metric in CURVE_METRICS:
        pairs = [(p["hours"], p["metrics"].get(metric)) for p in points if p["metrics"].get(metric) is not None]
        if pairs:
            line, = axis.plot(*zip(*pairs), "o-", label=METRIC_NAMES[metric])
            line.set_gid(f"series-{metric}")
    if stopping.get("plateau_since_hours") is not None:
        axis.axvline(stopping["plateau_since_hours"], color="grey", ls="--", label="plateau since")
    if points:
        axis.legend(fontsize=8, loc="lower right")
        axis.set_ylim(0, 1.02)
    else:
        _no_data(axis, "no batch scored yet: save labels, then train")
    axis.set(xlabel="labeled hours the committee was trained on", ylabel="on the batch it picked")
    return _svg(figure)


def audit_curve_svg(data: dict[str, Any]) -> str:
    """Each metric's cumulative audit gain against labeled hours (the chained paired gains on random stacks);
    each series is an SVG group with id `series-audit-<metric>`."""
    figure, axis = _figure("audit gain: random stacks scored before and after each training")
    points = data["stopping"]["audit_curve"]
    for metric in CURVE_METRICS:
        pairs = [(p["hours"], p["cumulative_gain"][metric]) for p in points if p["cumulative_gain"].get(metric) is not None]
        # The first pair is the chain's anchor (0 by definition): a metric with no gain of its own is not drawn.
        if len(pairs) > 1:
            line, = axis.plot(*zip(*pairs), "o-", label=METRIC_NAMES[metric])
            line.set_gid(f"series-audit-{metric}")
    if axis.get_legend_handles_labels()[0]:
        axis.axhline(0.0, color="grey", lw=1, ls=":")
        axis.legend(fontsize=8, loc="lower right")
    else:
        _no_data(axis, "no audit gain yet: label a worklist's audit stacks, then train")
    axis.set(xlabel="labeled hours the committee was trained on", ylabel="cumulative gain since the first")
    return _svg(figure)


def calibration_svg(data: dict[str, Any]) -> str:
    """Predicted against measured minutes, per stack and per worklist labeled through; the diagonal is exact."""
    figure, axis = _figure("labeling time: predicted vs measured")
    stacks, batches = data["calibration"]["stacks"], data["calibration"]["worklists"]
    for rows, marker, label, gid in ((stacks, "o", "stack", "series-stacks"), (batches, "s", "worklist", "series-worklists")):
        if rows:
            points = axis.scatter([r["predicted_minutes"] for r in rows], [r["measured_minutes"] for r in rows],
                                  marker=marker, label=label, alpha=0.8)
            points.set_gid(gid)
    if stacks or batches:
        top = max(max(r["predicted_minutes"], r["measured_minutes"]) for r in [*stacks, *batches]) * 1.1
        axis.plot([0, top], [0, top], color="grey", lw=1, ls=":")
        axis.legend(fontsize=8)
    else:
        _no_data(axis, "no label saved after a serve yet")
    axis.set(xlabel="predicted minutes", ylabel="measured minutes")
    return _svg(figure)


def annotators_svg(data: dict[str, Any]) -> str:
    """Labeling and review hours per annotator, stacked bars (SVG groups `series-annotators-<i>`)."""
    figure, axis = _figure("hours per annotator")
    rows = data["annotators"]
    if rows:
        names = [r["client"] for r in rows]
        labeling = axis.bar(names, [r["labeling_hours"] for r in rows], label="labeling")
        for index, bar in enumerate(labeling):
            bar.set_gid(f"series-annotators-{index}")
        axis.bar(names, [r["review_hours"] for r in rows], bottom=[r["labeling_hours"] for r in rows],
                 label="review of machine labels")
        axis.legend(fontsize=8)
    else:
        _no_data(axis, "no measured time yet")
    axis.set(ylabel="hours")
    return _svg(figure)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], empty: str) -> str:
    if not rows:
        return f"<p class='empty'>{html.escape(empty)}</p>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.2f}"
    return "" if value is None else str(value)


def render_page(data: dict[str, Any], generated: str) -> str:
    """The dashboard as one HTML page (charts inline); reloads itself every `REFRESH_SECONDS` while busy."""
    stopping = data["stopping"]
    gain = stopping.get("gain")
    numbers = "" if gain is None else (
        f"gain {gain['per_hour']:+.4f} per hour ({stopping['rule']['confidence']:.0%} interval {gain['low']:+.4f} to "
        f"{gain['high']:+.4f}) over {gain['batches']} batches, {gain['from_hours']:.1f}-{gain['to_hours']:.1f} h; "
        f"floor {stopping['rule']['min_gain_per_hour']} per hour")
    worklist_rows = [(w["client"], w["strategy"], len(w["ids"]), ", ".join(i for i in w["ids"] if i not in w["labeled"]),
                      w["predicted_minutes"], w["budget_minutes"]) for w in data["worklists"]]
    run_rows = [(r.get("state"), r.get("mode"), r.get("stacks"), (r.get("version") or "")[:12], r.get("seconds"),
                 r.get("started_iso")) for r in data["train_runs"]]
    refresh = f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' if data["busy"] else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8">{refresh}<title>ichal dashboard</title>
<style>
body {{ font-family: sans-serif; margin: 1.2em; color: #222; }}
.charts {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ margin: 0; border: 1px solid #ddd; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }} td, th {{ border: 1px solid #ccc; padding: 2px 8px; font-size: 90%; }}
.verdict {{ font-size: 120%; font-weight: bold; }} .empty, .note {{ color: #777; }}
</style></head><body>
<h1>ichal: labeling dashboard</h1>
<p class="verdict" id="verdict" data-verdict="{html.escape(stopping['verdict'])}">{html.escape(stopping['message'])}</p>
<p class="note">{html.escape(numbers)}</p>
<p class="note" id="source">source: {html.escape(stopping['source'])}</p>
<div class="charts">
<figure id="learning-curve">{learning_curve_svg(data)}</figure>
<figure id="audit-curve">{audit_curve_svg(data)}</figure>
<figure id="calibration">{calibration_svg(data)}</figure>
<figure id="annotators">{annotators_svg(data)}</figure>
</div>
<h2>Open worklists</h2>
{_table(("annotator", "strategy", "stacks", "still to label", "predicted min", "budget min"), worklist_rows, "no worklist served yet")}
<h2>Training runs</h2>
{_table(("state", "mode", "stacks", "committee", "seconds", "started (UTC)"), run_rows, "no training run yet")}
<p class="note">Generated {html.escape(generated)}{" - a training runs: this page reloads every " + str(REFRESH_SECONDS) + " s" if data["busy"] else ""}.
Data: <a href="data.json">data.json</a>.</p>
</body></html>
"""
