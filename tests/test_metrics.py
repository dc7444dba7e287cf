"""Detection-level scores and metrics, checked against scikit-learn on small cases."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from ichal.metrics import (
    DetectionEvaluator,
    PixelAPAccumulator,
    detection_ap,
    dice,
    frame_ap,
    frame_scores,
    paired_bootstrap,
    pixel_ap,
    region_ap,
    region_hits,
    region_scores,
    STACK_SCORE,
    STACK_SCORE_CANDIDATES,
    stack_ap,
    stack_score_candidates,
    stack_score,
)


SPACING_MM = (5.0, 1.8, 1.8)


def _random_case(seed: int, shape=(3, 6, 7)):
    rng = np.random.default_rng(seed)
    label = rng.random(shape) < 0.2
    prob = np.clip(0.35 * label + 0.65 * rng.random(shape), 0, 1).astype(np.float32)
    return prob, label


def test_dice_on_known_masks():
    a = np.array([1, 1, 0, 0], dtype=bool)
    assert dice(a, np.array([1, 0, 1, 0])) == pytest.approx(0.5)
    assert dice(a, a) == 1.0
    assert dice(np.zeros(4), np.zeros(4)) == 1.0
    with pytest.raises(ValueError, match="does not match label shape"):
        dice(a, np.zeros(3))


def test_binned_pixel_ap_equals_sklearn_when_scores_sit_on_distinct_bins():
    n_bins = 64
    rng = np.random.default_rng(1)
    scores = (rng.integers(0, n_bins, 500) + 0.5) / n_bins  # bin centres; many ties, as sklearn sees them
    labels = rng.random(500) < scores
    result = pixel_ap([scores.reshape(5, 10, 10)], [labels.reshape(5, 10, 10)], n_bins=n_bins)
    assert result.ap == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("n_bins", [1, 16, 2**16])
def test_exact_ap_lies_within_the_stated_binning_bounds(n_bins):
    probs, labels = zip(*[_random_case(seed) for seed in range(4)])
    exact = average_precision_score(np.concatenate([l.ravel() for l in labels]),
                                    np.concatenate([p.ravel() for p in probs]))
    result = pixel_ap(probs, labels, n_bins=n_bins)
    assert result.lower - 1e-9 <= exact <= result.upper + 1e-9
    assert result.lower <= result.ap <= result.upper
    if n_bins == 2**16:
        assert result.upper - result.lower < 1e-3 and result.ap == pytest.approx(exact, abs=1e-3)
    if n_bins == 1:
        assert result.ap == pytest.approx(np.mean(np.concatenate([l.ravel() for l in labels])))


def test_pixel_ap_streams_in_any_chunking():
    prob, label = _random_case(7, shape=(4, 8, 8))
    whole = PixelAPAccumulator()
    whole.update(prob, label)
    chunked = PixelAPAccumulator()
    for z in range(4):
        chunked.update(prob[z], label[z])
    assert chunked.result() == whole.result()
    assert np.isnan(pixel_ap([prob], [np.zeros_like(label)]).ap)
    with pytest.raises(ValueError, match="probabilities in \\[0, 1\\]"):
        whole.update(prob * 2, label)


def test_frame_and_stack_ap_match_sklearn():
    probs, labels = zip(*[_random_case(seed) for seed in range(6)])
    labels = list(labels)
    labels[2] = np.zeros_like(labels[2])  # a negative stack
    frames = np.concatenate([frame_scores(p) for p in probs])
    frame_truth = np.concatenate([l.any(axis=(1, 2)) for l in labels])
    assert frame_ap(probs, labels) == pytest.approx(average_precision_score(frame_truth, frames))
    stacks = [stack_score(p, SPACING_MM) for p in probs]
    assert stacks == [stack_score_candidates(p, SPACING_MM)[STACK_SCORE] for p in probs]
    top = round(0.1 / (5 * 1.8 * 1.8 / 1000))  # the highest voxels that fill 0.1 mL
    assert stacks[0] == pytest.approx(float(np.sort(probs[0].ravel())[-top:].mean()))
    assert stack_ap(probs, labels, [SPACING_MM] * 6) == pytest.approx(
        average_precision_score([l.any() for l in labels], stacks))


def _two_bleeds():
    label = np.zeros((3, 12, 12), dtype=np.uint8)
    label[0:2, 1:4, 1:4] = 1  # bleed A spans two slices
    label[2, 8:11, 8:11] = 1  # bleed B
    prob = np.zeros(label.shape, dtype=np.float32)
    prob[0:2, 2:4, 2:4] = 0.9  # hits A
    prob[1, 2:3, 2:3] = 0.95
    prob[2, 5:7, 0:2] = 0.8  # false positive
    prob[0, 9:11, 9:11] = 0.6  # false positive (B is on slice 2)
    return prob, label


def test_regions_are_3d_components_scored_by_their_peak():
    prob, _ = _two_bleeds()
    components, scores = region_scores(prob, threshold=0.5)
    assert components.max() == 3
    assert sorted(scores.tolist()) == pytest.approx([0.6, 0.8, 0.95])


def test_region_ap_counts_missed_bleeds_and_matches_sklearn_times_recall():
    prob, label = _two_bleeds()
    scores, hits, truths = region_hits(prob, label, threshold=0.5)
    assert truths == 2 and hits.sum() == 1
    expected = average_precision_score(hits, scores) * 1 / 2  # ranked: hit, FP, FP; recall caps at 1/2
    assert region_ap([prob], [label], threshold=0.5) == pytest.approx(expected) == pytest.approx(0.5)
    assert detection_ap(np.array([0.9, 0.8]), np.array([False, True]), 1) == pytest.approx(0.5)
    assert np.isnan(detection_ap(np.zeros(0), np.zeros(0, dtype=bool), 0))


def test_a_region_over_an_already_matched_bleed_is_a_false_positive():
    label = np.zeros((1, 10, 10), dtype=np.uint8)
    label[0, 2:8, 2:8] = 1
    prob = np.zeros(label.shape, dtype=np.float32)
    prob[0, 2:4, 2:4], prob[0, 6:8, 6:8] = 0.9, 0.7  # two separate regions inside one bleed
    scores, hits, truths = region_hits(prob, label, threshold=0.5)
    assert truths == 1 and sorted(zip(scores.tolist(), hits.tolist())) == [(pytest.approx(0.7), False),
                                                                        (pytest.approx(0.9), True)]


def test_evaluator_agrees_with_the_standalone_metrics():
    cases = [_random_case(seed) for seed in range(5)] + [_two_bleeds()]
    probs, labels = [c[0] for c in cases], [c[1].astype(np.uint8) for c in cases]
    evaluator = DetectionEvaluator(threshold=0.5)
    for p, l in cases:
        evaluator.update(p, l, SPACING_MM)
    result = evaluator.result()
    assert result["pixel_ap"] == pytest.approx(pixel_ap(probs, labels).ap)
    assert result["region_ap"] == pytest.approx(region_ap(probs, labels, threshold=0.5))
    assert result["frame_ap"] == pytest.approx(frame_ap(probs, labels))
    assert result["stack_ap"] == pytest.approx(stack_ap(probs, labels, [SPACING_MM] * len(probs)))
    comparison = evaluator.stack_score_comparison()
    assert set(comparison) == set(STACK_SCORE_CANDIDATES)
    assert comparison["max_voxel"]["stack_ap"] == pytest.approx(
        average_precision_score([l.any() for l in labels], [p.max() for p in probs]))
    assert np.isnan(result["stack_auc"])  # every stack holds a bleed: no AUC
    pooled = dice(np.concatenate([p.ravel() >= 0.5 for p in probs]), np.concatenate([l.ravel() for l in labels]))
    assert result["dice"] == pytest.approx(pooled)
    assert result["stacks"] == 6


def _evaluate(probs, labels) -> DetectionEvaluator:
    evaluator = DetectionEvaluator(threshold=0.5)
    for p, l in zip(probs, labels):
        evaluator.update(p, l, SPACING_MM)
    return evaluator


def _noisy_stacks(signal: float, noise: float, seed: int, count: int = 30):
    """Stacks where every other one has a bleed; probabilities = `signal` x label + `noise` x uniform."""
    rng = np.random.default_rng(seed)
    labels = [np.zeros((2, 8, 8), dtype=np.uint8) for _ in range(count)]
    for index, label in enumerate(labels[::2]):
        label[index % 2, 2:5, 2:5] = 1
    probs = [np.clip(signal * l + noise * rng.random(l.shape), 0, 1).astype(np.float32) for l in labels]
    return probs, labels


def test_paired_bootstrap_finds_a_better_model_and_no_difference_against_itself():
    good, labels = _noisy_stacks(0.6, 0.4, seed=0)
    poor, _ = _noisy_stacks(0.05, 0.95, seed=1)
    better = paired_bootstrap([(_evaluate(poor, labels), _evaluate(good, labels))], resamples=300)
    assert [d.metric for d in better] == ["pixel_ap", "stack_ap", "dice"]
    observed = {d.metric: d for d in better}
    assert observed["stack_ap"].second == pytest.approx(stack_ap(good, labels, [SPACING_MM] * len(good)))
    assert observed["stack_ap"].first == pytest.approx(stack_ap(poor, labels, [SPACING_MM] * len(poor)))
    assert observed["dice"].second == pytest.approx(_evaluate(good, labels).result()["dice"])
    assert _evaluate(good, labels).result()["stack_auc"] == pytest.approx(
        roc_auc_score([l.any() for l in labels], [stack_score(p, SPACING_MM) for p in good]))
    assert observed["pixel_ap"].second == pytest.approx(pixel_ap(good, labels).ap, abs=5e-3)  # logit bins
    for difference in better:
        assert difference.difference > 0 and 0 < difference.low <= difference.difference <= difference.high
    same = paired_bootstrap([(_evaluate(good, labels), _evaluate(good, labels))], resamples=50)
    assert all(d.difference == d.low == d.high == 0 for d in same)


def test_paired_bootstrap_rejects_different_stacks_and_bad_settings():
    probs, labels = _noisy_stacks(0.6, 0.4, seed=0)
    with pytest.raises(ValueError, match="same, non-empty list of stacks"):
        paired_bootstrap([(_evaluate(probs, labels), _evaluate(probs[1:], labels[1:]))])
    with pytest.raises(ValueError, match="same, non-empty list of stacks"):  # a second pair on other stacks
        paired_bootstrap([(_evaluate(probs, labels), _evaluate(probs, labels)),
                          (_evaluate(probs[1:], labels[1:]), _evaluate(probs[1:], labels[1:]))])
    with pytest.raises(ValueError, match="same, non-empty list of stacks"):
        paired_bootstrap([(DetectionEvaluator(), DetectionEvaluator())])
    with pytest.raises(ValueError, match="same, non-empty list of stacks"):
        paired_bootstrap([])
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap([(_evaluate(probs, labels), _evaluate(probs, labels))], confidence=1.0)
    with pytest.raises(ValueError, match="stack_score must be one of"):
        paired_bootstrap([(_evaluate(probs, labels), _evaluate(probs, labels))], stack_score="mean")


def _empty_stack_with(spots: list[tuple[int, int, int, float]]) -> np.ndarray:
    prob = np.zeros((4, 16, 16), dtype=np.float32)
    for z, y, x, value in spots:
        prob[z, y, x] = value
    return prob


def test_stack_score_candidates_rank_a_bleed_above_a_single_saturated_voxel():
    # 1.8 x 1.8 x 5 mm: 16.2 uL per voxel, the 0.1 mL floor is 6 voxels
    lone_voxel = _empty_stack_with([(1, 3, 3, 1.0)])
    bleed = _empty_stack_with([])
    bleed[1:3, 6:9, 6:9] = 0.9  # 18 voxels, 0.29 mL
    faint = _empty_stack_with([(2, 10, 10, 0.3)])
    scores = {name: stack_score_candidates(p, SPACING_MM, 0.5) for name, p in
              (("lone", lone_voxel), ("bleed", bleed), ("faint", faint))}
    voxel_ml = 5 * 1.8 * 1.8 / 1000
    assert scores["lone"]["max_voxel"] == 1.0 > scores["bleed"]["max_voxel"]  # the tie problem, reversed
    assert scores["bleed"]["largest_region_ml"] == pytest.approx(18 * 0.9 * voxel_ml, rel=1e-5)
    assert scores["bleed"]["detected_ml"] == pytest.approx(18 * 0.9 * voxel_ml, rel=1e-5)
    assert scores["bleed"]["largest_region_mean"] == pytest.approx(0.9)
    assert scores["lone"]["largest_region_mean"] == pytest.approx(0.5)  # region under the floor: 0.5 x max
    assert scores["bleed"]["top_volume_mean"] == pytest.approx(0.9)
    assert scores["lone"]["top_volume_mean"] == pytest.approx(1.0 / 6)
    assert scores["faint"]["largest_region_ml"] == pytest.approx(0.3 * voxel_ml)  # no region: the best voxel
    for name in ("top_volume_mean", "largest_region_mean", "largest_region_ml", "detected_ml"):
        assert scores["bleed"][name] > scores["lone"][name] > scores["faint"][name], name
    with pytest.raises(ValueError, match="spacing must be positive"):
        stack_score_candidates(bleed, (0.0, 1.0, 1.0))


def test_paired_bootstrap_over_several_pairs_averages_them_and_resamples_the_pairs():
    # Two training draws: one where the second model is much better, one where it is the same model.
    good, labels = _noisy_stacks(0.6, 0.4, seed=0)
    poor, _ = _noisy_stacks(0.05, 0.95, seed=1)
    gain = [(_evaluate(poor, labels), _evaluate(good, labels))]
    no_gain = [(_evaluate(good, labels), _evaluate(good, labels))]
    single = {d.metric: d for d in paired_bootstrap(gain, resamples=300)}
    mixed = {d.metric: d for d in paired_bootstrap(gain + no_gain, resamples=300)}
    for metric in ("pixel_ap", "dice"):
        assert mixed[metric].difference == pytest.approx(single[metric].difference / 2)
        assert mixed[metric].first == pytest.approx((single[metric].first + single[metric].second) / 2)
        # Drawing the no-gain pair twice gives 0, the gain pair twice the full gain: both ends are reached.
        assert mixed[metric].low == pytest.approx(0.0, abs=1e-12)
        assert mixed[metric].high > 0.8 * single[metric].difference
