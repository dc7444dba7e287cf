"""Detection levels (pixel, region, frame, stack) and their metrics: average precision and Dice.

Kuo et al. 2018, section 2 (pixelwise predictions grouped into 3D regions, aggregated to frame and
stack scores) and section 5 (pixel/region/frame/stack AP). Pixel AP streams through a histogram.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.special import digamma
from sklearn.metrics import average_precision_score, roc_auc_score

from ichal.config import DEFAULT_CONFIG

# 26-connectivity in (Z, Y, X): a region continues to the next 5 mm slice through any touching voxel.
CONNECTIVITY_3D = np.ones((3, 3, 3), dtype=bool)
DEFAULT_PIXEL_AP_BINS = 2**16
# Per-stack pixel histograms kept for the paired bootstrap: 4096 bins equally wide in logit between -20 and
# 20, because trained models put most voxels within 1e-3 of 0 or 1, where equal-width bins cannot separate them.
BOOTSTRAP_BINS = 4096
BOOTSTRAP_BIN_EDGES = 1.0 / (1.0 + np.exp(-np.linspace(-20.0, 20.0, BOOTSTRAP_BINS + 1)[1:-1]))


def _check_pair(prob: np.ndarray, label: np.ndarray) -> None:
    if prob.shape != label.shape:
        raise ValueError(f"prediction shape {prob.shape} does not match label shape {label.shape}")


def dice(prediction: np.ndarray, label: np.ndarray) -> float:
    """Dice 2|A n B| / (|A| + |B|) of two binary masks of equal shape; 1.0 when both are empty."""
    _check_pair(prediction, label)
    a, b = prediction.astype(bool), label.astype(bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def region_scores(mean_prob: np.ndarray, threshold: float = DEFAULT_CONFIG.detection_threshold
                  ) -> tuple[np.ndarray, np.ndarray]:
    """3D regions of a (Z, Y, X) probability map: connected components of `mean_prob >= threshold`.

    Returns (components, scores): an int32 (Z, Y, X) map with 0 = background and regions 1..R, and
    an (R,) array whose entry r-1 is the highest probability inside region r.
    """
    components, count = ndimage.label(mean_prob >= threshold, structure=CONNECTIVITY_3D)
    scores = ndimage.maximum(mean_prob, components, index=np.arange(1, count + 1)) if count else []
    return components.astype(np.int32), np.asarray(scores, dtype=np.float64)


def frame_scores(mean_prob: np.ndarray) -> np.ndarray:
    """(Z,) frame (slice) scores: the highest voxel probability in each slice of a (Z, Y, X) map."""
    return mean_prob.reshape(mean_prob.shape[0], -1).max(axis=1).astype(np.float64)


# Stack-level scores (issue 19). The highest voxel ties at probability 1.00 on nearly every stack of a trained
# model, empty or not (docs/model.md, "Look-alike negatives"), so stack AP was decided among ties; the other
# candidates grow with how much the model calls bleed, which single false-positive voxels do not have.
STACK_SCORE_CANDIDATES = ("max_voxel", "top_volume_mean", "largest_region_mean", "largest_region_ml", "detected_ml")
# Volume below which a called region does not make a stack positive by itself (0.1 mL: ~6 voxels at
# 1.8 x 1.8 x 5 mm; the smallest generated bleeds are larger).
STACK_SCORE_FLOOR_ML = DEFAULT_CONFIG.min_region_ml
# The candidate used for stack AP, the paired bootstrap and the app's stack call: the best of the candidates on
# held-out stacks (docs/model.md, "Stack score").
STACK_SCORE = "top_volume_mean"


def _voxel_ml(spacing_mm: Sequence[float]) -> float:
    """Volume of one voxel of (z, y, x) mm spacing, in mL; ValueError unless positive."""
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    if not voxel_ml > 0:
        raise ValueError(f"spacing must be positive, got {tuple(spacing_mm)}")
    return voxel_ml


def stack_score_candidates(mean_prob: np.ndarray, spacing_mm: Sequence[float],
                           threshold: float = DEFAULT_CONFIG.detection_threshold,
                           floor_ml: float = STACK_SCORE_FLOOR_ML) -> dict[str, float]:
    """Every candidate stack score of one (Z, Y, X) probability map with voxel spacing (z, y, x) mm.

    Regions are 3D components of `mean_prob >= threshold`; a region's soft volume is the sum of its
    probabilities times the voxel volume (mL).
    - `max_voxel`: the highest voxel probability (the paper's stack score; the highest frame score).
    - `top_volume_mean`: mean of the highest voxels that fill `floor_ml`.
    - `largest_region_mean`: mean probability of the region with the largest soft volume among regions of at
      least `floor_ml`; without one, `threshold * max_voxel` (below every such region).
    - `largest_region_ml` / `detected_ml`: soft volume of the largest region / of all regions; without a region,
      the soft volume of the best voxel (`max_voxel` times the voxel volume, below any region's).
    """
    voxel_ml = _voxel_ml(spacing_mm)
    prob = np.asarray(mean_prob)
    max_voxel = float(prob.max())
    components, count = ndimage.label(prob >= threshold, structure=CONNECTIVITY_3D)
    scores = {"max_voxel": max_voxel, "top_volume_mean": top_volume_mean(prob, spacing_mm, floor_ml)}
    if not count:
        return scores | {"largest_region_mean": threshold * max_voxel, "largest_region_ml": max_voxel * voxel_ml,
                         "detected_ml": max_voxel * voxel_ml}
    sizes_ml = np.bincount(components.ravel(), minlength=count + 1)[1:] * voxel_ml
    soft_ml = np.asarray(ndimage.sum(prob, components, np.arange(1, count + 1)), dtype=np.float64) * voxel_ml
    large = sizes_ml >= floor_ml
    largest_mean = (float(soft_ml[large].max() / sizes_ml[large][soft_ml[large].argmax()]) if large.any()
                    else threshold * max_voxel)
    return scores | {"largest_region_mean": largest_mean, "largest_region_ml": float(soft_ml.max()),
                     "detected_ml": float(soft_ml.sum())}


def top_volume_mean(mean_prob: np.ndarray, spacing_mm: Sequence[float], floor_ml: float = STACK_SCORE_FLOOR_ML) -> float:
    """Mean probability of the highest voxels of a (Z, Y, X) map that fill `floor_ml` (at least one voxel)."""
    flat = np.asarray(mean_prob).ravel()
    top = max(1, min(flat.size, round(floor_ml / _voxel_ml(spacing_mm))))
    return float(np.partition(flat, flat.size - top)[-top:].astype(np.float64).mean())


def stack_score(mean_prob: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """The stack score `STACK_SCORE` (`top_volume_mean`) of one (Z, Y, X) probability map, in [0, 1]; the
    detection threshold or more calls the stack positive. Only a partial sort: no connected components."""
    return top_volume_mean(mean_prob, spacing_mm)


def region_hits(mean_prob: np.ndarray, label: np.ndarray, threshold: float = DEFAULT_CONFIG.detection_threshold
                ) -> tuple[np.ndarray, np.ndarray, int]:
    """Match predicted regions to ground-truth 3D components of one stack, by descending score.

    A region is a hit when it overlaps a not-yet-matched true component (it takes the one it
    overlaps most); otherwise it is a false positive. Returns (scores (R,), hit (R,) bool,
    number of true components).
    """
    _check_pair(mean_prob, label)
    components, scores = region_scores(mean_prob, threshold)
    truth, truth_count = ndimage.label(label.astype(bool), structure=CONNECTIVITY_3D)
    hits = np.zeros(scores.size, dtype=bool)
    matched = np.zeros(truth_count + 1, dtype=bool)
    boxes = ndimage.find_objects(components)
    for region in np.argsort(-scores, kind="stable"):
        box = boxes[region]
        overlap = np.bincount(truth[box][components[box] == region + 1], minlength=truth_count + 1)
        overlap[0] = 0
        overlap[matched] = 0
        if overlap.any():
            matched[int(overlap.argmax())] = True
            hits[region] = True
    return scores, hits, truth_count


def detection_ap(scores: np.ndarray, hits: np.ndarray, positives: int) -> float:
    """AP of a ranked detection list when `positives` true objects exist (some possibly never detected).

    Equals scikit-learn's AP of (hits, scores) scaled by recall = hits / positives; nan without positives.
    """
    if positives == 0:
        return float("nan")
    found = int(np.sum(hits))
    if found == 0:
        return 0.0
    return float(average_precision_score(np.asarray(hits, dtype=bool), scores)) * found / positives


def _ap(targets: np.ndarray, scores: np.ndarray) -> float:
    """scikit-learn AP, nan when there is no positive target."""
    targets = np.asarray(targets, dtype=bool)
    return float(average_precision_score(targets, scores)) if targets.any() else float("nan")


def _auc(targets: np.ndarray, scores: np.ndarray) -> float:
    """scikit-learn ROC AUC, nan unless both classes occur."""
    targets = np.asarray(targets, dtype=bool)
    return float(roc_auc_score(targets, scores)) if 0 < targets.sum() < targets.size else float("nan")


def region_ap(mean_probs: Sequence[np.ndarray], labels: Sequence[np.ndarray],
              threshold: float = DEFAULT_CONFIG.detection_threshold) -> float:
    """Region AP over stacks: detections pooled across stacks, recall over all true components."""
    per_stack = [region_hits(p, l, threshold) for p, l in zip(mean_probs, labels, strict=True)]
    scores = np.concatenate([s for s, _, _ in per_stack]) if per_stack else np.zeros(0)
    hits = np.concatenate([h for _, h, _ in per_stack]) if per_stack else np.zeros(0, dtype=bool)
    return detection_ap(scores, hits, sum(n for _, _, n in per_stack))


def frame_ap(mean_probs: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> float:
    """Frame AP: every slice of every stack, score `frame_scores`, positive when it holds any bleed voxel."""
    for p, l in zip(mean_probs, labels, strict=True):
        _check_pair(p, l)
    scores = np.concatenate([frame_scores(p) for p in mean_probs])
    targets = np.concatenate([l.reshape(l.shape[0], -1).any(axis=1) for l in labels])
    return _ap(targets, scores)


def stack_ap(mean_probs: Sequence[np.ndarray], labels: Sequence[np.ndarray],
             spacings_mm: Sequence[Sequence[float]]) -> float:
    """Stack AP: one `stack_score` per stack, positive when the stack holds any bleed voxel."""
    for p, l in zip(mean_probs, labels, strict=True):
        _check_pair(p, l)
    scores = [stack_score(p, spacing) for p, spacing in zip(mean_probs, spacings_mm, strict=True)]
    return _ap(np.array([l.any() for l in labels]), np.array(scores))


def binned_average_precision(positives: np.ndarray, negatives: np.ndarray) -> float:
    """AP of scores given as per-bin positive/negative counts (ascending score bins), each bin a tie
    (scikit-learn's convention for tied scores); nan without positives."""
    pos = np.asarray(positives, dtype=np.float64)[::-1]
    neg = np.asarray(negatives, dtype=np.float64)[::-1]
    total = pos.sum()
    if total == 0:
        return float("nan")
    tp, seen = np.cumsum(pos), np.cumsum(pos + neg)
    return float(np.sum(pos[pos > 0] * tp[pos > 0] / seen[pos > 0]) / total)


def _histograms(prob: np.ndarray, label: np.ndarray, n_bins: int, edges: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Per-bin counts of positive and negative voxels in `n_bins` bins: equal-width probability bins, or
    the bins between ascending interior `edges` (n_bins - 1 of them)."""
    flat = np.asarray(prob, dtype=np.float64).ravel()
    if flat.size and (not np.isfinite(flat).all() or flat.min() < 0.0 or flat.max() > 1.0):
        raise ValueError("pixel AP needs probabilities in [0, 1]")
    if edges is None:
        bins = np.minimum((flat * n_bins).astype(np.int64), n_bins - 1)
    else:
        bins = np.searchsorted(edges, flat, side="right")
    truth = np.asarray(label).ravel().astype(bool)
    return np.bincount(bins[truth], minlength=n_bins), np.bincount(bins[~truth], minlength=n_bins)


@dataclass(frozen=True)
class BinnedAP:
    """Pixel AP from binned scores: `ap` treats each bin as tied scores (scikit-learn's convention);
    the exact AP of the unbinned scores lies in [`lower`, `upper`] (negatives / positives first in
    every bin), so `upper - lower` is the error bound of the binning on this data."""

    ap: float
    lower: float
    upper: float


class PixelAPAccumulator:
    """Streaming pixel AP: `update(prob, label)` per stack, `result()` at the end.

    Keeps two histograms of `n_bins` equal-width probability bins (16 bytes per bin), so memory does
    not grow with the number of voxels.
    """

    def __init__(self, n_bins: int = DEFAULT_PIXEL_AP_BINS) -> None:
        if n_bins < 1:
            raise ValueError(f"n_bins must be at least 1, got {n_bins}")
        self.n_bins = n_bins
        self.positives = np.zeros(n_bins, dtype=np.int64)
        self.negatives = np.zeros(n_bins, dtype=np.int64)

    def update(self, prob: np.ndarray, label: np.ndarray) -> None:
        """Add voxels: `prob` in [0, 1] and binary `label` of the same shape."""
        _check_pair(prob, label)
        positives, negatives = _histograms(prob, label, self.n_bins)
        self.positives += positives
        self.negatives += negatives

    def result(self) -> BinnedAP:
        """AP and its binning bounds; nan for all three when no positive voxel was seen."""
        total_positives = int(self.positives.sum())
        if total_positives == 0:
            return BinnedAP(float("nan"), float("nan"), float("nan"))
        keep = (self.positives + self.negatives) > 0
        pos = self.positives[keep][::-1].astype(np.float64)  # descending score
        neg = self.negatives[keep][::-1].astype(np.float64)
        tp, fp = np.cumsum(pos), np.cumsum(neg)
        tied = binned_average_precision(self.positives, self.negatives)
        tp_before, seen_before = tp - pos, tp + fp - pos - neg

        def precision_sum(offset: np.ndarray) -> np.ndarray:
            # sum_{j=1..p} (a + j) / (d + j) = p - (d - a) (psi(d + p + 1) - psi(d + 1)), d = offset
            return pos - (offset - tp_before) * (digamma(offset + pos + 1.0) - digamma(offset + 1.0))

        upper = float(np.sum(precision_sum(seen_before))) / total_positives
        lower = float(np.sum(precision_sum(seen_before + neg))) / total_positives
        return BinnedAP(ap=tied, lower=min(lower, tied), upper=max(upper, tied))


def pixel_ap(mean_probs: Iterable[np.ndarray], labels: Iterable[np.ndarray],
             n_bins: int = DEFAULT_PIXEL_AP_BINS) -> BinnedAP:
    """Pixel AP over stacks, streamed through a `PixelAPAccumulator` (one stack in memory at a time)."""
    accumulator = PixelAPAccumulator(n_bins)
    for prob, label in zip(mean_probs, labels, strict=True):
        accumulator.update(prob, label)
    return accumulator.result()


class DetectionEvaluator:
    """All detection metrics over a test set, fed one stack at a time.

    `update(mean_prob, label, spacing_mm)` keeps only per-stack summaries (pixel histogram, region hits,
    frame scores, every stack score candidate, Dice counts); `result()` returns pixel/region/frame/stack AP,
    stack AUC (stack score `STACK_SCORE`), pooled Dice (all voxels of all stacks) and mean Dice over stacks
    with a bleed; `stack_score_comparison()` the stack AP and AUC of every candidate. Each stack's coarse pixel
    histogram (logit bins) and Dice counts are kept too (64 KiB per stack) for `paired_bootstrap`.
    """

    def __init__(self, threshold: float = DEFAULT_CONFIG.detection_threshold,
                 n_bins: int = DEFAULT_PIXEL_AP_BINS) -> None:
        self.threshold = threshold
        self.pixels = PixelAPAccumulator(n_bins)
        self.region_scores: list[np.ndarray] = []
        self.region_hits: list[np.ndarray] = []
        self.region_truths = 0
        self.frame_scores: list[np.ndarray] = []
        self.frame_targets: list[np.ndarray] = []
        self.stack_candidates: dict[str, list[float]] = {name: [] for name in STACK_SCORE_CANDIDATES}
        self.stack_scores = self.stack_candidates[STACK_SCORE]
        self.stack_targets: list[bool] = []
        self.positive_stack_dice: list[float] = []
        self.stack_histograms: list[tuple[np.ndarray, np.ndarray]] = []
        self.stack_dice_counts: list[tuple[int, int]] = []

    def update(self, mean_prob: np.ndarray, label: np.ndarray, spacing_mm: Sequence[float]) -> None:
        _check_pair(mean_prob, label)
        truth = label.astype(bool)
        self.pixels.update(mean_prob, truth)
        scores, hits, count = region_hits(mean_prob, truth, self.threshold)
        self.region_scores.append(scores)
        self.region_hits.append(hits)
        self.region_truths += count
        self.frame_scores.append(frame_scores(mean_prob))
        self.frame_targets.append(truth.reshape(truth.shape[0], -1).any(axis=1))
        for name, score in stack_score_candidates(mean_prob, spacing_mm, self.threshold).items():
            self.stack_candidates[name].append(score)
        self.stack_targets.append(bool(truth.any()))
        predicted = mean_prob >= self.threshold
        self.stack_dice_counts.append((int(np.logical_and(predicted, truth).sum()), int(predicted.sum()) + int(truth.sum())))
        self.stack_histograms.append(_histograms(mean_prob, truth, BOOTSTRAP_BINS, BOOTSTRAP_BIN_EDGES))
        if truth.any():
            self.positive_stack_dice.append(dice(predicted, truth))

    def result(self) -> dict[str, float]:
        pixel = self.pixels.result()
        positive_dice = self.positive_stack_dice
        intersection, mask_sum = np.array(self.stack_dice_counts, dtype=np.int64).reshape(-1, 2).sum(axis=0)
        return {
            "pixel_ap": pixel.ap,
            "pixel_ap_bound": pixel.upper - pixel.lower,
            "region_ap": detection_ap(np.concatenate(self.region_scores), np.concatenate(self.region_hits),
                                      self.region_truths),
            "frame_ap": _ap(np.concatenate(self.frame_targets), np.concatenate(self.frame_scores)),
            "stack_ap": _ap(np.array(self.stack_targets), np.array(self.stack_scores)),
            "stack_auc": _auc(np.array(self.stack_targets), np.array(self.stack_scores)),
            "dice": 1.0 if mask_sum == 0 else 2.0 * float(intersection) / float(mask_sum),
            "mean_dice_positive": float(np.mean(positive_dice)) if positive_dice else float("nan"),
            "stacks": len(self.stack_scores),
        }

    def stack_score_comparison(self) -> dict[str, dict[str, float]]:
        """Stack AP and ROC AUC of every candidate stack score (`stack_score_candidates`)."""
        targets = np.array(self.stack_targets)
        return {name: {"stack_ap": _ap(targets, np.array(scores)), "stack_auc": _auc(targets, np.array(scores))}
                for name, scores in self.stack_candidates.items()}


@dataclass(frozen=True)
class PairedDifference:
    """`second - first` of one metric on the same stacks, with a bootstrap confidence interval."""

    metric: str
    first: float
    second: float
    difference: float
    low: float
    high: float


def paired_bootstrap(pairs: Sequence[tuple[DetectionEvaluator, DetectionEvaluator]], resamples: int = 2000,
                     confidence: float = 0.95, seed: int = 0, stack_score: str = STACK_SCORE) -> list[PairedDifference]:
    """Is the second model of each pair better than the first on these stacks? Paired bootstrap of pixel AP,
    stack AP and pooled Dice.

    Every evaluator must have seen the same stacks in the same order. Each resample draws stacks with
    replacement and scores both models of a pair on the same draw, so stack-to-stack difficulty cancels.
    With several pairs (e.g. 60 vs. 200 stacks from several training pools) the figures are means over the
    pairs, and each resample also draws the pairs with replacement, so the interval covers which training
    pool was drawn as well as which test stacks (with few pairs the interval is a little too narrow: the
    bootstrap's variance is (k - 1) / k of the true one for k pairs). Pixel AP uses the kept histograms
    (`BOOTSTRAP_BIN_EDGES`, the same bins for all); resamples without a bleed stack are skipped for stack
    AP, which ranks stacks by the candidate `stack_score`. Returns one `PairedDifference` per metric with the `confidence` percentile interval of the difference.
    """
    def stack_sizes(evaluator: DetectionEvaluator) -> list[tuple[int, int]]:
        return [(int(pos.sum()), int(neg.sum())) for pos, neg in evaluator.stack_histograms]

    evaluators = [evaluator for pair in pairs for evaluator in pair]
    if not evaluators or not len(evaluators[0].stack_targets) or any(
            stack_sizes(e) != stack_sizes(evaluators[0]) for e in evaluators[1:]):
        raise ValueError("paired bootstrap needs evaluations of the same, non-empty list of stacks")
    if stack_score not in STACK_SCORE_CANDIDATES:
        raise ValueError(f"stack_score must be one of {STACK_SCORE_CANDIDATES}, got {stack_score!r}")
    if resamples < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(f"need resamples >= 1 and confidence in (0, 1), got {resamples}, {confidence}")
    n, k = len(evaluators[0].stack_targets), len(pairs)
    targets = np.array(evaluators[0].stack_targets)

    def arrays(evaluator: DetectionEvaluator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        positives = np.stack([h[0] for h in evaluator.stack_histograms]).astype(np.float64)
        negatives = np.stack([h[1] for h in evaluator.stack_histograms]).astype(np.float64)
        return positives, negatives, np.array(evaluator.stack_candidates[stack_score]), np.array(evaluator.stack_dice_counts, dtype=np.float64)

    def metrics(data, weights: np.ndarray) -> np.ndarray:
        positives, negatives, scores, dice_counts = data
        stack = (float(average_precision_score(targets, scores, sample_weight=weights))
                 if (weights * targets).sum() > 0 else float("nan"))
        intersection, mask_sum = weights @ dice_counts
        return np.array([binned_average_precision(weights @ positives, weights @ negatives), stack,
                         1.0 if mask_sum == 0 else 2.0 * intersection / mask_sum])

    data = [(arrays(first), arrays(second)) for first, second in pairs]
    ones = np.ones(n)
    observed = np.array([[metrics(first, ones), metrics(second, ones)] for first, second in data])  # (k, 2, 3)
    rng = np.random.default_rng(seed)
    differences = np.empty((resamples, 3))
    for r in range(resamples):
        weights = np.bincount(rng.integers(n, size=n), minlength=n).astype(np.float64)
        # One pair draws nothing more, so its intervals stay those of the same seed before pairs were resampled.
        drawn = np.bincount(rng.integers(k, size=k), minlength=k) if k > 1 else np.ones(1, dtype=int)
        differences[r] = sum(count * (metrics(data[p][1], weights) - metrics(data[p][0], weights))
                             for p, count in enumerate(drawn) if count) / k
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.nanpercentile(differences, [tail, 100.0 - tail], axis=0)
    first_mean, second_mean = observed.mean(axis=0)
    return [PairedDifference(name, float(a), float(b), float(b - a), float(lo), float(hi))
            for name, a, b, lo, hi in zip(("pixel_ap", "stack_ap", "dice"), first_mean, second_mean, low, high)]
