"""Honest minutes replayed on one committee (issue 17): worklists budgeted at a confidence, against the
simulated annotator's true seconds.

Two committees can be replayed:
- a well-trained one (`--checkpoint`, e.g. 2 x `cpu_small`, 20000 steps on 200 stacks at 128 px: more than the
  cost protocol can train on 2 CPU cores), with the time model fit on the true masks and true seconds of the
  stacks it was trained on (what the site has measured) and a fresh pool of unlabeled stacks;
- the per-hour protocol's young one (`--hours-seed S`): round 0 of seed S (2 members of 3200 iterations on the
  seed set of S's 120-stack pool, trained here in ~3 min), with the time model fit on the seed set's true masks
  and the rest of S's pool as the unlabeled stacks: a site's first committee.

The pool is scored once; then, for each repetition, a random seed worklist is "labeled" first (its pick-time
errors are the first residuals, as after a site's first random worklists), and each method picks R worklists in
turn, each within `budget_fraction` of the pool's true seconds at `--confidence` (raised by the overruns of that
method's earlier worklists, `--confidence-step`), recalibrated on the errors of every stack labeled before it
(`ichal.experiment.budget_at_confidence` and `worklist_confidence`, the experiment's and the app's logic).
The committee is not retrained between worklists: the question here is the time estimate, not the model.

    python benchmarks/honest_minutes_trained.py --checkpoint C.pt --time-pool-seed 0 --time-pool-count 200 \
        --pool-seed 3000 --pool-count 120 --reps 10 --rounds 5 --json out/honest/trained.json
    python benchmarks/honest_minutes_trained.py --hours-seed 0 --cache out/honest/hours0.pkl --seed-count 15 \
        --reps 10 --rounds 5 --json out/honest/young0.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pickle
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ichal.cost import LabelTimeModel
from ichal.ensemble import load_ensemble
from ichal.experiment import (CONFIGS, METHODS, ExperimentConfig, StackScores, batch_outcome, budget_at_confidence,
                              make_data, protocol_data_config, score_stacks, seed_set_ids, train_labeled,
                              true_mask_features, worklist_confidence)
from ichal.io import atomic_write_bytes
from ichal.phantom import PhantomStack, generate_pool
from ichal.time_intervals import BATCH_TAILS, CONFIDENCE_STEP, DEFAULT_BATCH_TAIL


def batch_record(rep: int, method: str, round_index: int, indices: np.ndarray, medians: np.ndarray,
                 mean_factor: float, high_total: float, interval: tuple[float, float], raw_log: np.ndarray,
                 raw_mean_factor: float, true_seconds: np.ndarray, budget: float) -> dict:
    """What one budgeted worklist predicted and what it really took (all arrays over the unlabeled stacks)."""
    true_log = np.log(true_seconds)
    error = true_log - np.log(medians)
    picked_true = math.fsum(true_seconds[indices])
    predicted = math.fsum(medians[indices]) * mean_factor
    return {
        "rep": rep, "method": method, "round": round_index, "n_picked": int(len(indices)), "budget": budget,
        "predicted_seconds": predicted, "high_seconds": high_total, "true_seconds": picked_true,
        "raw_predicted_seconds": math.fsum(np.exp(raw_log[indices])) * raw_mean_factor,
        "rel_error": (picked_true - predicted) / predicted if predicted > 0 else float("nan"),
        "over_budget": bool(picked_true > budget),
        "in_interval": int(((error[indices] >= interval[0]) & (error[indices] <= interval[1])).sum()),
        "abs_log_errors": [float(v) for v in np.abs(error[indices])],
        "selection_raw": float(np.mean(true_log[indices] - raw_log[indices]) - np.mean(true_log - raw_log))
        if len(indices) else float("nan"),
        "selection_recalibrated": float(np.mean(error[indices]) - np.mean(error)) if len(indices) else float("nan"),
    }


def summarize(batches: list[dict]) -> dict:
    """The issue's four figures and the selection effect over `batches`."""
    picked = [b for b in batches if b["n_picked"]]
    stacks = sum(b["n_picked"] for b in picked)
    return {
        "batches": len(picked), "stacks": stacks,
        "median_batch_rel_error": float(np.median([b["rel_error"] for b in picked])),
        "median_batch_rel_error_raw": float(np.median([(b["true_seconds"] - b["raw_predicted_seconds"])
                                                       / b["raw_predicted_seconds"] for b in picked])),
        "share_over_budget": float(np.mean([b["over_budget"] for b in picked])),
        "interval_coverage": sum(b["in_interval"] for b in picked) / stacks,
        "median_abs_log_error": float(np.median([e for b in picked for e in b["abs_log_errors"]])),
        "selection_raw": float(np.nanmean([b["selection_raw"] for b in picked])),
        "selection_recalibrated": float(np.nanmean([b["selection_recalibrated"] for b in picked])),
        "true_over_budget_total": math.fsum(b["true_seconds"] for b in picked) / math.fsum(b["budget"] for b in picked),
        "share_over_budget_by_round": [float(np.mean([b["over_budget"] for b in picked if b["round"] == r]))
                                       for r in sorted({b["round"] for b in picked})],
        "mean_applied_confidence": float(np.mean([b["applied_confidence"] for b in picked])),
    }


