"""Head anatomy of the synthetic CT in Hounsfield units: scalp, skull with diploe, skull base, brain, CSF, look-alikes.

DESIGN.md "Data": GM/WM with texture, sulci, ventricles, dense falx and tentorium, calcifications, air cells;
the acute bleeds of `ichal.phantom.bleeds` are painted on top of these layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ichal.phantom.geometry import (
    NOISE_BOX_MM,
    NOISE_GRID_MM,
    Ellipsoid,
    SliceGrid,
    head_box_noise,
    partial_volume_width,
    sample_box_noise,
    sheet_fraction,
    smooth_noise,
    soft_inside,
    upsample,
)

# Tissue codes of the per-voxel tissue map (the dominant material of each voxel).
TISSUE_CODES: dict[str, int] = {
    "air": 0,
    "fat": 1,
    "soft_tissue": 2,
    "bone": 3,
    "csf": 4,
    "gray_matter": 5,
    "white_matter": 6,
    "calcification": 7,
    "falx": 8,
    "blood": 9,
    "edema": 10,
    "vessel": 11,
}
# Pure-tissue HU ranges that each stack samples its values from (before noise and partial volume).
TISSUE_HU_RANGES: dict[str, tuple[float, float]] = {
    "air": (-1000.0, -1000.0),
    "fat": (-110.0, -70.0),
    "soft_tissue": (30.0, 55.0),
    "bone": (700.0, 1500.0),
    "csf": (0.0, 15.0),
    "gray_matter": (34.0, 42.0),
    "white_matter": (24.0, 31.0),
    "calcification": (100.0, 300.0),
    "falx": (50.0, 85.0),
    "blood": (50.0, 90.0),
    "edema": (15.0, 25.0),
    "vessel": (40.0, 75.0),
}
SULCUS_ARC_CELLS = 256
SULCUS_DEPTH_STEP_MM = 3.0
SULCUS_DEPTH_CELLS = 16
LOW_RES_MAX = 128
TENTORIUM_SLOPE = (0.45, 0.6)  # dw/d|u|, dw/dv behind the incisura
SKULL_BASE_PLATE_MM = 2.0


@dataclass(frozen=True)
class HeadParams:
    """One random head: shape (mm), pose, atrophy, tissue HU values and its look-alike structures."""

    cavity_axes_mm: tuple[float, float, float, float]  # lateral, anterior, posterior, superior semi-axes
    skull_thickness_mm: float
    skull_thickness_swing_mm: float
    scalp_thickness_mm: float
    atrophy: float  # 0 young .. 1 atrophic: wider sulci, larger ventricles
    floors_mm: tuple[float, float, float]  # anterior, middle, posterior cranial fossa floors (w)
    tissue_hu: dict[str, float]
    diploe_hu: float
    petrous_hu: float
    texture_hu: float
    ventricles: tuple[Ellipsoid, ...]
    deep_gray: tuple[Ellipsoid, ...]
    calcifications: tuple[Ellipsoid, ...]
    falx_thickness_mm: float


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


def sample_head(rng: np.random.Generator) -> HeadParams:
    """Draw a random head: size, thickness, atrophy, tissue HU, ventricles, deep nuclei and calcifications."""
    scale = _uniform(rng, 0.92, 1.08)
    lateral = scale * _uniform(rng, 60.0, 68.0)
    anterior = scale * _uniform(rng, 78.0, 86.0)
    posterior = scale * _uniform(rng, 82.0, 92.0)
    superior = scale * _uniform(rng, 66.0, 76.0)
    atrophy = float(rng.beta(1.5, 3.0))
    ventricle_scale = 0.75 + 0.9 * atrophy + _uniform(rng, -0.05, 0.15)
    ranges = TISSUE_HU_RANGES
    per_bleed = ("blood", "edema", "vessel")  # drawn per bleed (ichal.phantom.bleeds) or per mimic (ichal.phantom.mimics)
    tissue_hu = {name: _uniform(rng, low, high) for name, (low, high) in ranges.items() if name not in per_bleed}
    tissue_hu["gray_matter"] = _uniform(rng, 36.0, 41.0)
    tissue_hu["white_matter"] = float(np.clip(tissue_hu["gray_matter"] - _uniform(rng, 8.0, 12.0), *ranges["white_matter"]))
    tissue_hu["csf"] = _uniform(rng, 2.0, 12.0)
    tissue_hu["bone"] = _uniform(rng, 1200.0, 1450.0)
    s = ventricle_scale
    ventricles = []
    for side in (-1.0, 1.0):
        ventricles += [
            Ellipsoid((side * (5.5 + 2.0 * s), -20.0, 6.0), (4.2 * s, 13.0, 9.0), -side * 15.0),
            Ellipsoid((side * (6.5 + 3.0 * s), 0.0, 16.0), (4.0 * s, 20.0, 5.5), -side * 4.0),
            Ellipsoid((side * (14.0 + 3.5 * s), 21.0, 8.0), (5.5 * s, 8.0, 8.0)),
            Ellipsoid((side * (16.0 + 3.5 * s), 35.0, 5.0), (3.2 * s, 12.0, 4.5), side * 18.0),
            Ellipsoid((side * 27.0, -10.0, -20.0), (2.2 * s, 12.0, 3.5), side * 10.0),
        ]
    ventricles += [
        Ellipsoid((0.0, 2.0, -6.0), (1.0 + 1.6 * s, 13.0, 9.0)),
        Ellipsoid((0.0, 25.0, -46.0), (5.5, 3.5, 7.0)),
    ]
    deep_gray = []
    for side in (-1.0, 1.0):
        deep_gray += [
            Ellipsoid((side * (9.5 + 4.5 * s), -15.0, 4.0), (4.5, 9.0, 10.0), -side * 10.0),
            Ellipsoid((side * (24.0 + 2.0 * s), -3.0, -4.0), (5.5, 13.0, 9.0), -side * 12.0),
            Ellipsoid((side * (5.0 + 3.5 * s), 9.0, -4.0), (7.5, 10.0, 9.0), side * 8.0),
        ]
    calcifications = []
    for side in (-1.0, 1.0):
        if rng.random() < 0.6:
            radius = _uniform(rng, 1.5, 3.5)
            calcifications.append(Ellipsoid((side * (14.0 + 3.5 * s), 22.0, 8.0), (radius, radius * 1.3, radius)))
    if rng.random() < 0.55:
        radius = _uniform(rng, 1.2, 3.0)
        calcifications.append(Ellipsoid((0.0, 17.0 + 2.0 * s, -5.0), (radius, radius, radius)))
    if rng.random() < 0.12:
        for side in (-1.0, 1.0):
            calcifications.append(Ellipsoid((side * (21.0 + 2.0 * s), -3.0, -4.0), (2.0, 3.0, 2.5)))
    return HeadParams(
        cavity_axes_mm=(lateral, anterior, posterior, superior),
        skull_thickness_mm=_uniform(rng, 3.6, 5.0),
        skull_thickness_swing_mm=_uniform(rng, 0.8, 1.5),
        scalp_thickness_mm=_uniform(rng, 4.0, 7.0),
        atrophy=atrophy,
        floors_mm=(_uniform(rng, -36.0, -30.0), _uniform(rng, -58.0, -52.0), _uniform(rng, -74.0, -68.0)),
        tissue_hu=tissue_hu,
        diploe_hu=_uniform(rng, 720.0, 900.0),
        petrous_hu=_uniform(rng, 1400.0, 1500.0),
        texture_hu=_uniform(rng, 1.0, 2.0),
        ventricles=tuple(ventricles),
        deep_gray=tuple(deep_gray),
        calcifications=tuple(calcifications),
        falx_thickness_mm=_uniform(rng, 0.9, 1.6),
    )


@dataclass(frozen=True)
class NoiseFields:
    """Smooth random fields of one head: parenchymal texture, air-cell pattern and the sulcal pattern."""

    texture: np.ndarray  # head box, sigma ~4 mm
    cells: np.ndarray  # head box, sigma ~2 mm (air cells, septa)
    sulci: np.ndarray  # (arc, depth, w) in polar head coordinates, periodic in arc


def sample_noise_fields(rng: np.random.Generator) -> NoiseFields:
    """Draw the smooth noise fields of one head (deterministic given `rng`)."""
    texture = head_box_noise(rng, 4.0)
    cells = head_box_noise(rng, 2.0)
    w_cells = texture.shape[2]
    sulci = smooth_noise(rng, (SULCUS_ARC_CELLS, SULCUS_DEPTH_CELLS, w_cells), (1.6, 2.5, 1.6), wrap_axis=0)
    return NoiseFields(texture=texture, cells=cells, sulci=sulci)


def vault_sdf(grid: SliceGrid, axes_mm: tuple[float, float, float, float], offset_mm: float, w_floor_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Approximate signed distance (mm) to the egg-shaped vault grown by `offset_mm`, and |normal_z|.

    Below `w_floor_mm` the cross-section stops shrinking (face and neck keep the head wide).
    """
    lateral, anterior, posterior, superior = (axis + offset_mm for axis in axes_mm)
    inferior = superior * 1.05
    depth_axis = np.where(grid.v < 0, anterior, posterior)
    height_axis = np.where(grid.w > 0, superior, inferior)
    w = np.maximum(grid.w, w_floor_mm)
    radius = np.sqrt((grid.u / lateral) ** 2 + (grid.v / depth_axis) ** 2 + (w / height_axis) ** 2)
    gu, gv, gw = grid.u / lateral**2, grid.v / depth_axis**2, np.where(grid.w > w_floor_mm, w / height_axis**2, 0.0)
    gradient = np.sqrt(gu**2 + gv**2 + gw**2) + 1e-6
    distance = (radius - 1.0) * np.maximum(radius, 0.3) / gradient
    return distance.astype(np.float32), (np.abs(gw) / gradient).astype(np.float32)


