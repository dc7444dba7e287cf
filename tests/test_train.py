"""Ensemble training: determinism, learning, continual fine-tuning (H u Q), cancelling, bad input, CLIs."""

import numpy as np
import pytest
import torch

from ichal.config import DEFAULT_CONFIG
from ichal.ensemble import CheckpointError, load_ensemble, merge_ensembles, save_ensemble
from ichal.infer import main as infer_main
from ichal.io import VolumeError, read_nifti, write_nifti
from ichal.models import ModelPreset, Stage
from ichal.train import (
    TrainingCancelled,
    TrainItem,
    TrainSettings,
    _patch_kind,
    _prepare,
    _sample_patch_center,
    _with_hard_negatives,
    false_positive_voxels,
    lookalike_voxels,
    train_ensemble,
)
from ichal.train import main as train_main

TINY = ModelPreset("tiny", 4, 3, (Stage(8, 1, stride=2), Stage(8, 1, dilation=2), Stage(8, 1, residual=False)))
SPACING_MM = (5.0, 1.8, 1.8)  # patch_px = 72 mm / 1.8 mm = 40


def _stack(index: int, bleed: bool = True, size: int = 48) -> TrainItem:
    """4 x size x size head: skull ring, 30 HU brain, and (if `bleed`) a 70 HU blob on slices 1-2."""
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[:size, :size]
    radius = np.hypot(yy - size / 2, xx - size / 2)
    image = np.full((4, size, size), -1000.0)
    image[:, radius < 0.45 * size] = 1000.0
    image[:, radius < 0.4 * size] = 30.0
    label = np.zeros(image.shape, dtype=np.uint8)
    if bleed:
        cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
        label[1:3, np.hypot(yy - cy, xx - cx) < 4] = 1
        image[label.astype(bool)] = 70.0
    image += rng.normal(0, 3, image.shape)
    return TrainItem(f"stack_{index:02d}", image.astype(np.int16), label, SPACING_MM)


def _settings(**overrides) -> TrainSettings:
    values = dict(preset=TINY, ensemble_size=2, iterations=8, batch_size=4, seed=3)
    return TrainSettings(**(values | overrides))


def _flat_weights(member: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in member.parameters()])


def test_training_is_deterministic_for_a_seed_and_members_differ_by_seed(tmp_path):
    items = [_stack(i, bleed=i % 2 == 0) for i in range(4)]
    first, again, other = (train_ensemble(items, _settings(seed=s)) for s in (3, 3, 4))
    for model, name in ((first, "a"), (again, "b"), (other, "c")):
        save_ensemble(model, tmp_path / f"{name}.pt")
    assert first.meta["version"] == again.meta["version"] != other.meta["version"]
    assert not torch.equal(_flat_weights(first.members[0]), _flat_weights(first.members[1]))
    assert first.meta["train_ids"] == [item.id for item in items]
    assert first.meta["patch_px"] == 40 and first.meta["spacing_mm"] == pytest.approx(1.8)


def test_training_reduces_the_loss_with_either_loss_function():
    items = [_stack(i) for i in range(3)]
    for loss in ("dice_ce", "focal"):
        losses = []
        train_ensemble(items, _settings(ensemble_size=1, iterations=100, lr=5e-3, loss=loss),
                       progress=lambda event: losses.append(event["loss"]))
        assert len(losses) == 100
        assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])


def test_continual_mode_fine_tunes_from_the_previous_weights_on_new_and_hard_stacks():
    old_items = [_stack(i) for i in range(3)]
    previous = train_ensemble(old_items, _settings(iterations=10))
    before = [_flat_weights(m).clone() for m in previous.members]
    events = []
    fresh = train_ensemble(old_items + [_stack(10), _stack(11)], _settings(iterations=10, seed=9))
    updated = train_ensemble(old_items + [_stack(10), _stack(11)], _settings(iterations=10), mode="continual",
                             previous=previous, progress=events.append)
    for index, member in enumerate(updated.members):
        moved = (_flat_weights(member) - before[index]).norm()
        assert 0 < moved < 0.5 * (_flat_weights(fresh.members[index]) - before[index]).norm()
        assert torch.equal(_flat_weights(previous.members[index]), before[index])  # previous untouched
    selections = [e for e in events if "hard" in e]
    assert [e["new"] for e in selections] == [2, 2] and all(0 <= e["hard"] <= 3 for e in selections)
    assert updated.meta["train_ids"] == sorted([i.id for i in old_items] + ["stack_10", "stack_11"])
    assert updated.meta["metrics"]["mode"] == "continual"


def test_should_stop_cancels_and_leaves_the_previous_model_untouched():
    items = [_stack(i) for i in range(2)]
    previous = train_ensemble(items, _settings(ensemble_size=1, iterations=2))
    before = _flat_weights(previous.members[0]).clone()
    calls = []

    def stop_on_third_call() -> bool:
        calls.append(1)
        return len(calls) >= 3

    with pytest.raises(TrainingCancelled):
        train_ensemble(items + [_stack(5)], _settings(), mode="continual", previous=previous,
                       should_stop=stop_on_third_call)
    assert torch.equal(_flat_weights(previous.members[0]), before)


