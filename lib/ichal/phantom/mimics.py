"""Blood-density look-alikes of the synthetic CT: dense dural sinuses, a dense artery, granulomas, falx plaques.

Generator version 2. With look-alikes only at fixed places (choroid plexus, pineal, basal ganglia), 60 stacks
taught the small model all there was to learn (docs/model.md). Readers of real head CT meet dural venous
sinuses at 40-70 HU (hematocrit), the dense-artery sign (thrombus, 55-75 HU), calcified granulomas anywhere in
the parenchyma and dural plaques on the falx, which partial volume over a 5 mm slice brings down to blood
density. None of them is labeled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ichal.phantom.anatomy import AnatomyContext, HeadParams, SliceCanvas, midline_offset_mm, tentorium_height
from ichal.phantom.geometry import Ellipsoid, SliceGrid, partial_volume_width, soft_inside

DENSE_ARTERY_PROBABILITY = 0.2
GRANULOMA_RATE = 0.8  # Poisson mean per head
FALX_PLAQUE_PROBABILITY = 0.3


@dataclass(frozen=True)
class Artery:
    """A straight arterial segment (head frame, mm) with a dense lumen."""

    start: tuple[float, float, float]
    end: tuple[float, float, float]
    radius_mm: float
    hu: float


@dataclass(frozen=True)
class Mimics:
    """The look-alikes of one head."""

    sinus_hu: float
    sagittal_sinus_mm: tuple[float, float]  # half base, depth of its triangular section
    transverse_sinus_radius_mm: float
    arteries: tuple[Artery, ...]
    calcifications: tuple[tuple[Ellipsoid, float], ...]  # granulomas and falx plaques with their HU

    def summary(self) -> dict:
        """JSON-serialisable description for the stack's metadata."""
        return {
            "sinus_hu": round(self.sinus_hu, 1),
            "dense_arteries": len(self.arteries),
            "scattered_calcifications": len(self.calcifications),
        }


def _random_parenchymal_point(rng: np.random.Generator, head: HeadParams) -> tuple[float, float, float]:
    """A point well inside the supratentorial brain or the cerebellum (fractions of the cavity axes)."""
    lateral, anterior, posterior, superior = head.cavity_axes_mm
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction) + 1e-9
    depth = float(rng.uniform(0.25, 0.8))
    u = direction[0] * lateral * depth
    v = direction[1] * (anterior if direction[1] < 0 else posterior) * depth
    w = max(direction[2] * superior * depth, -25.0 if v < 20.0 else -45.0)
    return float(u), float(v), float(w)


def sample_mimics(rng: np.random.Generator, head: HeadParams) -> Mimics:
    """Draw the look-alikes of `head` (sinus density always; the others with their own frequencies)."""
    sinus_hu = float(rng.uniform(40.0, 70.0))
    sagittal = (float(rng.uniform(3.0, 5.5)), float(rng.uniform(4.0, 7.0)))
    transverse = float(rng.uniform(2.5, 4.5))
    arteries = []
    if rng.random() < DENSE_ARTERY_PROBABILITY:
        hu, radius = float(rng.uniform(55.0, 75.0)), float(rng.uniform(1.2, 2.2))
        if rng.random() < 0.75:  # middle cerebral artery along the Sylvian fissure
            side = float(rng.choice([-1.0, 1.0]))
            arteries.append(Artery((side * 6.0, -6.0, -14.0), (side * float(rng.uniform(30.0, 45.0)), -8.0, -10.0), radius, hu))
        else:  # basilar artery in front of the pons
            arteries.append(Artery((0.0, -4.0, -50.0), (0.0, -6.0, -24.0), radius, hu))
    calcifications = []
    for _ in range(min(int(rng.poisson(GRANULOMA_RATE)), 4)):
        radius = float(rng.uniform(0.8, 2.5))
        calcifications.append((Ellipsoid(_random_parenchymal_point(rng, head), (radius, radius, radius)), float(rng.uniform(100.0, 300.0))))
    if rng.random() < FALX_PLAQUE_PROBABILITY:
        for _ in range(int(rng.integers(1, 4))):
            centre = (0.0, float(rng.uniform(-40.0, 50.0)), float(rng.uniform(20.0, 0.8 * head.cavity_axes_mm[3])))
            axes = (0.9, float(rng.uniform(2.0, 6.0)), float(rng.uniform(1.5, 4.0)))
            calcifications.append((Ellipsoid(centre, axes), float(rng.uniform(100.0, 300.0))))
    return Mimics(sinus_hu, sagittal, transverse, tuple(arteries), tuple(calcifications))


def _segment_distance(grid: SliceGrid, artery: Artery) -> np.ndarray:
    """Distance (mm) of every pixel to the artery's axis segment."""
    start, end = np.asarray(artery.start, dtype=np.float32), np.asarray(artery.end, dtype=np.float32)
    axis = end - start
    du, dv, dw = grid.u - start[0], grid.v - start[1], grid.w - start[2]
    t = np.clip((du * axis[0] + dv * axis[1] + dw * axis[2]) / float(axis @ axis), 0.0, 1.0)
    return np.sqrt((du - t * axis[0]) ** 2 + (dv - t * axis[1]) ** 2 + (dw - t * axis[2]) ** 2)


def render_mimics(mimics: Mimics, canvas: SliceCanvas, context: AnatomyContext) -> None:
    """Paint the look-alikes into `canvas` after the intracranial pass and before the bleeds."""
    grid, px = canvas.grid, canvas.grid.pixel_mm
    vault_depth = -context.inner_sdf_mm
    tentorium = tentorium_height(grid.u, grid.v)
    # Superior sagittal sinus: triangle under the inner table at the midline, above the tentorium.
    half_base, depth = mimics.sagittal_sinus_mm
    midline = midline_offset_mm(grid)
    taper = np.clip(1.0 - vault_depth / depth, 0.0, 1.0)
    sagittal = soft_inside(np.abs(midline) - half_base * taper, px) * (taper > 0) * (grid.w > tentorium + 6.0)
    # Transverse sinuses: round channels along the occipital inner table where the tentorium meets it.
    radius = mimics.transverse_sinus_radius_mm
    across = np.sqrt((vault_depth - radius) ** 2 + (grid.w - tentorium) ** 2)
    transverse = soft_inside(across - radius, partial_volume_width(px, 0.7 * grid.dwdz)) * (grid.v > 25.0)
    canvas.paint(np.maximum(sagittal, transverse) * (vault_depth > -0.5), mimics.sinus_hu, "vessel")
    for artery in mimics.arteries:
        lumen = soft_inside(_segment_distance(grid, artery) - artery.radius_mm, partial_volume_width(px, 0.7 * grid.dwdz))
        canvas.paint(lumen * (context.cavity_depth_mm > 0), artery.hu, "vessel")
    for ellipsoid, hu in mimics.calcifications:
        canvas.paint_ellipsoid(ellipsoid, hu, "calcification")
