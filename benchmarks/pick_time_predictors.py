"""Which pick-time predictor of labeling seconds works with a young committee? (issue 17)

Replays a finished cost run (`python -m ichal.experiment cost --out RUN`): for every committee that picked a
batch (round r-1's checkpoint of each seed and method) it scores the stacks that were unlabeled then, fits the
true-mask time model on the stacks labeled then (as the run did), and compares predictors of each unlabeled
stack's true seconds. Nothing is trained; the committees are the run's own checkpoints.

Predictors (all but the `oracle_*` rows use only what the app knows when it picks):
- `raw`: the true-mask time model applied to the committee's mask features (what the app serves, before
  recalibration).
- `constant`: the median measured seconds of the labeled stacks.
- `mixture`: the stack score p (`ichal.metrics.stack_score`) as the chance of a bleed; p x seconds of the
  committee's mask (or, when it calls nothing, of the median labeled bleed) + (1 - p) x seconds of an empty
  stack (the time model at B = M = 0).
- `oracle_presence`: a perfect stack classifier, p = 1 for a true bleed, else 0; a bleed's seconds are the larger
  of the committee mask's and the median labeled bleed's (a called-nothing mask gives the latter).
- `oracle_mask`: the time model on the TRUE mask (the ceiling of any mask-based predictor).

    python benchmarks/pick_time_predictors.py --run docs/results/cal17_quick_hardneg ... (needs the run's
        checkpoints, i.e. its --out folder) --csv out/pick_time/stacks.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ichal.cost import LabelTimeModel, MaskFeatures, mask_features
from ichal.ensemble import load_ensemble, predict_stack
from ichal.experiment import ExperimentConfig, make_data, saved_config
from ichal.config import DEFAULT_CONFIG
from ichal.metrics import stack_score

PREDICTORS = ("raw", "constant", "mixture", "oracle_presence", "oracle_mask")


def mixture_seconds(p_bleed: float, bleed_seconds: float, empty_seconds: float) -> float:
    """Expected seconds when a stack holds a bleed (taking `bleed_seconds`) with probability `p_bleed`."""
    return p_bleed * bleed_seconds + (1.0 - p_bleed) * empty_seconds


def committee_rows(config: ExperimentConfig, data, checkpoint: Path, labeled: list[str], unlabeled: list[str],
                   cell: dict) -> list[dict]:
    """One row per unlabeled stack: the committee's pick-time features and every predictor's seconds."""
    by_id = {s.id: s for s in data.pool}
    true_seconds = {i: data.true_seconds([i]) for i in data.pool_ids}
    time_model = LabelTimeModel().fit([data.true_features[i] for i in labeled], [true_seconds[i] for i in labeled])
    bleed_labeled = [i for i in labeled if data.true_features[i].n_components > 0]
    typical_bleed = MaskFeatures(float(np.median([data.true_features[i].boundary_mm for i in bleed_labeled])),
                                 float(np.median([data.true_features[i].n_components for i in bleed_labeled])))
    empty_seconds = float(time_model.predict([MaskFeatures(0.0, 0.0)])[0])
    typical_bleed_seconds = float(time_model.predict([typical_bleed])[0])
    constant = float(np.median([true_seconds[i] for i in labeled]))
    model = load_ensemble(checkpoint, config.device)
    rows = []
    for stack_id in unlabeled:
        stack = by_id[stack_id]
        prediction = predict_stack(model, stack.image_hu, stack.spacing_mm, device=config.device,
                                   batch_slices=config.batch_slices)
        features = mask_features(prediction.mean_prob, stack.spacing_mm, DEFAULT_CONFIG.feature_thresholds)
        p = stack_score(prediction.mean_prob, stack.spacing_mm)
        raw = float(time_model.predict([features])[0])
        bleed_seconds = raw if features.n_components > 0 else typical_bleed_seconds
        has_bleed = float(data.true_features[stack_id].n_components > 0)
        rows.append(cell | {
            "id": stack_id, "true_seconds": true_seconds[stack_id], "true_bleed": int(has_bleed),
            "stack_score": p, "pred_boundary_mm": features.boundary_mm, "pred_components": features.n_components,
            "raw": raw, "constant": constant,
            "mixture": mixture_seconds(p, bleed_seconds, empty_seconds),
            "oracle_presence": mixture_seconds(has_bleed, max(raw, typical_bleed_seconds) if features.n_components
                                               else typical_bleed_seconds, empty_seconds),
            "oracle_mask": float(time_model.predict([data.true_features[stack_id]])[0]),
        })
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per predictor: correlation of log seconds, median |log error|, and true/predicted on empty and bleed stacks."""
    true_log = np.log([r["true_seconds"] for r in rows])
    bleed = np.array([r["true_bleed"] for r in rows], dtype=bool)
    out = []
    for name in PREDICTORS:
        predicted_log = np.log([r[name] for r in rows])
        error = true_log - predicted_log
        out.append({
            "predictor": name,
            "n": len(rows),
            "corr_log": float(np.corrcoef(predicted_log, true_log)[0, 1]) if np.std(predicted_log) > 0 else float("nan"),
            "median_abs_log_error": float(np.median(np.abs(error))),
            "empty_true_over_pred": float(np.exp(np.median(error[~bleed]))),
            "bleed_true_over_pred": float(np.exp(np.median(error[bleed]))),
        })
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a cost run's --out folder (with checkpoints)")
    parser.add_argument("--csv", type=Path, help="write one row per (committee, unlabeled stack) here")
    parser.add_argument("--json", type=Path, help="write the summary here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = saved_config(args.run, "cost")
    data = make_data(config, progress=False)
    if data.fingerprint() != json.loads((args.run / "cost_config.json").read_text())["data_fingerprint"]:
        sys.exit(f"{args.run}: the generator now gives other stacks than this run saw (fingerprint differs)")
    cells = []
    for seed_dir in sorted((args.run / "cost").glob("seed*")):
        seed = int(seed_dir.name[4:])
        for method_dir in sorted(p for p in seed_dir.iterdir() if p.is_dir() and p.name != "shared"):
            for record_path in sorted(method_dir.glob("round*.json")):
                record = json.loads(record_path.read_text())
                r = record["round"]
                previous_dir = seed_dir / "shared" if r == 1 else method_dir
                previous = json.loads((previous_dir / f"round{r - 1}.json").read_text())
                cells.append((previous_dir / f"round{r - 1}.pt", previous["labeled_ids"],
                              {"seed": seed, "method": method_dir.name, "round": r}))
    rows: list[dict] = []
    for checkpoint, labeled, cell in tqdm(cells, desc="committees", unit="committee"):
        unlabeled = [i for i in data.pool_ids if i not in set(labeled)]
        rows += committee_rows(config, data, checkpoint, labeled, unlabeled, cell)
    summary = summarize(rows)
    print(f"{'predictor':16} {'n':>4} {'corr':>6} {'med|log err|':>12} {'empty true/pred':>15} {'bleed true/pred':>15}")
    for s in summary:
        print(f"{s['predictor']:16} {s['n']:4d} {s['corr_log']:6.2f} {s['median_abs_log_error']:12.2f} "
              f"{s['empty_true_over_pred']:15.2f} {s['bleed_true_over_pred']:15.2f}")
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
