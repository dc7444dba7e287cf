"""Figures of the per-hour protocol (issue 18): curves against cumulative TRUE labeled hours with 95%
intervals over seeds, and P1, the true hours each method needs to reach 95% of the whole-pool committee.

Each seed has its own pool and test set, so a seed's target is 95% of ITS whole-pool committee's AP, and
methods are compared paired by seed (same pool, same seed set, same test set).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend chosen first: no display here)
import numpy as np  # noqa: E402
from scipy.stats import t as student_t  # noqa: E402

from ichal.experiment import FULL_POOL  # noqa: E402
from ichal.experiment_plots import save_png  # noqa: E402

CURVE_LEVELS = ("pixel_ap", "frame_ap", "stack_ap", "dice")
P1_LEVELS = ("pixel_ap", "stack_ap")
P1_FRACTION = 0.95
P1_RATIOS = (("cost_sensitive", "random"), ("cost_sensitive", "uncertainty"), ("cost_sensitive", "foreground_random"))
GRID_POINTS = 80


def hours_to_reach(hours: Sequence[float], values: Sequence[float], target: float) -> float:
    """True labeled hours at which a curve first reaches `target`.

    `hours` (increasing, one per round) and `values` (AP or Dice after that round). Linear between the two
    rounds around the first crossing; the first point's hours when the curve starts at or above `target`;
    `inf` when it never reaches it within the run (the need is then only known to exceed the last point's
    hours). Rounds whose value is NaN (a test set without positives) are skipped.
    """
    points = [(h, v) for h, v in zip(hours, values, strict=True) if np.isfinite(v)]
    for index, (h, v) in enumerate(points):
        if v >= target:
            if index == 0:
                return float(h)
            h0, v0 = points[index - 1]
            return float(h0 + (target - v0) / (v - v0) * (h - h0))
    return math.inf


def _metric(record: dict, level: str) -> float:
    return float(record["metrics"][level])


def _curves(records: Sequence[dict]) -> dict[tuple[str, int], list[dict]]:
    """Records per (method, seed), by round; the whole-pool reference left out."""
    curves: dict[tuple[str, int], list[dict]] = {}
    for record in records:
        if record["method"] != FULL_POOL:
            curves.setdefault((record["method"], record["seed"]), []).append(record)
    return {key: sorted(rows, key=lambda r: r["round"]) for key, rows in curves.items()}


def p1_hours(records: Sequence[dict], level: str, fraction: float = P1_FRACTION) -> dict[str, dict[int, float]]:
    """{method: {seed: true hours to reach `fraction` x that seed's whole-pool `level`}} (`hours_to_reach`,
    `inf` = never reached). Seeds without a whole-pool record are left out."""
    targets = {r["seed"]: fraction * _metric(r, level) for r in records if r["method"] == FULL_POOL}
    result: dict[str, dict[int, float]] = {}
    for (method, seed), rows in sorted(_curves(records).items()):
        if seed in targets:
            result.setdefault(method, {})[seed] = hours_to_reach(
                [r["labeled_hours"] for r in rows], [_metric(r, level) for r in rows], targets[seed])
    return result


def _median_ratio(numerator: np.ndarray, denominator: np.ndarray) -> float:
    """median(numerator) / median(denominator); inf when only the numerator's median is inf, 0 for the
    reverse, NaN when both are (neither method reached the target on most seeds)."""
    top, bottom = float(np.median(numerator)), float(np.median(denominator))
    if math.isinf(top) and math.isinf(bottom):
        return math.nan
    if math.isinf(top):
        return math.inf
    return top / bottom if bottom > 0 else math.inf


def paired_ratio_interval(numerator: Sequence[float], denominator: Sequence[float], confidence: float = 0.95,
                          resamples: int = 4000, seed: int = 0) -> dict[str, float]:
    """Ratio of median hours over seeds, `numerator` / `denominator` (same seeds, same order), with a paired
    bootstrap interval: seeds resampled with replacement, the same draw for both methods.

    Values may be `inf` (target never reached): a median is `inf` when at least half the seeds are. Returns
    {"ratio", "low", "high", "undefined"}: the interval is the percentile interval of the replicates whose
    ratio is defined (`undefined`: share of replicates where both medians were inf); quantiles are taken
    without interpolation, so an inf replicate gives an inf bound rather than a NaN.
    """
    top, bottom = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    if top.shape != bottom.shape or top.ndim != 1 or top.size == 0:
        raise ValueError(f"numerator and denominator must be equal-length 1-D sequences (one value per seed), "
                         f"got shapes {top.shape} and {bottom.shape}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    draws = np.random.default_rng(seed).integers(0, top.size, size=(resamples, top.size))
    replicates = np.array([_median_ratio(top[d], bottom[d]) for d in draws])
    defined = replicates[~np.isnan(replicates)]
    tail = (1.0 - confidence) / 2.0
    low, high = (np.quantile(defined, [tail, 1.0 - tail], method="inverted_cdf") if defined.size
                 else (math.nan, math.nan))
    return {"ratio": _median_ratio(top, bottom), "low": float(low), "high": float(high),
            "undefined": float(1.0 - defined.size / resamples)}


def curve_band(curves: Sequence[tuple[Sequence[float], Sequence[float]]], grid: np.ndarray,
               confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and t-interval over seeds of curves interpolated on `grid`.

    `curves`: one (hours increasing, values) per seed, linearly interpolated on `grid` (never extrapolated:
    NaN outside a curve's hours). Returns (mean, low, high), each (len(grid),); NaN where fewer than two
    seeds cover a grid point.
    """
    grid = np.asarray(grid, dtype=np.float64)
    rows = np.full((len(curves), grid.size), np.nan)
    for row, (hours, values) in zip(rows, curves):
        hours, values = np.asarray(hours, dtype=np.float64), np.asarray(values, dtype=np.float64)
        keep = np.isfinite(values)
        if keep.sum() >= 2:
            inside = (grid >= hours[keep][0]) & (grid <= hours[keep][-1])
            row[inside] = np.interp(grid[inside], hours[keep], values[keep])
    count = np.isfinite(rows).sum(axis=0)
    mean, low, high = (np.full(grid.size, np.nan) for _ in range(3))
    enough = count >= 2
    if enough.any():
        mean[enough] = np.nanmean(rows[:, enough], axis=0)
        half = student_t.ppf(0.5 + confidence / 2, count[enough] - 1) * np.nanstd(rows[:, enough], axis=0, ddof=1) \
            / np.sqrt(count[enough])
        low[enough], high[enough] = mean[enough] - half, mean[enough] + half
    return mean, low, high


def plot_hours_curves(records: Sequence[dict], path: Path, labels: dict[str, str]) -> None:
    """2x2 panels (pixel/frame/stack AP, Dice) against cumulative true labeled hours: per method the mean over
    seeds with its 95% t-interval, on the hours every seed's curve covers; the whole-pool committee's mean
    and interval as a gray band. `labels`: display names of the methods."""
    curves = _curves(records)
    methods = sorted({method for method, _ in curves})
    references = [r for r in records if r["method"] == FULL_POOL]
    figure, axes = plt.subplots(2, 2, figsize=(12, 9), constrained_layout=True)
    for axis, level in zip(axes.ravel(), CURVE_LEVELS):
        for method in methods:
            per_seed = [([r["labeled_hours"] for r in rows], [_metric(r, level) for r in rows])
                        for (m, _), rows in curves.items() if m == method]
            start, stop = max(h[0] for h, _ in per_seed), min(h[-1] for h, _ in per_seed)
            if stop <= start:
                continue
            grid = np.linspace(start, stop, GRID_POINTS)
            mean, low, high = curve_band(per_seed, grid) if len(per_seed) > 1 else (
                np.interp(grid, *per_seed[0]), None, None)
            line, = axis.plot(grid, mean, label=f"{labels.get(method, method)} ({len(per_seed)} seed{'s' * (len(per_seed) > 1)})")
            if low is not None:
                axis.fill_between(grid, low, high, color=line.get_color(), alpha=0.15)
        if references:
            values = np.array([_metric(r, level) for r in references])
            mean = float(np.nanmean(values))
            axis.axhline(mean, color="gray", linestyle="--", label="whole pool")
            if np.isfinite(values).sum() > 1:
                finite = values[np.isfinite(values)]
                half = student_t.ppf(0.975, finite.size - 1) * finite.std(ddof=1) / math.sqrt(finite.size)
                axis.axhspan(mean - half, mean + half, color="gray", alpha=0.12)
        axis.set_title(level.replace("_ap", " AP").replace("dice", "Dice"))
        axis.set_xlabel("cumulative TRUE labeled hours (simulated annotator)")
        axis.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    figure.suptitle("per-hour protocol: mean over seeds, band = 95% t-interval")
    save_png(figure, path)


def _hours_text(hours: dict[int, float]) -> str:
    values = np.array(list(hours.values()))
    reached = np.isfinite(values)
    if not reached.any():
        return f"0/{values.size} reached"
    median = float(np.median(values))
    span = f"[{values[reached].min():.2f}-{values[reached].max():.2f}]"
    if not math.isfinite(median):
        return f"{reached.sum()}/{values.size} reached ({span} h); median not reached"
    return f"{reached.sum()}/{values.size} reached; median {median:.2f} h {span}"


def _ratio_text(interval: dict[str, float]) -> str:
    if math.isnan(interval["ratio"]):
        return "undefined (neither reached on most seeds)"
    text = f"{interval['ratio']:.2f} [{interval['low']:.2f}, {interval['high']:.2f}]"
    return text + (f" ({interval['undefined']:.0%} of replicates undefined)" if interval["undefined"] else "")


def p1_table(records: Sequence[dict], labels: dict[str, str]) -> str:
    """Markdown: per method the true hours to reach 95% of the whole-pool committee's pixel and stack AP
    (seeds reaching it, median [range] of the hours), then the paired-bootstrap ratios of P1_RATIOS."""
    hours = {level: p1_hours(records, level) for level in P1_LEVELS}
    lines = [f"Target: {P1_FRACTION:.0%} of each seed's whole-pool committee AP. Hours: true labeled hours at the "
             "first crossing (linear between rounds); a seed that never reaches it counts as infinitely many "
             "hours (median: 'not reached' when half the seeds or more did not).", "",
             "| method | " + " | ".join(f"{level.replace('_ap', ' AP')}: hours to target" for level in P1_LEVELS) + " |",
             "|---|" + "---|" * len(P1_LEVELS)]
    for method in sorted(hours[P1_LEVELS[0]]):
        lines.append(f"| {labels.get(method, method)} | "
                     + " | ".join(_hours_text(hours[level][method]) for level in P1_LEVELS) + " |")
    lines += ["", "| ratio of median hours (95% paired bootstrap over seeds) | "
              + " | ".join(level.replace("_ap", " AP") for level in P1_LEVELS) + " |", "|---|" + "---|" * len(P1_LEVELS)]
    for top, bottom in P1_RATIOS:
        cells = []
        for level in P1_LEVELS:
            a, b = hours[level].get(top, {}), hours[level].get(bottom, {})
            seeds = sorted(set(a) & set(b))
            cells.append(_ratio_text(paired_ratio_interval([a[s] for s in seeds], [b[s] for s in seeds]))
                         if seeds else "-")
        lines.append(f"| {top} / {bottom} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
