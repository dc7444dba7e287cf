"""Geometry helpers of the synthetic head CT: head frame, ellipsoids, partial-volume fractions, noise fields.

Supports the phantom generator (DESIGN.md "Data"); shapes are defined in a head frame in mm and rendered
slice by slice with soft edges so that thin structures show partial-volume averaging as in 5 mm CT.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

SLICE_THICKNESS_MM = 5.0
FIELD_OF_VIEW_MM = 230.0
NOISE_GRID_MM = 3.0
# Head-frame box (u lateral, v antero-posterior, w cranio-caudal; mm) covered by the smooth noise fields.
NOISE_BOX_MM = ((-120.0, 120.0), (-130.0, 130.0), (-130.0, 110.0))


@dataclass(frozen=True)
class SliceGrid:
    """One axial slice: head-frame coordinates (mm) of every pixel, each array (Y, X) float32.

    `u` points to the patient's left, `v` posterior, `w` superior, all relative to the head centre.
    `dwdz` is the w-component of the scanner z axis in the head frame (cosine of the head's tilt).
    """

    u: np.ndarray
    v: np.ndarray
    w: np.ndarray
    pixel_mm: float
    dwdz: float

    def crop(self, rows: slice, cols: slice) -> "SliceGrid":
        return SliceGrid(self.u[rows, cols], self.v[rows, cols], self.w[rows, cols], self.pixel_mm, self.dwdz)


def rotation_matrix(yaw_deg: float, pitch_deg: float, roll_deg: float) -> np.ndarray:
    """3x3 rotation from head frame to scanner frame: yaw about z, then pitch about x, then roll about y."""
    yaw, pitch, roll = np.deg2rad([yaw_deg, pitch_deg, roll_deg])
    rz = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(pitch), -np.sin(pitch)], [0, np.sin(pitch), np.cos(pitch)]])
    ry = np.array([[np.cos(roll), 0, np.sin(roll)], [0, 1, 0], [-np.sin(roll), 0, np.cos(roll)]])
    return rz @ rx @ ry


def slice_grid(
    x_mm: np.ndarray, y_mm: np.ndarray, z_mm: float, rotation: np.ndarray, centre_mm: np.ndarray, pixel_mm: float
) -> SliceGrid:
    """Head-frame coordinates of the pixels of the axial slice at scanner height `z_mm`.

    `x_mm` (X,) and `y_mm` (Y,) are scanner LPS coordinates of columns and rows; `rotation` maps head to
    scanner frame and `centre_mm` is the head centre in the scanner frame.
    """
    inverse = rotation.T
    dx = (x_mm - centre_mm[0]).astype(np.float32)[None, :]
    dy = (y_mm - centre_mm[1]).astype(np.float32)[:, None]
    dz = np.float32(z_mm - centre_mm[2])
    coords = [
        (inverse[i, 0] * dx + inverse[i, 1] * dy + inverse[i, 2] * dz).astype(np.float32) for i in range(3)
    ]
    return SliceGrid(coords[0], coords[1], coords[2], pixel_mm, float(inverse[2, 2]))


def soft_inside(sdf_mm: np.ndarray, width_mm: float | np.ndarray) -> np.ndarray:
    """Fraction of a voxel inside a surface given its signed distance (negative inside) and blur width."""
    return np.clip(0.5 - sdf_mm / width_mm, 0.0, 1.0).astype(np.float32)


def partial_volume_width(pixel_mm: float, normal_z: np.ndarray | float) -> np.ndarray | float:
    """Blur width (mm) of an edge whose unit normal has z-component `normal_z`, for 5 mm slices."""
    return np.sqrt(pixel_mm**2 + (SLICE_THICKNESS_MM * normal_z) ** 2)


def sheet_fraction(distance_mm: np.ndarray, thickness_mm: float, normal_z: float, pixel_mm: float) -> np.ndarray:
    """Fraction of a voxel filled by a thin sheet (falx, tentorium) at signed distance `distance_mm`.

    An oblique sheet crosses a 5 mm slab over a band of half-width `T*|n_z|/2`; the sheet's material is
    spread over that band, so a tilted sheet looks broad and faint and an upright one thin and dense.
    """
    half_band = 0.5 * max(SLICE_THICKNESS_MM * abs(normal_z), pixel_mm, thickness_mm)
    density = min(1.0, thickness_mm / (2.0 * half_band))
    return density * soft_inside(np.abs(distance_mm) - half_band, pixel_mm)


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid in the head frame: centre and semi-axes in mm, turned by `yaw_deg` about w."""

    centre: tuple[float, float, float]
    axes: tuple[float, float, float]
    yaw_deg: float = 0.0

    @property
    def radius_mm(self) -> float:
        return float(max(self.axes))

    def sdf(self, grid: SliceGrid) -> tuple[np.ndarray, np.ndarray]:
        """Approximate signed distance (mm, negative inside) and |normal_z| at every pixel of `grid`."""
        angle = np.deg2rad(self.yaw_deg)
        du, dv, dw = grid.u - self.centre[0], grid.v - self.centre[1], grid.w - self.centre[2]
        qu = np.cos(angle) * du + np.sin(angle) * dv
        qv = -np.sin(angle) * du + np.cos(angle) * dv
        a, b, c = self.axes
        radius = np.sqrt((qu / a) ** 2 + (qv / b) ** 2 + (dw / c) ** 2)
        gu, gv, gw = qu / a**2, qv / b**2, dw / c**2
        gradient = np.sqrt(gu**2 + gv**2 + gw**2) + 1e-6
        distance = np.where(radius > 0.3, (radius - 1.0) * radius / gradient, (radius - 1.0) * min(self.axes))
        return distance.astype(np.float32), (np.abs(gw) / gradient).astype(np.float32)

    def fraction(self, grid: SliceGrid) -> np.ndarray:
        """Partial-volume fraction (Y, X) in [0, 1] of each pixel inside the ellipsoid."""
        distance, normal_z = self.sdf(grid)
        return soft_inside(distance, partial_volume_width(grid.pixel_mm, normal_z * grid.dwdz))


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: tuple[float, ...], wrap_axis: int = -1) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation (float32); `wrap_axis` is periodic."""
    field = rng.standard_normal(shape).astype(np.float32)
    for axis, axis_sigma in enumerate(sigma):
        mode = "wrap" if axis == wrap_axis else "reflect"
        field = ndimage.gaussian_filter1d(field, axis_sigma, axis=axis, mode=mode)
    return field / max(float(field.std()), 1e-6)


def head_box_noise(rng: np.random.Generator, sigma_mm: float) -> np.ndarray:
    """Smooth noise on the head-frame box `NOISE_BOX_MM` sampled every `NOISE_GRID_MM` (axes u, v, w)."""
    shape = tuple(int(round((high - low) / NOISE_GRID_MM)) + 1 for low, high in NOISE_BOX_MM)
    return smooth_noise(rng, shape, (sigma_mm / NOISE_GRID_MM,) * 3)


def sample_box_noise(field: np.ndarray, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Trilinear sample of a `head_box_noise` field at head-frame points (arrays of one shape)."""
    index = [(coord - low) / NOISE_GRID_MM for coord, (low, _) in zip((u, v, w), NOISE_BOX_MM)]
    return ndimage.map_coordinates(field, index, order=1, mode="nearest").astype(np.float32)


@lru_cache(maxsize=8)
def _interpolation_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) linear-interpolation weights between corner-aligned grids."""
    position = np.linspace(0.0, n_in - 1.0, n_out)
    left = np.clip(np.floor(position).astype(int), 0, max(n_in - 2, 0))
    weight = position - left
    matrix = np.zeros((n_out, n_in), dtype=np.float32)
    matrix[np.arange(n_out), left] = 1.0 - weight
    if n_in > 1:
        matrix[np.arange(n_out), left + 1] += weight
    return matrix


def upsample(low_res: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a (y, x) map sampled on the corner-aligned low-res grid to `shape`."""
    if low_res.shape == shape:
        return low_res.astype(np.float32, copy=False)
    rows = _interpolation_matrix(shape[0], low_res.shape[0])
    cols = _interpolation_matrix(shape[1], low_res.shape[1])
    return (rows @ low_res.astype(np.float32) @ cols.T).astype(np.float32)
