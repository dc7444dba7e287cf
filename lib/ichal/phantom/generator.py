"""Synthetic head-CT stacks with exact hemorrhage labels and simulated labeling seconds, deterministic from a seed.

DESIGN.md "Data" (paper section 4 geometry: 27-38 axial 5 mm slices, 512x512 at ~0.45 mm; other sizes keep
the ~230 mm field of view).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ichal.phantom.anatomy import (
    TISSUE_CODES,
    CropIndex,
    SliceCanvas,
    render_intracranial,
    render_skull,
    sample_head,
    sample_noise_fields,
)
from ichal.phantom.annotator import label_features, simulated_annotator_seconds
from ichal.phantom.artifacts import apply_kernel, correlated_noise, rim_offsets, sample_scanner, sample_streaks, streak_offsets
from ichal.phantom.bleeds import BLEED_KINDS, Bleed, bleed_fractions, blood_density, sample_bleeds
from ichal.phantom.mimics import render_mimics, sample_mimics
from ichal.phantom.geometry import FIELD_OF_VIEW_MM, SLICE_THICKNESS_MM, rotation_matrix, slice_grid

# 2: blood-density look-alikes (ichal.phantom.mimics), scanner effects, swirling bleeds (docs/phantom.md).
GENERATOR_VERSION = "2"
MIN_SIZE = 32
MAX_SIZE = 1024
SLICE_COUNT_RANGE = (27, 38)
NOISE_STD_RANGE_HU = (3.0, 8.0)


class PhantomError(ValueError):
    """Bad arguments to the phantom generator or its writers; the message names the problem."""


@dataclass(frozen=True)
class PhantomStack:
    """One generated head CT with its ground truth.

    `image_hu` (Z, Y, X) int16 HU, `label` (Z, Y, X) uint8 {0, 1} acute blood, `affine` the 4x4 NIfTI (RAS)
    affine, `spacing_mm` (z, y, x), `meta` JSON-serialisable ground truth (see `ichal.phantom`).
    """

    id: str
    image_hu: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    spacing_mm: tuple[float, float, float]
    meta: dict


@dataclass(frozen=True)
class RenderedStack:
    """A stack plus what tests and figures need: noise-free HU, tissue map and blood fraction (all (Z, Y, X))."""

    stack: PhantomStack
    clean_hu: np.ndarray
    tissue: np.ndarray
    blood_fraction: np.ndarray
    bleed_kind: np.ndarray  # uint8: 0 none, else 1 + index into BLEED_KINDS of the labeled voxel's bleed


def check_size(size: int) -> int:
    """Return `size` if it is a usable in-plane matrix size, else raise `PhantomError`."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not MIN_SIZE <= int(size) <= MAX_SIZE:
        raise PhantomError(f"size must be an integer number of pixels in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}")
    return int(size)


def stack_seed(seed: int, index: int) -> int:
    """Seed of stack `index` in a pool made with `seed` (independent streams, stable across runs)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def nifti_affine(size: int, n_slices: int, z_bottom_mm: float) -> np.ndarray:
    """RAS affine of the (Z, Y, X) grid: columns run to the patient's left, rows posterior, slices superior."""
    pixel_mm = FIELD_OF_VIEW_MM / size
    half = (size - 1) / 2.0 * pixel_mm
    affine = np.diag([-pixel_mm, -pixel_mm, SLICE_THICKNESS_MM, 1.0])
    affine[:3, 3] = [half, half, z_bottom_mm]
    return affine


def _bleed_reach_mm(bleed: Bleed, ventricle_radius_mm: float) -> float:
    """How far from `bleed.centre` (mm) the bleed or its edema can reach."""
    if bleed.kind == "intraparenchymal":
        return 1.45 * max(bleed.axes_mm) + bleed.radius_mm * 0.6 + bleed.edema_mm + 3.0
    if bleed.kind == "intraventricular":
        return ventricle_radius_mm + 6.0
    return bleed.radius_mm + 6.0


