"""Apply a saved PatchFCN ensemble to a folder of NIfTI CT stacks; `python -m ichal.infer`.

Kuo et al. 2018, Fig. 1: per stack, the mean hemorrhage heatmap and the JS-divergence heatmap.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ichal.config import DEFAULT_CONFIG
from ichal.ensemble import EnsembleModel, load_ensemble, predict_stack
from ichal.io import read_nifti, write_nifti


def infer_folder(model: EnsembleModel, images_dir: Path, out_dir: Path, *, device: str = "cpu",
                 overlap: float = 0.25, threshold: float = DEFAULT_CONFIG.detection_threshold) -> list[str]:
    """Predict every `images_dir/<id>.nii.gz` (not sub-folders); returns the stack ids done.

    Writes `<id>_prob.nii.gz` (float32 ensemble mean), `<id>_label.nii.gz` (uint8, mean >= threshold)
    and `<id>_js.nii.gz` (float32, nats) to `out_dir`, each with the input's affine.
    """
    paths = sorted(Path(images_dir).glob("*.nii.gz"))
    if not paths:
        raise ValueError(f"no .nii.gz images in {images_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for path in tqdm(paths, desc="inference", unit="stack"):
        stack_id = path.name.removesuffix(".nii.gz")
        volume = read_nifti(path)
        prediction = predict_stack(model, volume.array, volume.spacing_mm, device=device, overlap=overlap)
        write_nifti(prediction.mean_prob, volume.affine, out_dir / f"{stack_id}_prob.nii.gz")
        label = (prediction.mean_prob >= threshold).astype(np.uint8)
        write_nifti(label, volume.affine, out_dir / f"{stack_id}_label.nii.gz")
        write_nifti(prediction.js, volume.affine, out_dir / f"{stack_id}_js.nii.gz")
        done.append(stack_id)
    return done


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ichal.infer", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="ensemble checkpoint (from ichal.train)")
    parser.add_argument("--images", type=Path, required=True, help="folder of <id>.nii.gz CT stacks in HU")
    parser.add_argument("--out", type=Path, required=True, help="folder for <id>_prob/_label/_js.nii.gz")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--threshold", type=float, default=DEFAULT_CONFIG.detection_threshold)
    args = parser.parse_args(argv)
    model = load_ensemble(args.model, device=args.device)
    done = infer_folder(model, args.images, args.out, device=args.device, overlap=args.overlap,
                        threshold=args.threshold)
    print(f"wrote predictions for {len(done)} stacks to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
