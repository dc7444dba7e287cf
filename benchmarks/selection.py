"""Benchmark of selection and pool scoring: knapsack time/memory, scoring overhead vs. the ensemble, scaling.

Kuo et al. 2018, section 3 (knapsack over the pool) and 5.3 (a 100 h budget over thousands of stacks).
Run: `python benchmarks/selection.py [--sections knapsack,overhead,scaling] [--size 256]`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from ichal.config import DEFAULT_CONFIG
from ichal.cost import mask_features
from ichal.ensemble import EnsembleModel, predict_stack, windows_to_meta
from ichal.models import build_network, resolve_preset
from ichal.phantom import generate_pool
from ichal.selection import SelectionInputError, knapsack_select
from ichal.uncertainty import js_divergence, patch_scores, stack_uncertainty

POOL_SIZES = (100, 1_000, 10_000, 100_000)
BUDGET_HOURS = (1, 10, 100, 1000)
RESOLUTION_SECONDS = 10.0
# Skip a knapsack whose DP would touch more cells (stacks x time steps) than this: ~25 s on this machine.
MAX_DP_CELLS = 1e10


def synthetic_pool(n_stacks: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stack values in [0, ln 2] and lognormal labeling seconds (median 5 min, spread ~3 decades)."""
    rng = np.random.default_rng(seed)
    seconds = np.exp(rng.normal(np.log(300.0), 1.2, n_stacks))
    values = rng.beta(2.0, 5.0, n_stacks) * np.log(2.0)
    return values, seconds


def knapsack_once(n_stacks: int, budget_hours: float) -> dict:
    """One knapsack run in this process: wall seconds and peak resident memory growth (MiB)."""
    values, seconds = synthetic_pool(n_stacks)
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        selection = knapsack_select(values, seconds, budget_hours * 3600.0, RESOLUTION_SECONDS)
    except SelectionInputError as error:
        return {"skipped": str(error)}
    wall = time.perf_counter() - start
    peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kib) / 1024
    return {
        "seconds": wall,
        "peak_mib": peak_mib,
        "picked": len(selection.indices),
        "all_fit": bool(seconds.sum() <= budget_hours * 3600.0),
        "pool_hours": float(seconds.sum() / 3600.0),
    }


