"""Which stack value says how much a stack could teach? Candidate values against the committee's error (issue 18).

The knapsack maximizes summed value under a time budget. With the paper's value V (mean of the top-K patch
JS) the per-hour runs' oracle knapsack (true seconds) bought many cheap, mostly empty stacks and less AP per
hour than the uniform-cost learner (docs/results.md). This benchmark takes round-0 committees of the per-hour
protocol (one per seed: the seed set of that seed's pool), predicts every other pool stack, and

- ranks candidate values against what the stack could teach, measured as the committee's error mass on it
  (sum over voxels of |mean probability - true label|) and the same counted on the true bleed only (missed
  bleed), and per true second as the knapsack sees them;
- fills one round's budget (5% of the pool's true seconds, as the protocol's round 1) with each candidate:
  the knapsack on true seconds, the uniform-cost top-V and random, and sums what each batch holds;
- with `--run`, relates what the run's real round-1 batches held under that committee to the pixel AP they
  bought (round 1 minus round 0, per seed and method).

    OMP_NUM_THREADS=1 python benchmarks/value_measures.py --seeds 0 --out out/value_measures   # trains round 0
    OMP_NUM_THREADS=1 python benchmarks/value_measures.py --seeds 0 1 2 3 4 --run out/hours_run --out out/vm

Without `--run` each seed's round-0 committee is trained (about 4 min per seed on one core); with it, the
run's own round-0 checkpoint `RUN/hours/seed<s>/shared/round0.pt` is loaded, after checking that the pool
regenerated here is the run's (fingerprint) and the seed set is its round 0's. Prints tables and writes
OUT/value_measures.jsonl (one line per seed and stack) and OUT/value_measures.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from ichal.config import DEFAULT_CONFIG
from ichal.ensemble import EnsembleModel, load_ensemble, predict_stack
from ichal.experiment import CONFIGS, Data, ExperimentConfig, make_data, protocol_data_config, seed_set_ids, train_labeled
from ichal.selection import Selection, knapsack_select, random_select, uncertainty_select
from ichal.uncertainty import patch_scores, stack_uncertainty

CANDIDATES = ("top_k_mean_js", "sum_patch_js", "sum_voxel_js", "max_patch_js", "sum_js_on_predicted_bleed",
              "expected_error_mass", "expected_bleed_voxels", "js_weighted_by_probability")
TARGETS = ("error_mass", "missed_bleed_mass", "bleed_voxels")
RANDOM_DRAWS = 200
TIME_EXPONENTS = (0.5, 1.0)


def stack_rows(config: ExperimentConfig, data: Data, model: EnsembleModel, seed_ids: set[str], seed: int) -> list[dict]:
    """One row per unlabeled pool stack: candidate values under `model` and what the stack could teach."""
    rows = []
    for stack in data.pool:
        if stack.id in seed_ids:
            continue
        prediction = predict_stack(model, stack.image_hu, stack.spacing_mm, batch_slices=config.batch_slices)
        patches = patch_scores(prediction.js, DEFAULT_CONFIG.patch_px(stack.spacing_mm[1]))
        label = stack.label.astype(bool)
        error = np.abs(prediction.mean_prob - label)
        rows.append({
            "seed": seed, "id": stack.id, "true_seconds": float(stack.meta["simulated_seconds"]),
            "positive": bool(label.any()), "bleed_voxels": int(label.sum()),
            "top_k_mean_js": stack_uncertainty(patches, DEFAULT_CONFIG.top_k_patches),
            "sum_patch_js": float(patches.sum()),
            "sum_voxel_js": float(prediction.js.sum()),
            "max_patch_js": float(patches.max()),
            # Bleed-focused candidates: disagreement where the committee sees bleed, and the error mass the
            # committee expects of itself (E|p - y| = 2p(1 - p) if y ~ Bernoulli(p)).
            "sum_js_on_predicted_bleed": float(prediction.js[prediction.mean_prob >= 0.5].sum()),
            "expected_error_mass": float((2 * prediction.mean_prob * (1 - prediction.mean_prob)).sum()),
            # How much bleed the committee expects (sum of p), and its disagreement weighted by it: what a
            # labeler could show it of bleed, if the round-1 batches' AP follows their true bleed.
            "expected_bleed_voxels": float(prediction.mean_prob.sum()),
            "js_weighted_by_probability": float((prediction.js * prediction.mean_prob).sum()),
            "error_mass": float(error.sum()), "missed_bleed_mass": float(error[label].sum()),
        })
    return rows


def correlations(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Spearman rho of each candidate with each target, and per true second (what the knapsack ranks by)."""
    seconds = np.array([r["true_seconds"] for r in rows])
    result = {}
    for name in CANDIDATES:
        value = np.array([r[name] for r in rows])
        rho = {target: float(spearmanr(value, [r[target] for r in rows]).statistic)
               for target in ("error_mass", "missed_bleed_mass", "true_seconds")}
        for target in ("error_mass", "missed_bleed_mass"):
            rho[f"{target}_per_second"] = float(spearmanr(value / seconds,
                                                          np.array([r[target] for r in rows]) / seconds).statistic)
        result[name] = rho
    return result


