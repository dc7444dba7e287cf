"""Labeling cost: mask features (boundary length, component count) and the log-linear labeling-time model.

Follows Kuo et al. 2018, section 3.2 (eq. 2), log t = a log(1+B) + b log(1+M) + c, plus d for stacks with a bleed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage
from skimage.measure import find_contours
from sklearn.exceptions import NotFittedError

from ichal.io import atomic_write_bytes

_JSON_KEYS = ("a", "b", "c", "d", "n", "r2", "residual_std", "fit_date", "source", "min_samples")


class TimeModelError(ValueError):
    """Features, times or a saved labeling-time model are unusable; the message says why."""


@dataclass(frozen=True)
class MaskFeatures:
    """Cost features of one stack, averaged over thresholds.

    `boundary_mm`: total 2D contour length over all axial slices, in mm.
    `n_components`: number of 3D connected components (26-connectivity).
    """

    boundary_mm: float
    n_components: float


@dataclass(frozen=True)
class TimePrior:
    """Coefficients used until enough measured times exist (see `LabelTimeModel` for the formula)."""

    a: float
    b: float
    c: float
    d: float
    residual_std: float


# Literature-sized prior (Kuo et al. 2018, section 3.2 and Fig. 3: per-stack times span ~3 orders of
# magnitude, from under a minute to hours). With these numbers a stack without bleed costs
# exp(c) = 60 s (open and review), a tiny bleed (B = 5 mm, M = 1) about 80 s, a small one (B = 100 mm,
# M = 1) about 7 min, and a large multi-focal one (B = 5000 mm, M = 3) about 90 min; a residual
# spread of 0.5 in log t is a factor ~1.6.
DEFAULT_PRIOR = TimePrior(a=0.60, b=0.30, c=math.log(60.0), d=-1.0, residual_std=0.5)
# Pull of the least-squares fit toward the prior: negligible where the measured times determine a
# coefficient, decisive where they cannot (e.g. every measured stack empty leaves a, b, d unknown).
_PRIOR_PULL = 1e-6


def _contour_length_mm(slice_prob: np.ndarray, level: float, spacing_yx_mm: tuple[float, float]) -> float:
    """Length in mm of the iso-`level` contours of one (Y, X) slice, closed at the image border."""
    rows, cols = np.nonzero(slice_prob >= level)
    if rows.size == 0:
        return 0.0
    # Crop to the foreground's bounding box plus a margin of 1, padded with 0 so contours close.
    y0, y1 = max(rows.min() - 1, 0), min(rows.max() + 2, slice_prob.shape[0])
    x0, x1 = max(cols.min() - 1, 0), min(cols.max() + 2, slice_prob.shape[1])
    crop = np.pad(slice_prob[y0:y1, x0:x1], 1)
    scale = np.asarray(spacing_yx_mm, dtype=np.float64)
    return float(sum(np.linalg.norm(np.diff(c, axis=0) * scale, axis=1).sum() for c in find_contours(crop, level)))


def mask_features(
    mean_prob: np.ndarray,
    spacing_mm: tuple[float, float, float],
    thresholds: Sequence[float] = (0.3, 0.5, 0.7),
) -> MaskFeatures:
    """Boundary length B (mm) and 3D component count M of `mean_prob` >= t, averaged over `thresholds`.

    `mean_prob`: (Z, Y, X) ensemble-mean foreground probabilities in [0, 1] (a binary label works too).
    `spacing_mm`: (z, y, x) voxel size in mm. B sums the in-plane iso-contour lengths of every slice
    (marching squares, sub-pixel); M counts 26-connected components of the thresholded volume.
    """
    probs = np.asarray(mean_prob, dtype=np.float32)
    if probs.ndim != 3 or min(probs.shape) < 1:
        raise TimeModelError(f"mean_prob must be a non-empty (Z, Y, X) array; got shape {probs.shape}")
    if not np.isfinite(probs).all() or probs.min() < 0.0 or probs.max() > 1.0:
        raise TimeModelError("mean_prob must hold finite probabilities in [0, 1]")
    if len(spacing_mm) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing_mm):
        raise TimeModelError(f"spacing_mm must be three positive (z, y, x) sizes in mm; got {spacing_mm}")
    if len(thresholds) == 0 or not all(0.0 < t < 1.0 for t in thresholds):
        raise TimeModelError(f"thresholds must be a non-empty list of values in (0, 1); got {thresholds}")
    spacing_yx = (float(spacing_mm[1]), float(spacing_mm[2]))
    full_connectivity = np.ones((3, 3, 3), dtype=bool)
    boundaries_mm, counts = [], []
    for level in thresholds:
        mask = probs >= level
        slices_with_foreground = np.flatnonzero(mask.any(axis=(1, 2)))
        boundaries_mm.append(sum(_contour_length_mm(probs[z], level, spacing_yx) for z in slices_with_foreground))
        counts.append(ndimage.label(mask, structure=full_connectivity)[1] if slices_with_foreground.size else 0)
    return MaskFeatures(boundary_mm=float(np.mean(boundaries_mm)), n_components=float(np.mean(counts)))


def _feature_matrix(features: Sequence[MaskFeatures] | np.ndarray) -> np.ndarray:
    """(n, 2) float64 [boundary_mm, n_components] from MaskFeatures or an array, validated."""
    if len(features) > 0 and isinstance(features[0], MaskFeatures):
        matrix = np.array([[f.boundary_mm, f.n_components] for f in features], dtype=np.float64)
    else:
        matrix = np.asarray(features, dtype=np.float64)
        if matrix.size == 0:
            matrix = matrix.reshape(0, 2)
    if matrix.ndim != 2 or matrix.shape[1] != 2:
        raise TimeModelError(f"features must be (n, 2) [boundary_mm, n_components]; got shape {matrix.shape}")
    if not np.isfinite(matrix).all() or (matrix < 0).any():
        raise TimeModelError("features must be finite and non-negative (boundary in mm, component count)")
    return matrix


def _design(matrix: np.ndarray) -> np.ndarray:
    """(n, 4) regressors [log(1+B), log(1+M), min(M, 1), 1]: min(M, 1) is 1 for a stack with a bleed."""
    components = matrix[:, 1]
    return np.column_stack([np.log1p(matrix[:, 0]), np.log1p(components), np.minimum(components, 1.0),
                            np.ones(len(matrix))])


class LabelTimeModel:
    """Predicts per-stack labeling seconds from mask features (scikit-learn estimator contract).

    log t = a log(1+B) + b log(1+M) + c + d min(M, 1): the paper's eq. 2 for stacks with a bleed, whose
    log B is undefined for empty stacks; exp(c) is the time of an empty stack (open and review) and d
    shifts the line of stacks with a bleed (M >= 1; M averaged over thresholds may be fractional).
    `fit` estimates it by least squares on measured times; coefficients the times cannot determine
    (e.g. all stacks empty) stay at `prior`. With fewer than `min_samples` times it keeps `prior`
    and reports source "prior". Learned: `coef_` = (a, b, d), `intercept_` = c, `n_`, `r2_` (None
    when undefined), `residual_std_` (of log t), `fit_date_`, `source_`.
    """

    def __init__(self, min_samples: int = 10, prior: TimePrior = DEFAULT_PRIOR) -> None:
        self.min_samples = min_samples
        self.prior = prior

    def fit(self, features: Sequence[MaskFeatures] | np.ndarray, seconds: np.ndarray) -> LabelTimeModel:
        """Fit on `features` (n stacks) and measured labeling `seconds` (n,), all > 0. Returns self."""
        if int(self.min_samples) != self.min_samples or self.min_samples < 5:
            raise TimeModelError(f"min_samples must be an integer >= 5 (four coefficients); got {self.min_samples}")
        matrix = _feature_matrix(features)
        times = np.asarray(seconds, dtype=np.float64).ravel()
        if len(times) != len(matrix):
            raise TimeModelError(f"{len(matrix)} feature rows but {len(times)} times")
        if not np.isfinite(times).all() or (times <= 0).any():
            raise TimeModelError("labeling seconds must be finite and positive")
        design, log_times = _design(matrix), np.log(times)
        prior = np.array([self.prior.a, self.prior.b, self.prior.d, self.prior.c])
        measured = len(times) >= self.min_samples
        if measured:
            gram = design.T @ design + _PRIOR_PULL * np.eye(4)
            coefficients = np.linalg.solve(gram, design.T @ log_times + _PRIOR_PULL * prior)
            residuals = log_times - design @ coefficients
            dof = max(len(times) - int(np.linalg.matrix_rank(design)), 1)
            self.residual_std_ = float(np.sqrt((residuals**2).sum() / dof))
        else:
            coefficients = prior
            residuals = log_times - design @ coefficients
            self.residual_std_ = float(self.prior.residual_std)
        total_variation = float(((log_times - log_times.mean()) ** 2).sum()) if len(times) else 0.0
        self.r2_ = 1.0 - float((residuals**2).sum()) / total_variation if total_variation > 0 else None
        self.coef_ = coefficients[:3].copy()
        self.intercept_ = float(coefficients[3])
        self.n_ = int(len(times))
        self.source_ = "measured" if measured else "prior"
        self.fit_date_ = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise NotFittedError("LabelTimeModel is not fitted: call fit (with no times it uses the prior) or load")

    def predict_log(self, features: Sequence[MaskFeatures] | np.ndarray) -> np.ndarray:
        """Predicted log labeling seconds (the median of the lognormal), shape (n,)."""
        self._check_fitted()
        design = _design(_feature_matrix(features))
        return design @ np.array([*self.coef_, self.intercept_])

    def predict(self, features: Sequence[MaskFeatures] | np.ndarray) -> np.ndarray:
        """Expected labeling seconds, shape (n,): exp(log-prediction + residual_std^2 / 2).

        The lognormal mean (not the median) so that sums over a batch are unbiased.
        """
        return np.exp(self.predict_log(features) + 0.5 * self.residual_std_**2)

    def describe(self) -> dict:
        """What the server shows: coefficients a, b, c, d, n, r2, residual_std (log t), fit date, source."""
        self._check_fitted()
        return {
            "a": float(self.coef_[0]),
            "b": float(self.coef_[1]),
            "c": self.intercept_,
            "d": float(self.coef_[2]),
            "n": self.n_,
            "r2": self.r2_,
            "residual_std": self.residual_std_,
            "fit_date": self.fit_date_,
            "source": self.source_,
            "min_samples": int(self.min_samples),
        }

    def save(self, path: str | Path) -> None:
        """Atomically write `describe()` as readable JSON."""
        atomic_write_bytes(path, json.dumps(self.describe(), indent=2).encode())

    @classmethod
    def load(cls, path: str | Path) -> LabelTimeModel:
        """Read a model written by `save`; raises `TimeModelError` naming the file and the problem."""
        path = Path(path)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise TimeModelError(f"cannot read labeling-time model {path}: {error}") from error
        missing = [key for key in _JSON_KEYS if not isinstance(record, dict) or key not in record]
        if missing:
            raise TimeModelError(f"labeling-time model {path} lacks {missing}")
        if record["source"] not in ("prior", "measured"):
            raise TimeModelError(f"labeling-time model {path} has unknown source {record['source']!r}")
        numbers = [record[key] for key in ("a", "b", "c", "d", "residual_std")]
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in numbers) or record["residual_std"] < 0:
            raise TimeModelError(f"labeling-time model {path} has non-numeric or invalid coefficients")
        model = cls(min_samples=int(record["min_samples"]))
        model.coef_ = np.array([float(record["a"]), float(record["b"]), float(record["d"])])
        model.intercept_ = float(record["c"])
        model.n_ = int(record["n"])
        model.r2_ = None if record["r2"] is None else float(record["r2"])
        model.residual_std_ = float(record["residual_std"])
        model.fit_date_ = str(record["fit_date"])
        model.source_ = record["source"]
        return model