def skull_base_floor(u: np.ndarray, v: np.ndarray, floors_mm: tuple[float, float, float]) -> np.ndarray:
    """Height w (mm) of the cranial floor: bowl-shaped anterior, middle and posterior fossae, foramen magnum open.

    The sphenoid ridges and petrous ridges separate the fossae; the floors meet them as bony walls.
    """
    anterior, middle, posterior = floors_mm
    au = np.abs(u)
    sphenoid_ridge_v = -12.0 - 0.45 * np.maximum(au - 12.0, 0.0)
    petrous_ridge_v = -4.0 + 0.6 * np.maximum(au - 10.0, 0.0)
    orbital_roofs = 8.0 * np.exp(-(((au - 26.0) / 12.0) ** 2)) - 5.0 * np.exp(-((u / 6.0) ** 2))
    anterior_floor = anterior + orbital_roofs
    middle_floor = middle + 0.010 * ((au - 36.0) ** 2 + (v + 6.0) ** 2)
    posterior_floor = posterior + 0.005 * (u**2 + (v - 40.0) ** 2)
    floor = np.where(v < sphenoid_ridge_v, anterior_floor, np.where(v < petrous_ridge_v, middle_floor, posterior_floor))
    foramen = (u / 14.0) ** 2 + ((v - 20.0) / 17.0) ** 2 < 1.0
    return np.where(foramen, -400.0, floor).astype(np.float32)