def batch_holdings(rows: list[dict], selection: Selection) -> dict[str, float]:
    """What one batch holds: stacks, stacks with a bleed, true hours, and the TARGETS summed."""
    picked = [rows[i] for i in selection.indices]
    return {"stacks": len(picked), "positive": sum(r["positive"] for r in picked),
            "hours": math.fsum(r["true_seconds"] for r in picked) / 3600.0} | {
        target: math.fsum(r[target] for r in picked) for target in TARGETS}


def simulated_batches(rows: list[dict], budget_seconds: float, seed: int) -> dict[str, dict[str, float]]:
    """One round's batch under `budget_seconds` of TRUE seconds: the knapsack on each candidate value, the
    uniform-cost top-V (`uncertainty`), the knapsack on the committee's real missed bleed (the value a
    pixel-level learner would want; knowable only with the labels), the knapsack on V x seconds^gamma for
    TIME_EXPONENTS, and the mean of RANDOM_DRAWS random batches."""
    seconds = np.array([r["true_seconds"] for r in rows])
    values = {name: np.array([r[name] for r in rows]) for name in (*CANDIDATES, "missed_bleed_mass")}
    batches = {f"knapsack {name}": batch_holdings(rows, knapsack_select(value, seconds, budget_seconds,
                                                                         CONFIGS["hours"].knapsack_resolution_seconds))
               for name, value in values.items()}
    # V times seconds^gamma: a value that grows with the stack's labeling time (gamma 1: the knapsack ranks by V
    # itself, as the uniform-cost learner does, but fills the budget exactly).
    for gamma in TIME_EXPONENTS:
        batches[f"knapsack top_k_mean_js x seconds^{gamma}"] = batch_holdings(rows, knapsack_select(
            values["top_k_mean_js"] * seconds**gamma, seconds, budget_seconds, CONFIGS["hours"].knapsack_resolution_seconds))
    batches["uncertainty (top V, uniform cost)"] = batch_holdings(
        rows, uncertainty_select(values["top_k_mean_js"], seconds, budget_seconds))
    draws = [batch_holdings(rows, random_select(seconds, budget_seconds, np.random.default_rng([seed, k])))
             for k in range(RANDOM_DRAWS)]
    batches["random (mean)"] = {key: float(np.mean([d[key] for d in draws])) for key in draws[0]}
    return batches


def run_round1_batches(run: Path, seed: int, rows: list[dict]) -> list[dict]:
    """The run's round-1 batches of `seed` (all methods), with what they held under this round-0 committee and
    the pixel AP they bought (round 1 minus round 0)."""
    by_id = {r["id"]: r for r in rows}
    start = json.loads((run / "hours" / f"seed{seed}" / "shared" / "round0.json").read_text())
    result = []
    for path in sorted((run / "hours" / f"seed{seed}").glob("*/round1.json")):
        record = json.loads(path.read_text())
        picked = [by_id[i] for i in record["picked_ids"]]
        result.append({"seed": seed, "method": record["method"], "stacks": len(picked),
                       "pixel_ap_gain": record["metrics"]["pixel_ap"] - start["metrics"]["pixel_ap"],
                       "stack_ap_gain": record["metrics"]["stack_ap"] - start["metrics"]["stack_ap"]} | {
            target: math.fsum(r[target] for r in picked) for target in TARGETS})
    return result


