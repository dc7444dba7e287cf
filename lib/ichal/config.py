"""One place for the pipeline's shared constants: HU windows, patch geometry, thresholds.

Training, inference, scoring and the app all read `PipelineConfig`, so a change here changes
them together (DESIGN.md, Pipeline; paper sections 2-3).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class HUWindow:
    """A display window mapped to [0, 1]: `low_hu` -> 0, `high_hu` -> 1, clipped outside."""

    name: str
    low_hu: float
    high_hu: float


DEFAULT_HU_WINDOWS: tuple[HUWindow, ...] = (
    HUWindow("brain", 0.0, 80.0),
    HUWindow("subdural", -20.0, 180.0),
    HUWindow("wide", -100.0, 300.0),
)


@dataclass(frozen=True)
class PipelineConfig:
    """Settings shared by every stage. Units are in the names.

    `patch_mm` is the PatchFCN crop edge (paper: 160 px at ~0.45 mm = 72 mm); the pixel size of a
    patch at a given spacing is `patch_px(spacing_mm)`. Scoring tiles slices with the same patch.
    """

    hu_windows: tuple[HUWindow, ...] = DEFAULT_HU_WINDOWS
    patch_mm: float = 72.0
    feature_thresholds: tuple[float, ...] = (0.3, 0.5, 0.7)
    detection_threshold: float = 0.5
    # A committee's called region smaller than this is a speck, not a bleed: it does not make a stack positive by
    # itself (`ichal.metrics.stack_score_candidates`).
    min_region_ml: float = 0.1
    top_k_patches: int = 200
    ensemble_size: int = 4
    extra: dict[str, str] = field(default_factory=dict)

    def patch_px(self, spacing_mm: float) -> int:
        """Patch edge in pixels at in-plane `spacing_mm` (at least 16 px)."""
        if not spacing_mm > 0:
            raise ValueError(f"in-plane spacing must be positive, got {spacing_mm} mm")
        return max(16, int(round(self.patch_mm / spacing_mm)))


DEFAULT_CONFIG = PipelineConfig()