def _square(plane: np.ndarray, y: int, x: int, value: float, half: int = 2) -> None:
    plane[y - half : y + half + 1, x - half : x + half + 1] = value


def test_lookalike_voxels_are_unlabeled_intracranial_blood_density_only():
    size = 48
    yy, xx = np.mgrid[:size, :size]
    radius = np.hypot(yy - size / 2, xx - size / 2)
    image = np.full((2, size, size), 30.0)  # 30 HU "scalp" outside the skull too
    image[:, (radius >= 0.4 * size) & (radius < 0.45 * size)] = 1000.0
    image[1, : size // 2, size // 2 - 1 : size // 2 + 2] = 30.0  # slice 1: the skull is open at the top
    label = np.zeros(image.shape, dtype=np.uint8)
    for z in (0, 1):
        _square(image[z], 16, 16, 70.0)  # unlabeled look-alike inside the skull
        _square(image[z], 32, 32, 70.0)  # a labeled bleed
        _square(image[z], 3, 3, 70.0)  # blood density in the scalp
    label[:, 30:35, 30:35] = 1
    found = np.zeros(image.shape, dtype=bool).ravel()
    found[lookalike_voxels(image.astype(np.int16), label)] = True
    expected = np.zeros(image.shape, dtype=bool)
    expected[0, 14:19, 14:19] = True
    expected[0, [14, 14, 18, 18], [14, 18, 14, 18]] = False  # corners: the 3 x 3 mean is 48 HU, below blood
    assert np.array_equal(found.reshape(image.shape), expected)


def test_lookalike_fraction_centres_negative_patches_on_lookalikes():
    item = _stack(0, bleed=False)
    _square(item.image_hu[1], 14, 14, 70)
    stacks = [_prepare(item, 1.8)]
    assert stacks[0].lookalikes.size > 0
    rng = np.random.default_rng(0)
    assert {_patch_kind([], [], [0], _settings(lookalike_fraction=1.0), rng) for _ in range(20)} == {"lookalike"}
    assert {_patch_kind([], [], [0], _settings(lookalike_fraction=0.0), rng) for _ in range(20)} == {"head"}
    assert {_patch_kind([], [], [], _settings(lookalike_fraction=1.0), rng) for _ in range(20)} == {"head"}
    for _ in range(20):
        _, z, y, x = _sample_patch_center(stacks, [], [], [0], "lookalike", 40, rng)
        assert z == 1 and abs(y - 14) <= 2 + 10 and abs(x - 14) <= 2 + 10
    with pytest.raises(ValueError, match="lookalike_fraction must be in"):
        train_ensemble([item], _settings(lookalike_fraction=1.5))


def test_false_positive_voxels_are_called_voxels_away_from_the_label():
    probs = np.zeros((2, 20, 20), dtype=np.float32)
    label = np.zeros(probs.shape, dtype=np.uint8)
    label[0, 5:8, 5:8] = 1
    probs[0, 4:9, 4:9] = 0.9  # the bleed and its rim: not a mistake
    probs[1, 15, 15] = 0.7  # a called voxel where there is no bleed
    probs[1, 2, 2] = 0.4  # below the threshold
    found = np.unravel_index(false_positive_voxels(probs, label, 0.5), probs.shape)
    assert list(zip(*(axis.tolist() for axis in found))) == [(1, 15, 15)]


class _CallsEverythingBleed(torch.nn.Module):
    """A member so sure of blood everywhere that every voxel is a false positive on an empty stack."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.full_like(image[:, :1], 20.0)


def test_hard_negatives_are_the_members_own_false_positives_and_are_sampled():
    empty, bleed = _stack(0, bleed=False), _stack(1, bleed=True)
    stacks = [_prepare(item, 1.8) for item in (empty, bleed)]
    mined = _with_hard_negatives(_CallsEverythingBleed(), stacks, 2, _settings(), 40, DEFAULT_CONFIG.hu_windows,
                                 np.random.default_rng(0))
    assert all(stack.hard_negatives.size == 0 for stack in stacks)  # the shared stacks are untouched
    assert mined[0].hard_negatives.size == empty.label.size
    near_bleed = np.zeros(bleed.label.shape, dtype=bool).ravel()
    near_bleed[mined[1].hard_negatives] = True
    assert not (near_bleed.reshape(bleed.label.shape) & (bleed.label > 0)).any()
    rng = np.random.default_rng(0)
    settings = _settings(hard_negative_fraction=1.0)
    assert {_patch_kind([], [0, 1], [0], settings, rng) for _ in range(20)} == {"hard"}
    assert {_patch_kind([], [], [0], settings, rng) for _ in range(20)} == {"head", "lookalike"}


def test_training_with_hard_negatives_mines_midway_and_reports_it():
    items = [_stack(i, bleed=i % 2 == 0) for i in range(4)]
    model = train_ensemble(items, _settings(ensemble_size=1, hard_negative_fraction=0.5, hard_negative_start=0.5))
    metrics = model.meta["metrics"]["members"][0]
    assert {"hard_negative_stacks", "hard_negative_voxels"} <= metrics.keys()
    assert model.meta["metrics"]["settings"]["hard_negative_fraction"] == 0.5
    plain = train_ensemble(items, _settings(ensemble_size=1, hard_negative_fraction=0.0))
    assert plain.meta["metrics"]["members"][0]["hard_negative_stacks"] == 0
    with pytest.raises(ValueError, match="hard_negative_fraction must be in"):
        train_ensemble(items, _settings(hard_negative_fraction=-0.1))


def test_members_trained_in_separate_runs_merge_into_the_same_committee(tmp_path):
    items = [_stack(i, bleed=i % 2 == 0) for i in range(3)]
    together = train_ensemble(items, _settings(ensemble_size=3))
    parts = [train_ensemble(items, _settings(ensemble_size=1)), train_ensemble(items, _settings(ensemble_size=2, first_member=1))]
    merged = merge_ensembles(parts)
    save_ensemble(together, tmp_path / "together.pt")
    save_ensemble(merged, tmp_path / "merged.pt")
    assert merged.meta["version"] == together.meta["version"]
    assert [m["seed"] for m in merged.meta["metrics"]["members"]] == [3000, 3001, 3002]
    assert merged.meta["metrics"]["mode"] == "merged" and len(load_ensemble(tmp_path / "merged.pt").members) == 3
    with pytest.raises(CheckpointError, match="same seed \\[3000\\]"):
        merge_ensembles([parts[0], parts[0]])
    other_stacks = train_ensemble(items[:2], _settings(ensemble_size=1, first_member=3))
    with pytest.raises(CheckpointError, match="differs from ensemble 0 in \\['train_ids'\\]"):
        merge_ensembles([parts[0], other_stacks])
    with pytest.raises(ValueError, match="at least two ensembles"):
        merge_ensembles(parts[:1])
    with pytest.raises(ValueError, match="first_member must be at least 0"):
        train_ensemble(items, _settings(first_member=-1))


def test_bad_training_input_is_rejected_with_a_clear_error():
    good = _stack(0)
    wrong_shape = TrainItem("bad", good.image_hu, good.label[:, :-1], SPACING_MM)
    with pytest.raises(VolumeError, match="label of 'bad' shape"):
        train_ensemble([wrong_shape], _settings())
    with pytest.raises(VolumeError, match="must be binary"):
        train_ensemble([TrainItem("bad", good.image_hu, good.label * 2, SPACING_MM)], _settings())
    with pytest.raises(VolumeError, match="not a CT in Hounsfield units"):
        train_ensemble([TrainItem("mr", (good.image_hu > 0).astype(np.float32), good.label, SPACING_MM)], _settings())
    with pytest.raises(VolumeError, match="invalid spacing"):
        train_ensemble([TrainItem("bad", good.image_hu, good.label, (5.0, 0.0, 1.0))], _settings())
    with pytest.raises(ValueError, match="no labeled stacks"):
        train_ensemble([], _settings())
    with pytest.raises(ValueError, match="duplicate stack ids"):
        train_ensemble([good, good], _settings())
    with pytest.raises(ValueError, match="loss must be one of"):
        train_ensemble([good], _settings(loss="mse"))
    with pytest.raises(ValueError, match="continual mode needs the previous ensemble"):
        train_ensemble([good], _settings(), mode="continual")


def test_train_and_infer_clis_on_a_pool_folder(tmp_path):
    pool, affine = tmp_path / "pool", np.diag([1.8, 1.8, 5.0, 1.0])
    for index in range(3):
        item = _stack(index, bleed=index != 1, size=40)
        write_nifti(item.image_hu, affine, pool / f"{item.id}.nii.gz")
        if index < 2:
            write_nifti(item.label, affine, pool / "labels" / "final" / f"{item.id}.nii.gz")
    model_path = tmp_path / "model.pt"
    assert train_main(["--pool", str(pool), "--out", str(model_path), "--members", "1", "--iterations", "2",
                       "--batch-size", "2"]) == 0
    assert load_ensemble(model_path).meta["train_ids"] == ["stack_00", "stack_01"]
    second = tmp_path / "member1.pt"
    assert train_main(["--pool", str(pool), "--out", str(second), "--members", "1", "--first-member", "1",
                       "--iterations", "2", "--batch-size", "2"]) == 0
    merged_path = tmp_path / "merged.pt"
    assert train_main(["--merge", str(model_path), str(second), "--out", str(merged_path)]) == 0
    assert len(load_ensemble(merged_path).members) == 2
    with pytest.raises(SystemExit):
        train_main(["--out", str(merged_path)])  # neither --pool nor --merge
    out = tmp_path / "predictions"
    assert infer_main(["--model", str(model_path), "--images", str(pool), "--out", str(out)]) == 0
    for index in range(3):
        for kind in ("prob", "label", "js"):
            written = read_nifti(out / f"stack_{index:02d}_{kind}.nii.gz")
            assert written.array.shape == (4, 40, 40)
            np.testing.assert_allclose(written.affine, affine)
