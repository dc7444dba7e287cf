"""Committee disagreement and stack value: Jensen-Shannon divergence, patch scores, top-K stack value.

Follows Kuo et al. 2018, section 3.1 (eq. 1), and ACFT (paper 001, eq. 1-3) for its candidate scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_EPS = 1e-12


def _binary_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in nats of Bernoulli(p), exact 0 at p in {0, 1}."""
    q = 1.0 - p
    return -(p * np.log(np.clip(p, _EPS, 1.0)) + q * np.log(np.clip(q, _EPS, 1.0)))


def js_divergence(member_probs: np.ndarray) -> np.ndarray:
    """Voxelwise Jensen-Shannon divergence (nats) of a committee of binary predictions.

    `member_probs`: (N, ...) foreground probabilities in [0, 1], N >= 1 members on the first axis.
    Returns an array of shape `member_probs.shape[1:]` in [0, ln 2]:
    JS = H(mean_i P_i) - mean_i H(P_i), with P_i = (p_i, 1 - p_i).
    """
    probs = np.asarray(member_probs, dtype=np.float64)
    if probs.ndim < 1 or probs.shape[0] < 1:
        raise ValueError(f"member_probs must have a committee axis first; got shape {probs.shape}")
    if not np.isfinite(probs).all():
        raise ValueError("member_probs contains NaN or infinite values")
    if probs.min(initial=0.0) < 0.0 or probs.max(initial=0.0) > 1.0:
        raise ValueError("member_probs must be probabilities in [0, 1]")
    js = _binary_entropy(probs.mean(axis=0)) - _binary_entropy(probs).mean(axis=0)
    return np.clip(js, 0.0, np.log(2.0)).astype(np.float32)


def patch_scores(voxel_scores: np.ndarray, patch_size: int) -> np.ndarray:
    """Mean of `voxel_scores` over each `patch_size` x `patch_size` tile of each axial slice.

    `voxel_scores`: (Z, Y, X) finite values (e.g. JS divergence in nats, or probabilities).
    Returns (Z, ceil(Y / patch_size), ceil(X / patch_size)) float32. Tiles start at (0, 0); the last
    tile of a row or column may be partial, and its score is the mean over the voxels it covers.
    """
    scores = np.asarray(voxel_scores, dtype=np.float64)
    if scores.ndim != 3 or min(scores.shape) < 1:
        raise ValueError(f"voxel_scores must be a non-empty (Z, Y, X) array; got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("voxel_scores contains NaN or infinite values")
    if int(patch_size) != patch_size or patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer number of pixels; got {patch_size}")
    patch_size = int(patch_size)
    depth, height, width = scores.shape
    tiles_y, tiles_x = -(-height // patch_size), -(-width // patch_size)
    padded = np.zeros((depth, tiles_y * patch_size, tiles_x * patch_size))
    padded[:, :height, :width] = scores
    sums = padded.reshape(depth, tiles_y, patch_size, tiles_x, patch_size).sum(axis=(2, 4))
    rows = np.minimum(patch_size, height - patch_size * np.arange(tiles_y))
    cols = np.minimum(patch_size, width - patch_size * np.arange(tiles_x))
    return (sums / np.outer(rows, cols)[None]).astype(np.float32)


def stack_uncertainty(patch_scores: np.ndarray, k: int = 200) -> float:
    """Stack value V: mean of the `k` highest patch scores (paper section 3.1, K = 200).

    `patch_scores`: any shape, e.g. (Z, nY, nX) from `patch_scores`. `k` is capped at the number of
    patches, so a small stack averages all of its patches.
    """
    flat = np.asarray(patch_scores, dtype=np.float64).ravel()
    if flat.size == 0:
        raise ValueError("patch_scores is empty; a stack needs at least one patch")
    if not np.isfinite(flat).all():
        raise ValueError("patch_scores contains NaN or infinite values")
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer; got {k}")
    top_k = min(int(k), flat.size)
    return float(np.partition(flat, flat.size - top_k)[flat.size - top_k :].mean())


@dataclass(frozen=True)
class AcftScores:
    """ACFT candidate scores of one stack (paper 001, eq. 1-2), in nats: e, d and a = l1*e + l2*d."""

    entropy: float
    diversity: float
    total: float


def acft_scores(
    mean_prob: np.ndarray,
    patch_size: int,
    alpha: float = 0.25,
    lambda_1: float = 1.0,
    lambda_2: float = 1.0,
) -> AcftScores:
    """ACFT entropy, diversity and their weighted sum for one stack (paper 001, eq. 1-3).

    The stack is ACFT's candidate and its patch tiles are the candidate's patches: patch j predicts
    P^j = (1 - p_j, p_j), with p_j the mean foreground probability of the tile of `mean_prob`
    ((Z, Y, X) ensemble-mean probabilities). The dominant class is the one with the larger mean
    over patches (eq. 3); the patches are sorted by their probability of that class and only the top
    ceil(alpha * m) of them (at least one) enter
    e = -1/m' sum_j sum_k P^j_k log P^j_k and d = sum_k sum_{j<l} (P^j_k - P^l_k) log(P^j_k / P^l_k).
    """
    probs = np.asarray(mean_prob, dtype=np.float64)
    if probs.size and (probs.min() < 0.0 or probs.max() > 1.0):
        raise ValueError("mean_prob must be probabilities in [0, 1]")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1]; got {alpha}")
    foreground = patch_scores(probs, patch_size).ravel().astype(np.float64)
    patch_probs = np.stack([1.0 - foreground, foreground], axis=1)  # (m, 2): background, foreground
    dominant = int(np.argmax(patch_probs.mean(axis=0)))
    top_count = max(1, int(np.ceil(alpha * len(patch_probs))))
    order = np.argsort(-patch_probs[:, dominant], kind="stable")
    top = np.clip(patch_probs[order[:top_count]], _EPS, 1.0)
    log_top = np.log(top)
    entropy = float(-(top * log_top).sum(axis=1).mean())
    # sum_{j<l} (x_j - x_l)(log x_j - log x_l) = m' sum_j x_j log x_j - (sum_j x_j)(sum_j log x_j), per class:
    # the pairwise sum of eq. 1 in O(m') instead of O(m'^2) memory and time.
    diversity = float((top_count * (top * log_top).sum(axis=0) - top.sum(axis=0) * log_top.sum(axis=0)).sum())
    return AcftScores(entropy=entropy, diversity=diversity, total=lambda_1 * entropy + lambda_2 * diversity)
