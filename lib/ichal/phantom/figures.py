"""Figures of the phantom for docs/: one mid-brain slice per bleed kind, and the anatomy from skull base to vertex.

DESIGN.md "Data" asks to look at the generator's output; `python -m ichal.phantom.figures --out docs` redraws them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ichal.phantom.bleeds import BLEED_KINDS  # noqa: E402
from ichal.phantom.generator import RenderedStack, render_stack  # noqa: E402

BRAIN_WINDOW_HU = (0.0, 80.0)
SEARCH_SIZE = 96
MIN_VISIBLE_ML = {"subarachnoid": 0.6, "intraventricular": 1.0}


def find_seed_with_kind(kind: str, first_seed: int = 0, max_tries: int = 400) -> int:
    """First seed >= `first_seed` whose stack holds a clearly visible bleed of `kind` (searched at low size)."""
    for seed in range(first_seed, first_seed + max_tries):
        bleeds = render_stack(seed, SEARCH_SIZE).stack.meta["bleeds"]
        if any(b["kind"] == kind and b["volume_ml"] >= MIN_VISIBLE_ML.get(kind, 3.0) for b in bleeds):
            return seed
    raise RuntimeError(f"no stack with a visible {kind} bleed in seeds {first_seed}..{first_seed + max_tries - 1}")


def best_slice(result: RenderedStack, kind: str) -> int:
    """Slice index holding the most voxels of `kind`."""
    code = 1 + BLEED_KINDS.index(kind)
    return int(np.argmax((result.bleed_kind == code).sum(axis=(1, 2))))


def draw_kinds(out: Path, size: int = 512) -> Path:
    """One panel per bleed kind (brain window), the label contoured in red; returns the PNG path."""
    figure, axes = plt.subplots(2, len(BLEED_KINDS), figsize=(4.2 * len(BLEED_KINDS), 8.8))
    for column, kind in enumerate(BLEED_KINDS):
        seed = find_seed_with_kind(kind)
        result = render_stack(seed, size)
        k = best_slice(result, kind)
        image, label = result.stack.image_hu[k], result.stack.label[k]
        for row, with_contour in enumerate((False, True)):
            axis = axes[row, column]
            axis.imshow(image, cmap="gray", vmin=BRAIN_WINDOW_HU[0], vmax=BRAIN_WINDOW_HU[1], interpolation="bilinear")
            if with_contour and label.any():
                axis.contour(label, levels=[0.5], colors="red", linewidths=0.6)
            axis.set_axis_off()
        bleeds = [b for b in result.stack.meta["bleeds"] if b["kind"] == kind]
        detail = ", ".join(f"{b['volume_ml']:.1f} ml {b['blood_hu']:.0f} HU" for b in bleeds)
        axes[0, column].set_title(f"{kind}\nseed {seed}, slice {k}: {detail}", fontsize=9)
    axes[1, 0].text(-0.05, 0.5, "label contour", transform=axes[1, 0].transAxes, rotation=90, va="center", ha="right")
    figure.suptitle(f"Synthetic head CT, brain window {BRAIN_WINDOW_HU[0]:.0f}-{BRAIN_WINDOW_HU[1]:.0f} HU, {size}x{size}", fontsize=11)
    figure.tight_layout()
    path = out / "phantom_bleed_kinds.png"
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def draw_levels(out: Path, seed: int = 1, size: int = 512) -> Path:
    """Eight levels of one stack from skull base to vertex, brain window above and bone window below."""
    result = render_stack(seed, size)
    image = result.stack.image_hu
    levels = np.linspace(1, image.shape[0] - 2, 8).round().astype(int)
    figure, axes = plt.subplots(2, len(levels), figsize=(2.6 * len(levels), 5.6))
    for column, k in enumerate(levels):
        axes[0, column].imshow(image[k], cmap="gray", vmin=0, vmax=80, interpolation="bilinear")
        axes[1, column].imshow(image[k], cmap="gray", vmin=-400, vmax=1600, interpolation="bilinear")
        axes[0, column].set_title(f"slice {k}", fontsize=9)
        for axis in axes[:, column]:
            axis.set_axis_off()
    figure.suptitle(f"seed {seed}: brain window (top), bone window (bottom); {result.stack.meta['kinds'] or 'negative'}", fontsize=10)
    figure.tight_layout()
    path = out / "phantom_levels.png"
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="Draw the phantom figures of docs/phantom.md.")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(draw_kinds(args.out, args.size))
    print(draw_levels(args.out, size=args.size))


if __name__ == "__main__":
    main()
