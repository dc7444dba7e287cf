"""Benchmark of the labeling-time model on a generated pool: fit on 60 stacks, predict the others.

Kuo et al. 2018, section 3.2 (61 stacks fit eq. 2) and 5.3 (true time of the picked batch within 10%).
Run: `python benchmarks/time_model.py [--count 200] [--size 128] [--train 60]`.

With `--model CKPT` the test stacks' features come from the committee's predictions, as in the app, and
two fits are compared: on the training stacks' TRUE-mask features (the label the annotator saved) and on
their PRE-LABEL predicted features (what the committee predicted before the stack was labeled). Use a
pool the checkpoint was not trained on (another `--seed`), so predictions are out of sample.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ichal.config import DEFAULT_CONFIG
from ichal.cost import LabelTimeModel, mask_features
from ichal.ensemble import load_ensemble, predict_stack
from ichal.phantom import GENERATOR_VERSION, generate_pool
from ichal.selection import knapsack_select, random_select, uncertainty_select


def pool_features(count: int, size: int, seed: int, model_path: Path | None = None
                  ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(count, 2) [boundary_mm, n_components] of the TRUE masks, of the committee's predicted masks (None
    without `model_path`), and the simulated annotator seconds."""
    model = None if model_path is None else load_ensemble(model_path)
    true_features, predicted_features, seconds = [], [], []
    for stack in tqdm(generate_pool(count, size, seed), total=count, desc="pool", unit="stack"):
        spacing = tuple(float(s) for s in stack.spacing_mm)
        found = mask_features(stack.label.astype(np.float32), spacing, DEFAULT_CONFIG.feature_thresholds)
        true_features.append([found.boundary_mm, found.n_components])
        if model is not None:
            mean_prob = predict_stack(model, stack.image_hu, spacing).mean_prob
            found = mask_features(mean_prob, spacing, DEFAULT_CONFIG.feature_thresholds)
            predicted_features.append([found.boundary_mm, found.n_components])
        seconds.append(float(stack.meta["simulated_seconds"]))
    predicted = None if model is None else np.asarray(predicted_features)
    return np.asarray(true_features), predicted, np.asarray(seconds)


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


def print_fit_table(fits: dict[str, tuple[LabelTimeModel, np.ndarray]], seconds: np.ndarray) -> None:
    """One row per fitted model: coefficients, fit quality, and its errors on (test features, test seconds)."""
    print("\n| model | a | b | c | d | R^2 (train) | residual std (log) | median abs log error (test) | "
          "within x2 (test) | total time error, whole test pool |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, (model, features) in fits.items():
        info = model.describe()
        log_error = np.abs(model.predict_log(features) - np.log(seconds))
        total_error = model.predict(features).sum() / seconds.sum() - 1
        r2 = "n/a" if info["r2"] is None else f"{info['r2']:.3f}"
        print(f"| {name} (n={info['n']}) | {info['a']:.3f} | {info['b']:.3f} | {info['c']:.3f} | {info['d']:.3f} | {r2} | "
              f"{info['residual_std']:.3f} | {np.median(log_error):.3f} | {(log_error < np.log(2)).mean():.0%} | "
              f"{total_error:+.1%} |")


def print_batch_table(title: str, model: LabelTimeModel, features: np.ndarray, seconds: np.ndarray,
                      budget_fraction: float, draws: int) -> None:
    errors = batch_errors(model, features, seconds, budget_fraction, draws)
    print(f"\nbatch total time, predicted vs. simulated, budget {budget_fraction:.0%} of the test pool's "
          f"true time, {draws} random value vectors ({title}):")
    print("| selector | median error | mean abs error | worst abs error |")
    print("|---|---:|---:|---:|")
    for name, values in errors.items():
        err = np.asarray(values)
        print(f"| {name} | {np.median(err):+.1%} | {np.abs(err).mean():.1%} | {np.abs(err).max():.1%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=200, help="stacks in the generated pool")
    parser.add_argument("--size", type=int, default=128, help="phantom in-plane size in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=60, help="stacks the model is fit on")
    parser.add_argument("--budget-fraction", type=float, default=0.1)
    parser.add_argument("--draws", type=int, default=20, help="random value vectors for the batch error")
    parser.add_argument("--model", type=Path, help="committee checkpoint: test features from its predictions")
    args = parser.parse_args()

    start = time.perf_counter()
    features, predicted, seconds = pool_features(args.count, args.size, args.seed, args.model)
    print(f"pool: {args.count} stacks, size {args.size}, seed {args.seed}, generator {GENERATOR_VERSION}; "
          f"generated and featurized in {time.perf_counter() - start:.1f} s")
    print(f"simulated seconds: min {seconds.min():.0f}, median {np.median(seconds):.0f}, max {seconds.max():.0f} "
          f"(span x{seconds.max() / seconds.min():.0f}); stacks without bleed: {(features[:, 1] == 0).mean():.0%}")
    train, test = slice(0, args.train), slice(args.train, None)
    on_labels = LabelTimeModel().fit(features[train], seconds[train])
    print("\nTRUE-mask features for fitting and predicting:")
    print_fit_table({"measured": (on_labels, features[test]),
                     "prior": (LabelTimeModel().fit(features[:0], seconds[:0]), features[test])}, seconds[test])
    print_batch_table("measured model, true-mask features", on_labels, features[test], seconds[test],
                      args.budget_fraction, args.draws)
    if predicted is None:
        return
    bleed = features[test][:, 1] > 0
    boundary_ratio = np.median(predicted[test][bleed, 0] / features[test][bleed, 0])
    print(f"\nPREDICTED features of the test stacks ({args.model}); median boundary predicted / true on "
          f"stacks with a bleed: {boundary_ratio:.2f}")
    on_predictions = LabelTimeModel().fit(predicted[train], seconds[train])
    print_fit_table({"fit on labels": (on_labels, predicted[test]),
                     "fit on pre-label predictions": (on_predictions, predicted[test])}, seconds[test])
    print_batch_table("fit on labels", on_labels, predicted[test], seconds[test], args.budget_fraction, args.draws)
    print_batch_table("fit on pre-label predictions", on_predictions, predicted[test], seconds[test],
                      args.budget_fraction, args.draws)


if __name__ == "__main__":
    main()
