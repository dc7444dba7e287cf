"""Reports of active-learning experiments: per-cell CSV, AP curves with error bars, markdown table.

Kuo et al. 2018, Fig. 4 (core-set AP vs. labeled fraction) and Fig. 5 (cost-sensitive AP vs. labeling time).
Also the paired comparison of two training-set sizes over several training pools (`plot_paired_differences`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend chosen first: no display here)
import numpy as np  # noqa: E402

from ichal.io import atomic_write_bytes  # noqa: E402
from ichal.metrics import PairedDifference  # noqa: E402

AP_LEVELS = ("pixel_ap", "region_ap", "frame_ap", "stack_ap")
CSV_COLUMNS = (
    "protocol", "method", "seed", "round", "n_labeled", "labeled_fraction", "labeled_hours", "n_picked",
    "picked_positive", "budget", "picked_budget_used", "picked_predicted_seconds", "picked_true_seconds",
    "picked_oracle_seconds", "batch_time_rel_error", "picked_high_seconds", "picked_raw_predicted_seconds",
    "picked_in_interval", *AP_LEVELS, "dice", "mean_dice_positive", "train_seconds",
    "picked_ids",
)
# The per-hour protocol's CSV (issue 18) names what the radiologist spent: column -> record key.
HOURS_CSV_SOURCES = {
    "labeled_true_hours": "labeled_hours", "batch_predicted_seconds": "picked_predicted_seconds",
    "batch_high_seconds": "picked_high_seconds", "batch_true_seconds": "picked_true_seconds",
}
HOURS_CSV_COLUMNS = (
    "seed", "method", "round", "n_labeled", "labeled_true_hours", "n_picked", "picked_positive", "budget",
    "batch_predicted_seconds", "batch_high_seconds", "batch_true_seconds", "picked_in_interval", *AP_LEVELS,
    "dice", "mean_dice_positive", "train_seconds", "picked_ids",
)
METHOD_LABELS = {
    "random": "random", "uncertainty": "uniform-cost QBC", "cost_sensitive": "cost-sensitive (knapsack)",
    "acft": "ACFT", "foreground_random": "foreground random", "full_pool": "whole pool",
    "oracle_cost": "knapsack on true seconds (oracle)", "roi": "value per second (ROI)",
}


def save_png(figure: plt.Figure, path: Path) -> None:
    """Write `figure` as a PNG atomically and close it."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def _flat(record: dict, columns: Sequence[str] = CSV_COLUMNS) -> dict:
    """One CSV row of a cell record (metrics inlined, picked ids joined by spaces)."""
    row = {key: record.get(HOURS_CSV_SOURCES.get(key, key), "") for key in columns}
    row |= {k: record["metrics"][k] for k in (*AP_LEVELS, "dice", "mean_dice_positive")}
    row["picked_ids"] = " ".join(record.get("picked_ids", []))
    return row


def write_csv(records: Sequence[dict], path: Path, columns: Sequence[str] = CSV_COLUMNS) -> None:
    """One row per (method, seed, round) cell, atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for record in sorted(records, key=lambda r: (r["method"], r["seed"], r["round"])):
        writer.writerow(_flat(record, columns))
    atomic_write_bytes(path, buffer.getvalue().encode())


def summarize(records: Sequence[dict]) -> list[dict]:
    """Mean and standard deviation over seeds per (method, round): keys `<name>` and `<name>_std`."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for record in records:
        groups.setdefault((record["method"], record["round"]), []).append(_flat(record))
    numeric = [c for c in CSV_COLUMNS if c not in ("protocol", "method", "seed", "round", "picked_ids")]
    summary = []
    for (method, round_index), rows in sorted(groups.items()):
        entry = {"method": method, "round": round_index, "seeds": len(rows)}
        for column in numeric:
            values = np.array([float(r[column]) if r[column] != "" else np.nan for r in rows], dtype=np.float64)
            finite = values[np.isfinite(values)]
            entry[column] = float(finite.mean()) if finite.size else float("nan")
            entry[f"{column}_std"] = float(finite.std()) if finite.size else float("nan")
            entry[f"{column}_n"] = int(finite.size)
        summary.append(entry)
    return summary


def _x_axis(protocol: str) -> tuple[str, str]:
    return ("labeled_fraction", "labeled fraction of the pool") if protocol == "coreset" else \
        ("labeled_hours", "labeled data: simulated annotator hours")