def budget_settings(args: argparse.Namespace) -> dict:
    """The ExperimentConfig fields of the budgeting rule the command line asks for."""
    return {"budget_confidence": args.confidence, "batch_tail": args.batch_tail, "confidence_step": args.confidence_step}


def cached_scores(cache: Path | None, key: tuple, score: Callable[[], list[StackScores]]) -> list[StackScores]:
    """The pool's scores from `cache` when it was written for `key`, else `score()` (and written there)."""
    cached = pickle.loads(cache.read_bytes()) if cache and cache.exists() else None
    if cached is not None and cached["key"] == key:
        return cached["scores"]
    scores = score()
    if cache:
        atomic_write_bytes(cache, pickle.dumps({"key": key, "scores": scores}))
    return scores


def trained_committee(args: argparse.Namespace) -> tuple[ExperimentConfig, list[PhantomStack], list[StackScores], LabelTimeModel]:
    """A finished checkpoint, the time model of its training stacks, a fresh pool scored by it."""
    config = dataclasses.replace(CONFIGS["quick"], name="trained", size=args.size, **budget_settings(args))
    labeled = list(tqdm(generate_pool(args.time_pool_count, args.size, args.time_pool_seed), total=args.time_pool_count,
                        desc="committee's training stacks", unit="stack"))
    time_model = LabelTimeModel().fit(
        [true_mask_features(s) for s in labeled],
        [float(s.meta["simulated_seconds"]) for s in labeled])
    del labeled
    pool = list(tqdm(generate_pool(args.pool_count, args.size, args.pool_seed), total=args.pool_count,
                     desc="unlabeled pool", unit="stack"))
    model = load_ensemble(args.checkpoint)

    def score() -> list[StackScores]:
        by_id = score_stacks(config, model, pool, progress=True)
        return [by_id[s.id] for s in pool]

    key = (model.meta["version"], args.size, args.pool_seed, args.pool_count)
    return config, pool, cached_scores(args.cache, key, score), time_model


