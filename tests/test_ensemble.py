"""Ensemble inference geometry, JS extremes, checkpoint round trip and corruption handling."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import ichal.ensemble as ensemble_module
from ichal.config import DEFAULT_CONFIG
from ichal.ensemble import (
    CheckpointError,
    EnsembleModel,
    load_ensemble,
    predict_stack,
    save_ensemble,
    windows_to_meta,
)
from ichal.io import VolumeError
from ichal.models import ModelPreset, Stage, build_network

TINY = ModelPreset("tiny", 4, 3, (Stage(8, 1, stride=2), Stage(8, 1, dilation=2), Stage(8, 1, residual=False)))
MODEL_SPACING_MM = 1.0
PATCH_PX = 24


def _meta(preset: ModelPreset = TINY) -> dict:
    return {
        "preset": preset.to_dict(),
        "channels": windows_to_meta(DEFAULT_CONFIG.hu_windows),
        "patch_px": PATCH_PX,
        "spacing_mm": MODEL_SPACING_MM,
        "train_ids": ["a", "b"],
        "metrics": {},
        "versions": {},
        "created": "2024-01-01T00:00:00+00:00",
    }


def _tiny_ensemble(members: int = 2) -> EnsembleModel:
    networks = []
    for seed in range(members):
        torch.manual_seed(seed)
        networks.append(build_network(TINY, len(DEFAULT_CONFIG.hu_windows)).eval())
    return EnsembleModel(members=networks, meta=_meta())


class BrightnessDetector(nn.Module):
    """Calls a pixel hemorrhage when its brain-window value (channel 0) exceeds 0.6 (48 HU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, :1] - 0.6) * 50.0


class ConstantLogit(nn.Module):
    def __init__(self, logit: float) -> None:
        super().__init__()
        self.logit = logit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x[:, :1], self.logit)


def _head_ct(shape, blob=None, seed=0) -> np.ndarray:
    """Air outside an ellipse of 30 HU brain; `blob` = (z, y0, y1, x0, x1) set to 70 HU."""
    depth, height, width = shape
    yy, xx = np.mgrid[:height, :width]
    inside = ((yy - height / 2) / (0.45 * height)) ** 2 + ((xx - width / 2) / (0.45 * width)) ** 2 < 1
    image = np.where(inside, 30.0, -1000.0)[None].repeat(depth, axis=0)
    image[:, 0, 0] = 1200.0  # a bone-like voxel so the value range looks like CT
    if blob is not None:
        z, y0, y1, x0, x1 = blob
        image[z, y0:y1, x0:x1] = 70.0
    return (image + np.random.default_rng(seed).normal(0, 2, image.shape)).astype(np.int16)


@pytest.mark.parametrize("shape, spacing", [((3, 37, 53), (5.0, 0.7, 1.3)), ((2, 41, 29), (2.5, 1.9, 1.9))])
def test_outputs_stay_on_the_input_grid_for_odd_sizes_and_spacings(shape, spacing):
    model = _tiny_ensemble()
    prediction = predict_stack(model, _head_ct(shape), spacing, batch_slices=2)
    assert prediction.member_probs.shape == (2, *shape)
    assert prediction.mean_prob.shape == shape and prediction.js.shape == shape
    assert prediction.member_probs.dtype == np.float32
    assert 0.0 <= prediction.member_probs.min() and prediction.member_probs.max() <= 1.0
    assert 0.0 <= prediction.js.min() and prediction.js.max() <= math.log(2) + 1e-6


@pytest.mark.parametrize("spacing", [(5.0, 0.6, 0.6), (5.0, 1.7, 1.1)])
def test_a_lesion_is_found_where_it_is_after_resampling(spacing):
    shape, blob = (3, 61, 67), (1, 20, 32, 35, 50)
    model = EnsembleModel(members=[BrightnessDetector()], meta=_meta())
    prediction = predict_stack(model, _head_ct(shape, blob), spacing)
    found = prediction.mean_prob >= 0.5
    found[:, :4, :4] = False  # the bone marker voxel in the corner is bright too
    truth = np.zeros(shape, dtype=bool)
    truth[blob[0], blob[1] : blob[2], blob[3] : blob[4]] = True
    overlap = 2 * np.logical_and(found, truth).sum() / (found.sum() + truth.sum())
    assert overlap > 0.85
    assert not found[[0, 2]].any()