def plot_curves(protocol: str, summary: Sequence[dict], path: Path) -> None:
    """2x2 AP panels (pixel/region/frame/stack) against labeled fraction or hours; bars = std over seeds."""
    x_key, x_label = _x_axis(protocol)
    figure, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    methods = sorted({s["method"] for s in summary if s["method"] != "full_pool"})
    for axis, level in zip(axes.ravel(), AP_LEVELS):
        for method in methods:
            points = sorted((s for s in summary if s["method"] == method), key=lambda s: s["round"])
            axis.errorbar([p[x_key] for p in points], [p[level] for p in points],
                          xerr=[p[f"{x_key}_std"] for p in points], yerr=[p[f"{level}_std"] for p in points],
                          marker="o", capsize=3, label=METHOD_LABELS.get(method, method))
        for reference in (s for s in summary if s["method"] == "full_pool"):
            axis.axhline(reference[level], color="gray", linestyle="--", label="whole pool (S1)")
            axis.axhspan(reference[level] - reference[f"{level}_std"], reference[level] + reference[f"{level}_std"],
                         color="gray", alpha=0.15)
        axis.set_title(level.replace("_ap", " AP"))
        axis.set_xlabel(x_label)
        axis.set_ylabel("AP on held-out test set")
        axis.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    seeds = max((s["seeds"] for s in summary), default=0)
    figure.suptitle(f"{protocol}: mean over {seeds} seed(s), bars = std")
    save_png(figure, path)


PAIR_COLOURS = {"better": "tab:green", "worse": "tab:red", "no difference": "tab:gray"}


def plot_paired_differences(pairs: Sequence[Sequence[PairedDifference]], mean: Sequence[PairedDifference],
                            labels: tuple[str, str], path: Path) -> None:
    """One panel per metric: a line from the first to the second model of each pair (green when the
    bootstrap interval of second - first is above 0, red when below, gray when it spans 0) and the mean of
    the pairs in black, its difference and interval in the panel title."""
    metrics = [d.metric for d in mean]
    if not pairs or any([d.metric for d in pair] != metrics for pair in pairs):
        raise ValueError("every pair needs the same metrics as the mean, in the same order")
    figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 4.5), constrained_layout=True)
    for index, (axis, overall) in enumerate(zip(np.atleast_1d(axes), mean)):
        used = set()
        for pair in pairs:
            d = pair[index]
            verdict = "better" if d.low > 0 else "worse" if d.high < 0 else "no difference"
            axis.plot([0, 1], [d.first, d.second], marker="o", color=PAIR_COLOURS[verdict], alpha=0.8,
                      label=None if verdict in used else f"one pool: {verdict}")
            used.add(verdict)
        axis.plot([0, 1], [overall.first, overall.second], marker="s", color="black", linewidth=2.5, label="mean")
        axis.set_title(f"{overall.metric.replace('_ap', ' AP')}: {overall.difference:+.3f} "
                       f"[{overall.low:+.3f}, {overall.high:+.3f}]", fontsize=10)
        axis.set_xticks([0, 1], labels)
        axis.set_xlim(-0.2, 1.2)
        axis.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=8)
    figure.suptitle(f"{labels[1]} minus {labels[0]} on the same test stacks, {len(pairs)} pairs (95% bootstrap intervals)")
    save_png(figure, path)


def _pm(entry: dict, key: str, digits: int = 3, scale: float = 1.0) -> str:
    """`mean ± std` of summary column `key` times `scale` (just the mean for one value); '-' when undefined;
    `(n=k)` when only k of the seeds have the value (a column added after a run started)."""
    value, spread, count = entry[key] * scale, entry[f"{key}_std"] * scale, entry[f"{key}_n"]
    if not np.isfinite(value):
        return "-"
    text = f"{value:.{digits}f} ± {spread:.{digits}f}" if count > 1 else f"{value:.{digits}f}"
    return text if count == entry["seeds"] else f"{text} (n={count})"


