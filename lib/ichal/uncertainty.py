"""Committee disagreement and stack value: Jensen-Shannon divergence, patch scores, top-K stack value.

Follows Kuo et al. 2018, section 3.1 (eq. 1), and ACFT (paper 001, eq. 1-3) for its candidate scores.
"""

from __future__ import annotations

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
