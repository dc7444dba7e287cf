"""Tests for labeling-cost features and the log-linear labeling-time model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ichal.cost import DEFAULT_PRIOR, LabelTimeModel, MaskFeatures, TimeModelError, mask_features


def _square_volume(side_px: int, slices: int) -> np.ndarray:
    volume = np.zeros((slices + 2, 40, 40), dtype=np.float32)
    volume[1 : slices + 1, 5 : 5 + side_px, 8 : 8 + side_px] = 1.0
    return volume


def test_mask_features_boundary_is_perimeter_in_mm_summed_over_slices():
    features = mask_features(_square_volume(20, 3), spacing_mm=(5.0, 0.5, 0.5))
    # Marching squares on a binary square: side 20 px with the four corners cut diagonally.
    perimeter_px = 4 * 19 + 4 * math.sqrt(0.5)
    assert features.boundary_mm == pytest.approx(3 * perimeter_px * 0.5, rel=0.02)
    assert features.n_components == 1.0


def test_mask_features_respect_anisotropic_in_plane_spacing():
    isotropic = mask_features(_square_volume(20, 1), spacing_mm=(5.0, 1.0, 1.0)).boundary_mm
    stretched = mask_features(_square_volume(20, 1), spacing_mm=(5.0, 2.0, 1.0)).boundary_mm
    assert stretched == pytest.approx(1.5 * isotropic, rel=0.03)


def test_mask_features_count_3d_components_with_diagonal_connectivity():
    volume = np.zeros((3, 20, 20), dtype=np.float32)
    volume[0, 2:4, 2:4] = 1.0
    volume[1, 4:6, 4:6] = 1.0  # touches the first blob only across a corner: same component
    volume[2, 15:18, 15:18] = 1.0
    assert mask_features(volume, spacing_mm=(5.0, 0.5, 0.5)).n_components == 2.0


def test_mask_features_average_over_thresholds_and_are_zero_when_empty():
    volume = np.zeros((2, 20, 20), dtype=np.float32)
    assert mask_features(volume, (5.0, 0.5, 0.5)) == MaskFeatures(boundary_mm=0.0, n_components=0.0)
    volume[0, 5:10, 5:10] = 0.6  # above 0.3 and 0.5, below 0.7
    assert mask_features(volume, (5.0, 0.5, 0.5)).n_components == pytest.approx(2 / 3)


def test_mask_features_reject_bad_input():
    with pytest.raises(TimeModelError, match="Z, Y, X"):
        mask_features(np.zeros((4, 4)), (1.0, 1.0, 1.0))
    with pytest.raises(TimeModelError, match="probabilities"):
        mask_features(np.full((1, 4, 4), np.nan), (1.0, 1.0, 1.0))
    with pytest.raises(TimeModelError, match="spacing"):
        mask_features(np.zeros((1, 4, 4)), (1.0, 0.0, 1.0))
    with pytest.raises(TimeModelError, match="thresholds"):
        mask_features(np.zeros((1, 4, 4)), (1.0, 1.0, 1.0), thresholds=(0.0,))


def _synthetic_times(n: int, a: float, b: float, c: float, d: float, noise: float, seed: int):
    """Features (40% empty stacks) and seconds from the model's own form with lognormal noise."""
    rng = np.random.default_rng(seed)
    has_bleed = rng.random(n) > 0.4
    boundary_mm = np.where(has_bleed, np.exp(rng.uniform(1, 9, n)), 0.0)
    components = np.where(has_bleed, rng.integers(1, 9, n), 0).astype(float)
    log_t = (a * np.log1p(boundary_mm) + b * np.log1p(components) + c + d * has_bleed
             + rng.normal(0, noise, n))
    return np.column_stack([boundary_mm, components]), np.exp(log_t)


_TRUE = {"a": 0.6, "b": 0.4, "c": 3.5, "d": -1.2}


def test_time_model_recovers_known_coefficients_from_noisy_data():
    features, seconds = _synthetic_times(400, **_TRUE, noise=0.3, seed=3)
    model = LabelTimeModel().fit(features, seconds)
    assert model.coef_ == pytest.approx([0.6, 0.4, -1.2], abs=0.1)
    assert model.intercept_ == pytest.approx(3.5, abs=0.1)
    assert model.residual_std_ == pytest.approx(0.3, abs=0.04)
    assert model.source_ == "measured" and model.n_ == 400 and model.r2_ > 0.9