def markdown_table(protocol: str, summary: Sequence[dict]) -> str:
    """Mean ± std over seeds per (method, round): labeled data, picked batch, its time estimate, APs."""
    x_key, _ = _x_axis(protocol)
    header = ["method", "round", "seeds", "labeled stacks", "labeled h" if x_key == "labeled_hours" else "labeled frac",
              "picked", "picked +", "batch pred. h", "batch true h", "batch time rel. err", "pred. h on true masks",
              "pixel AP", "region AP", "frame AP", "stack AP"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    shared_round0 = False
    for e in sorted(summary, key=lambda s: (s["round"], s["method"])):
        batch = e["round"] > 0 and e["method"] != "full_pool"
        if e["round"] == 0 and e["method"] != "full_pool":
            if shared_round0:  # every method starts from the same seed set: one row
                continue
            shared_round0, e = True, e | {"method": "seed set (all methods)"}
        cells = [METHOD_LABELS.get(e["method"], e["method"]), str(e["round"]), str(e["seeds"]), _pm(e, "n_labeled", 1),
                 _pm(e, x_key, 2), _pm(e, "n_picked", 1) if batch else "-",
                 _pm(e, "picked_positive", 1) if batch else "-",
                 _pm(e, "picked_predicted_seconds", 2, 1 / 3600) if batch else "-",
                 _pm(e, "picked_true_seconds", 2, 1 / 3600) if batch else "-",
                 _pm(e, "batch_time_rel_error", 2) if batch else "-",
                 _pm(e, "picked_oracle_seconds", 2, 1 / 3600) if batch else "-",
                 *(_pm(e, level) for level in AP_LEVELS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# The paper's claim C5: batch time estimates within 10% of the true batch time.
BATCH_ESTIMATE_TOLERANCE = 0.10


def time_calibration(records: Sequence[dict]) -> list[dict]:
    """How honest each method's batch minutes were on the cost protocol (issue 17's figures), before
    (`raw`: the true-mask time model's mean on predicted masks, expected-value budget) and after
    (recalibrated medians, budget at the configured confidence). Per method, over its picked batches:
    median (true - predicted) / predicted of the batch total, share of batches whose true total is within
    BATCH_ESTIMATE_TOLERANCE of the predicted one (the paper's claim C5), share of batches whose true seconds exceed
    the budget, the mean confidence the batch totals were budgeted at (the configured one raised after
    earlier rounds' overruns; runs before that rule: the configured one), per-stack interval coverage, median
    |log error| per stack, and the selection effect (mean log error of the picked stacks minus that of all
    unlabeled stacks; > 0: picked ones are under-predicted more than the pool)."""
    rows = []
    by_method: dict[str, list[dict]] = {}
    for record in records:
        if record.get("round", 0) > 0 and record.get("n_picked") and "log_error" in record:
            by_method.setdefault(record["method"], []).append(record)
    for method, batches in sorted(by_method.items()):
        true = np.array([b["picked_true_seconds"] for b in batches])
        predicted = np.array([b["picked_predicted_seconds"] for b in batches])
        raw = np.array([b["picked_raw_predicted_seconds"] for b in batches])
        errors = [b["log_error"] for b in batches]
        rows.append({
            "method": method, "batches": len(batches), "stacks": int(sum(b["n_picked"] for b in batches)),
            "confidence": batches[0]["budget_confidence"],
            "batch_error_raw": float(np.median((true - raw) / raw)),
            "batch_error": float(np.median((true - predicted) / predicted)),
            "batches_within": float(np.mean(np.abs(true - predicted) <= BATCH_ESTIMATE_TOLERANCE * predicted)),
            "over_budget": float(np.mean(true > np.array([b["budget"] for b in batches]))),
            "applied_confidence": float(np.mean([b.get("applied_confidence") or b["budget_confidence"] for b in batches])),
            "coverage": sum(b["picked_in_interval"] for b in batches) / sum(b["n_picked"] for b in batches),
            "median_abs_log_error": float(np.median(np.concatenate([e["picked_abs_recalibrated"] for e in errors]))),
            "selection_effect_raw": float(np.mean([e["picked_raw"] - e["pool_raw"] for e in errors])),
            "selection_effect": float(np.mean([e["picked_recalibrated"] - e["pool_recalibrated"] for e in errors])),
            "recalibrated_batches": sum(bool(b["recalibration"]["empirical"]) for b in batches),
        })
    return rows


def time_calibration_table(rows: Sequence[dict]) -> str:
    header = ["method", "batches (recalibrated)", "stacks", "batch (true-pred)/pred: before", "after",
              f"batches within ±{BATCH_ESTIMATE_TOLERANCE:.0%} (after)",
              "share of batches over budget", "mean applied confidence", "per-stack interval coverage", "median abs log error",
              "selection effect: before", "after"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join([
            METHOD_LABELS.get(r["method"], r["method"]), f"{r['batches']} ({r['recalibrated_batches']})", str(r["stacks"]),
            f"{r['batch_error_raw']:+.0%}", f"{r['batch_error']:+.0%}", f"{r['batches_within']:.0%}", f"{r['over_budget']:.0%}", f"{r['applied_confidence']:.3f}",
            f"{r['coverage']:.0%} (nominal {r['confidence']:.0%})", f"{r['median_abs_log_error']:.2f}",
            f"{r['selection_effect_raw']:+.2f}", f"{r['selection_effect']:+.2f}"]) + " |")
    return "\n".join(lines) + "\n"


def pick_time_diagnosis(records: Sequence[dict], short_seconds: float = 120.0) -> dict:
    """How much the pick-time predictor (the raw time model on committee masks) knows, over every stack whose
    true time a cost run revealed (`pick_history`: the seed set's cross-fitted predictions and each method's
    picks, each once): n, correlation of predicted and true log-seconds, median |log error|, and the median
    log error (log true/predicted) of the stacks labeled in under `short_seconds` and of the others."""
    pairs: dict[tuple, tuple[float, float]] = {}
    for record in records:
        for entry in record.get("pick_history") or []:
            key = (record["seed"], entry["id"], entry.get("source") or record["method"])
            pairs[key] = (entry["predicted_log_seconds"], float(np.log(entry["true_seconds"])))
    if len(pairs) < 3:
        return {"n": len(pairs)}
    predicted, true = np.array(list(pairs.values())).T
    error = true - predicted
    short = true < np.log(short_seconds)
    return {
        "n": len(pairs), "correlation": float(np.corrcoef(predicted, true)[0, 1]),
        "median_abs_log_error": float(np.median(np.abs(error))), "short_seconds": short_seconds,
        "n_short": int(short.sum()), "median_log_error_short": float(np.median(error[short])) if short.any() else None,
        "median_log_error_long": float(np.median(error[~short])) if (~short).any() else None,
    }


def pick_time_diagnosis_text(diagnosis: dict) -> str:
    if diagnosis["n"] < 3:
        return ""
    def factor(log_error: float | None) -> str:
        return "-" if log_error is None else f"{log_error:+.2f} (x{np.exp(log_error):.2g})"
    return (f"\nPick-time predictor over {diagnosis['n']} revealed stacks: correlation of predicted and true "
            f"log-seconds {diagnosis['correlation']:.2f}, median |log error| {diagnosis['median_abs_log_error']:.2f}; "
            f"median log error (true/predicted) of the {diagnosis['n_short']} stacks labeled in under "
            f"{diagnosis['short_seconds']:.0f} s {factor(diagnosis['median_log_error_short'])}, "
            f"of the others {factor(diagnosis['median_log_error_long'])}.\n")


def write_report(protocol: str, out: str | Path, records: Sequence[dict]) -> None:
    """OUT/<protocol>_results.csv, OUT/<protocol>_ap.png and OUT/<protocol>_table.md from the records;
    for the cost and per-hour protocols also OUT/<protocol>_time_calibration.md (`time_calibration`); for the
    per-hour protocol the CSV has HOURS_CSV_COLUMNS, the plot is against true hours with 95% intervals
    (`ichal.experiment_hours.plot_hours_curves`; OUT/hours_gain.png the same as gains over each seed's seed set)
    and OUT/hours_p1.md holds P1 and the AP differences at equal hours (`p1_table`)."""
    from ichal.experiment_hours import p1_table, plot_hours_curves

    if not records:
        return
    out = Path(out)
    write_csv(records, out / f"{protocol}_results.csv", HOURS_CSV_COLUMNS if protocol == "hours" else CSV_COLUMNS)
    summary = summarize(records)
    if protocol == "hours":
        plot_hours_curves(records, out / "hours_ap.png", METHOD_LABELS)
        plot_hours_curves(records, out / "hours_gain.png", METHOD_LABELS, gain=True)
        atomic_write_bytes(out / "hours_p1.md", p1_table(records, METHOD_LABELS).encode())
    else:
        plot_curves(protocol, summary, out / f"{protocol}_ap.png")
    atomic_write_bytes(out / f"{protocol}_table.md", markdown_table(protocol, summary).encode())
    calibration = time_calibration(records)
    if protocol != "coreset" and calibration:
        text = time_calibration_table(calibration) + pick_time_diagnosis_text(pick_time_diagnosis(records))
        atomic_write_bytes(out / f"{protocol}_time_calibration.md", text.encode())


def plot_iterations_curve(rows: Sequence[dict], path: Path, levels: Sequence[str] = ("pixel_ap", "stack_ap")) -> None:
    """Is the committee data-limited? One panel per AP level: AP against labeled stacks, one line per
    training-iteration count. `rows`: dicts with `train_stacks`, `iterations` and the levels."""
    figure, axes = plt.subplots(1, len(levels), figsize=(5.5 * len(levels), 4.5), constrained_layout=True)
    for axis, level in zip(np.atleast_1d(axes), levels):
        for iterations in sorted({r["iterations"] for r in rows}):
            points = sorted((r for r in rows if r["iterations"] == iterations), key=lambda r: r["train_stacks"])
            axis.plot([p["train_stacks"] for p in points], [p[level] for p in points], marker="o",
                      label=f"{iterations} iterations")
        axis.set_xscale("log", base=2)
        axis.set_title(level.replace("_ap", " AP"))
        axis.set_xlabel("labeled stacks (nested subsets of one pool)")
        axis.set_ylabel("AP on held-out test set")
        axis.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=8)
    figure.suptitle("committee AP vs. labeled stacks per training length")
    save_png(figure, path)
