"""Is the experiment committee data-limited at a given training length? Train it on nested subsets of one
generated pool at several iteration counts and score each on the held-out test set (issue 18).

The per-hour protocol needs iterations at which more labeled stacks give higher AP; with too few, a
larger labeled set only means fewer passes over each stack (docs/results.md, "training-limited").

    OMP_NUM_THREADS=1 python benchmarks/iterations_curve.py --config hours --counts 15 30 60 120 \
        --iterations 400 800 1600 3200 --out out/iterations_curve

Writes OUT/iterations_curve.jsonl (one line per trained committee, appended as it finishes; a rerun skips
the (count, iterations) pairs already there) and OUT/iterations_curve.png (`plot_iterations_curve`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from ichal.experiment import CONFIGS, evaluate, make_data, train_labeled
from ichal.experiment_plots import plot_iterations_curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="hours", help="sizes, members, batch, data seed")
    parser.add_argument("--counts", type=int, nargs="+", default=[15, 30, 60, 120], help="labeled stacks")
    parser.add_argument("--iterations", type=int, nargs="+", default=[400, 800, 1600, 3200])
    parser.add_argument("--train-seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = CONFIGS[args.config]
    if max(args.counts) > config.pool_count:
        parser.error(f"--counts up to {max(args.counts)} but config {config.name!r} has {config.pool_count} pool stacks")
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "iterations_curve.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    done = {(r["train_stacks"], r["iterations"]) for r in rows}
    data = make_data(config, progress=False)
    order = np.random.default_rng([args.train_seed, 0]).permutation(len(data.pool))
    for iterations in sorted(args.iterations):  # shortest first: an interrupted run still shows a curve
        for count in sorted(args.counts):
            if (count, iterations) in done:
                continue
            labeled = [data.pool_ids[i] for i in order[:count]]
            model, train_seconds = train_labeled(dataclasses.replace(config, iterations=iterations), data, labeled,
                                                 args.train_seed, progress=False)
            metrics = evaluate(config, model, data.test)
            row = {"config": config.name, "data_fingerprint": data.fingerprint(), "train_stacks": count,
                   "iterations": iterations, "members": config.members, "train_seed": args.train_seed,
                   "positive_train_stacks": sum(bool(data.pool[i].label.any()) for i in order[:count]),
                   "train_seconds": round(train_seconds, 1), **{k: round(v, 4) for k, v in metrics.items()}}
            rows.append(row)
            with log.open("a") as stream:
                stream.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
            plot_iterations_curve(rows, args.out / "iterations_curve.png")


if __name__ == "__main__":
    main()
