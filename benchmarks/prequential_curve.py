"""Does the prequential curve track the held-out one, and where does the stopping rule stop? (issue 20)

Reads a finished per-hour run of `python -m ichal.experiment hours` (its records and checkpoints). For each
(seed, method) chain and round r >= 1, the committee of round r-1 (the one that picked round r's batch)
is scored on that batch before training on it: the prequential point at round r-1's labeled hours. Its
held-out twin is round r-1's test-set metrics. Then `ichal.learning_curve.stopping_advice` is replayed
batch by batch, as the app would give it, and its first plateau is compared with the hours at which the
held-out curve (rounds 0..R) first reaches 95% of its final value (`ichal.experiment_hours.hours_to_reach`).

    OMP_NUM_THREADS=1 python benchmarks/prequential_curve.py --run out/hours/it1600 --out out/prequential

With `--simulate`, first runs (or resumes) that per-hour experiment in --run: config `hours` with
--iterations, --rounds and --budget-fraction (each round's budget as a share of the pool's true hours),
seeds --seeds, methods --methods, in --workers processes.

Writes OUT/prequential.jsonl (one line per batch), OUT/prequential.md (the table) and OUT/prequential.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from ichal.ensemble import load_ensemble
from ichal.experiment import CONFIGS, ExperimentConfig, _seed_data, load_records, run_protocol, saved_config
from ichal.experiment_hours import hours_to_reach
from ichal.learning_curve import CURVE_METRICS, CurvePoint, StoppingRule, stopping_advice
from ichal.prequential import batch_metrics
from ichal.train import TrainItem

FRACTION_OF_FINAL = 0.95


def batch_points(run: Path, config: ExperimentConfig, seed: int, methods: list[str]) -> list[dict]:
    """One dict per (method, round r >= 1): the picking committee's metrics on batch r and on the test set."""
    data = _seed_data("hours", config, run, seed, progress=False)
    by_id = {stack.id: stack for stack in data.pool}
    records = [r for r in load_records(run, "hours") if r["seed"] == seed]
    rows = []
    for method in methods:
        chain = sorted((r for r in records if r["method"] == method), key=lambda r: r["round"])
        for previous, record in zip(chain, chain[1:]):
            folder = "shared" if previous["round"] == 0 else method
            model = load_ensemble(run / "hours" / f"seed{seed}" / folder / f"round{previous['round']}.pt", config.device)
            batch = [TrainItem(i, by_id[i].image_hu, by_id[i].label, by_id[i].spacing_mm) for i in record["picked_ids"]]
            if not batch:  # an exhausted pool: nothing was picked
                continue
            rows.append({
                "seed": seed, "method": method, "round": previous["round"], "hours": previous["labeled_hours"],
                "stacks": len(batch), "positive": sum(bool(s.label.any()) for s in batch),
                "hours_after": record["labeled_hours"],
                "prequential": batch_metrics(model, batch, device=config.device),
                "held_out": {k: previous["metrics"][k] for k in CURVE_METRICS},
                "held_out_final": {k: chain[-1]["metrics"][k] for k in CURVE_METRICS},
                "held_out_curve": [(r["labeled_hours"], r["metrics"]) for r in chain],
            })
    return rows


def chain_summary(rows: list[dict], rule: StoppingRule) -> dict:
    """One chain's stop point (the hours labeled when the rule first says plateau) and its held-out 95% point."""
    points, stop = [], math.inf
    for row in sorted(rows, key=lambda r: r["round"]):
        points.append(CurvePoint(f"round{row['round']}", row["hours"], row["stacks"], row["prequential"]))
        if stopping_advice(points, rule).verdict == "plateau":
            stop = row["hours_after"]  # the advice comes once this batch is labeled
            break
    curve = rows[0]["held_out_curve"]
    hours = [h for h, _ in curve]
    values = [m[rule.metric] for _, m in curve]
    return {"stop_hours": stop, "reach_hours": hours_to_reach(hours, values, FRACTION_OF_FINAL * values[-1]),
            "last_hours": hours[-1]}


