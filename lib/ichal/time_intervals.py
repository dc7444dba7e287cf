"""Labeling-time intervals calibrated on what the app really predicted, and budgets that hold with a
stated confidence (issue 17).

The residuals are out of sample by construction: each is log(measured seconds) minus the log-median
the app predicted when it served that stack (`at_serve.predicted_log_seconds`), from the committee's
predicted mask and the time model of that moment. So they carry every error the worklist really
meets: predicted-vs-true mask features, a time model fit on fewer labels, and the selection effect of
the strategy that picked the stack. Before the residuals are taken, the raw predictions are
recalibrated by a line fit of log(measured) on log(predicted) (slope kept in [MIN_SLOPE, 1]): the
intercept removes a young committee's systematic error, a slope below 1 shrinks predictions toward their
mean, which counters the selection effect (a knapsack favours stacks whose time is under-predicted, so
the further below the mean a prediction lies, the more it is likely to be too low). Per-stack intervals are
split-conformal quantiles of the recalibrated residuals; until `MIN_RESIDUALS` exist, no
recalibration, and a lognormal with the time model's residual spread stands in.

A batch total is not a sum of independent draws from those residuals: its stacks share one
recalibration and one estimate of the error distribution, both fit on few residuals while a site is
young (measured, docs/results.md "Budgets that hold": with 20 residuals the first worklists of a
repetition ran long together). So a batch's total is drawn from the posterior predictive of a normal
log error whose mean and variance are unknown (normal-inverse-chi-square), one draw of them shared by
the batch. Each stack's deviation from that shared draw is a centred residual resampled with replacement
(scaled to the drawn variance; `tail="bootstrap"`, the default) rather than a normal draw (`tail="normal"`):
the measured errors' heavy right tail (single stacks at 10-25x their prediction on a young committee) is kept.

What no model of the errors catches (a strategy's selection effect, a tail the residuals have not shown yet)
the site's own worklists do: `confidence_offset` raises the quantile the next worklist is budgeted at after
each overrun and lowers it back after each worklist within budget (adaptive conformal inference), so the
share of worklists over budget comes down to 1 - confidence. Measured on the young committee's replay
(docs/results.md, "Budgets that learn from overruns").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy.stats import norm

MIN_RESIDUALS = 10
MIN_SLOPE = 0.25
BATCH_DRAWS = 4000
MIN_DRAWS = 400
MAX_DRAWN_VALUES = 100_000
MAX_DOUBLINGS = 40
BATCH_TAILS = ("normal", "bootstrap")
DEFAULT_BATCH_TAIL = "bootstrap"
CONFIDENCE_STEP = 0.15
MAX_APPLIED_CONFIDENCE = 0.99
MAX_CONFIDENCE_OFFSET = 0.5


class IntervalError(ValueError):
    """Bad input to an interval computation; the message names it."""


def check_confidence(confidence: float) -> float:
    """`confidence` as a float strictly between 0 and 1; IntervalError otherwise."""
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.0 < confidence < 1.0:
        raise IntervalError(f"confidence must be a probability strictly between 0 and 1, got {confidence!r}")
    return float(confidence)


@dataclass(frozen=True)
class LogErrorModel:
    """The distribution of log(measured / predicted median) seconds: empirical `residuals` when there
    are at least MIN_RESIDUALS, else normal with standard deviation `fallback_std`."""

    residuals: np.ndarray
    fallback_std: float
    intercept: float = 0.0
    slope: float = 1.0
    tail: str = DEFAULT_BATCH_TAIL

    def __post_init__(self) -> None:
        if self.tail not in BATCH_TAILS:
            raise IntervalError(f"tail must be one of {BATCH_TAILS}, got {self.tail!r}")

    @property
    def empirical(self) -> bool:
        return len(self.residuals) >= MIN_RESIDUALS

    def adjust(self, predicted_log_seconds: np.ndarray) -> np.ndarray:
        """Raw predicted log-medians recalibrated on the served stacks' measured times."""
        return self.intercept + self.slope * np.asarray(predicted_log_seconds, dtype=np.float64)

    def quantile(self, q: float) -> float:
        """The q-quantile of the log error; split-conformal (rank ceil((n+1)q)) when empirical."""
        if not 0.0 < q < 1.0:
            raise IntervalError(f"quantile level must be in (0, 1), got {q}")
        if not self.empirical:
            return float(norm.ppf(q) * self.fallback_std)
        ordered = np.sort(self.residuals)
        n = len(ordered)
        # Conformal ranks: the upper end rounds up, the lower end down, so coverage is at least nominal.
        rank = math.ceil((n + 1) * q) if q >= 0.5 else math.floor((n + 1) * q)
        return float(ordered[min(max(rank, 1), n) - 1])

    def interval(self, confidence: float) -> tuple[float, float]:
        """Central log-error interval holding `confidence` of the mass."""
        tail = (1.0 - check_confidence(confidence)) / 2.0
        return self.quantile(tail), self.quantile(1.0 - tail)

    def mean_factor(self) -> float:
        """E[exp(error)]: median x this is the expected seconds (unbiased for batch sums), with the
        served stacks' systematic error, e.g. a young committee's under-prediction, corrected."""
        if self.empirical:
            return float(np.exp(self.residuals).mean())
        return math.exp(0.5 * self.fallback_std**2)

    def total_draws(self, median_seconds: np.ndarray, draws: int, rng: np.random.Generator) -> np.ndarray:
        """`draws` samples of the batch's total seconds. Empirical: the posterior predictive of normal log
        errors with unknown mean and variance (flat prior) fit on the residuals, with one chi-square and one
        normal draw per sample shared by the batch, so the uncertainty of the fit moves the stacks together;
        each stack's deviation from it normal, or (`tail="bootstrap"`) a centred residual drawn with replacement and
        scaled to the drawn variance. Otherwise independent normal errors of `fallback_std`."""
        medians = np.asarray(median_seconds, dtype=np.float64)
        if not self.empirical:
            return (medians[None, :] * np.exp(rng.normal(0.0, self.fallback_std, size=(draws, medians.size)))).sum(axis=1)
        k = len(self.residuals)
        sample_variance = float(np.var(self.residuals, ddof=1))
        variances = (k - 1) * sample_variance / rng.chisquare(k - 1, size=(draws, 1))
        means = float(np.mean(self.residuals)) + np.sqrt(variances / k) * rng.standard_normal((draws, 1))
        if self.tail == "bootstrap" and sample_variance > 0:
            centred = self.residuals - np.mean(self.residuals)
            deviations = centred[rng.integers(0, k, size=(draws, medians.size))] * np.sqrt(variances / sample_variance)
        else:
            deviations = np.sqrt(variances) * rng.standard_normal((draws, medians.size))
        errors = means + deviations
        return (medians[None, :] * np.exp(errors)).sum(axis=1)