def midline_offset_mm(grid: SliceGrid) -> np.ndarray:
    """Signed lateral distance (mm) from the gently curving midsagittal plane (falx, fissure, sagittal sinus)."""
    return grid.u - 1.2 * np.sin(grid.v / 23.0 + grid.w / 31.0)


def tentorium_height(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Height w (mm) of the tentorium cerebelli: highest at the incisura, sloping down back and out."""
    return (-14.0 - TENTORIUM_SLOPE[1] * np.clip(v - 10.0, 0.0, None) - TENTORIUM_SLOPE[0] * np.abs(u)).astype(np.float32)


class SliceCanvas:
    """HU and tissue-map buffers of one slice, painted back to front with partial-volume fractions."""

    def __init__(self, grid: SliceGrid, crop_index: "CropIndex") -> None:
        shape = grid.u.shape
        self.grid = grid
        self.crop_index = crop_index
        self.hu = np.full(shape, TISSUE_HU_RANGES["air"][0], dtype=np.float32)
        self.tissue = np.zeros(shape, dtype=np.uint8)
        self.blood = np.zeros(shape, dtype=np.float32)

    def paint(self, fraction: np.ndarray, value_hu: float | np.ndarray, tissue: str, window=(slice(None), slice(None))) -> None:
        """Blend `value_hu` in with weight `fraction` inside `window`; voxels >= 50% become `tissue`.

        `blood` tracks the share of each voxel that is still acute blood after everything painted over it.
        """
        hu = self.hu[window]
        hu += fraction * (value_hu - hu)
        blood = self.blood[window]
        blood *= 1.0 - fraction
        if tissue == "blood":
            blood += fraction
        else:
            self.tissue[window][fraction >= 0.5] = TISSUE_CODES[tissue]

    def finish(self) -> None:
        """Mark voxels that ended up at least half acute blood as blood in the tissue map."""
        self.tissue[self.blood >= 0.5] = TISSUE_CODES["blood"]

    def paint_ellipsoid(
        self, ellipsoid: Ellipsoid, value_hu: float, tissue: str, accumulate: np.ndarray | None = None, clear: np.ndarray | None = None
    ) -> None:
        """Paint `ellipsoid`; optionally add its fraction to (`accumulate`) or remove it from (`clear`) a map."""
        window = self.crop_index.window(ellipsoid)
        if window is None:
            return
        fraction = ellipsoid.fraction(self.grid.crop(*window))
        self.paint(fraction, value_hu, tissue, window)
        if accumulate is not None:
            np.maximum(accumulate[window], fraction, out=accumulate[window])
        if clear is not None:
            clear[window] *= 1.0 - fraction


@dataclass(frozen=True)
class CropIndex:
    """Maps head-frame ellipsoids to the pixel window of the current slice that they can touch."""

    rotation: np.ndarray
    centre_mm: np.ndarray
    origin_xy_mm: tuple[float, float]
    pixel_mm: float
    z_mm: float
    size: int

    def window(self, ellipsoid: Ellipsoid) -> tuple[slice, slice] | None:
        centre = self.rotation @ np.asarray(ellipsoid.centre) + self.centre_mm
        radius = ellipsoid.radius_mm + 3.0 + 2.0 * self.pixel_mm
        if abs(centre[2] - self.z_mm) > radius + 3.0:
            return None
        col = (centre[0] - self.origin_xy_mm[0]) / self.pixel_mm
        row = (centre[1] - self.origin_xy_mm[1]) / self.pixel_mm
        reach = radius / self.pixel_mm
        rows = slice(max(0, int(row - reach)), min(self.size, int(row + reach) + 2))
        cols = slice(max(0, int(col - reach)), min(self.size, int(col + reach) + 2))
        if rows.start >= rows.stop or cols.start >= cols.stop:
            return None
        return rows, cols


@dataclass(frozen=True)
class AnatomyContext:
    """Per-slice fields shared by the intracranial pass, the bleed painter and the skull pass ((Y, X) float32)."""

    cavity_depth_mm: np.ndarray  # depth below the inner table / cranial floor (negative outside the cavity)
    subarachnoid: np.ndarray  # fraction of CSF in sulci, fissures, cisterns and the surface layer (not ventricles)
    parenchyma: np.ndarray  # 1 where brain tissue dominates
    inner_sdf_mm: np.ndarray  # signed distance to the inner table of the vault
    inner_width_mm: np.ndarray  # partial-volume blur width at the inner table
    below_floor_mm: np.ndarray  # height below the cranial floor
    skull_thickness_mm: np.ndarray
    texture: np.ndarray  # smooth unit noise (parenchyma, bone)
    cells: np.ndarray  # finer unit noise (diploe, air cells)


def _low_res_grid(grid: SliceGrid, size: int) -> SliceGrid:
    """Corner-aligned sub-sampled copy of `grid` for smooth fields (at most LOW_RES_MAX pixels a side)."""
    count = min(size, LOW_RES_MAX)
    index = np.linspace(0, size - 1, count).round().astype(int)
    pixel_mm = grid.pixel_mm * (size - 1) / max(count - 1, 1)
    return SliceGrid(grid.u[np.ix_(index, index)], grid.v[np.ix_(index, index)], grid.w[np.ix_(index, index)], pixel_mm, grid.dwdz)


def _sulcal_field(
    head: HeadParams, fields: NoiseFields, grid: SliceGrid, depth_mm: np.ndarray, texture: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Sulcal noise G and its in-plane gradient magnitude (1/mm) on the low-res grid.

    Polar head coordinates make sulci run radially from the surface; toward the vertex the pattern blends
    into the isotropic `texture` so that the convexity shows meandering sulci instead of a star.
    """
    lateral, anterior, posterior, _ = head.cavity_axes_mm
    theta = np.arctan2(grid.v / np.where(grid.v < 0, anterior, posterior), grid.u / lateral)
    arc = (theta + np.pi) / (2 * np.pi) * SULCUS_ARC_CELLS
    depth = np.clip(depth_mm, 0.0, None) / SULCUS_DEPTH_STEP_MM
    height = (grid.w - NOISE_BOX_MM[2][0]) / NOISE_GRID_MM
    value = ndimage.map_coordinates(fields.sulci, [arc, depth, height], order=1, mode="grid-wrap").astype(np.float32)
    vertex_blend = np.clip((grid.w - 0.45 * head.cavity_axes_mm[3]) / (0.3 * head.cavity_axes_mm[3]), 0.0, 1.0)
    value = (1.0 - vertex_blend) * value + vertex_blend * texture
    grad_y, grad_x = np.gradient(value, grid.pixel_mm)
    return value, np.sqrt(grad_x**2 + grad_y**2) + 1e-3


def render_intracranial(head: HeadParams, fields: NoiseFields, canvas: SliceCanvas) -> AnatomyContext:
    """Paint scalp and the cranial contents (CSF, brain, look-alikes) into `canvas`.

    Cavity contents are painted slightly beyond the inner table; `render_skull` then covers exactly the bone's
    own share of each edge voxel, so partial volume mixes bone with what lies under it (including blood).
    """
    grid = canvas.grid
    size = grid.u.shape[0]
    px = grid.pixel_mm
    hu = head.tissue_hu
    low = _low_res_grid(grid, size)
    texture_low = sample_box_noise(fields.texture, low.u, low.v, low.w)
    texture = upsample(texture_low, grid.u.shape)
    cells = upsample(sample_box_noise(fields.cells, low.u, low.v, low.w), grid.u.shape)

    # Scalp (skin, subcutaneous fat, temporalis) around the vault; the face widens the head at the skull base.
    nu2 = grid.u**2 / (grid.u**2 + grid.v**2 + 1.0)
    temporalis = 4.0 * nu2 * np.clip(1.0 - np.abs(grid.w + 15.0) / 30.0, 0.0, 1.0)
    skull_t = head.skull_thickness_mm + head.skull_thickness_swing_mm * (1.0 - 2.0 * nu2) - 0.02 * np.clip(grid.w, 0, None)
    outer_offset = head.skull_thickness_mm + head.scalp_thickness_mm
    head_sdf, head_nz = vault_sdf(grid, head.cavity_axes_mm, outer_offset, -42.0)
    face = 10.0 * np.clip(-(grid.w + 30.0) / 20.0, 0.0, 1.0) * np.clip(-grid.v / 40.0, 0.0, 1.0)
    head_sdf = head_sdf - temporalis - face
    width = partial_volume_width(px, head_nz * grid.dwdz)
    canvas.paint(soft_inside(head_sdf, width), hu["soft_tissue"], "soft_tissue")
    fat_band = np.abs(head_sdf + 0.45 * head.scalp_thickness_mm) - 0.18 * head.scalp_thickness_mm
    canvas.paint(0.8 * soft_inside(fat_band, width), hu["fat"], "fat")

    # Cranial cavity (vault above the skull-base floor): CSF, then parenchyma below the subarachnoid layer.
    below_floor = skull_base_floor(grid.u, grid.v, head.floors_mm) - grid.w
    inner_sdf, inner_nz = vault_sdf(grid, head.cavity_axes_mm, 0.0, -42.0)
    width = partial_volume_width(px, inner_nz * grid.dwdz)
    cavity_sdf = np.maximum(inner_sdf, below_floor)
    depth = -cavity_sdf
    canvas.paint(soft_inside(cavity_sdf - 0.5 * width, width), hu["csf"], "csf")
    csf_gap = 0.6 + 2.2 * head.atrophy
    brain = soft_inside(cavity_sdf + csf_gap, width)
    canvas.paint(brain, hu["gray_matter"] + head.texture_hu * texture, "gray_matter")

    # Sulci: zero lines of a polar noise field, radial near the surface, tapering with depth.
    low_index = np.linspace(0, size - 1, low.u.shape[0]).round().astype(int)
    vault_depth = -inner_sdf
    g_low, grad_low = _sulcal_field(head, fields, low, vault_depth[np.ix_(low_index, low_index)], texture_low)
    distance_to_sulcus = np.abs(upsample(g_low, grid.u.shape)) / upsample(grad_low, grid.u.shape)
    sulcal_depth = np.maximum(12.0 + 6.0 * texture, 4.0)
    taper = np.clip(1.0 - vault_depth / sulcal_depth, 0.0, 1.0)
    half_width = (0.3 + 0.8 * head.atrophy + 0.2 * texture) * taper
    obliquity = np.clip(0.6 + 0.3 * cells, 0.3, 1.0)  # sulci cut obliquely by 5 mm slices look fainter
    sulcus = soft_inside(distance_to_sulcus - half_width, px) * (taper > 0) * brain * obliquity
    canvas.paint(sulcus, hu["csf"], "csf")
    cortex_mm = 3.2 + 0.6 * texture
    wm_score = np.maximum(
        vault_depth - sulcal_depth - 1.0, np.minimum(distance_to_sulcus - half_width - cortex_mm, depth - csf_gap - cortex_mm)
    )
    white = soft_inside(-wm_score, 1.8 * px + 0.8) * brain
    canvas.paint(white, hu["white_matter"] + head.texture_hu * texture, "white_matter")

    # Interhemispheric fissure with the falx; tentorium over the posterior fossa.
    tentorium = tentorium_height(grid.u, grid.v)
    fissure_zone = ((grid.w > 20.0) | (grid.v < -28.0) | ((grid.v > 32.0) & (grid.w > tentorium))).astype(np.float32)
    midline = midline_offset_mm(grid)
    fissure = soft_inside(np.abs(midline) - (0.8 + 2.0 * head.atrophy), px) * fissure_zone * soft_inside(cavity_sdf, px)
    canvas.paint(fissure, hu["csf"], "csf")
    falx = sheet_fraction(midline, head.falx_thickness_mm, 0.0, px) * fissure_zone * soft_inside(cavity_sdf + 0.5, px)
    falx *= np.clip(0.75 + 0.25 * cells, 0.3, 1.0)
    canvas.paint(falx, hu["falx"], "falx")
    tent_nz = 1.0 / np.sqrt(1.0 + TENTORIUM_SLOPE[0] ** 2 + TENTORIUM_SLOPE[1] ** 2)
    tent = sheet_fraction((grid.w - tentorium) * tent_nz, 0.8, tent_nz * grid.dwdz, px)
    canvas.paint(tent * (grid.v > 8.0) * soft_inside(cavity_sdf + 1.0, px), hu["falx"] - 10.0, "falx")

    # Sylvian fissures and basal cisterns (subarachnoid), brainstem, deep nuclei, ventricles, calcifications.
    surface = soft_inside(np.abs(depth - 0.5 * csf_gap) - 0.5 * csf_gap, px) * (depth > 0)
    subarachnoid = np.maximum(np.maximum(sulcus, fissure) * (1.0 - falx), surface).astype(np.float32)
    cisterns = [Ellipsoid((side * 46.0, -6.0, -10.0), (15.0, 1.0 + 1.5 * head.atrophy, 8.0), side * 22.0) for side in (-1.0, 1.0)]
    cisterns += [
        Ellipsoid((0.0, -9.0, -23.0), (12.0, 8.0, 4.5)),
        Ellipsoid((0.0, 11.0, -20.0), (12.5 + 2 * head.atrophy, 13.0, 9.0)),
        Ellipsoid((0.0, 10.0, -46.0), (14.0 + 2 * head.atrophy, 14.0, 20.0)),
    ]
    for ellipsoid in cisterns:
        canvas.paint_ellipsoid(ellipsoid, hu["csf"], "csf", accumulate=subarachnoid)
    for ellipsoid in (Ellipsoid((0.0, 7.0, -20.0), (11.0, 10.0, 9.0)), Ellipsoid((0.0, 10.0, -48.0), (11.5, 11.0, 20.0))):
        canvas.paint_ellipsoid(ellipsoid, hu["white_matter"] + 2.0, "white_matter", clear=subarachnoid)
    for ellipsoid in head.deep_gray:
        canvas.paint_ellipsoid(ellipsoid, hu["gray_matter"] - 4.0, "gray_matter")
    for ellipsoid in head.ventricles:
        canvas.paint_ellipsoid(ellipsoid, hu["csf"], "csf", clear=subarachnoid)
    for ellipsoid in head.calcifications:
        canvas.paint_ellipsoid(ellipsoid, hu["calcification"], "calcification")
    parenchyma = np.isin(canvas.tissue, [TISSUE_CODES["gray_matter"], TISSUE_CODES["white_matter"]]).astype(np.float32)
    return AnatomyContext(
        cavity_depth_mm=depth.astype(np.float32),
        subarachnoid=subarachnoid,
        parenchyma=parenchyma,
        inner_sdf_mm=inner_sdf,
        inner_width_mm=width.astype(np.float32),
        below_floor_mm=below_floor.astype(np.float32),
        skull_thickness_mm=skull_t.astype(np.float32),
        texture=texture,
        cells=cells,
    )


def render_skull(head: HeadParams, canvas: SliceCanvas, context: AnatomyContext) -> None:
    """Paint the vault (tables and diploe), the skull-base plate and the face/neck structures over `canvas`."""
    grid, px, hu = canvas.grid, canvas.grid.pixel_mm, head.tissue_hu
    inner_sdf, width, below_floor = context.inner_sdf_mm, context.inner_width_mm, context.below_floor_mm
    skull_t, texture, cells = context.skull_thickness_mm, context.texture, context.cells
    cavity = soft_inside(np.maximum(inner_sdf, below_floor), width)
    above_base = soft_inside(below_floor - SKULL_BASE_PLATE_MM, px)
    skull = np.clip(soft_inside(inner_sdf - skull_t, width) * above_base - cavity, 0.0, 1.0)
    canvas.paint(skull, hu["bone"] + 60.0 * texture, "bone")
    diploe = soft_inside(np.abs(inner_sdf - 0.5 * skull_t) - 0.22 * skull_t, width) * np.clip(skull_t - 3.5, 0.0, 1.0)
    canvas.paint(diploe * above_base, head.diploe_hu + 40.0 * cells, "bone")
    inside_head = soft_inside(inner_sdf - skull_t - 2.0, px)
    plate = sheet_fraction(below_floor - 0.5 * SKULL_BASE_PLATE_MM, SKULL_BASE_PLATE_MM, 0.8 * grid.dwdz, px) * inside_head
    canvas.paint(plate, hu["bone"] - 300.0 + 60.0 * texture, "bone")
    _paint_skull_base(head, canvas, cells)


def _paint_skull_base(head: HeadParams, canvas: SliceCanvas, cells: np.ndarray) -> None:
    """Orbits, sinuses, petrous bones, mastoid and ethmoid air cells, upper cervical spine (head frame)."""
    hu = head.tissue_hu
    _, anterior, _, _ = head.cavity_axes_mm
    globe_v = -0.85 * anterior - 1.0
    for side in (-1.0, 1.0):
        canvas.paint_ellipsoid(Ellipsoid((side * 27.0, globe_v + 14.0, -47.0), (15.0, 22.5, 15.5), side * 12.0), hu["bone"] - 200.0, "bone")
        canvas.paint_ellipsoid(Ellipsoid((side * 27.0, globe_v + 14.0, -47.0), (13.5, 21.0, 14.0), side * 12.0), hu["fat"], "fat")
        canvas.paint_ellipsoid(Ellipsoid((side * 31.0, globe_v, -48.0), (11.5, 11.5, 11.5)), 12.0, "soft_tissue")
        canvas.paint_ellipsoid(Ellipsoid((side * 31.0, globe_v - 9.5, -48.0), (4.0, 1.8, 4.0)), 90.0, "soft_tissue")
        canvas.paint_ellipsoid(Ellipsoid((side * 20.0, -60.0, -82.0), (14.2, 16.2, 17.2)), hu["bone"] - 200.0, "bone")
        canvas.paint_ellipsoid(Ellipsoid((side * 20.0, -60.0, -82.0), (13.0, 15.0, 16.0)), -1000.0, "air")
        canvas.paint_ellipsoid(Ellipsoid((side * 32.0, 6.0, -57.0), (24.0, 6.0, 7.0), side * 38.0), head.petrous_hu, "bone")
    canvas.paint_ellipsoid(Ellipsoid((0.0, -9.0, -50.0), (8.0, 4.5, 12.0)), hu["bone"] - 150.0, "bone")
    for centre, axes in (((0.0, -24.0, -55.0), (14.0, 12.0, 10.0)), ((0.0, -58.0, -48.0), (12.0, 20.0, 14.0))):
        canvas.paint_ellipsoid(Ellipsoid(centre, tuple(a + 1.5 for a in axes)), hu["bone"] - 200.0, "bone")
    canvas.paint_ellipsoid(Ellipsoid((0.0, -24.0, -55.0), (14.0, 12.0, 10.0)), -1000.0, "air")
    canvas.paint_ellipsoid(Ellipsoid((0.0, -68.0, -80.0), (9.0, 24.0, 18.0)), -1000.0, "air")
    canvas.paint_ellipsoid(Ellipsoid((0.0, -68.0, -80.0), (1.2, 24.0, 18.0)), hu["bone"] - 400.0, "bone")
    # Honeycomb air cells: ethmoid and mastoid, air where the cell field is high, bony septa between.
    for ellipsoid in (
        Ellipsoid((0.0, -58.0, -48.0), (12.0, 20.0, 14.0)),
        Ellipsoid((-52.0, 18.0, -58.0), (10.0, 12.0, 13.0)),
        Ellipsoid((52.0, 18.0, -58.0), (10.0, 12.0, 13.0)),
    ):
        window = canvas.crop_index.window(ellipsoid)
        if window is None:
            continue
        region = ellipsoid.fraction(canvas.grid.crop(*window))
        air = soft_inside(0.15 - cells[window], 0.25)
        canvas.paint(region, hu["bone"] - 300.0, "bone", window)
        canvas.paint(region * air, -1000.0, "air", window)
    # Upper cervical spine: C1/C2 body with the spinal canal and cord behind it.
    canvas.paint_ellipsoid(Ellipsoid((0.0, 12.0, -105.0), (17.0, 16.0, 28.0)), hu["bone"] - 300.0, "bone")
    canvas.paint_ellipsoid(Ellipsoid((0.0, 12.0, -105.0), (14.0, 13.0, 30.0)), hu["soft_tissue"], "soft_tissue")
    canvas.paint_ellipsoid(Ellipsoid((0.0, 2.0, -105.0), (5.5, 5.0, 30.0)), hu["bone"] - 300.0, "bone")
    canvas.paint_ellipsoid(Ellipsoid((0.0, 20.0, -100.0), (11.0, 10.0, 32.0)), hu["csf"], "csf")
    canvas.paint_ellipsoid(Ellipsoid((0.0, 20.0, -100.0), (5.5, 5.0, 32.0)), hu["white_matter"] + 3.0, "white_matter")