def young_committee(args: argparse.Namespace) -> tuple[ExperimentConfig, list[PhantomStack], list[StackScores], LabelTimeModel]:
    """Round 0 of the per-hour protocol's seed `args.hours_seed`, the time model of its seed set's true masks,
    and the rest of that seed's pool, scored by it."""
    config = dataclasses.replace(protocol_data_config("hours", CONFIGS["hours"], args.hours_seed),
                                 **budget_settings(args))
    data = make_data(config, progress=True)
    seed_ids = seed_set_ids(data.pool_ids, config.hours_seed_fraction, args.hours_seed)
    time_model = LabelTimeModel().fit([data.true_features[i] for i in seed_ids], [data.true_seconds([i]) for i in seed_ids])
    labeled = set(seed_ids)
    pool = [stack for stack in data.pool if stack.id not in labeled]

    def score() -> list[StackScores]:
        model, _ = train_labeled(config, data, seed_ids, args.hours_seed * 100, True)
        by_id = score_stacks(config, model, pool, progress=True)
        return [by_id[s.id] for s in pool]

    key = ("hours", args.hours_seed, config.iterations, data.fingerprint())
    return config, pool, cached_scores(args.cache, key, score), time_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    committee = parser.add_mutually_exclusive_group(required=True)
    committee.add_argument("--checkpoint", type=Path, help="a trained committee (2+ members for uncertainty)")
    committee.add_argument("--hours-seed", type=int, help="the per-hour protocol's round-0 committee of this seed")
    parser.add_argument("--size", type=int, default=128, help="with --checkpoint")
    parser.add_argument("--time-pool-seed", type=int, help="with --checkpoint: generator seed of its training stacks")
    parser.add_argument("--time-pool-count", type=int, default=200)
    parser.add_argument("--pool-seed", type=int, default=3000, help="with --checkpoint: generator seed of the unlabeled pool")
    parser.add_argument("--pool-count", type=int, default=120)
    parser.add_argument("--seed-count", type=int, default=20, help="stacks of the first, random worklist")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget-fraction", type=float, default=0.05)
    parser.add_argument("--confidence", type=float, default=0.8)
    parser.add_argument("--confidence-step", type=float, default=CONFIDENCE_STEP,
                        help="each worklist's quantile raised by the earlier ones' overruns "
                             "(ichal.time_intervals.confidence_offset; 0: the asked confidence)")
    parser.add_argument("--batch-tail", choices=BATCH_TAILS, default=DEFAULT_BATCH_TAIL,
                        help="each stack's error in the batch total's draws (ichal.time_intervals.LogErrorModel.tail)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["cost_sensitive", "random", "uncertainty"])
    parser.add_argument("--cache", type=Path, help="pickle of the pool's scores (reused when it matches)")
    parser.add_argument("--json", type=Path, help="write every batch and the summaries here")
    args = parser.parse_args(argv)
    if args.checkpoint and args.time_pool_seed is None:
        parser.error("--checkpoint needs --time-pool-seed (the generator seed of the stacks it was trained on)")
    torch.set_num_threads(1)
    config, pool, scores, time_model = trained_committee(args) if args.checkpoint else young_committee(args)
    true_seconds = np.array([float(s.meta["simulated_seconds"]) for s in pool])
    raw_log_all = time_model.predict_log([s.features for s in scores])
    raw_mean_factor = math.exp(0.5 * time_model.residual_std_**2)
    budget = args.budget_fraction * float(true_seconds.sum())

    batches = []
    for rep in tqdm(range(args.reps), desc="repetitions"):
        first = np.random.default_rng([rep, 17]).permutation(len(pool))[:args.seed_count]
        for m, method in enumerate(args.methods):
            labeled_idx = [int(i) for i in first]
            history = [{"predicted_log_seconds": float(raw_log_all[i]), "true_seconds": float(true_seconds[i])}
                       for i in labeled_idx]
            outcomes: list[dict] = []
            for round_index in range(1, args.rounds + 1):
                unlabeled = np.array([i for i in range(len(pool)) if i not in set(labeled_idx)])
                raw_log = raw_log_all[unlabeled]
                indices, medians, high_total, confidence, errors = budget_at_confidence(
                    method, [scores[i] for i in unlabeled], raw_log, history, time_model.residual_std_, budget,
                    worklist_confidence(outcomes, config), config, [rep, m, round_index], rep * 1000 + round_index)
                batch = batch_record(rep, method, round_index, indices, medians, errors.mean_factor(), high_total,
                                     errors.interval(args.confidence), raw_log, raw_mean_factor, true_seconds[unlabeled],
                                     budget)
                batches.append(batch | {"applied_confidence": confidence})
                picked = unlabeled[indices]
                if len(picked):
                    outcomes.append(batch_outcome(budget, batch["true_seconds"], args.confidence))
                history += [{"predicted_log_seconds": float(raw_log_all[i]), "true_seconds": float(true_seconds[i])}
                            for i in picked]
                labeled_idx += [int(i) for i in picked]

    pool_error = np.log(true_seconds) - raw_log_all
    # The same time model on the pool's TRUE masks: the floor of any mask-based predictor (the rest is the
    # simulated annotator's own spread).
    true_mask_log = time_model.predict_log([true_mask_features(s) for s in pool])
    bleed = np.array([bool(s.label.any()) for s in pool])
    pool_summary = {
        "stacks": len(pool), "budget_seconds": budget, "time_model_r2": time_model.r2_,
        "corr_log": float(np.corrcoef(raw_log_all, np.log(true_seconds))[0, 1]),
        "median_abs_log_error_raw": float(np.median(np.abs(pool_error))),
        "median_abs_log_error_true_masks": float(np.median(np.abs(np.log(true_seconds) - true_mask_log))),
        "empty_true_over_pred": float(np.exp(np.median(pool_error[~bleed]))),
        "bleed_true_over_pred": float(np.exp(np.median(pool_error[bleed]))),
        # How the error depends on the predicted time: each strategy picks from its own part of this range.
        "by_predicted_sixth": [
            {"predicted_seconds": [float(np.exp(raw_log_all[part].min())), float(np.exp(raw_log_all[part].max()))],
             "stacks": int(len(part)), "with_bleed": int(bleed[part].sum()),
             "true_over_pred_median": float(np.exp(np.median(pool_error[part]))),
             "log_error_std": float(np.std(pool_error[part], ddof=1))}
            for part in np.array_split(np.argsort(raw_log_all), 6)],
    }
    summaries = {method: summarize([b for b in batches if b["method"] == method]) for method in args.methods}
    summaries["all"] = summarize(batches)
    print(f"pool of {len(pool)}: raw predictor corr {pool_summary['corr_log']:.2f}, median |log error| "
          f"{pool_summary['median_abs_log_error_raw']:.2f} (on the true masks "
          f"{pool_summary['median_abs_log_error_true_masks']:.2f}); "
          f"empty stacks true/pred {pool_summary['empty_true_over_pred']:.2f}, "
          f"bleed stacks {pool_summary['bleed_true_over_pred']:.2f}; budget {budget / 60:.0f} min per worklist")
    for part in pool_summary["by_predicted_sixth"]:
        low, high = part["predicted_seconds"]
        print(f"  predicted {low / 60:5.1f}-{high / 60:5.1f} min: {part['stacks']} stacks, {part['with_bleed']} with a bleed, "
              f"true/predicted {part['true_over_pred_median']:.2f} (median), log error sd {part['log_error_std']:.2f}")
    print(f"{'method':16} {'batches':>7} {'stacks':>6} {'batch err raw':>13} {'batch err':>9} {'over budget':>11} "
          f"{'coverage':>8} {'med|log err|':>12} {'selection raw':>13} {'sel. recal.':>11}")
    for name, s in summaries.items():
        print(f"{name:16} {s['batches']:7d} {s['stacks']:6d} {s['median_batch_rel_error_raw']:+13.0%} "
              f"{s['median_batch_rel_error']:+9.0%} {s['share_over_budget']:11.0%} {s['interval_coverage']:8.0%} "
              f"{s['median_abs_log_error']:12.2f} {s['selection_raw']:+13.2f} {s['selection_recalibrated']:+11.2f}")
    by_round = " / ".join(f"{share:.0%}" for share in summaries["all"]["share_over_budget_by_round"])
    print(f"over budget by round, all methods: {by_round}; true seconds / budget "
          f"{summaries['all']['true_over_budget_total']:.2f}; mean applied confidence "
          f"{summaries['all']['mean_applied_confidence']:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "pool": pool_summary,
                                         "summaries": summaries, "batches": batches}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
