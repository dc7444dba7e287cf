"""Acute intracranial bleeds of the synthetic CT: epidural, subdural, intraparenchymal, intraventricular, subarachnoid.

DESIGN.md "Data": 50-90 HU, 0-8 per stack, subtle (small, thin, low-contrast) cases common; the label is the
acute blood only (not the 15-25 HU edema rim, not calcification).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ichal.phantom.anatomy import AnatomyContext, HeadParams
from ichal.phantom.geometry import Ellipsoid, SliceGrid, soft_inside

BLEED_KINDS: tuple[str, ...] = ("epidural", "subdural", "intraparenchymal", "intraventricular", "subarachnoid")
KIND_WEIGHTS: tuple[float, ...] = (0.13, 0.27, 0.22, 0.15, 0.23)
NEGATIVE_PROBABILITY = 0.42
MAX_BLEEDS = 8


@dataclass(frozen=True)
class Bleed:
    """One acute bleed in the head frame (mm); which fields matter depends on `kind`.

    epidural/subdural: `centre` on the inner table, `radius_mm` extent along it, `thickness_mm` maximum.
    intraparenchymal: `centre`, `axes_mm`, `lobes` (irregularity), `edema_mm` rim width, `edema_hu`.
    intraventricular: `ventricle` index into the head's ventricles, filled behind the level `centre[1]`.
    subarachnoid: blood in the CSF spaces within `radius_mm` of `centre`.
    """

    kind: str
    blood_hu: float
    centre: tuple[float, float, float]
    radius_mm: float = 0.0
    thickness_mm: float = 0.0
    axes_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    yaw_deg: float = 0.0
    lobes: tuple[tuple[float, float, float, float], ...] = ()
    edema_mm: float = 0.0
    edema_hu: float = 20.0
    ventricle: int = -1
    swirl_hu: float = 0.0  # hyperacute "swirl": unclotted patches up to this much darker (never below 50 HU)


def _inner_table_point(head: HeadParams, angle: float, w_mm: float) -> tuple[float, float, float]:
    """Point of the inner table at head-frame height `w_mm` in axial direction `angle` (0 = left)."""
    lateral, anterior, posterior, superior = head.cavity_axes_mm
    height_axis = superior if w_mm > 0 else superior * 1.05
    shrink = np.sqrt(max(1.0 - (max(w_mm, -42.0) / height_axis) ** 2, 0.05))
    depth_axis = anterior if np.sin(angle) < 0 else posterior
    return (float(lateral * shrink * np.cos(angle)), float(depth_axis * shrink * np.sin(angle)), float(w_mm))


def _blood_hu(rng: np.random.Generator) -> float:
    """Acute blood density: 50-90 HU, skewed toward the subtle low end."""
    return float(50.0 + 40.0 * rng.beta(1.3, 1.9))


SWIRL_PROBABILITY = 0.3


def sample_bleed(rng: np.random.Generator, head: HeadParams, kind: str) -> Bleed:
    """Draw one bleed of `kind` placed in `head`'s anatomy (sizes skewed toward small and thin)."""
    bleed = _sample_bleed_shape(rng, head, kind)
    if kind in ("epidural", "subdural", "intraparenchymal") and rng.random() < SWIRL_PROBABILITY:
        return replace(bleed, swirl_hu=float(rng.uniform(5.0, 20.0)))
    return bleed


def blood_density(bleed: Bleed, cells: np.ndarray) -> np.ndarray:
    """HU of `bleed`'s blood at each pixel: uniform, or darker in patches (`cells`: unit smooth noise) if it swirls."""
    darker = bleed.swirl_hu * np.clip(cells + 0.3, 0.0, 1.0)
    return np.maximum(bleed.blood_hu - darker, 50.0).astype(np.float32)


