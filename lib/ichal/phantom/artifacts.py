"""CT artifacts of the synthetic head: streaks from the dense skull base and correlated quantum noise.

DESIGN.md "Data": streak artifacts as look-alikes and 3-8 HU noise; both are added after the clean HU render.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ichal.phantom.geometry import SliceGrid

PETROUS_LEVEL_MM = -56.0
NOISE_CORRELATION_PX = 0.7


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