def agreement(rows: list[dict], metric: str) -> dict:
    """Pearson correlation and mean difference (prequential - held-out) over the rows with both finite."""
    pairs = np.array([(r["prequential"][metric], r["held_out"][metric]) for r in rows
                      if r["prequential"][metric] is not None and math.isfinite(r["held_out"][metric])])
    if len(pairs) < 3:
        return {"n": len(pairs), "correlation": math.nan, "mean_difference": math.nan}
    return {"n": len(pairs), "correlation": float(np.corrcoef(pairs[:, 0], pairs[:, 1])[0, 1]),
            "mean_difference": float(np.mean(pairs[:, 0] - pairs[:, 1]))}


def report(rows: list[dict], rule: StoppingRule) -> str:
    methods = sorted({r["method"] for r in rows})
    lines = ["| metric | batches | correlation | mean difference (prequential - held-out) |", "|---|---:|---:|---:|"]
    for metric in CURVE_METRICS:
        a = agreement(rows, metric)
        lines.append(f"| {metric} (all methods) | {a['n']} | {a['correlation']:.2f} | {a['mean_difference']:+.3f} |")
        for method in methods:
            a = agreement([r for r in rows if r["method"] == method], metric)
            lines.append(f"| {metric}, {method} | {a['n']} | {a['correlation']:.2f} | {a['mean_difference']:+.3f} |")
    lines += ["", f"Stopping rule: {rule}", "",
              f"| seed | method | stop (h) | held-out reaches {FRACTION_OF_FINAL:.0%} of final {rule.metric} (h) | last round (h) |",
              "|---:|---|---:|---:|---:|"]
    for seed in sorted({r["seed"] for r in rows}):
        for method in methods:
            chain = [r for r in rows if r["seed"] == seed and r["method"] == method]
            if chain:
                s = chain_summary(chain, rule)
                stop = "no plateau" if math.isinf(s["stop_hours"]) else f"{s['stop_hours']:.1f}"
                lines.append(f"| {seed} | {method} | {stop} | {s['reach_hours']:.1f} | {s['last_hours']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], metric: str, path: Path) -> None:
    methods = sorted({r["method"] for r in rows})
    fig, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 3.4), sharey=True, squeeze=False)
    for axis, method in zip(axes[0], methods):
        for seed in sorted({r["seed"] for r in rows}):
            chain = sorted((r for r in rows if r["seed"] == seed and r["method"] == method), key=lambda r: r["hours"])
            if not chain:
                continue
            line, = axis.plot([r["hours"] for r in chain], [r["prequential"][metric] if r["prequential"][metric] is not None
                                                            else math.nan for r in chain], "o-", lw=1)
            axis.plot([h for h, _ in chain[0]["held_out_curve"]], [m[metric] for _, m in chain[0]["held_out_curve"]],
                      "s--", lw=1, color=line.get_color(), alpha=0.6)
        axis.set(title=method, xlabel="labeled true hours")
    axes[0][0].set_ylabel(f"{metric}: prequential (o) / held-out (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="folder of a finished `ichal.experiment hours` run")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["random", "uncertainty", "cost_sensitive", "oracle_cost"])
    parser.add_argument("--window", type=int, default=StoppingRule.window)
    parser.add_argument("--min-gain-per-hour", type=float, default=StoppingRule.min_gain_per_hour)
    parser.add_argument("--simulate", action="store_true", help="run (or resume) the per-hour experiment in --run first")
    parser.add_argument("--iterations", type=int, default=1600, help="with --simulate: training steps per member")
    parser.add_argument("--rounds", type=int, default=8, help="with --simulate: labeled batches after the seed set")
    parser.add_argument("--budget-fraction", type=float, default=0.10,
                        help="with --simulate: each batch's true hours as a share of the pool's")
    parser.add_argument("--workers", type=int, default=1, help="with --simulate: experiment processes")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.simulate:
        config = dataclasses.replace(CONFIGS["hours"], iterations=args.iterations, rounds=args.rounds,
                                     hours_budget_fraction=args.budget_fraction)
        run_protocol("hours", config, args.run, args.seeds, resume=True, methods=args.methods, workers=args.workers)
    config = saved_config(args.run, "hours")
    rule = StoppingRule(window=args.window, min_gain_per_hour=args.min_gain_per_hour)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [row for seed in args.seeds for row in batch_points(args.run, config, seed, args.methods)]
    (args.out / "prequential.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = report(rows, rule)
    (args.out / "prequential.md").write_text(table)
    plot(rows, rule.metric, args.out / "prequential.png")
    print(table)


if __name__ == "__main__":
    main()
