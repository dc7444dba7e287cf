"""Tests of the synthetic head-CT generator: HU per tissue, labels, determinism, geometry, time span, writers, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from ichal.io import Volume, read_nifti
from ichal.phantom import (
    BLEED_KINDS,
    PhantomError,
    generate_pool,
    generate_stack,
    label_features,
    render_stack,
    simulated_annotator_seconds,
    stack_seed,
)
from ichal.phantom.__main__ import main as cli_main
from ichal.phantom.anatomy import TISSUE_CODES, TISSUE_HU_RANGES
from ichal.phantom.artifacts import Scanner, apply_kernel
from ichal.phantom.writers import write_pool

TINY = 48
META_KEYS = {
    "id", "seed", "size", "spacing_mm", "n_slices", "negative", "kinds", "bleeds", "volume_ml",
    "n_components", "boundary_mm", "n_bleed_slices", "simulated_seconds", "generator_version", "mimics", "scanner",
}


@pytest.fixture(scope="module")
def tiny_pool():
    """40 stacks at 48x48 (fast): enough for negatives, several kinds and the time span."""
    return list(generate_pool(40, TINY, seed=0))


@pytest.fixture(scope="module")
def rendered():
    """Three stacks at 128x128 with their noise-free HU and tissue maps: seed 6 has a subdural, 11 is negative."""
    return {seed: render_stack(seed, 128) for seed in (0, 6, 11)}


def test_pure_tissue_voxels_have_their_hu(rendered):
    for result in rendered.values():
        for name, code in TISSUE_CODES.items():
            interior = ndimage.binary_erosion(result.tissue == code, np.ones((1, 3, 3), dtype=bool))
            if interior.sum() < 20 or name in ("calcification", "falx"):
                continue  # too thin to have interior voxels at 1.8 mm
            low, high = TISSUE_HU_RANGES[name]
            median = float(np.median(result.clean_hu[interior]))
            assert low - 6.0 <= median <= high + 6.0, f"{name}: median {median:.1f} HU outside [{low}, {high}]"
        for name, value in result.stack.meta["tissue_hu"].items():
            low, high = TISSUE_HU_RANGES[name]
            assert low <= value <= high, name


def test_gray_matter_is_denser_than_white_matter_and_csf(rendered):
    result = rendered[0]
    median = {}
    for name in ("gray_matter", "white_matter", "csf"):
        interior = ndimage.binary_erosion(result.tissue == TISSUE_CODES[name], np.ones((1, 3, 3), dtype=bool))
        median[name] = float(np.median(result.clean_hu[interior]))
    assert median["gray_matter"] > median["white_matter"] + 4.0
    assert median["csf"] <= 15.0 and median["white_matter"] > median["csf"] + 10.0


def test_label_is_exactly_the_acute_blood_and_pure_blood_is_50_to_90_hu(rendered):
    result = rendered[6]
    stack = result.stack
    assert not stack.meta["negative"] and "subdural" in stack.meta["kinds"]
    np.testing.assert_array_equal(stack.label, (result.blood_fraction >= 0.5).astype(np.uint8))
    core = result.blood_fraction >= 0.999
    assert core.sum() > 50
    assert 50.0 <= result.clean_hu[core].min() and result.clean_hu[core].max() <= 90.0
    # The scanned image agrees with the truth: the kernel-blurred clean HU plus the calibration drift, plus at
    # most the beam-hardening rim (extra-axial blood sits right under the inner table); noise adds no bias.
    scanner = Scanner(**stack.meta["scanner"])
    excess = float(stack.image_hu[core].mean()) - float(apply_kernel(result.clean_hu, scanner, stack.spacing_mm[1])[core].mean())
    assert -3.0 < excess < scanner.rim_hu + 3.0
    assert not stack.label[result.tissue == TISSUE_CODES["edema"]].any()
    assert not stack.label[result.tissue == TISSUE_CODES["calcification"]].any()
    for bleed in stack.meta["bleeds"]:
        assert 50.0 <= bleed["blood_hu"] <= 90.0 and bleed["volume_ml"] > 0 and bleed["n_slices"] >= 1


def test_negative_stacks_have_empty_labels_and_cost_about_a_minute(tiny_pool, rendered):
    negatives = [stack for stack in tiny_pool if stack.meta["negative"]] + [rendered[11].stack]
    assert len(negatives) >= 5
    for stack in negatives:
        assert stack.label.sum() == 0 and stack.meta["kinds"] == [] and stack.meta["bleeds"] == []
        assert stack.meta["volume_ml"] == 0 and stack.meta["n_components"] == 0
        assert 15.0 <= stack.meta["simulated_seconds"] <= 200.0
    for stack in tiny_pool:
        assert stack.meta["negative"] == (stack.label.sum() == 0)


def test_look_alikes_are_unlabeled_and_some_sit_at_blood_density():
    """Sinuses, dense arteries, granulomas and falx plaques (generator 2) are never blood, yet reach 50-90 HU."""
    mimic_voxels_at_blood_density = 0
    for index in range(6):
        result = render_stack(stack_seed(3, index), 96)
        look_alike = np.isin(result.tissue, [TISSUE_CODES["vessel"], TISSUE_CODES["calcification"]])
        assert look_alike.any()
        assert not result.stack.label[look_alike].any()
        intracranial = (result.clean_hu >= 50.0) & (result.clean_hu <= 90.0) & (result.blood_fraction == 0)
        mimic_voxels_at_blood_density += int((intracranial & look_alike).sum())
        mimics = result.stack.meta["mimics"]
        assert 40.0 <= mimics["sinus_hu"] <= 70.0 and 0 <= mimics["scattered_calcifications"] <= 7
    assert mimic_voxels_at_blood_density > 50


def test_scanner_effects_vary_between_stacks_and_shift_the_image(tiny_pool):
    scanners = [stack.meta["scanner"] for stack in tiny_pool]
    for key, (low, high) in {"kernel_sigma_mm": (0, 0.9), "calibration_hu": (-4, 4), "rim_hu": (0, 10)}.items():
        values = [scanner[key] for scanner in scanners]
        assert low <= min(values) and max(values) <= high and max(values) - min(values) > (high - low) / 3, key
    result = render_stack(stack_seed(3, 0), 96)
    brain = ndimage.binary_erosion(
        np.isin(result.tissue, [TISSUE_CODES["white_matter"], TISSUE_CODES["gray_matter"]]), np.ones((1, 5, 5), dtype=bool)
    )
    scanner = result.stack.meta["scanner"]
    shift = float(np.median(result.stack.image_hu[brain] - result.clean_hu[brain]))
    assert scanner["calibration_hu"] - 1.5 <= shift <= scanner["calibration_hu"] + scanner["rim_hu"] + 1.5


def test_same_seed_gives_identical_arrays_and_another_seed_differs():
    first, again, other = generate_stack(5, 48), generate_stack(5, 48), generate_stack(8, 48)
    np.testing.assert_array_equal(first.image_hu, again.image_hu)
    np.testing.assert_array_equal(first.label, again.label)
    assert first.meta == again.meta
    assert first.image_hu.shape != other.image_hu.shape or not np.array_equal(first.image_hu, other.image_hu)


def test_geometry_types_and_affine(tiny_pool):
    for stack in tiny_pool[:5]:
        n_slices = stack.image_hu.shape[0]
        assert 27 <= n_slices <= 38 and stack.image_hu.shape[1:] == (TINY, TINY)
        assert stack.image_hu.dtype == np.int16 and stack.label.dtype == np.uint8
        assert set(np.unique(stack.label)) <= {0, 1}
        assert stack.spacing_mm == pytest.approx((5.0, 230.0 / TINY, 230.0 / TINY))
        assert Volume(stack.image_hu, stack.affine).spacing_mm == pytest.approx(stack.spacing_mm)
        # Columns run to the patient's left (RAS -x), rows posterior (-y), slices superior (+z).
        assert np.sign(np.diag(stack.affine)[:3]).tolist() == [-1.0, -1.0, 1.0]
        assert META_KEYS <= set(stack.meta) and stack.meta["n_slices"] == n_slices
        json.dumps(stack.meta)


def test_head_narrows_to_the_vertex_and_air_cells_sit_only_in_the_skull_base():
    stack = generate_stack(2, 64)
    head = stack.image_hu > -500
    head_area = head.sum(axis=(1, 2))
    n = len(head_area)
    assert head_area[-1] < 0.6 * head_area.max() and int(np.argmax(head_area)) > 0
    filled = np.stack([ndimage.binary_fill_holes(h) for h in head])
    internal_air = (filled & ~head).sum(axis=(1, 2))
    assert internal_air[: n // 3].sum() > 20  # sinuses, mastoid and ethmoid air cells
    assert internal_air[n // 2 :].sum() == 0
    other = generate_stack(9, 64)
    assert abs(int((other.image_hu > -500).sum()) - int(head.sum())) > 100


def test_pool_uses_derived_seeds_and_covers_kinds_negatives_and_two_orders_of_magnitude(tiny_pool):
    assert [s.id for s in tiny_pool[:3]] == ["ct_0000", "ct_0001", "ct_0002"]
    assert tiny_pool[1].meta["seed"] == stack_seed(0, 1)
    negative_share = np.mean([s.meta["negative"] for s in tiny_pool])
    assert 0.25 <= negative_share <= 0.6
    kinds = {kind for s in tiny_pool for kind in s.meta["kinds"]}
    assert len(kinds) >= 4 and kinds <= set(BLEED_KINDS)
    seconds = np.array([s.meta["simulated_seconds"] for s in tiny_pool])
    assert seconds.max() / seconds.min() >= 100.0


def test_label_features_of_a_box():
    label = np.zeros((4, 20, 20), dtype=np.uint8)
    label[1:3, 5:15, 5:15] = 1
    label[3, 0, 0] = 1
    features = label_features(label, (5.0, 0.5, 0.5))
    assert features.n_components == 2 and features.n_bleed_slices == 3
    assert features.volume_ml == pytest.approx((200 + 1) * 5.0 * 0.25 / 1000.0)
    assert 2 * 36 * 0.5 <= features.boundary_mm <= 2 * 40 * 0.5 + 2.0


def test_simulated_seconds_grow_with_work_and_reject_negative_features():
    base = simulated_annotator_seconds(0.0, 0, 0, 0.0, seed=3)
    traced = simulated_annotator_seconds(500.0, 1, 5, 70.0, seed=3)
    faint = simulated_annotator_seconds(500.0, 1, 5, 52.0, seed=3)
    assert base < traced < faint
    assert simulated_annotator_seconds(500.0, 1, 5, 70.0, seed=3) == traced
    with pytest.raises(ValueError, match="non-negative"):
        simulated_annotator_seconds(-1.0, 0, 0, 60.0, seed=0)


@pytest.mark.parametrize("size", [8, 2048, True, 64.0])
def test_bad_size_is_rejected(size):
    with pytest.raises(PhantomError, match="size"):
        generate_stack(0, size)


def test_bad_seed_and_count_are_rejected():
    with pytest.raises(PhantomError, match="seed"):
        generate_stack(-1, 32)
    with pytest.raises(PhantomError, match="count"):
        next(generate_pool(0, 32))
    with pytest.raises(PhantomError, match="start must be a non-negative integer"):
        next(generate_pool(2, 32, start=-1))


def test_a_pool_started_later_gives_the_same_stacks_and_ids(tiny_pool):
    later = list(generate_pool(3, TINY, seed=0, start=37))
    assert [s.id for s in later] == ["ct_0037", "ct_0038", "ct_0039"]
    for stack, same in zip(later, tiny_pool[37:]):
        np.testing.assert_array_equal(stack.image_hu, same.image_hu)
        np.testing.assert_array_equal(stack.label, same.label)


def test_write_pool_layout_labels_a_mix_and_round_trips(tmp_path):
    ids = write_pool(tmp_path / "pool", count=4, size=TINY, seed=0, labeled_count=2, progress=False)
    pool = tmp_path / "pool"
    assert ids == ["ct_0000", "ct_0001", "ct_0002", "ct_0003"]
    labeled = sorted(p.name.removesuffix(".nii.gz") for p in (pool / "labels" / "final").iterdir())
    assert len(labeled) == 2
    metas = {i: json.loads((pool / "phantom_truth" / f"{i}.json").read_text()) for i in ids}
    if any(m["negative"] for m in metas.values()) and not all(m["negative"] for m in metas.values()):
        assert {metas[i]["negative"] for i in labeled} == {True, False}
    stack = generate_stack(stack_seed(0, 0), TINY, stack_id="ct_0000")
    image = read_nifti(pool / "ct_0000.nii.gz")
    np.testing.assert_array_equal(image.array, stack.image_hu)
    np.testing.assert_allclose(image.affine, stack.affine, atol=1e-5)
    np.testing.assert_array_equal(read_nifti(pool / "phantom_truth" / "ct_0000.nii.gz").array, stack.label)
    assert metas["ct_0000"] == json.loads(json.dumps(stack.meta))


def test_write_pool_refuses_a_non_empty_directory_and_bad_labeled_count(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(PhantomError, match="not empty"):
        write_pool(tmp_path, count=1, size=TINY, seed=0, progress=False)
    with pytest.raises(PhantomError, match="labeled"):
        write_pool(tmp_path / "new", count=2, size=TINY, seed=0, labeled_count=3, progress=False)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--count", "0"], "--count"),
        (["--size", "4"], "--size"),
        (["--labeled", "5", "--count", "2"], "--labeled"),
        (["--seed", "-3"], "--seed"),
    ],
)
def test_cli_bad_arguments_exit_with_code_2(tmp_path, capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--out", str(tmp_path / "pool"), *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_writes_a_pool_and_refuses_to_overwrite_it(tmp_path, capsys):
    out = tmp_path / "pool"
    assert cli_main(["--out", str(out), "--count", "1", "--size", str(TINY), "--quiet"]) == 0
    assert (out / "ct_0000.nii.gz").is_file() and (out / "phantom_truth" / "ct_0000.json").is_file()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--out", str(out), "--count", "1", "--size", str(TINY), "--quiet"])
    assert exit_info.value.code == 2 and "not empty" in capsys.readouterr().err
    assert cli_main(["--out", str(out), "--count", "1", "--size", str(TINY), "--quiet", "--overwrite"]) == 0