def test_js_is_zero_when_members_agree_and_ln2_at_full_disagreement():
    image, spacing = _head_ct((2, 32, 32)), (5.0, 1.0, 1.0)
    agreeing = _tiny_ensemble(1)
    agreeing.members.append(copy.deepcopy(agreeing.members[0]))
    assert np.abs(predict_stack(agreeing, image, spacing).js).max() < 1e-6
    opposed = EnsembleModel(members=[ConstantLogit(40.0), ConstantLogit(-40.0)], meta=_meta())
    prediction = predict_stack(opposed, image, spacing)
    np.testing.assert_allclose(prediction.js, math.log(2), atol=1e-5)
    np.testing.assert_allclose(prediction.mean_prob, 0.5, atol=1e-5)


@pytest.mark.parametrize(
    "image, spacing, message",
    [
        (np.zeros((32, 32), dtype=np.int16), (5.0, 1.0, 1.0), "expected \\(Z, Y, X\\)"),
        (np.random.default_rng(0).random((2, 32, 32)), (5.0, 1.0, 1.0), "not a CT in Hounsfield units"),
        (_head_ct((2, 8, 32)), (5.0, 1.0, 1.0), "at least 16x16"),
        (_head_ct((2, 32, 32)), (5.0, -1.0, 1.0), "spacing_mm"),
        (_head_ct((2, 32, 32)), (1.0, 1.0), "spacing_mm"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_error(image, spacing, message):
    with pytest.raises(VolumeError, match=message):
        predict_stack(_tiny_ensemble(1), image, spacing)


def test_checkpoint_round_trip_keeps_weights_meta_and_predictions(tmp_path):
    model, path = _tiny_ensemble(), tmp_path / "model.pt"
    save_ensemble(model, path)
    loaded = load_ensemble(path)
    assert loaded.meta == model.meta and len(loaded.meta["version"]) == 16
    image, spacing = _head_ct((2, 33, 35)), (5.0, 0.9, 0.9)
    np.testing.assert_array_equal(
        predict_stack(model, image, spacing).member_probs, predict_stack(loaded, image, spacing).member_probs
    )
    with torch.no_grad():
        loaded.members[0].classifier.bias += 1.0
    save_ensemble(loaded, tmp_path / "changed.pt")
    assert load_ensemble(tmp_path / "changed.pt").meta["version"] != model.meta["version"]


def test_missing_corrupt_and_mismatched_checkpoints_raise_checkpoint_error(tmp_path):
    good = tmp_path / "good.pt"
    save_ensemble(_tiny_ensemble(), good)
    data = good.read_bytes()
    with pytest.raises(CheckpointError, match="no ensemble checkpoint"):
        load_ensemble(tmp_path / "absent.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_ensemble(truncated)
    payload = torch.load(good, weights_only=True)
    payload["members"][0]["classifier.bias"] += 1.0
    tampered = tmp_path / "tampered.pt"
    torch.save(payload, tampered)
    with pytest.raises(CheckpointError, match="do not match their recorded version"):
        load_ensemble(tampered)
    payload = torch.load(good, weights_only=True)
    payload["meta"]["channels"] = payload["meta"]["channels"][:2]
    mismatched = tmp_path / "mismatched.pt"
    torch.save(payload, mismatched)
    with pytest.raises(CheckpointError, match="do not fit preset 'tiny' with 2 channels"):
        load_ensemble(mismatched)
    with pytest.raises(CheckpointError, match="metadata lacks \\['train_ids'\\]"):
        save_ensemble(EnsembleModel(_tiny_ensemble().members, {k: v for k, v in _meta().items() if k != "train_ids"}),
                      good)
    assert good.read_bytes() == data


def test_a_failed_save_leaves_the_previous_good_checkpoint_usable(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    save_ensemble(_tiny_ensemble(), path)
    before = path.read_bytes()

    def failing_write(target, data):
        raise OSError("disk full")

    monkeypatch.setattr(ensemble_module, "atomic_write_bytes", failing_write)
    with pytest.raises(OSError, match="disk full"):
        save_ensemble(_tiny_ensemble(3), path)
    assert path.read_bytes() == before
    assert len(load_ensemble(path).members) == 2
