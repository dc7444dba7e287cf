"""Which stack value says how much a stack could teach? Candidate values against the committee's error (issue 18).

The knapsack maximizes summed value under a time budget. With the paper's value V (mean of the top-K patch
JS) the partial per-hour run's oracle knapsack bought many cheap, mostly empty stacks and lost AP
(docs/results.md): V barely grows with how much of a stack the committee gets wrong. This benchmark
trains one round-0 committee of the per-hour protocol (the seed set of one seed's pool), predicts every
other pool stack, and ranks candidate values against what the stack could teach, measured as the
committee's error mass on it (sum over voxels of |mean probability - true label|, and the same counted on
the true bleed only), and against value per true second as the knapsack sees it.

    OMP_NUM_THREADS=1 python benchmarks/value_measures.py --seed 0 --out out/value_measures

Prints Spearman correlations and writes OUT/value_measures.jsonl (one line per stack) and OUT/value_measures.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from ichal.config import DEFAULT_CONFIG
from ichal.ensemble import predict_stack
from ichal.experiment import CONFIGS, make_data, protocol_data_config, seed_set_ids, train_labeled
from ichal.uncertainty import patch_scores, stack_uncertainty


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="per-hour seed whose pool and seed set are used")
    parser.add_argument("--iterations", type=int, help="default: the hours config's")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = protocol_data_config("hours", CONFIGS["hours"], args.seed)
    if args.iterations:
        config = dataclasses.replace(config, iterations=args.iterations)
    data = make_data(config, progress=True)
    seed_ids = seed_set_ids(data.pool_ids, config.hours_seed_fraction, args.seed)  # the protocol's round 0
    model, _ = train_labeled(config, data, seed_ids, args.seed * 100, True)
    rows = []
    for stack in data.pool:
        if stack.id in seed_ids:
            continue
        prediction = predict_stack(model, stack.image_hu, stack.spacing_mm, batch_slices=config.batch_slices)
        patches = patch_scores(prediction.js, DEFAULT_CONFIG.patch_px(stack.spacing_mm[1]))
        label = stack.label.astype(bool)
        error = np.abs(prediction.mean_prob - label)
        rows.append({
            "id": stack.id, "true_seconds": float(stack.meta["simulated_seconds"]),
            "positive": bool(label.any()), "bleed_voxels": int(label.sum()),
            "top_k_mean_js": stack_uncertainty(patches, DEFAULT_CONFIG.top_k_patches),
            "sum_patch_js": float(patches.sum()),
            "sum_voxel_js": float(prediction.js.sum()),
            "max_patch_js": float(patches.max()),
            # Bleed-focused candidates: disagreement where the committee sees bleed, and the error mass the
            # committee expects of itself (E|p - y| = 2p(1 - p) if y ~ Bernoulli(p)).
            "sum_js_on_predicted_bleed": float(prediction.js[prediction.mean_prob >= 0.5].sum()),
            "expected_error_mass": float((2 * prediction.mean_prob * (1 - prediction.mean_prob)).sum()),
            "error_mass": float(error.sum()), "missed_bleed_mass": float(error[label].sum()),
        })
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "value_measures.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    seconds = np.array([r["true_seconds"] for r in rows])
    summary = {"seed": args.seed, "iterations": config.iterations, "stacks": len(rows), "correlations": {}}
    print(f"{len(rows)} stacks, seed {args.seed}, {config.iterations} iterations; Spearman rho")
    print(f"{'value':>26} {'error mass':>11} {'missed bleed':>13} {'true s':>7} {'per s: error':>13} {'missed':>7}")
    for name in ("top_k_mean_js", "sum_patch_js", "sum_voxel_js", "max_patch_js", "sum_js_on_predicted_bleed",
                 "expected_error_mass"):
        value = np.array([r[name] for r in rows])
        rho = {target: float(spearmanr(value, [r[target] for r in rows]).statistic)
               for target in ("error_mass", "missed_bleed_mass", "true_seconds")}
        for target in ("error_mass", "missed_bleed_mass"):  # what the knapsack ranks by: value per second
            rho[f"{target}_per_second"] = float(spearmanr(value / seconds,
                                                          np.array([r[target] for r in rows]) / seconds).statistic)
        summary["correlations"][name] = rho
        print(f"{name:>26} {rho['error_mass']:11.2f} {rho['missed_bleed_mass']:13.2f} {rho['true_seconds']:7.2f} "
              f"{rho['error_mass_per_second']:13.2f} {rho['missed_bleed_mass_per_second']:7.2f}")
    for positive in (True, False):
        group = [r for r in rows if r["positive"] == positive]
        if group:
            medians = {key: float(np.median([r[key] for r in group]))
                       for key in ("true_seconds", "top_k_mean_js", "error_mass", "missed_bleed_mass")}
            medians["error_mass_per_second"] = float(np.median([r["error_mass"] / r["true_seconds"] for r in group]))
            medians["top_k_mean_js_per_second"] = float(np.median([r["top_k_mean_js"] / r["true_seconds"]
                                                                   for r in group]))
            summary["bleed" if positive else "no_bleed"] = {"stacks": len(group)} | medians
            print(f"{'bleed' if positive else 'no bleed'}: {len(group)} stacks, median " +
                  ", ".join(f"{k} {v:.3g}" for k, v in medians.items()))
    (args.out / "value_measures.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
