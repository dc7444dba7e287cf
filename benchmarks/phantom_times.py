"""Span of the phantom's simulated annotator seconds over a generated pool, plus generation speed.

Prints min/median/max seconds, the max/min ratio in orders of magnitude, the negative share and the bleed
kinds seen (DESIGN.md "Data": negatives about a minute, the largest bleeds an hour or more).
Usage: python benchmarks/phantom_times.py [--count 200] [--size 256] [--seed 0]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import numpy as np

from ichal.phantom import generate_pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    seconds, negatives, kinds, slices = [], 0, Counter(), []
    start = time.perf_counter()
    for stack in generate_pool(args.count, args.size, args.seed):
        seconds.append(stack.meta["simulated_seconds"])
        negatives += stack.meta["negative"]
        kinds.update(stack.meta["kinds"])
        slices.append(stack.meta["n_slices"])
    elapsed = time.perf_counter() - start
    times = np.asarray(seconds)
    positive_times = times[times > 0]
    print(f"{args.count} stacks at {args.size}x{args.size}, seed {args.seed}: {elapsed:.1f} s ({elapsed / args.count:.2f} s/stack)")
    print(f"simulated annotator seconds: min {times.min():.0f}  median {np.median(times):.0f}  max {times.max():.0f}")
    print(f"span max/min = {times.max() / positive_times.min():.0f}x = {np.log10(times.max() / times.min()):.2f} orders of magnitude")
    print(f"negatives: {negatives}/{args.count} ({100 * negatives / args.count:.0f}%); stacks with each kind: {dict(sorted(kinds.items()))}")
    print(f"slices per stack: {min(slices)}-{max(slices)}; over 1 hour: {(times >= 3600).sum()} stacks; under 2 minutes: {(times < 120).sum()}")


if __name__ == "__main__":
    main()
