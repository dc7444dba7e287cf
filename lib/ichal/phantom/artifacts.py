"""CT artifacts and scanner effects of the synthetic head: streaks, beam-hardening rim, kernel, calibration, noise.

DESIGN.md "Data": streak artifacts as look-alikes and 3-8 HU noise, added after the clean HU render. Generator
version 2 adds what differs between scanners and protocols: a bright rim of brain under the inner table
(beam hardening; the "pseudo-subdural" look-alike), the reconstruction kernel's blur and the water
calibration's drift.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ichal.phantom.geometry import SliceGrid

PETROUS_LEVEL_MM = -56.0
NOISE_CORRELATION_PX = 0.7


@dataclass(frozen=True)
class Scanner:
    """Per-stack scanner and protocol effects."""

    kernel_sigma_mm: float  # in-plane blur of the reconstruction kernel (0 sharp .. 0.9 soft)
    calibration_hu: float  # offset of the whole image (water calibration drift)
    rim_hu: float  # beam-hardening brightening of brain just under the inner table
    rim_width_mm: float

    def summary(self) -> dict:
        """JSON-serialisable description for the stack's metadata."""
        return {name: round(float(value), 2) for name, value in vars(self).items()}


def sample_scanner(rng: np.random.Generator) -> Scanner:
    """Draw one stack's scanner effects."""
    return Scanner(
        kernel_sigma_mm=float(rng.uniform(0.0, 0.9)),
        calibration_hu=float(rng.uniform(-4.0, 4.0)),
        rim_hu=float(rng.uniform(0.0, 10.0)),
        rim_width_mm=float(rng.uniform(1.5, 4.0)),
    )


def rim_offsets(scanner: Scanner, cavity_depth_mm: np.ndarray, texture: np.ndarray) -> np.ndarray:
    """HU offsets (Y, X) of the beam-hardening rim: strongest at the inner table, uneven along it."""
    inside = cavity_depth_mm > 0
    strength = np.clip(0.7 + 0.4 * texture, 0.2, 1.2)
    return (scanner.rim_hu * strength * np.exp(-np.clip(cavity_depth_mm, 0.0, None) / scanner.rim_width_mm) * inside).astype(np.float32)


def apply_kernel(volume_hu: np.ndarray, scanner: Scanner, pixel_mm: float) -> np.ndarray:
    """In-plane Gaussian blur of the reconstruction kernel (slices are independent), plus the calibration offset."""
    sigma_px = scanner.kernel_sigma_mm / pixel_mm
    blurred = ndimage.gaussian_filter(volume_hu, (0.0, sigma_px, sigma_px)) if sigma_px > 0.05 else volume_hu
    return blurred + np.float32(scanner.calibration_hu)


@dataclass(frozen=True)
class Streak:
    """A straight streak in the head frame through (u, v) at `angle`; `amplitude_hu` may be negative."""

    u_mm: float
    v_mm: float
    angle: float
    width_mm: float
    amplitude_hu: float


def sample_streaks(rng: np.random.Generator) -> tuple[Streak, ...]:
    """The inter-petrous dark band plus 3-8 thin bright/dark streaks radiating from the petrous apices."""
    streaks = [Streak(0.0, float(rng.uniform(0.0, 8.0)), 0.0, float(rng.uniform(3.0, 6.0)), -float(rng.uniform(12.0, 30.0)))]
    for _ in range(int(rng.integers(3, 9))):
        side = float(rng.choice([-1.0, 1.0]))
        streaks.append(
            Streak(
                side * float(rng.uniform(15.0, 35.0)),
                float(rng.uniform(-5.0, 15.0)),
                float(rng.uniform(0.0, np.pi)),
                float(rng.uniform(0.5, 1.5)),
                float(rng.choice([-1.0, 1.0]) * rng.uniform(8.0, 35.0)),
            )
        )
    return tuple(streaks)


def streak_offsets(streaks: tuple[Streak, ...], grid: SliceGrid, head_mask: np.ndarray) -> np.ndarray:
    """HU offsets (Y, X) of `streaks` on one slice, strongest at the petrous level, zero outside the head."""
    envelope = np.exp(-(((grid.w - PETROUS_LEVEL_MM) / 11.0) ** 2)) * head_mask
    if float(envelope.max()) < 1e-3:
        return np.zeros(grid.u.shape, dtype=np.float32)
    offsets = np.zeros(grid.u.shape, dtype=np.float32)
    for streak in streaks:
        du, dv = grid.u - streak.u_mm, grid.v - streak.v_mm
        across = du * np.sin(streak.angle) - dv * np.cos(streak.angle)
        along = np.abs(du * np.cos(streak.angle) + dv * np.sin(streak.angle))
        offsets += streak.amplitude_hu * np.exp(-((across / streak.width_mm) ** 2) - along / 90.0)
    return (offsets * envelope).astype(np.float32)


def correlated_noise(rng: np.random.Generator, shape: tuple[int, int, int], std_hu: float) -> np.ndarray:
    """In-plane correlated Gaussian noise (Z, Y, X) with standard deviation `std_hu`."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), (0.0, NOISE_CORRELATION_PX, NOISE_CORRELATION_PX))
    return noise * np.float32(std_hu / max(float(noise.std()), 1e-6))