def committee_pairs(records: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(raw predicted, measured) log-seconds of the served stacks, in the order they were saved. Only
    predictions of the time model on committee masks count (`at_serve.predicted_from`): a stack no
    committee had scored was predicted by the site's median time, a different predictor."""
    predicted, measured = [], []
    for record in records:
        at_serve = record.get("at_serve") or {}
        raw = at_serve.get("predicted_log_seconds")
        if at_serve.get("predicted_from") != "committee":
            continue
        if isinstance(raw, (int, float)) and math.isfinite(raw) and record.get("seconds", 0) > 0:
            predicted.append(raw)
            measured.append(math.log(record["seconds"]))
    return np.asarray(predicted, dtype=np.float64), np.asarray(measured, dtype=np.float64)


def log_error_model(records: Sequence[dict], fallback_std: float) -> LogErrorModel:
    """The served stacks' log errors from their time records (`committee_pairs`), recalibrated when the
    time-ordered backtest says recalibration predicts better than the raw time model."""
    return fit_log_error_model(*committee_pairs(records), fallback_std)


def _line(predicted_log: np.ndarray, measured_log: np.ndarray) -> tuple[float, float]:
    """(intercept, slope) of the recalibration line, slope kept in [MIN_SLOPE, 1]."""
    spread = float(np.var(predicted_log))
    slope = float(np.cov(predicted_log, measured_log, bias=True)[0, 1] / spread) if spread > 0 else 1.0
    slope = min(1.0, max(MIN_SLOPE, slope))
    return float(np.mean(measured_log) - slope * np.mean(predicted_log)), slope


def recalibration_backtest(predicted_log: np.ndarray, measured_log: np.ndarray) -> dict:
    """Time-ordered backtest: each stack from the (MIN_RESIDUALS + 1)-th on predicted both raw and by the
    line fit on the stacks saved before it only. n, and the median |log error| of each."""
    predicted_log = np.asarray(predicted_log, dtype=np.float64)
    measured_log = np.asarray(measured_log, dtype=np.float64)
    if len(predicted_log) <= MIN_RESIDUALS:
        return {"n": 0}
    # The line of every prefix at once, from running sums (a fit per saved stack would be quadratic).
    count = np.arange(1, len(predicted_log) + 1, dtype=np.float64)
    mean_p, mean_m = np.cumsum(predicted_log) / count, np.cumsum(measured_log) / count
    spread = np.cumsum(predicted_log**2) / count - mean_p**2
    covariance = np.cumsum(predicted_log * measured_log) / count - mean_p * mean_m
    safe = np.where(spread > 1e-12, spread, 1.0)
    slope = np.clip(np.where(spread > 1e-12, covariance / safe, 1.0), MIN_SLOPE, 1.0)
    intercept = mean_m - slope * mean_p
    k = np.arange(MIN_RESIDUALS, len(predicted_log))  # predicted from the k stacks before it: prefix k - 1
    raw = np.abs(measured_log[k] - predicted_log[k])
    recalibrated = np.abs(measured_log[k] - intercept[k - 1] - slope[k - 1] * predicted_log[k])
    return {"n": int(len(k)), "raw_median_abs_log_error": float(np.median(raw)),
            "recalibrated_median_abs_log_error": float(np.median(recalibrated))}


def fit_log_error_model(predicted_log: np.ndarray, measured_log: np.ndarray, fallback_std: float) -> LogErrorModel:
    """Recalibration line and residuals from pairs of raw predicted and measured log-seconds, in the order
    they were measured. The line is used unless the backtest (`recalibration_backtest`, at least
    MIN_RESIDUALS predictions) found it worse than the raw predictions; then the raw errors are the residuals."""
    if not (math.isfinite(fallback_std) and fallback_std >= 0):
        raise IntervalError(f"fallback_std must be a finite non-negative number, got {fallback_std}")
    predicted_log = np.asarray(predicted_log, dtype=np.float64)
    measured_log = np.asarray(measured_log, dtype=np.float64)
    if len(predicted_log) < MIN_RESIDUALS:
        return LogErrorModel(measured_log - predicted_log, float(fallback_std))
    backtest = recalibration_backtest(predicted_log, measured_log)
    if backtest["n"] >= MIN_RESIDUALS and backtest["recalibrated_median_abs_log_error"] > backtest["raw_median_abs_log_error"]:
        return LogErrorModel(measured_log - predicted_log, float(fallback_std))
    intercept, slope = _line(predicted_log, measured_log)
    return LogErrorModel(measured_log - (intercept + slope * predicted_log), float(fallback_std), intercept, slope)


def batch_total_quantile(median_seconds: np.ndarray, errors: LogErrorModel, q: float,
                         rng: np.random.Generator, draws: int = BATCH_DRAWS) -> float:
    """The q-quantile of a batch's total seconds (`LogErrorModel.total_draws`)."""
    medians = np.asarray(median_seconds, dtype=np.float64)
    if medians.size == 0:
        return 0.0
    if not np.isfinite(medians).all() or (medians <= 0).any():
        raise IntervalError("median seconds must be finite and positive")
    # Keep draws x stacks bounded: a large batch's total is concentrated (its sum averages many errors),
    # so fewer draws suffice, and a next-sample that bisects over batch sizes stays fast.
    draws = max(MIN_DRAWS, min(draws, MAX_DRAWN_VALUES // medians.size))
    return float(np.quantile(errors.total_draws(medians, draws, rng), q))


def select_within_budget_at_confidence(
    select: Callable[[np.ndarray, float], np.ndarray],
    median_seconds: np.ndarray,
    budget_seconds: float,
    errors: LogErrorModel,
    confidence: float,
    seed: int = 0,
    tolerance: float = 1.05,
) -> tuple[np.ndarray, float, float]:
    """Pick with `select(times, budget) -> indices` on median times inflated by the smallest factor f
    for which the picked batch's total stays within `budget_seconds` with probability `confidence`.

    Returns (indices, f, the batch total's `confidence`-quantile). Bisection on f (a larger f picks less,
    so its quantile falls) until f is known within `tolerance`x. The bracket runs from half the median
    error factor (a large batch averages its errors) to twice a single stack's `confidence`-quantile
    factor, doubled while even that batch does not fit. One seed for the draws: the same inputs pick the
    same batch.
    """
    check_confidence(confidence)
    medians = np.asarray(median_seconds, dtype=np.float64)

    def high_total(indices: np.ndarray) -> float:
        return batch_total_quantile(medians[indices], errors, confidence, np.random.default_rng(seed))

    low = 0.5 * min(1.0, math.exp(errors.quantile(0.5)))
    high = 2.0 * max(1.0, math.exp(errors.quantile(confidence)))
    best = np.asarray(select(medians * high, budget_seconds), dtype=int)
    best_total = high_total(best)
    # A batch can need more than a single stack's conformal quantile (a few very long residuals widen the
    # fit): double until the batch fits (an empty one always does).
    for _ in range(MAX_DOUBLINGS):
        if best_total <= budget_seconds:
            break
        low, high = high, 2.0 * high
        best = np.asarray(select(medians * high, budget_seconds), dtype=int)
        best_total = high_total(best)
    best_factor = high
    if best_total > budget_seconds:  # only for a `select` that ignores its budget
        return np.asarray([], dtype=int), high, 0.0
    if len(best) == len(medians):
        return best, best_factor, best_total  # every stack fits even inflated: a smaller factor adds nothing
    while high / low > tolerance:
        factor = math.sqrt(low * high)
        picked = np.asarray(select(medians * factor, budget_seconds), dtype=int)
        total = high_total(picked)
        if total <= budget_seconds:
            best, best_total, best_factor, high = picked, total, factor, factor
        else:
            low = factor
    return best, best_factor, best_total


def select_within_budget_at_applied_confidence(
    select: Callable[[np.ndarray, float], np.ndarray],
    median_seconds: np.ndarray,
    budget_seconds: float,
    errors: LogErrorModel,
    confidence: float,
    applied: float,
    seed: int = 0,
) -> tuple[np.ndarray, float, float]:
    """`select_within_budget_at_confidence` at the `applied` confidence (`applied_confidence`); when nothing fits
    there, at the asked `confidence`: the raise is caution learned from overruns, not a reason to serve nothing
    that the asked confidence allows (measured: once raised, a site whose fit has a heavy tail could otherwise
    get no worklist at all, and with no worklist labeled the raise never comes down). Returns (indices, the batch
    total's quantile, the confidence it is at)."""
    picked, _, total_high = select_within_budget_at_confidence(select, median_seconds, budget_seconds, errors, applied,
                                                               seed=seed)
    if len(picked) or applied <= confidence:
        return picked, total_high, applied
    picked, _, total_high = select_within_budget_at_confidence(select, median_seconds, budget_seconds, errors,
                                                               confidence, seed=seed)
    return picked, total_high, confidence


def worklist_summary(at_serve: dict) -> dict:
    """A serve snapshot with its worklist's stacks reduced to their ids: what a time record keeps."""
    worklist = at_serve.get("worklist")
    if not worklist or "items" not in worklist:
        return at_serve
    kept = {key: value for key, value in worklist.items() if key != "items"}
    return {**at_serve, "worklist": {**kept, "ids": [item["id"] for item in worklist["items"]]}}


def batch_outcomes(records: Sequence[dict]) -> list[dict]:
    """Each worklist whose every stack was labeled by the annotator it was served to: its predicted and
    measured total seconds, its budget and its `confidence`-quantile total. Worklists cut short (stacks
    taken by others, or the annotator moved on to another worklist) are left out: they were not
    labeled as predicted."""
    by_worklist: dict[str, dict[str, float]] = {}
    worklists: dict[str, dict] = {}
    for record in records:
        worklist = (record.get("at_serve") or {}).get("worklist")
        if worklist and "ids" in worklist:
            worklists[worklist["id"]] = worklist
            # A stack saved twice in one session updates its record; keep the latest seconds per stack.
            by_worklist.setdefault(worklist["id"], {})[record["image"]] = float(record["seconds"])
    outcomes = []
    for worklist_id, measured in by_worklist.items():
        worklist = worklists[worklist_id]
        if set(worklist["ids"]) <= set(measured):
            outcomes.append({
                "worklist_id": worklist_id, "n_stacks": len(worklist["ids"]),
                "predicted_seconds": worklist["predicted_seconds"], "high_seconds": worklist["high_seconds"],
                "measured_seconds": sum(measured[i] for i in worklist["ids"]),
                "budget_seconds": worklist["budget_seconds"], "confidence": worklist["confidence"],
            })
    return outcomes


def confidence_offset(outcomes: Sequence[dict], step: float = CONFIDENCE_STEP) -> float:
    """How far above the asked confidence the next worklist's batch total is budgeted, learned from this site's
    worklists labeled through (`batch_outcomes`, in order): adaptive conformal inference (Gibbs & Candes 2021)
    on their overruns. Each worklist over its budget raises the offset by step x confidence, each within it lowers
    the offset by step x (1 - confidence): where worklists overrun
    more often than 1 - confidence, whatever the time model misses (a selection effect, heavy tails, a young
    committee), the next ones are budgeted more cautiously until the share over budget comes down to 1 - confidence.
    Kept in [0, MAX_CONFIDENCE_OFFSET] at every step: never below the asked confidence, so a long run within budget
    does not bank credit against later overruns; above what `applied_confidence` applies (at most
    MAX_APPLIED_CONFIDENCE), so the overruns of worklists budgeted at that cap still count against the next ones."""
    if not (math.isfinite(step) and step >= 0):
        raise IntervalError(f"confidence step must be a finite non-negative number, got {step}")
    offset = 0.0
    for outcome in outcomes:
        confidence = check_confidence(outcome["confidence"])
        over = outcome["measured_seconds"] > outcome["budget_seconds"]
        offset = min(MAX_CONFIDENCE_OFFSET, max(0.0, offset + step * (float(over) - (1.0 - confidence))))
    return offset


def applied_confidence(confidence: float, offset: float) -> float:
    """The quantile level a worklist's batch total is budgeted at: the asked `confidence` raised by `offset`
    (`confidence_offset`), at most MAX_APPLIED_CONFIDENCE (and never below the asked confidence)."""
    return max(check_confidence(confidence), min(MAX_APPLIED_CONFIDENCE, confidence + offset))


def calibration_summary(records: Sequence[dict], confidence_step: float = CONFIDENCE_STEP) -> dict:
    """How the predictions made at serve time held, from the time records.

    Per stack: n, median log error (log measured/predicted median; > 0 means labeling took longer than
    predicted), median |log error|, and the share of measured times inside the interval given at serve
    time. Per worklist labeled through (`batch_outcomes`): batches seen, median relative error of the
    total (measured - predicted) / predicted, the share over budget, and the `confidence_offset` the next
    worklist's confidence is raised by."""
    rows = [(r["seconds"], r["at_serve"]) for r in records
            if r.get("seconds", 0) > 0 and isinstance((r.get("at_serve") or {}).get("predicted_log_seconds"), (int, float))]
    if not rows:
        return {"n": 0, "batches": 0, "confidence_offset": 0.0,
                "note": "no label saved after a serve with a time prediction yet"}
    # Judge what was served (the recalibrated median when there was one), not the raw time model.
    errors = np.array([math.log(seconds) - at_serve.get("served_log_seconds", at_serve["predicted_log_seconds"])
                       for seconds, at_serve in rows])
    inside = [at_serve["predicted_seconds_low"] <= seconds <= at_serve["predicted_seconds_high"]
              for seconds, at_serve in rows if "predicted_seconds_low" in at_serve and "predicted_seconds_high" in at_serve]
    confidences = sorted({at_serve.get("confidence") for _, at_serve in rows if at_serve.get("confidence") is not None})
    batches = batch_outcomes(records)
    chosen = log_error_model(records, fallback_std=0.0)
    return {
        "backtest": {**recalibration_backtest(*committee_pairs(records)),
                     "recalibrated": chosen.empirical and (chosen.intercept, chosen.slope) != (0.0, 1.0)},
        "n": len(rows),
        "median_log_error": float(np.median(errors)),
        "median_abs_log_error": float(np.median(np.abs(errors))),
        "interval_coverage": float(np.mean(inside)) if inside else None,
        "interval_confidences": confidences,
        "batches": len(batches),
        "median_batch_error": float(np.median([(b["measured_seconds"] - b["predicted_seconds"]) / b["predicted_seconds"]
                                               for b in batches])) if batches else None,
        "share_over_budget": float(np.mean([b["measured_seconds"] > b["budget_seconds"] for b in batches])) if batches else None,
        "confidence_offset": confidence_offset(batches, confidence_step),
    }
