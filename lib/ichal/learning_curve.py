"""The learning curve and when to stop labeling (issue 20; "AL is 90% effective", the elbow).

Two curves, no held-out set. Prequential: each labeled batch, before it is trained on, scored by the
committee that picked it (biased low: actively picked stacks are the ones it gets wrong). Audit: a few
random stacks per worklist, withheld from training for one round, scored by the committee before and
after it; the paired gains, chained, trace an unbiased curve. `stopping_advice` reads the gain per labeled
hour off a curve's last points and calls a plateau only when the whole interval of that gain is below a floor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

# The metrics each batch point carries (`ichal.metrics.DetectionEvaluator.result` keys).
CURVE_METRICS = ("pixel_ap", "stack_ap", "dice")
METRIC_NAMES = {"pixel_ap": "pixel AP", "stack_ap": "stack AP", "dice": "Dice"}
# Where the advice comes from until the audit curve has enough points: said with the advice, since it misleads.
PREQUENTIAL_SOURCE = "prequential (biased on actively picked stacks)"


class CurveError(ValueError):
    """A curve point or stopping setting out of range; the message names it."""


@dataclass(frozen=True)
class CurvePoint:
    """One batch: the committee `model_version`, trained on `hours` of labeled true (measured) hours,
    scored on the `stacks` stacks of the batch it picked, before training on them. `metrics`: values in
    [0, 1] (missing or NaN when undefined on the batch, e.g. stack AP of a batch without a positive)."""

    model_version: str
    hours: float
    stacks: int
    metrics: dict[str, float]

    def value(self, metric: str) -> float:
        value = self.metrics.get(metric)
        return float("nan") if value is None else float(value)


@dataclass(frozen=True)
class AuditPoint:
    """One training's paired test on its audit stacks: `stacks` random stacks neither committee was trained
    on, scored by `old_version` (the committee serving when the training started, trained on `old_hours`
    labeled hours) and by `new_version` (the one it trained, `new_hours`). Metrics: values in [0, 1],
    None where undefined on the stacks (`ichal.prequential.batch_metrics`)."""

    old_version: str
    new_version: str
    old_hours: float
    new_hours: float
    stacks: int
    old_metrics: dict[str, float | None]
    new_metrics: dict[str, float | None]

    @classmethod
    def of(cls, record: dict) -> "AuditPoint":
        """From a stored record (`StateDB.audit_points`), which carries more keys than these."""
        return cls(**{name: record[name] for name in cls.__dataclass_fields__})

    def gains(self) -> dict[str, float | None]:
        """New minus old per metric, on the same stacks (each stack's difficulty cancels); None where either is undefined."""
        return {metric: None if self.old_metrics.get(metric) is None or self.new_metrics.get(metric) is None
                else float(self.new_metrics[metric]) - float(self.old_metrics[metric]) for metric in CURVE_METRICS}


def audit_curve(points: Sequence[AuditPoint]) -> list[CurvePoint]:
    """The chained audit curve of `points` (training order): 0 at the first point's old hours, then per metric
    the running sum of the paired gains, at each point's new hours. A point whose gain is undefined for a
    metric has no value for it and adds nothing to the sum; so does a training that had no labeled audit
    stack (it stored no point)."""
    if not points:
        return []
    first = points[0]
    curve = [CurvePoint(first.old_version, first.old_hours, first.stacks, dict.fromkeys(CURVE_METRICS, 0.0))]
    totals = dict.fromkeys(CURVE_METRICS, 0.0)
    for point in points:
        values: dict[str, float] = {}
        for metric, gain in point.gains().items():
            if gain is not None:
                totals[metric] += gain
                values[metric] = totals[metric]
        curve.append(CurvePoint(point.new_version, point.new_hours, point.stacks, values))
    return curve


@dataclass(frozen=True)
class StoppingRule:
    """`window`: how many of the last batches the gain is measured over (at least 3: two points fit any
    line exactly); `min_gain_per_hour`: the gain (metric units per labeled hour) below which more labels
    buy little; `confidence`: of the gain's two-sided interval."""

    metric: str = "pixel_ap"
    window: int = 4
    min_gain_per_hour: float = 0.01
    confidence: float = 0.9

    def check(self) -> None:
        if self.metric not in CURVE_METRICS:
            raise CurveError(f"stopping metric must be one of {CURVE_METRICS}, got {self.metric!r}")
        if self.window < 3:
            raise CurveError(f"stopping window must be at least 3 batches, got {self.window}")
        if not math.isfinite(self.min_gain_per_hour) or self.min_gain_per_hour <= 0:
            raise CurveError(f"min_gain_per_hour must be a positive number, got {self.min_gain_per_hour}")
        if not 0 < self.confidence < 1:
            raise CurveError(f"stopping confidence must be in (0, 1), got {self.confidence}")


@dataclass(frozen=True)
class GainPerHour:
    """Slope of the metric against labeled hours (weighted least squares, weight = batch stacks) and its
    t interval; over `batches` batches from `from_hours` to `to_hours`."""

    per_hour: float
    low: float
    high: float
    batches: int
    from_hours: float
    to_hours: float


@dataclass(frozen=True)
class StoppingAdvice:
    """`verdict`: "not_enough_batches", "keep_labeling" or "plateau"; `message`: the plain sentence;
    `gain`: over the last `rule.window` batches; `plateau_since_hours`: the elbow (the earliest batch
    from which the curve stays flat), set with a plateau; `source`: the curve it was read from."""

    verdict: str
    message: str
    rule: StoppingRule
    batches: int
    gain: GainPerHour | None
    plateau_since_hours: float | None
    latest_value: float | None
    source: str

    def to_dict(self) -> dict:
        return asdict(self)


def gain_per_hour(hours: Sequence[float], values: Sequence[float], weights: Sequence[float],
                  confidence: float = 0.9) -> GainPerHour:
    """Weighted least-squares slope of `values` on `hours` with its `confidence` t interval (n - 2 degrees
    of freedom). Needs at least 3 points at 2 or more distinct hours."""
    x, y, w = (np.asarray(a, dtype=np.float64) for a in (hours, values, weights))
    if len(x) < 3 or np.ptp(x) <= 0:
        raise CurveError(f"a gain per hour needs 3 batches at different labeled hours, got {len(x)}")
    w = w / w.mean()
    x_mean, y_mean = np.average(x, weights=w), np.average(y, weights=w)
    sxx = float(np.sum(w * (x - x_mean) ** 2))
    slope = float(np.sum(w * (x - x_mean) * (y - y_mean)) / sxx)
    residuals = y - (y_mean + slope * (x - x_mean))
    se = math.sqrt(float(np.sum(w * residuals**2)) / (len(x) - 2) / sxx)
    half = float(stats.t.ppf(0.5 + confidence / 2, len(x) - 2)) * se
    return GainPerHour(slope, slope - half, slope + half, len(x), float(x.min()), float(x.max()))


def _usable(points: Sequence[CurvePoint], metric: str) -> list[CurvePoint]:
    """The points with a finite `metric`, in order of labeled hours."""
    for point in points:
        if not math.isfinite(point.hours) or point.hours < 0 or point.stacks < 1:
            raise CurveError(f"curve point of model {point.model_version!r} has hours {point.hours} and "
                             f"{point.stacks} stacks; need hours >= 0 and at least one stack")
    return sorted((p for p in points if math.isfinite(p.value(metric))), key=lambda p: p.hours)


def _is_flat(points: Sequence[CurvePoint], rule: StoppingRule) -> GainPerHour | None:
    """The gain over `points` when its whole interval lies below the floor; None otherwise (or too few)."""
    try:
        gain = gain_per_hour([p.hours for p in points], [p.value(rule.metric) for p in points],
                             [p.stacks for p in points], rule.confidence)
    except CurveError:
        return None
    return gain if gain.high < rule.min_gain_per_hour else None


def plateau_start(points: Sequence[CurvePoint], rule: StoppingRule) -> float | None:
    """The elbow: the labeled hours of the earliest batch from which the curve to the end is flat (its gain
    interval wholly below `rule.min_gain_per_hour`); None when the last `rule.window` batches are not flat."""
    usable = _usable(points, rule.metric)
    if len(usable) < rule.window or _is_flat(usable[-rule.window:], rule) is None:
        return None
    start = len(usable) - rule.window
    while start > 0 and _is_flat(usable[start - 1:], rule) is not None:
        start -= 1
    return usable[start].hours


def stopping_advice(points: Sequence[CurvePoint], rule: StoppingRule = StoppingRule(),
                    source: str = PREQUENTIAL_SOURCE) -> StoppingAdvice:
    """Keep labeling or stop, from the curve `points` (any order); `source` names the curve in the advice.

    Plateau: the gain per labeled hour over the last `rule.window` batches is below `rule.min_gain_per_hour`
    with the rule's confidence (its interval's upper end is below the floor). A noisy curve keeps its
    interval wide and so keeps labeling: the rule stops only when the data say the gain is small.
    """
    rule.check()
    usable = _usable(points, rule.metric)
    name = METRIC_NAMES[rule.metric]
    latest = usable[-1].value(rule.metric) if usable else None
    if len(usable) < rule.window or np.ptp([p.hours for p in usable[-rule.window:]]) <= 0:
        return StoppingAdvice("not_enough_batches",
                              f"not enough batches yet: {len(usable)} with a {name}, the advice needs {rule.window}",
                              rule, len(usable), None, None, latest, source)
    recent = usable[-rule.window:]
    gain = gain_per_hour([p.hours for p in recent], [p.value(rule.metric) for p in recent],
                         [p.stacks for p in recent], rule.confidence)
    interval = f"{rule.confidence:.0%} interval {gain.low:+.3f} to {gain.high:+.3f}"
    since = plateau_start(usable, rule)
    if since is not None:
        return StoppingAdvice("plateau", f"plateau since {since:.1f} h: further labels buy little "
                                         f"({gain.per_hour:+.3f} {name} per hour, {interval})",
                              rule, len(usable), gain, since, latest, source)
    # A noisy curve keeps labeling too, but must not read as a measured gain (or a measured loss).
    measured = "" if gain.low > rule.min_gain_per_hour else "no clear gain yet, "
    return StoppingAdvice("keep_labeling", f"keep labeling: {measured}{gain.per_hour:+.3f} {name} per hour ({interval}, "
                                           f"stop when it is wholly below {rule.min_gain_per_hour:.3f})",
                          rule, len(usable), gain, None, latest, source)


def advice_from_curves(prequential: Sequence[CurvePoint], audits: Sequence[AuditPoint],
                       rule: StoppingRule = StoppingRule()) -> StoppingAdvice:
    """The advice of the chained audit curve (`audit_curve`) once it has `rule.window` audit points; before
    that, the prequential curve's, labelled as biased: it does not track a held-out curve (docs/dashboard.md)."""
    if len(audits) < rule.window:
        return stopping_advice(prequential, rule)
    source = f"audit: {len(audits)} points, {sum(point.stacks for point in audits)} stacks"
    return stopping_advice(audit_curve(audits), rule, source)