def bench_knapsack() -> None:
    print(f"## knapsack_select: exact 0/1, {RESOLUTION_SECONDS:g} s resolution, one fresh process per run")
    print("| stacks | budget h | pool h | picked | seconds | peak RSS growth MiB | note |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for n_stacks in POOL_SIZES:
        for hours in BUDGET_HOURS:
            capacity_steps = hours * 3600.0 / RESOLUTION_SECONDS
            if n_stacks * capacity_steps > MAX_DP_CELLS:
                print(f"| {n_stacks} | {hours} | | | | | skipped: {n_stacks * capacity_steps:.1e} DP cells "
                      f"(> {MAX_DP_CELLS:.0e}); use resolution_seconds >= {RESOLUTION_SECONDS * 10:g} |")
                continue
            child = subprocess.run(
                [sys.executable, __file__, "--knapsack-once", str(n_stacks), str(hours)],
                capture_output=True, text=True, check=True,
            )
            result = json.loads(child.stdout.strip().splitlines()[-1])
            if "skipped" in result:
                print(f"| {n_stacks} | {hours} | | | | | refused: {result['skipped']} |")
                continue
            note = "whole pool fits (no DP)" if result["all_fit"] else ""
            print(f"| {n_stacks} | {hours} | {result['pool_hours']:.0f} | {result['picked']} | "
                  f"{result['seconds']:.3f} | {result['peak_mib']:.0f} | {note} |")


def score_stack(member_probs: np.ndarray, spacing_mm: tuple[float, float, float], patch_px: int) -> float:
    """Everything scoring adds on top of the ensemble's member probabilities: JS, V and mask features."""
    value = stack_uncertainty(patch_scores(js_divergence(member_probs), patch_px), DEFAULT_CONFIG.top_k_patches)
    mask_features(member_probs.mean(axis=0), spacing_mm, DEFAULT_CONFIG.feature_thresholds)
    return value


def random_ensemble(spacing_yx_mm: float, members: int = 4, preset: str = "cpu_small") -> EnsembleModel:
    """An untrained ensemble with the app's geometry (as fast as a trained one) at `spacing_yx_mm`."""
    windows = DEFAULT_CONFIG.hu_windows
    nets = []
    for seed in range(members):
        torch.manual_seed(seed)
        nets.append(build_network(preset, len(windows)).eval())
    meta = {
        "preset": resolve_preset(preset).to_dict(),
        "channels": windows_to_meta(windows),
        "patch_px": DEFAULT_CONFIG.patch_px(spacing_yx_mm),
        "spacing_mm": spacing_yx_mm,
    }
    return EnsembleModel(members=nets, meta=meta)


def committee_from_label(label: np.ndarray, members: int, rng: np.random.Generator) -> np.ndarray:
    """(N, Z, Y, X) plausible member probabilities: a softened true mask with per-member noise."""
    from scipy.ndimage import gaussian_filter

    soft = gaussian_filter(label.astype(np.float32), sigma=(0, 2, 2))
    noise = rng.normal(0.0, 0.08, (members, *label.shape)).astype(np.float32)
    return np.clip(soft[None] * rng.uniform(0.7, 1.0, (members, 1, 1, 1)) + noise * soft[None], 0.0, 1.0)


def bench_overhead(size: int, repeats: int) -> None:
    stack = next(iter(generate_pool(1, size, 11)))
    spacing = tuple(float(s) for s in stack.spacing_mm)
    model = random_ensemble(spacing[1])
    print(f"## scoring overhead vs. ensemble forward pass (ichal.ensemble.predict_stack, 4 x cpu_small, "
          f"untrained weights), stack {stack.image_hu.shape} at {spacing} mm, torch threads "
          f"{torch.get_num_threads()}")
    forward, scoring_model, scoring_truth = [], [], []
    committee = committee_from_label(stack.label, 4, np.random.default_rng(0))
    for _ in range(repeats):
        start = time.perf_counter()
        prediction = predict_stack(model, stack.image_hu, spacing)
        forward.append(time.perf_counter() - start)
        start = time.perf_counter()
        score_stack(prediction.member_probs, spacing, model.patch_px)
        scoring_model.append(time.perf_counter() - start)
        start = time.perf_counter()
        score_stack(committee, spacing, model.patch_px)
        scoring_truth.append(time.perf_counter() - start)
    f, s1, s2 = (float(np.median(x)) for x in (forward, scoring_model, scoring_truth))
    print("| what | median seconds | % of forward |")
    print("|---|---:|---:|")
    print(f"| ensemble forward pass (predict_stack, includes its own JS) | {f:.3f} | 100 |")
    print(f"| scoring on the untrained ensemble's output | {s1:.3f} | {100 * s1 / f:.1f} |")
    print(f"| scoring on a realistic committee (softened true mask + noise) | {s2:.3f} | {100 * s2 / f:.1f} |")


def bench_scaling(size: int, pool_sizes: tuple[int, ...]) -> None:
    print(f"## scoring time vs. pool size (JS + V + mask features, realistic committees, size {size})")
    print("| stacks | seconds | seconds per stack |")
    print("|---:|---:|---:|")
    rng = np.random.default_rng(1)
    stacks = list(generate_pool(max(pool_sizes), size, 21))
    committees = [committee_from_label(s.label, 4, rng) for s in stacks]
    patch_px = DEFAULT_CONFIG.patch_px(float(stacks[0].spacing_mm[1]))
    for count in pool_sizes:
        start = time.perf_counter()
        for stack, committee in zip(stacks[:count], committees[:count]):
            score_stack(committee, tuple(float(s) for s in stack.spacing_mm), patch_px)
        wall = time.perf_counter() - start
        print(f"| {count} | {wall:.3f} | {wall / count:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sections", default="knapsack,overhead,scaling")
    parser.add_argument("--size", type=int, default=256, help="phantom in-plane size in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scaling-sizes", default="4,8,16")
    parser.add_argument("--knapsack-once", nargs=2, metavar=("STACKS", "HOURS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.knapsack_once:
        print(json.dumps(knapsack_once(int(args.knapsack_once[0]), float(args.knapsack_once[1]))))
        return
    sections = args.sections.split(",")
    if "knapsack" in sections:
        bench_knapsack()
    if "overhead" in sections:
        bench_overhead(args.size, args.repeats)
    if "scaling" in sections:
        bench_scaling(args.size, tuple(int(x) for x in args.scaling_sizes.split(",")))


if __name__ == "__main__":
    main()
