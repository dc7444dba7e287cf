"""Tests for committee uncertainty: JS divergence, patch tiling, top-K stack value, ACFT scores."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ichal.uncertainty import acft_scores, js_divergence, patch_scores, stack_uncertainty


def _entropy(p: float) -> float:
    return -sum(x * math.log(x) for x in (p, 1.0 - p) if x > 0)


def test_js_divergence_matches_direct_formula():
    rng = np.random.default_rng(0)
    probs = rng.random((4, 3, 5, 6))
    probs[0, 0, 0, 0], probs[1, 0, 0, 0] = 0.0, 1.0  # exact 0 and 1 must be safe
    js = js_divergence(probs)
    assert js.shape == (3, 5, 6)
    for index in [(0, 0, 0), (1, 2, 3), (2, 4, 5)]:
        members = [float(probs[(i, *index)]) for i in range(4)]
        expected = _entropy(sum(members) / 4) - sum(_entropy(p) for p in members) / 4
        assert js[index] == pytest.approx(expected, abs=1e-6)


def test_js_divergence_is_zero_for_agreement_and_ln2_for_total_disagreement():
    agree = np.full((4, 2, 3, 3), 0.8)
    assert np.allclose(js_divergence(agree), 0.0, atol=1e-7)
    opposite = np.stack([np.zeros((1, 2, 2)), np.ones((1, 2, 2))])
    assert np.allclose(js_divergence(opposite), math.log(2.0), atol=1e-6)


def test_js_divergence_rejects_nan_and_out_of_range():
    with pytest.raises(ValueError, match="NaN"):
        js_divergence(np.array([[np.nan, 0.5]]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        js_divergence(np.array([[1.5, 0.5]]))


def test_patch_scores_means_tiles_including_partial_edges():
    rng = np.random.default_rng(1)
    scores = rng.random((2, 7, 10))
    tiles = patch_scores(scores, 4)
    assert tiles.shape == (2, 2, 3)
    for z in range(2):
        for ty in range(2):
            for tx in range(3):
                block = scores[z, 4 * ty : 4 * ty + 4, 4 * tx : 4 * tx + 4]
                assert tiles[z, ty, tx] == pytest.approx(block.mean(), abs=1e-6)


def test_patch_scores_rejects_bad_input():
    with pytest.raises(ValueError, match="Z, Y, X"):
        patch_scores(np.zeros((4, 4)), 2)
    with pytest.raises(ValueError, match="patch_size"):
        patch_scores(np.zeros((1, 4, 4)), 0)
    with pytest.raises(ValueError, match="NaN"):
        patch_scores(np.full((1, 4, 4), np.nan), 2)


def test_stack_uncertainty_is_mean_of_top_k_and_caps_k():
    scores = np.array([[[0.1, 0.9], [0.5, 0.3]]])
    assert stack_uncertainty(scores, k=2) == pytest.approx(0.7)
    assert stack_uncertainty(scores, k=1) == pytest.approx(0.9)
    assert stack_uncertainty(scores, k=200) == pytest.approx(0.45)  # k capped at 4 patches


def test_stack_uncertainty_rejects_empty_and_bad_k():
    with pytest.raises(ValueError, match="empty"):
        stack_uncertainty(np.zeros((0, 2, 2)))
    with pytest.raises(ValueError, match="k must be"):
        stack_uncertainty(np.ones((1, 2, 2)), k=0)


def _direct_acft(patch_fg: list[float], alpha: float) -> tuple[float, float]:
    """Eq. 1 and 3 of ACFT written out with loops, for binary patches (1 - p, p)."""
    patches = [(1.0 - p, p) for p in patch_fg]
    dominant = 0 if sum(q[0] for q in patches) >= sum(q[1] for q in patches) else 1
    top = sorted(patches, key=lambda q: -q[dominant])[: max(1, math.ceil(alpha * len(patches)))]
    top = [tuple(min(max(x, 1e-12), 1.0) for x in q) for q in top]
    entropy = -sum(x * math.log(x) for q in top for x in q) / len(top)
    diversity = sum(
        (top[j][k] - top[l][k]) * math.log(top[j][k] / top[l][k])
        for k in (0, 1)
        for j in range(len(top))
        for l in range(j, len(top))
    )
    return entropy, diversity


def test_acft_scores_match_the_paper_formulas():
    rng = np.random.default_rng(2)
    mean_prob = rng.random((2, 8, 8)) ** 3  # mostly background: dominant class 0
    scores = acft_scores(mean_prob, patch_size=2, alpha=0.25, lambda_1=1.0, lambda_2=0.5)
    patch_fg = patch_scores(mean_prob, 2).ravel().astype(np.float64).tolist()
    entropy, diversity = _direct_acft(patch_fg, 0.25)
    assert scores.entropy == pytest.approx(entropy, rel=1e-6)
    assert scores.diversity == pytest.approx(diversity, rel=1e-6)
    assert scores.total == pytest.approx(entropy + 0.5 * diversity, rel=1e-6)


def test_acft_scores_use_the_dominant_foreground_class():
    mean_prob = np.full((1, 4, 4), 0.9)
    mean_prob[0, :2, :2] = 0.55  # the least foreground-confident patch is left out by alpha = 1/4
    scores = acft_scores(mean_prob, patch_size=2, alpha=0.25)
    assert scores.entropy == pytest.approx(_entropy(0.9), rel=1e-5)
    assert scores.diversity == pytest.approx(0.0, abs=1e-9)


def test_acft_scores_are_zero_for_a_certain_empty_stack():
    scores = acft_scores(np.zeros((2, 8, 8)), patch_size=4)
    assert scores.entropy == pytest.approx(0.0, abs=1e-9)
    assert scores.total == pytest.approx(0.0, abs=1e-9)


def test_acft_scores_reject_bad_alpha_and_probabilities():
    with pytest.raises(ValueError, match="alpha"):
        acft_scores(np.zeros((1, 4, 4)), patch_size=2, alpha=0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        acft_scores(np.full((1, 4, 4), 2.0), patch_size=2)