def _sample_bleed_shape(rng: np.random.Generator, head: HeadParams, kind: str) -> Bleed:
    blood_hu = _blood_hu(rng)
    if kind in ("epidural", "subdural"):
        angle = float(rng.uniform(0, 2 * np.pi))
        centre = _inner_table_point(head, angle, float(rng.uniform(-15.0, 50.0)))
        if kind == "epidural":
            radius, thickness = float(rng.uniform(14.0, 35.0)), float(np.exp(rng.uniform(np.log(3.0), np.log(18.0))))
        else:
            radius, thickness = float(rng.uniform(35.0, 90.0)), float(np.exp(rng.uniform(np.log(1.3), np.log(14.0))))
        return Bleed(kind, blood_hu, centre, radius_mm=radius, thickness_mm=thickness)
    if kind == "intraparenchymal":
        if rng.random() < 0.45:  # hypertensive: basal ganglia / thalamus
            side = float(rng.choice([-1.0, 1.0]))
            centre = (side * float(rng.uniform(12.0, 28.0)), float(rng.uniform(-12.0, 12.0)), float(rng.uniform(-10.0, 8.0)))
        else:  # lobar, contusion
            angle = float(rng.uniform(0, 2 * np.pi))
            surface = _inner_table_point(head, angle, float(rng.uniform(-12.0, 45.0)))
            depth_fraction = float(rng.uniform(0.55, 0.82))
            centre = (surface[0] * depth_fraction, surface[1] * depth_fraction, surface[2])
        radius = float(np.exp(rng.uniform(np.log(2.5), np.log(24.0))))
        axes = tuple(float(radius * rng.uniform(0.7, 1.3)) for _ in range(3))
        lobes = tuple(
            (*rng.normal(size=3).tolist(), float(rng.uniform(0.05, 0.18))) for _ in range(int(rng.integers(2, 6)))
        )
        edema = 0.35 * radius + float(rng.uniform(0.5, 4.0))
        return Bleed(
            kind, blood_hu, centre, radius_mm=radius, axes_mm=axes, yaw_deg=float(rng.uniform(0, 180)),
            lobes=lobes, edema_mm=edema, edema_hu=float(rng.uniform(15.0, 25.0)),
        )
    if kind == "intraventricular":
        index = int(rng.integers(len(head.ventricles)))
        ventricle = head.ventricles[index]
        # Blood layers dependently (patient supine: posterior); the level sets how much is filled.
        level = ventricle.centre[1] + ventricle.axes[1] * float(rng.uniform(-1.0, 0.8))
        return Bleed(kind, float(50.0 + 30.0 * rng.beta(1.3, 1.9)), (ventricle.centre[0], level, ventricle.centre[2]), ventricle=index)
    if kind == "subarachnoid":
        site = rng.random()
        if site < 0.5:
            angle = float(rng.uniform(0, 2 * np.pi))
            surface = _inner_table_point(head, angle, float(rng.uniform(-5.0, 55.0)))
            centre = (surface[0] * 0.93, surface[1] * 0.93, surface[2])
            radius = float(rng.uniform(10.0, 38.0))
        elif site < 0.8:
            side = float(rng.choice([-1.0, 1.0]))
            centre, radius = (side * 40.0, -6.0, -10.0), float(rng.uniform(10.0, 28.0))
        else:
            centre, radius = (0.0, 0.0, -22.0), float(rng.uniform(10.0, 24.0))
        return Bleed(kind, float(50.0 + 30.0 * rng.beta(1.3, 1.9)), centre, radius_mm=radius)
    raise ValueError(f"unknown bleed kind {kind!r}; expected one of {BLEED_KINDS}")


def sample_bleeds(rng: np.random.Generator, head: HeadParams) -> list[Bleed]:
    """0 bleeds with probability ~0.42, else 1-8 (geometric), kinds drawn with `KIND_WEIGHTS`."""
    if rng.random() < NEGATIVE_PROBABILITY:
        return []
    count = min(MAX_BLEEDS, int(rng.geometric(0.5)))
    kinds = rng.choice(len(BLEED_KINDS), size=count, p=np.asarray(KIND_WEIGHTS) / sum(KIND_WEIGHTS))
    return [sample_bleed(rng, head, BLEED_KINDS[int(k)]) for k in kinds]


