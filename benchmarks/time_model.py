"""Benchmark of the labeling-time model on a generated pool: fit on 60 stacks, predict the others.

Kuo et al. 2018, section 3.2 (61 stacks fit eq. 2) and 5.3 (true time of the picked batch within 10%).
Run: `python benchmarks/time_model.py [--count 200] [--size 128] [--train 60]`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ichal.cost import LabelTimeModel, mask_features
from ichal.phantom import GENERATOR_VERSION, generate_pool
from ichal.selection import knapsack_select, random_select, uncertainty_select


def pool_features(count: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(count, 2) [boundary_mm, n_components] of the TRUE masks and the simulated annotator seconds."""
    features, seconds = [], []
    for stack in generate_pool(count, size, seed):
        found = mask_features(stack.label.astype(np.float32), tuple(float(s) for s in stack.spacing_mm))
        features.append([found.boundary_mm, found.n_components])
        seconds.append(float(stack.meta["simulated_seconds"]))
    return np.asarray(features), np.asarray(seconds)


def batch_errors(model: LabelTimeModel, features: np.ndarray, seconds: np.ndarray, budget_fraction: float,
                 draws: int) -> dict[str, list[float]]:
    """Relative error (predicted - true) / true of the total time of batches picked under a budget.

    Stack values are random (no ensemble here): each draw is a different value vector; the budget is
    `budget_fraction` of the pool's true total time (DESIGN.md evaluation protocol).
    """
    predicted = model.predict(features)
    budget_seconds = budget_fraction * float(seconds.sum())
    errors: dict[str, list[float]] = {"knapsack": [], "uncertainty": [], "random": []}
    for draw in range(draws):
        rng = np.random.default_rng(draw)
        values = rng.beta(2.0, 5.0, len(seconds)) * np.log(2.0)
        picks = {
            "knapsack": knapsack_select(values, predicted, budget_seconds),
            "uncertainty": uncertainty_select(values, predicted, budget_seconds),
            "random": random_select(predicted, budget_seconds, rng),
        }
        for name, selection in picks.items():
            true_total = float(seconds[selection.indices].sum())
            errors[name].append((selection.total_seconds - true_total) / true_total)
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=200, help="stacks in the generated pool")
    parser.add_argument("--size", type=int, default=128, help="phantom in-plane size in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=60, help="stacks the model is fit on")
    parser.add_argument("--budget-fraction", type=float, default=0.1)
    parser.add_argument("--draws", type=int, default=20, help="random value vectors for the batch error")
    args = parser.parse_args()

    start = time.perf_counter()
    features, seconds = pool_features(args.count, args.size, args.seed)
    print(f"pool: {args.count} stacks, size {args.size}, seed {args.seed}, generator {GENERATOR_VERSION}; "
          f"generated and featurized in "
          f"{time.perf_counter() - start:.1f} s")
    print(f"simulated seconds: min {seconds.min():.0f}, median {np.median(seconds):.0f}, max {seconds.max():.0f} "
          f"(span x{seconds.max() / seconds.min():.0f}); stacks without bleed: {(features[:, 1] == 0).mean():.0%}")
    train, test = slice(0, args.train), slice(args.train, None)
    models = {
        "measured": LabelTimeModel().fit(features[train], seconds[train]),
        "prior": LabelTimeModel().fit(features[:0], seconds[:0]),
    }
    print("\n| model | a | b | c | d | R^2 (train) | residual std (log) | median abs log error (test) | "
          "within x2 (test) | total time error, whole test pool |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, model in models.items():
        info = model.describe()
        log_error = np.abs(model.predict_log(features[test]) - np.log(seconds[test]))
        total_error = model.predict(features[test]).sum() / seconds[test].sum() - 1
        r2 = "n/a" if info["r2"] is None else f"{info['r2']:.3f}"
        print(f"| {name} (n={info['n']}) | {info['a']:.3f} | {info['b']:.3f} | {info['c']:.3f} | {info['d']:.3f} | {r2} | "
              f"{info['residual_std']:.3f} | {np.median(log_error):.3f} | {(log_error < np.log(2)).mean():.0%} | "
              f"{total_error:+.1%} |")

    errors = batch_errors(models["measured"], features[test], seconds[test], args.budget_fraction, args.draws)
    print(f"\nbatch total time, predicted vs. simulated, budget {args.budget_fraction:.0%} of the test pool's "
          f"true time, {args.draws} random value vectors (measured model):")
    print("| selector | median error | mean abs error | worst abs error |")
    print("|---|---:|---:|---:|")
    for name, values in errors.items():
        err = np.asarray(values)
        print(f"| {name} | {np.median(err):+.1%} | {np.abs(err).mean():.1%} | {np.abs(err).max():.1%} |")


if __name__ == "__main__":
    main()