def round0_committee(config: ExperimentConfig, data: Data, seed: int, run: Path | None) -> tuple[EnsembleModel, set[str]]:
    """The per-hour protocol's round-0 committee of `seed`: the run's checkpoint (checked to be of this pool
    and seed set) or, without a run, trained here."""
    seed_ids = seed_set_ids(data.pool_ids, config.hours_seed_fraction, seed)
    if run is None:
        return train_labeled(config, data, seed_ids, seed * 100, True)[0], set(seed_ids)
    seed_dir = run / "hours" / f"seed{seed}"
    recorded = json.loads((seed_dir / "data.json").read_text())["data_fingerprint"]
    if recorded != data.fingerprint():
        raise SystemExit(f"seed {seed}: the pool generated here ({data.fingerprint()}) is not the run's ({recorded})")
    if json.loads((seed_dir / "shared" / "round0.json").read_text())["labeled_ids"] != seed_ids:
        raise SystemExit(f"seed {seed}: the run's round 0 labeled another seed set")
    return load_ensemble(seed_dir / "shared" / "round0.pt"), set(seed_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="per-hour seeds whose pools are used")
    parser.add_argument("--iterations", type=int, help="default: the hours config's (ignored with --run)")
    parser.add_argument("--run", type=Path, help="a per-hour run's --out: its round-0 checkpoints and round-1 records")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    all_rows, batches, real_batches, summary = [], {}, [], {"seeds": args.seeds, "per_seed": {}}
    for seed in args.seeds:
        config = protocol_data_config("hours", CONFIGS["hours"], seed)
        if args.iterations and args.run is None:
            config = dataclasses.replace(config, iterations=args.iterations)
        data = make_data(config, progress=True)
        model, seed_ids = round0_committee(config, data, seed, args.run)
        rows = stack_rows(config, data, model, seed_ids, seed)
        all_rows += rows
        budget = config.hours_budget_fraction * data.true_seconds(data.pool_ids)
        batches[seed] = simulated_batches(rows, budget, seed)
        summary["per_seed"][seed] = {"stacks": len(rows), "budget_seconds": budget,
                                     "correlations": correlations(rows), "batches": batches[seed]}
        if args.run is not None:
            real_batches += run_round1_batches(args.run, seed, rows)

    print(f"Spearman rho over each seed's unlabeled stacks, median over {len(args.seeds)} seed(s)")
    print(f"{'value':>26} {'error mass':>11} {'missed bleed':>13} {'true s':>7} {'per s: error':>13} {'missed':>7}")
    for name in CANDIDATES:
        rho = {key: float(np.median([summary["per_seed"][s]["correlations"][name][key] for s in args.seeds]))
               for key in ("error_mass", "missed_bleed_mass", "true_seconds", "error_mass_per_second",
                           "missed_bleed_mass_per_second")}
        print(f"{name:>26} {rho['error_mass']:11.2f} {rho['missed_bleed_mass']:13.2f} {rho['true_seconds']:7.2f} "
              f"{rho['error_mass_per_second']:13.2f} {rho['missed_bleed_mass_per_second']:7.2f}")

    print(f"\nOne round's batch (5% of the pool's true seconds), mean over {len(args.seeds)} seed(s); "
          "missed bleed as a share of what the knapsack on the real missed bleed holds")
    print(f"{'selection':>38} {'stacks':>7} {'bleeds':>7} {'true h':>7} {'missed bleed':>13} {'share':>6} {'bleed vox':>10}")
    summary["batches_mean"] = {}
    for name in batches[args.seeds[0]]:
        mean = {key: float(np.mean([batches[s][name][key] for s in args.seeds])) for key in batches[args.seeds[0]][name]}
        share = float(np.mean([batches[s][name]["missed_bleed_mass"] / batches[s]["knapsack missed_bleed_mass"]["missed_bleed_mass"]
                               for s in args.seeds]))
        summary["batches_mean"][name] = mean | {"missed_bleed_share": share}
        print(f"{name:>38} {mean['stacks']:7.1f} {mean['positive']:7.1f} {mean['hours']:7.2f} "
              f"{mean['missed_bleed_mass']:13.0f} {share:6.2f} {mean['bleed_voxels']:10.0f}")

    if real_batches:
        gain = [b["pixel_ap_gain"] for b in real_batches]
        summary["round1"] = {"batches": real_batches, "spearman_pixel_ap_gain": {
            key: float(spearmanr([b[key] for b in real_batches], gain).statistic)
            for key in ("stacks", *TARGETS)}}
        print(f"\nThe run's round-1 batches ({len(real_batches)}: seeds x methods): Spearman rho with the pixel AP "
              "they bought: " + ", ".join(f"{k} {v:+.2f}" for k, v in summary["round1"]["spearman_pixel_ap_gain"].items()))
        for method in sorted({b["method"] for b in real_batches}):
            group = [b for b in real_batches if b["method"] == method]
            print(f"{method:>18}: mean stacks {np.mean([b['stacks'] for b in group]):5.1f}, missed bleed "
                  f"{np.mean([b['missed_bleed_mass'] for b in group]):6.0f}, pixel AP gain "
                  f"{np.mean([b['pixel_ap_gain'] for b in group]):+.3f}")

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "value_measures.jsonl").write_text("".join(json.dumps(r) + "\n" for r in all_rows))
    (args.out / "value_measures.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