def _extra_axial(bleed: Bleed, grid: SliceGrid, context: AnatomyContext, lens: bool, beyond_mm: float | np.ndarray) -> np.ndarray:
    """Epidural lens (convex, `lens`) or subdural crescent hugging the inner table, extended `beyond_mm` into it."""
    distance = np.sqrt((grid.u - bleed.centre[0]) ** 2 + (grid.v - bleed.centre[1]) ** 2 + (grid.w - bleed.centre[2]) ** 2)
    along = np.clip(1.0 - (distance / bleed.radius_mm) ** 2, 0.0, None)
    thickness = bleed.thickness_mm * (along if lens else along**0.35)
    depth = context.cavity_depth_mm
    fraction = soft_inside(np.maximum(-depth - beyond_mm, depth - thickness), context.inner_width_mm) * (thickness > 0)
    if not lens:  # the falx stops a subdural at the midline
        fraction = fraction * soft_inside(-grid.u * np.sign(bleed.centre[0] or 1.0), grid.pixel_mm)
    return fraction


def _lobulated_sdf(bleed: Bleed, grid: SliceGrid, grow_mm: float) -> np.ndarray:
    """Approximate signed distance (mm) to an irregular (lobulated) ellipsoid grown by `grow_mm`."""
    distance, _ = Ellipsoid(bleed.centre, bleed.axes_mm, bleed.yaw_deg).sdf(grid)
    du, dv, dw = grid.u - bleed.centre[0], grid.v - bleed.centre[1], grid.w - bleed.centre[2]
    norm = np.sqrt(du**2 + dv**2 + dw**2) + 1e-3
    wobble = np.zeros_like(distance)
    for ku, kv, kw, amplitude in bleed.lobes:
        wobble += amplitude * np.cos(2.0 * (ku * du + kv * dv + kw * dw) / norm + ku * kv)
    return distance - wobble * bleed.radius_mm - grow_mm


def bleed_fractions(bleed: Bleed, grid: SliceGrid, context: AnatomyContext, head: HeadParams) -> tuple[np.ndarray, np.ndarray | None]:
    """Blood fraction (Y, X) of `bleed` on this slice and its edema fraction (intraparenchymal only).

    Extra-axial blood is extended half an edge width under the inner table; the skull painted afterwards
    covers exactly its own share, so edge voxels mix blood and bone as in a real scan.
    """
    if bleed.kind in ("epidural", "subdural"):
        return _extra_axial(bleed, grid, context, bleed.kind == "epidural", 0.5 * context.inner_width_mm), None
    if bleed.kind == "intraparenchymal":
        inside_brain = soft_inside(2.0 - context.cavity_depth_mm, grid.pixel_mm)
        blood = soft_inside(_lobulated_sdf(bleed, grid, 0.0), grid.pixel_mm) * inside_brain
        edema = soft_inside(_lobulated_sdf(bleed, grid, bleed.edema_mm), 1.5 * grid.pixel_mm + 1.5) * inside_brain
        return blood, edema * context.parenchyma
    if bleed.kind == "intraventricular":
        return head.ventricles[bleed.ventricle].fraction(grid) * soft_inside(bleed.centre[1] - grid.v, grid.pixel_mm), None
    if bleed.kind == "subarachnoid":
        distance = np.sqrt((grid.u - bleed.centre[0]) ** 2 + (grid.v - bleed.centre[1]) ** 2 + (grid.w - bleed.centre[2]) ** 2)
        return context.subarachnoid * soft_inside(distance - bleed.radius_mm, 3.0), None
    raise ValueError(f"unknown bleed kind {bleed.kind!r}; expected one of {BLEED_KINDS}")
