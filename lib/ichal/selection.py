"""Budgeted batch selection: exact 0/1 knapsack on stack value and predicted seconds, plus baselines.

Follows Kuo et al. 2018, section 3 and 5.2 (knapsack, random, uniform-cost AL), ACFT (paper 001,
sec. 3.4, eq. 4: randomized top-omega*b sampling), a value-per-second greedy (issue 18), k-center cold
start for a pool without a model, and random audit stacks forced into a worklist (issue 20).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Upper edges (HU) of the histogram bins in `cheap_image_features`: fat/scalp, CSF, white and gray
# matter, acute blood (50-90 HU), calcification, bone. Voxels at or below -200 HU are air, not head.
_HEAD_MIN_HU = -200.0
_HU_BIN_EDGES = np.array([-200, -20, 0, 15, 25, 32, 40, 50, 60, 70, 80, 90, 100, 300, 700, 1500, np.inf])
_BLOOD_HU = (50.0, 90.0)


class SelectionInputError(ValueError):
    """Values, seconds, budget or features given to a selector are unusable; the message says why."""


@dataclass(frozen=True)
class Selection:
    """A batch to label: pool indices in labeling order, their summed value and predicted seconds."""

    indices: np.ndarray
    total_value: float
    total_seconds: float


def _check_seconds(seconds: np.ndarray, budget_seconds: float) -> np.ndarray:
    times = np.asarray(seconds, dtype=np.float64)
    if times.ndim != 1:
        raise SelectionInputError(f"seconds must be a 1-D array (one per stack); got shape {times.shape}")
    if not np.isfinite(times).all():
        raise SelectionInputError("seconds contains NaN or infinite values")
    if (times < 0).any():
        raise SelectionInputError(f"seconds must be >= 0; stack {int(np.argmin(times))} has {times.min():g}")
    if not (isinstance(budget_seconds, (int, float, np.number)) and math.isfinite(budget_seconds)):
        raise SelectionInputError(f"budget_seconds must be a finite number; got {budget_seconds!r}")
    if budget_seconds < 0:
        raise SelectionInputError(f"budget_seconds must be >= 0; got {budget_seconds:g}")
    return times


def _check_values(values: np.ndarray, times: np.ndarray) -> np.ndarray:
    scores = np.asarray(values, dtype=np.float64)
    if scores.shape != times.shape:
        raise SelectionInputError(f"values has shape {scores.shape} but seconds has shape {times.shape}")
    if not np.isfinite(scores).all():
        raise SelectionInputError("values contains NaN or infinite values")
    if (scores < 0).any():
        worst = int(np.argmin(scores))
        raise SelectionInputError(f"values must be >= 0 (stack uncertainties); stack {worst} has {scores[worst]:g}")
    return scores


def _selection(indices: list[int] | np.ndarray, values: np.ndarray | None, times: np.ndarray) -> Selection:
    chosen = np.asarray(indices, dtype=np.int64)
    total_value = math.fsum(values[chosen]) if values is not None else 0.0
    return Selection(indices=chosen, total_value=float(total_value), total_seconds=math.fsum(times[chosen]))


def _fill(order: np.ndarray, times: np.ndarray, budget_seconds: float) -> list[int]:
    """Walk `order`, adding each stack whose time still fits (the paper's "add while it fits")."""
    chosen, spent = [], 0.0
    for index in order.tolist():
        if spent + times[index] <= budget_seconds:
            chosen.append(index)
            spent += times[index]
    return chosen


def knapsack_select(
    values: np.ndarray,
    seconds: np.ndarray,
    budget_seconds: float,
    resolution_seconds: float = 10.0,
    max_table_bytes: int = 512 * 2**20,
) -> Selection:
    """Exact 0/1 knapsack: maximize sum(values) subject to sum(ceil-rounded seconds) <= budget.

    `values` (n,) >= 0 (stack uncertainty V), `seconds` (n,) >= 0 predicted labeling seconds. Times are
    rounded up and the budget down to multiples of `resolution_seconds`, so the true predicted total
    never exceeds `budget_seconds`. Dynamic programming over capacities, vectorized per item, with a
    bit-packed choice table of n x capacity bits; raises `SelectionInputError` if that table would
    exceed `max_table_bytes` (use a coarser resolution). Stacks of zero value are never chosen; on ties
    the optimum found is deterministic for a given input. Labeling order: value per second, descending.
    """
    times = _check_seconds(seconds, budget_seconds)
    scores = _check_values(values, times)
    if not (math.isfinite(resolution_seconds) and resolution_seconds > 0):
        raise SelectionInputError(f"resolution_seconds must be positive; got {resolution_seconds}")
    steps = np.ceil(times / resolution_seconds)  # float until filtered, so huge times cannot overflow
    steps += steps * resolution_seconds < times  # guard against division rounding down
    capacity = int(math.floor(budget_seconds / resolution_seconds))
    capacity -= capacity * resolution_seconds > budget_seconds
    useful = np.flatnonzero((scores > 0) & (steps <= capacity))
    weights = np.zeros(len(times), dtype=np.int64)
    weights[useful] = steps[useful]
    free = useful[weights[useful] == 0]
    items = useful[weights[useful] > 0]
    if weights[items].sum() <= capacity:
        chosen = np.concatenate([free, items])
    else:
        optimum = _knapsack_dp(scores[items], weights[items], capacity, max_table_bytes, items)
        chosen = np.concatenate([free, optimum])
    with np.errstate(divide="ignore"):
        density = np.where(times[chosen] > 0, scores[chosen] / np.maximum(times[chosen], 1e-300), np.inf)
    order = np.lexsort((chosen, -density))
    return _selection(chosen[order], scores, times)


def _knapsack_dp(
    scores: np.ndarray, weights: np.ndarray, capacity: int, max_table_bytes: int, ids: np.ndarray
) -> np.ndarray:
    """Indices `ids[j]` of an optimal subset of items j (weights >= 1) within integer `capacity`."""
    width = capacity + 1
    row_bytes = (width + 7) // 8
    table_bytes = len(weights) * row_bytes
    if table_bytes > max_table_bytes:
        raise SelectionInputError(
            f"knapsack of {len(weights)} stacks x {width} time steps needs a {table_bytes / 2**20:.0f} MiB choice "
            f"table (limit {max_table_bytes / 2**20:.0f} MiB); use a coarser resolution_seconds"
        )
    taken = np.zeros((len(weights), row_bytes), dtype=np.uint8)  # bit c of row j: item j taken at capacity c
    best = np.zeros(width)  # best[c]: best value with total weight <= c over the items seen so far
    row = np.zeros(width, dtype=bool)
    for j, (weight, score) in enumerate(zip(weights.tolist(), scores.tolist())):
        with_item = best[: width - weight] + score
        better = with_item > best[weight:]
        np.maximum(best[weight:], with_item, out=best[weight:])
        row[:weight] = False
        row[weight:] = better
        taken[j] = np.packbits(row)
    chosen, remaining = [], capacity
    for j in range(len(weights) - 1, -1, -1):
        if (taken[j, remaining >> 3] >> (7 - (remaining & 7))) & 1:
            chosen.append(int(ids[j]))
            remaining -= int(weights[j])
    return np.asarray(chosen[::-1], dtype=np.int64)


def random_select(
    seconds: np.ndarray, budget_seconds: float, rng: np.random.Generator, values: np.ndarray | None = None
) -> Selection:
    """Random baseline: stacks in random order, each added if it still fits (paper section 5.2).

    `values`, if given, only fills `total_value` (otherwise 0.0).
    """
    times = _check_seconds(seconds, budget_seconds)
    scores = None if values is None else _check_values(values, times)
    return _selection(_fill(rng.permutation(len(times)), times, budget_seconds), scores, times)


def uncertainty_select(values: np.ndarray, seconds: np.ndarray, budget_seconds: float) -> Selection:
    """Uniform-cost AL: stacks by value descending (ties: lower index first), added while they fit."""
    times = _check_seconds(seconds, budget_seconds)
    scores = _check_values(values, times)
    return _selection(_fill(np.argsort(-scores, kind="stable"), times, budget_seconds), scores, times)


def roi_select(values: np.ndarray, seconds: np.ndarray, budget_seconds: float) -> Selection:
    """Value-per-second greedy: stacks by value / seconds descending (zero seconds first; ties: lower index
    first), each added while it still fits. Stacks of zero value are never chosen, as in the knapsack.

    `values` (n,) >= 0 stack values, `seconds` (n,) >= 0 predicted labeling seconds. The knapsack's fast
    approximation: it can leave budget unused that a different combination would fill.
    """
    times = _check_seconds(seconds, budget_seconds)
    scores = _check_values(values, times)
    ratio = np.where(times > 0, scores / np.maximum(times, 1e-300), np.inf)
    order = np.argsort(-ratio, kind="stable")
    return _selection(_fill(order[scores[order] > 0], times, budget_seconds), scores, times)


def acft_select(
    scores: np.ndarray, seconds: np.ndarray, budget_seconds: float, rng: np.random.Generator, omega: int = 5
) -> Selection:
    """ACFT randomized selection (paper 001, sec. 3.4, eq. 4) under a time budget.

    `scores` (n,) are ACFT totals a_i >= 0 (`ichal.uncertainty.acft_scores(...).total`). The batch size
    b is the number of stacks that fit when taken by score; the candidates are the top omega*b stacks,
    their scores rescaled to a'_i = (a_i - a_(omega b)) / (a_1 - a_(omega b)) and drawn without
    replacement with probability proportional to a'_i (uniformly if all equal; the last candidate has
    weight 0 and comes after the others). Stacks are added in draw order while they fit, then the rest
    of the pool by score.
    """
    times = _check_seconds(seconds, budget_seconds)
    values = _check_values(scores, times)
    if int(omega) != omega or omega < 1:
        raise SelectionInputError(f"omega must be a positive integer; got {omega}")
    by_score = np.argsort(-values, kind="stable")
    batch_size = len(_fill(by_score, times, budget_seconds))
    pool = by_score[: min(len(values), int(omega) * batch_size)]
    if len(pool) == 0:
        return _selection([], values, times)
    top, bottom = values[pool[0]], values[pool[-1]]
    weights = (values[pool] - bottom) / (top - bottom) if top > bottom else np.ones(len(pool))
    # Weighted sampling without replacement (Efraimidis-Spirakis keys u^(1/w)); weight 0 sorts last.
    keys = np.full(len(pool), -np.inf)
    positive = weights > 0
    keys[positive] = np.log(rng.random(int(positive.sum()))) / weights[positive]
    draw_order = pool[np.lexsort((rng.random(len(pool)), -keys))]
    order = np.concatenate([draw_order, by_score[len(pool) :]])
    return _selection(_fill(order, times, budget_seconds), values, times)


def cold_start_select(
    image_features: np.ndarray, seconds: np.ndarray, budget_seconds: float, rng: np.random.Generator
) -> Selection:
    """Diverse first batch without a model: greedy k-center on standardized image features, in budget.

    `image_features` (n, d), e.g. `cheap_image_features` per stack. The first stack is drawn at random
    among those that fit; each next one is the stack farthest (Euclidean, z-scored features) from
    those chosen, among the stacks that still fit (ties: lower index). Stops when none fits. The
    order chosen is the labeling order; `total_value` is 0.0 (no model, no value).
    """
    times = _check_seconds(seconds, budget_seconds)
    features = np.asarray(image_features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] != len(times):
        raise SelectionInputError(
            f"image_features has shape {features.shape}; expected (n, d) with n = {len(times)}"
        )
    if not np.isfinite(features).all():
        raise SelectionInputError("image_features contains NaN or infinite values")
    spread = features.std(axis=0)
    standardized = (features - features.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    fits = times <= budget_seconds
    if not fits.any():
        return _selection([], None, times)
    chosen = [int(rng.choice(np.flatnonzero(fits)))]
    remaining = budget_seconds - times[chosen[0]]
    distance = np.linalg.norm(standardized - standardized[chosen[0]], axis=1)
    available = fits.copy()
    available[chosen[0]] = False
    while True:
        available &= times <= remaining
        if not available.any():
            break
        pick = int(np.argmax(np.where(available, distance, -1.0)))
        chosen.append(pick)
        remaining -= times[pick]
        available[pick] = False
        np.minimum(distance, np.linalg.norm(standardized - standardized[pick], axis=1), out=distance)
    return _selection(chosen, None, times)


def draw_audit_stacks(pool_size: int, count: int, seed: int, draw_number: int) -> np.ndarray:
    """`count` indices of a pool of `pool_size` stacks drawn uniformly without replacement (all of them, in
    random order, when fewer). Reproducible: the same (`seed`, `draw_number`) draws the same; each worklist
    passes another `draw_number`, so worklists draw differently."""
    if pool_size < 0 or count < 0 or draw_number < 0:
        raise SelectionInputError(f"pool_size, count and draw_number must be >= 0; got {pool_size}, {count}, {draw_number}")
    return np.random.default_rng([seed, draw_number]).permutation(pool_size)[:count]


def select_with_audits(seconds: np.ndarray, budget_seconds: float, audit: np.ndarray,
                       select_rest: Callable[[np.ndarray, np.ndarray, float], np.ndarray]) -> np.ndarray:
    """A worklist with audit stacks forced in, all within `budget_seconds` (issue 20).

    `audit`: indices into `seconds`, in draw order; the longest prefix of them whose seconds fit the budget
    is taken (fewer audits when they do not all fit). Then `select_rest(rest, seconds[rest], left)` picks
    among the other stacks `rest` under the budget left, answering indices into `rest`. Returns indices
    into `seconds`: the audits first, then the rest's picks.
    """
    times = _check_seconds(seconds, budget_seconds)
    audit = np.asarray(audit, dtype=np.int64)
    fitting = int(np.searchsorted(np.cumsum(times[audit]), budget_seconds, side="right"))
    audits = audit[:fitting]
    rest = np.setdiff1d(np.arange(len(times)), audit)
    left = max(0.0, budget_seconds - math.fsum(times[audits]))
    if not len(rest):
        return audits
    picked = np.asarray(select_rest(rest, times[rest], left), dtype=np.int64)
    return np.concatenate([audits, rest[picked]])


def cheap_image_features(image_hu: np.ndarray) -> np.ndarray:
    """Model-free features of a CT stack for cold start, shape (22,) float64.

    `image_hu`: (Z, Y, X) in HU. Returns the fraction of head voxels (> -200 HU) in 16 HU bins (scalp,
    CSF, white/gray matter, acute blood 50-90 HU in 10 HU steps, calcification, bone), the head's share
    of the volume, the mean and std (HU) of brain-window voxels (0-80 HU), and the share of
    blood-range voxels in the lower, middle and upper third of the slices.
    """
    image = np.asarray(image_hu, dtype=np.float32)
    if image.ndim != 3 or min(image.shape) < 1:
        raise SelectionInputError(f"image_hu must be a non-empty (Z, Y, X) array; got shape {image.shape}")
    if not np.isfinite(image).all():
        raise SelectionInputError("image_hu contains NaN or infinite values")
    head = image[image > _HEAD_MIN_HU]
    histogram = np.histogram(head, bins=_HU_BIN_EDGES)[0] / max(head.size, 1)
    brain = head[(head >= 0) & (head <= 80)]
    brain_stats = [float(brain.mean()), float(brain.std())] if brain.size else [0.0, 0.0]
    blood_per_slice = ((image >= _BLOOD_HU[0]) & (image <= _BLOOD_HU[1])).sum(axis=(1, 2)).astype(np.float64)
    thirds = [part.sum() for part in np.array_split(blood_per_slice, 3)]
    blood_share = np.asarray(thirds) / max(blood_per_slice.sum(), 1.0)
    return np.concatenate([histogram, [head.size / image.size], brain_stats, blood_share])