def render_stack(seed: int, size: int = 512, stack_id: str | None = None) -> RenderedStack:
    """Generate one stack from `seed` at `size` x `size` pixels over a ~230 mm field of view."""
    size = check_size(size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise PhantomError(f"seed must be a non-negative integer, got {seed!r}")
    # Independent streams per component, so that changing one model part leaves the others' draws alone.
    head_rng, field_rng, bleed_rng, streak_rng, rng, mimic_rng, scanner_rng = (
        np.random.default_rng(child) for child in np.random.SeedSequence(int(seed)).spawn(7)
    )
    head = sample_head(head_rng)
    fields = sample_noise_fields(field_rng)
    bleeds = sample_bleeds(bleed_rng, head)
    streaks = sample_streaks(streak_rng)
    mimics = sample_mimics(mimic_rng, head)
    scanner = sample_scanner(scanner_rng)
    n_slices = int(rng.integers(SLICE_COUNT_RANGE[0], SLICE_COUNT_RANGE[1] + 1))
    low, high = NOISE_STD_RANGE_HU
    noise_std_hu = float(low + (high - low) * rng.beta(1.5, 3.0))
    rotation = rotation_matrix(rng.uniform(-10, 10), rng.uniform(-8, 12), rng.uniform(-4, 4))
    centre_mm = np.array([rng.uniform(-8, 8), rng.uniform(-8, 8), 0.0])
    vertex_mm = (head.cavity_axes_mm[3] + head.skull_thickness_mm + head.scalp_thickness_mm) * rotation[2, 2]
    z_bottom_mm = round(vertex_mm - float(rng.uniform(1.0, 7.0)) - SLICE_THICKNESS_MM * (n_slices - 1), 1)

    pixel_mm = FIELD_OF_VIEW_MM / size
    affine = nifti_affine(size, n_slices, z_bottom_mm)
    coords_mm = (np.arange(size) - (size - 1) / 2.0) * pixel_mm
    shape = (n_slices, size, size)
    clean_hu = np.empty(shape, dtype=np.float32)
    artifact_hu = np.zeros(shape, dtype=np.float32)
    tissue = np.empty(shape, dtype=np.uint8)
    blood = np.zeros(shape, dtype=np.float32)
    owner = np.zeros(shape, dtype=np.uint8)
    for k in range(n_slices):
        z_mm = z_bottom_mm + SLICE_THICKNESS_MM * k
        grid = slice_grid(coords_mm, coords_mm, z_mm, rotation, centre_mm, pixel_mm)
        crop = CropIndex(rotation, centre_mm, (coords_mm[0], coords_mm[0]), pixel_mm, z_mm, size)
        canvas = SliceCanvas(grid, crop)
        context = render_intracranial(head, fields, canvas)
        render_mimics(mimics, canvas, context)
        w_low, w_high = float(grid.w.min()), float(grid.w.max())
        blood_hu = np.zeros((size, size), dtype=np.float32)
        paint = np.zeros((size, size), dtype=np.float32)
        for index, bleed in enumerate(bleeds):
            reach = _bleed_reach_mm(bleed, max(head.ventricles[bleed.ventricle].axes) if bleed.ventricle >= 0 else 0.0)
            if not w_low - reach <= bleed.centre[2] <= w_high + reach:
                continue
            fraction, edema = bleed_fractions(bleed, grid, context, head)
            if edema is not None:
                canvas.paint(edema, bleed.edema_hu, "edema")
            stronger = fraction > paint
            blood_hu[stronger] = blood_density(bleed, context.cells)[stronger]
            owner[k][stronger] = index + 1
            paint = np.maximum(paint, fraction)
        canvas.paint(paint, blood_hu, "blood")
        render_skull(head, canvas, context)
        canvas.finish()
        blood[k] = canvas.blood
        clean_hu[k] = canvas.hu
        tissue[k] = canvas.tissue
        head_mask = (canvas.tissue != TISSUE_CODES["air"]).astype(np.float32)
        artifact_hu[k] = streak_offsets(streaks, grid, head_mask) + rim_offsets(scanner, context.cavity_depth_mm, context.texture)
    scanned_hu = apply_kernel(clean_hu + artifact_hu, scanner, pixel_mm) + correlated_noise(rng, shape, noise_std_hu)
    image_hu = np.clip(np.rint(scanned_hu), -1024, 3071).astype(np.int16)
    label = (blood >= 0.5).astype(np.uint8)
    owner = owner * label

    spacing_mm = (SLICE_THICKNESS_MM, pixel_mm, pixel_mm)
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    bleed_meta = []
    weighted_hu, weighted_volume = 0.0, 0.0
    for index, bleed in enumerate(bleeds):
        mask = owner == index + 1
        count = int(mask.sum())
        if count == 0:  # too small to cover half a voxel anywhere at this size: not visible, not labeled
            continue
        weighted_hu += bleed.blood_hu * count
        weighted_volume += count
        bleed_meta.append(
            {
                "kind": bleed.kind,
                "volume_ml": round(count * voxel_ml, 3),
                "mean_hu": round(float(clean_hu[mask].mean()), 1),
                "blood_hu": round(bleed.blood_hu, 1),
                "swirl_hu": round(bleed.swirl_hu, 1),
                "n_slices": int(mask.any(axis=(1, 2)).sum()),
            }
        )
    features = label_features(label, spacing_mm)
    mean_blood_hu = weighted_hu / weighted_volume if weighted_volume else 0.0
    seconds = simulated_annotator_seconds(
        features.boundary_mm, features.n_components, features.n_bleed_slices, mean_blood_hu, seed=int(seed)
    )
    stack_id = stack_id if stack_id is not None else f"ct_{int(seed) % 10**8:08d}"
    meta = {
        "id": stack_id,
        "seed": int(seed),
        "size": size,
        "spacing_mm": [float(s) for s in spacing_mm],
        "n_slices": n_slices,
        "negative": not bleed_meta,
        "kinds": sorted({entry["kind"] for entry in bleed_meta}),
        "bleeds": bleed_meta,
        "volume_ml": round(features.volume_ml, 3),
        "n_components": features.n_components,
        "boundary_mm": round(features.boundary_mm, 1),
        "n_bleed_slices": features.n_bleed_slices,
        "simulated_seconds": round(seconds, 1),
        "noise_std_hu": round(noise_std_hu, 2),
        "tissue_hu": {name: round(value, 1) for name, value in head.tissue_hu.items()},
        "mimics": mimics.summary(),
        "scanner": scanner.summary(),
        "generator_version": GENERATOR_VERSION,
    }
    stack = PhantomStack(stack_id, image_hu, label, affine, spacing_mm, meta)
    kind_codes = np.array([0] + [1 + BLEED_KINDS.index(bleed.kind) for bleed in bleeds], dtype=np.uint8)
    return RenderedStack(stack=stack, clean_hu=clean_hu, tissue=tissue, blood_fraction=blood, bleed_kind=kind_codes[owner])


def generate_stack(seed: int, size: int = 512, stack_id: str | None = None) -> PhantomStack:
    """Generate one stack (see `render_stack`); the same seed and size give identical arrays."""
    return render_stack(seed, size, stack_id).stack


def generate_pool(count: int, size: int = 512, seed: int = 0, start: int = 0) -> Iterator[PhantomStack]:
    """Yield `count` stacks with ids ct_0000, ct_0001, ...; stack i uses `stack_seed(seed, i)`.

    `start` skips the first stacks without generating them: stacks `start` .. `start + count - 1`.
    """
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise PhantomError(f"count must be a positive integer, got {count!r}")
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
        raise PhantomError(f"start must be a non-negative integer, got {start!r}")
    check_size(size)
    for index in range(int(start), int(start) + int(count)):
        yield generate_stack(stack_seed(seed, index), size, stack_id=f"ct_{index:04d}")
