"""Where trained models put false positives on generated stacks: the tissue under each false-positive voxel.

The generator's tissue map names what every voxel is (vessel = dense sinus or artery, calcification, falx,
gray matter, ...), so the false positives of a checkpoint can be attributed. For each checkpoint, prints the
empty stacks whose stack-level call is positive (any voxel >= the detection threshold), the median of their
highest probability, the tissue under that highest voxel, and the share of all false-positive voxels (every
stack) by tissue.

    python benchmarks/false_positives.py --models A.pt B.pt --seed 2000 --count 60 --size 128
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ichal.config import DEFAULT_CONFIG
from ichal.ensemble import load_ensemble, predict_stack
from ichal.phantom.anatomy import TISSUE_CODES
from ichal.phantom.generator import render_stack, stack_seed

TISSUE_NAMES = {code: name for name, code in TISSUE_CODES.items()}


def _share(counts: Counter, top: int = 4) -> str:
    total = sum(counts.values())
    return ", ".join(f"{name} {100 * n / total:.0f}%" for name, n in counts.most_common(top)) if total else "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, nargs="+", required=True, metavar="CKPT")
    parser.add_argument("--seed", type=int, default=2000, help="generator seed of the evaluated stacks")
    parser.add_argument("--count", type=int, default=60)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    threshold = DEFAULT_CONFIG.detection_threshold
    models = {str(path): load_ensemble(path) for path in args.models}
    empty_max = {name: [] for name in models}
    empty_tissue = {name: Counter() for name in models}
    fp_voxel_tissue = {name: Counter() for name in models}
    for index in tqdm(range(args.count), desc="stacks", unit="stack"):
        rendered = render_stack(stack_seed(args.seed, index), args.size)
        stack = rendered.stack
        unlabeled = stack.label == 0
        for name, model in models.items():
            probability = np.where(unlabeled, predict_stack(model, stack.image_hu, stack.spacing_mm).mean_prob, 0.0)
            fp_voxel_tissue[name].update(TISSUE_NAMES[int(t)] for t in rendered.tissue[probability >= threshold])
            if stack.meta["negative"]:
                top = np.unravel_index(int(np.argmax(probability)), probability.shape)
                empty_max[name].append(float(probability[top]))
                empty_tissue[name][TISSUE_NAMES[int(rendered.tissue[top])]] += 1
    print(f"{args.count} stacks of generator seed {args.seed} at {args.size} px; threshold {threshold}")
    print("| checkpoint | empty stacks called positive | median top probability, empty stacks "
          "| tissue under the top voxel, empty stacks | false-positive voxels per stack | their tissue |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name in models:
        maxima = np.asarray(empty_max[name])
        row = {"checkpoint": name, "empty_stacks": int(maxima.size), "empty_called_positive": int((maxima >= threshold).sum()),
               "median_top_probability": float(np.median(maxima)) if maxima.size else None,
               "top_voxel_tissue": dict(empty_tissue[name]), "fp_voxels": dict(fp_voxel_tissue[name])}
        rows.append(row)
        median = "-" if row["median_top_probability"] is None else f"{row['median_top_probability']:.2f}"
        print(f"| {Path(name).parent.name}/{Path(name).name} | {row['empty_called_positive']}/{row['empty_stacks']} "
              f"| {median} | {_share(empty_tissue[name])} "
              f"| {sum(fp_voxel_tissue[name].values()) / args.count:.0f} | {_share(fp_voxel_tissue[name])} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
