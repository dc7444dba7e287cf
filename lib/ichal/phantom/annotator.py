"""Simulated annotator: the ground-truth seconds an expert needs to label one generated stack pixelwise.

DESIGN.md "Data": review overhead + per bleeding slice + tracing along the true boundary + per component,
slower on low contrast, times a lognormal annotator factor (deliberately not the regressor's log-linear form).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.measure import perimeter

REVIEW_SECONDS = (30.0, 90.0)
PER_BLEED_SLICE_SECONDS = (5.0, 15.0)
TRACING_SECONDS_PER_MM = (0.35, 0.6)
PER_COMPONENT_SECONDS = (20.0, 45.0)
ANNOTATOR_LOG_SIGMA = 0.25
# Tracing slows down by up to this factor as blood density falls from 80 to 50 HU (faint edges).
LOW_CONTRAST_SLOWDOWN = 1.2


@dataclass(frozen=True)
class LabelFeatures:
    """True-mask features: boundary (mm, 2D perimeters summed over slices), 3D components, slices, volume."""

    boundary_mm: float
    n_components: int
    n_bleed_slices: int
    volume_ml: float


def label_features(label: np.ndarray, spacing_mm: tuple[float, float, float]) -> LabelFeatures:
    """Features of a (Z, Y, X) binary mask with (z, y, x) spacing in mm (in-plane spacing assumed square)."""
    mask = label.astype(bool)
    bleed_slices = np.flatnonzero(mask.any(axis=(1, 2)))
    boundary_px = sum(float(perimeter(mask[z])) for z in bleed_slices)
    _, n_components = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    return LabelFeatures(
        boundary_mm=boundary_px * float(spacing_mm[2]),
        n_components=int(n_components),
        n_bleed_slices=int(bleed_slices.size),
        volume_ml=float(mask.sum()) * voxel_ml,
    )


def contrast_slowdown(blood_hu: float) -> float:
    """Tracing time multiplier: 1 for dense blood (>= 80 HU) up to 1 + LOW_CONTRAST_SLOWDOWN at 50 HU."""
    return 1.0 + LOW_CONTRAST_SLOWDOWN * float(np.clip((80.0 - blood_hu) / 30.0, 0.0, 1.0))


def simulated_annotator_seconds(
    boundary_mm: float, n_components: int, n_bleed_slices: int, mean_blood_hu: float, seed: int
) -> float:
    """Seconds to label one stack: open/review + per bleeding slice + tracing + per component, times a factor.

    `boundary_mm` is the true boundary length (2D perimeters summed over slices), `mean_blood_hu` the
    boundary-weighted blood density (ignored when there is no blood). The per-stack rates and the lognormal
    annotator factor are drawn from `seed`, so the same stack always costs the same.
    """
    if boundary_mm < 0 or n_components < 0 or n_bleed_slices < 0:
        raise ValueError(
            f"label features must be non-negative, got boundary_mm={boundary_mm}, "
            f"n_components={n_components}, n_bleed_slices={n_bleed_slices}"
        )
    rng = np.random.default_rng([int(seed), 7919])
    review = rng.uniform(*REVIEW_SECONDS)
    per_slice = rng.uniform(*PER_BLEED_SLICE_SECONDS)
    per_mm = rng.uniform(*TRACING_SECONDS_PER_MM)
    per_component = rng.uniform(*PER_COMPONENT_SECONDS)
    factor = rng.lognormal(0.0, ANNOTATOR_LOG_SIGMA)
    slowdown = contrast_slowdown(mean_blood_hu) if boundary_mm > 0 else 1.0
    seconds = review + per_slice * n_bleed_slices + per_mm * boundary_mm * slowdown + per_component * n_components
    return float(seconds * factor)