def test_time_model_expected_seconds_make_batch_totals_unbiased():
    features, seconds = _synthetic_times(2000, **_TRUE, noise=0.5, seed=4)
    model = LabelTimeModel().fit(features[:1000], seconds[:1000])
    assert model.predict(features[1000:]).sum() == pytest.approx(seconds[1000:].sum(), rel=0.06)


def test_time_model_uses_prior_below_min_samples_and_says_so():
    features, seconds = _synthetic_times(9, **_TRUE, noise=0.3, seed=5)
    model = LabelTimeModel(min_samples=10).fit(features, seconds)
    info = model.describe()
    assert info["source"] == "prior" and info["n"] == 9
    prior = (DEFAULT_PRIOR.a, DEFAULT_PRIOR.b, DEFAULT_PRIOR.c, DEFAULT_PRIOR.d)
    assert (info["a"], info["b"], info["c"], info["d"]) == prior
    empty = LabelTimeModel().fit(np.zeros((0, 2)), np.zeros(0))
    assert empty.describe()["source"] == "prior" and empty.r2_ is None
    assert empty.predict(np.array([[0.0, 0.0]]))[0] == pytest.approx(
        math.exp(DEFAULT_PRIOR.c + DEFAULT_PRIOR.residual_std**2 / 2)
    )


def test_time_model_keeps_prior_only_for_coefficients_the_times_cannot_determine():
    rng = np.random.default_rng(9)
    empty_seconds = np.exp(rng.normal(math.log(45.0), 0.2, 20))
    model = LabelTimeModel().fit(np.zeros((20, 2)), empty_seconds)  # every stack empty: only c is known
    assert model.source_ == "measured"
    assert model.intercept_ == pytest.approx(np.log(empty_seconds).mean(), abs=1e-4)
    assert model.coef_ == pytest.approx([DEFAULT_PRIOR.a, DEFAULT_PRIOR.b, DEFAULT_PRIOR.d], abs=1e-4)


def test_time_model_keeps_its_parameters_and_returns_self():
    model = LabelTimeModel(min_samples=12)
    features, seconds = _synthetic_times(30, **_TRUE, noise=0.3, seed=6)
    assert model.fit(features, seconds) is model
    assert model.min_samples == 12 and model.prior is DEFAULT_PRIOR


def test_time_model_accepts_mask_features_objects():
    features, seconds = _synthetic_times(30, **_TRUE, noise=0.3, seed=7)
    as_objects = [MaskFeatures(boundary_mm=float(b), n_components=float(m)) for b, m in features]
    np.testing.assert_allclose(
        LabelTimeModel().fit(as_objects, seconds).predict(as_objects),
        LabelTimeModel().fit(features, seconds).predict(features),
    )


def test_time_model_save_load_round_trip(tmp_path):
    features, seconds = _synthetic_times(50, **_TRUE, noise=0.3, seed=8)
    model = LabelTimeModel().fit(features, seconds)
    path = tmp_path / "time_model.json"
    model.save(path)
    record = json.loads(path.read_text())
    assert {"a", "b", "c", "d", "n", "r2", "residual_std", "fit_date", "source"} <= record.keys()
    loaded = LabelTimeModel.load(path)
    np.testing.assert_allclose(loaded.predict(features), model.predict(features))
    assert loaded.describe() == model.describe()


def test_time_model_load_names_the_broken_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"a": 1.0}')
    with pytest.raises(TimeModelError, match="broken.json"):
        LabelTimeModel.load(path)
    path.write_text("not json")
    with pytest.raises(TimeModelError, match="broken.json"):
        LabelTimeModel.load(path)


def test_time_model_rejects_bad_input_and_unfitted_use():
    with pytest.raises(ValueError, match="not fitted"):
        LabelTimeModel().predict(np.zeros((1, 2)))
    with pytest.raises(TimeModelError, match="finite and non-negative"):
        LabelTimeModel().fit(np.array([[np.nan, 1.0]] * 12), np.ones(12))
    with pytest.raises(TimeModelError, match="positive"):
        LabelTimeModel().fit(np.ones((12, 2)), -np.ones(12))
    with pytest.raises(TimeModelError, match="12 feature rows but 11 times"):
        LabelTimeModel().fit(np.ones((12, 2)), np.ones(11))
    with pytest.raises(TimeModelError, match=r"\(n, 2\)"):
        LabelTimeModel().fit(np.ones((12, 3)), np.ones(12))
