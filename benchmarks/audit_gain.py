"""Can a few random audit stacks per worklist measure the committee's gain? (issue 20)

The prequential curve (each committee scored on the batch it picked) did not track the held-out curve
(docs/dashboard.md): actively picked batches are the stacks the committee gets wrong, and 4-15 stacks make a
noisy AP. This replays a finished per-hour run (`python -m ichal.experiment hours`, its records and checkpoints)
with a different design: after worklist r is labeled, N stacks drawn at random from the stacks still
unlabeled (seen by neither committee) are scored by the committee that picked worklist r (C_{r-1}) and by the
one trained after it (C_r). Their paired difference is the gain of worklist r, with each stack's difficulty
cancelled. Its twin is the held-out gain: C_r's test-set metric minus C_{r-1}'s (60 test stacks).

For the app this means: label the audit stacks, but train on them only after the next committee has scored
them (one round late).

    OMP_NUM_THREADS=1 python benchmarks/prequential_curve.py --run out/hours/it1600 --out out/prequential
    OMP_NUM_THREADS=1 python benchmarks/audit_gain.py --run out/hours/it1600 --sizes 4 8 16 --out out/audit \
        --prequential out/prequential/prequential.jsonl

Writes OUT/audit_gain.jsonl (one line per worklist) and OUT/audit_gain.md (agreement per audit size).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ichal.ensemble import load_ensemble, predict_stack
from ichal.experiment import ExperimentConfig, _seed_data, load_records, saved_config
from ichal.experiment_hours import hours_to_reach
from ichal.learning_curve import CURVE_METRICS, CurvePoint, StoppingRule, stopping_advice
from ichal.metrics import DetectionEvaluator


def audit_metrics(model, stacks, sizes: list[int], device: str) -> dict[int, dict[str, float]]:
    """`model`'s metrics on the first n of `stacks` for each n in `sizes` (one streaming evaluator)."""
    evaluator, out = DetectionEvaluator(), {}
    for count, stack in enumerate(stacks, start=1):
        prediction = predict_stack(model, stack.image_hu, stack.spacing_mm, device=device)
        evaluator.update(prediction.mean_prob, stack.label, stack.spacing_mm)
        if count in sizes:
            result = evaluator.result()
            out[count] = {k: float(result[k]) for k in CURVE_METRICS}
    return out


def chain_rows(run: Path, config: ExperimentConfig, seed: int, method: str, sizes: list[int]) -> list[dict]:
    data = _seed_data("hours", config, run, seed, progress=False)
    chain = sorted((r for r in load_records(run, "hours") if r["seed"] == seed and r["method"] == method),
                   key=lambda r: r["round"])
    rows = []
    for previous, record in zip(chain, chain[1:]):
        unseen = [s for s in data.pool if s.id not in set(record["labeled_ids"])]
        order = np.random.default_rng([seed, record["round"], 23]).permutation(len(unseen))
        audit = [unseen[i] for i in order[:max(sizes)]]
        before_folder = "shared" if previous["round"] == 0 else method
        before = load_ensemble(run / "hours" / f"seed{seed}" / before_folder / f"round{previous['round']}.pt")
        after = load_ensemble(run / "hours" / f"seed{seed}" / method / f"round{record['round']}.pt")
        scored_before = audit_metrics(before, audit, sizes, config.device)
        scored_after = audit_metrics(after, audit, sizes, config.device)
        rows.append({
            "seed": seed, "method": method, "round": record["round"],
            "hours_before": previous["labeled_hours"], "hours_after": record["labeled_hours"],
            "batch_stacks": record.get("n_picked"),
            "held_out_gain": {k: record["metrics"][k] - previous["metrics"][k] for k in CURVE_METRICS},
            "audit_gain": {n: {k: scored_after[n][k] - scored_before[n][k] for k in CURVE_METRICS} for n in sizes},
            "audit_before": scored_before, "audit_after": scored_after,
        })
    return rows


def agreement(rows: list[dict], size: int, metric: str) -> dict:
    """Correlation, mean difference (audit - held-out) and sign agreement of the per-worklist gains."""
    pairs = np.array([(r["audit_gain"][size][metric], r["held_out_gain"][metric]) for r in rows
                      if math.isfinite(r["audit_gain"][size][metric]) and math.isfinite(r["held_out_gain"][metric])])
    if len(pairs) < 3:
        return {"n": len(pairs), "correlation": math.nan, "mean_difference": math.nan, "same_sign": math.nan}
    return {"n": len(pairs), "correlation": float(np.corrcoef(pairs[:, 0], pairs[:, 1])[0, 1]),
            "mean_difference": float(np.mean(pairs[:, 0] - pairs[:, 1])),
            "same_sign": float(np.mean(np.sign(pairs[:, 0]) == np.sign(pairs[:, 1]))),
            "mean_audit": float(np.mean(pairs[:, 0])), "mean_held_out": float(np.mean(pairs[:, 1]))}


def prequential_gains(points: list[dict]) -> list[dict]:
    """Today's design as gains, for comparison: the prequential point of worklist r+1 (committee C_r on the
    batch it picked) minus that of worklist r (C_{r-1} on its own), as rows shaped like `chain_rows`' with
    the gain under audit size 0. `points`: `benchmarks/prequential_curve.py`'s prequential.jsonl rows."""
    rows = []
    chains = {(p["seed"], p["method"]) for p in points}
    for seed, method in sorted(chains):
        chain = sorted((p for p in points if p["seed"] == seed and p["method"] == method), key=lambda p: p["round"])
        for a, b in zip(chain, chain[1:]):
            gain = {k: (b["prequential"][k] - a["prequential"][k]) if None not in (a["prequential"][k], b["prequential"][k])
                    else math.nan for k in CURVE_METRICS}
            rows.append({"held_out_gain": {k: b["held_out"][k] - a["held_out"][k] for k in CURVE_METRICS},
                         "audit_gain": {0: gain}})
    return rows


def report(rows: list[dict], sizes: list[int], prequential: list[dict]) -> str:
    """Agreement per metric and audit size; audit size 0 is today's prequential design (consecutive batches)."""
    lines = ["| metric | audit stacks per worklist | worklists | correlation of gains | mean audit gain | "
             "mean held-out gain | same sign |", "|---|---:|---:|---:|---:|---:|---:|"]
    for metric in CURVE_METRICS:
        for size, source in [(0, prequential)] * bool(prequential) + [(n, rows) for n in sizes]:
            a = agreement(source, size, metric)
            label = "0 (prequential: consecutive picked batches)" if size == 0 else str(size)
            lines.append(f"| {metric} | {label} | {a['n']} | {a['correlation']:.2f} | {a.get('mean_audit', math.nan):+.3f} | "
                         f"{a.get('mean_held_out', math.nan):+.3f} | {a['same_sign']:.0%} |")
    return "\n".join(lines) + "\n"


def stop_table(rows: list[dict], run: Path, sizes: list[int], rule: StoppingRule) -> str:
    """Per chain: where `stopping_advice` on the chained audit curve (0 at the first committee's hours, then the
    running sum of the paired gains) first says plateau, against the hours at which the held-out curve first
    reaches 95% of its final value."""
    records = load_records(run, "hours")
    lines = [f"| seed | method | held-out reaches 95% of final {rule.metric} (h) | last round (h) | "
             + " | ".join(f"stop, {n} audit stacks (h)" for n in sizes) + " |", "|---:|---|---:|---:|" + "---:|" * len(sizes)]
    for seed, method in sorted({(r["seed"], r["method"]) for r in rows}):
        chain = sorted((r for r in rows if r["seed"] == seed and r["method"] == method), key=lambda r: r["round"])
        held_out = sorted((r for r in records if r["seed"] == seed and r["method"] == method),
                          key=lambda r: r["round"])
        values = [r["metrics"][rule.metric] for r in held_out]
        reach = hours_to_reach([r["labeled_hours"] for r in held_out], values, 0.95 * values[-1])
        stops = []
        for size in sizes:
            points, total, stop = [CurvePoint("start", chain[0]["hours_before"], size, {rule.metric: 0.0})], 0.0, math.inf
            for row in chain:
                total += row["audit_gain"][size][rule.metric] if math.isfinite(row["audit_gain"][size][rule.metric]) else 0.0
                points.append(CurvePoint(f"round{row['round']}", row["hours_after"], size, {rule.metric: total}))
                if stopping_advice(points, rule).verdict == "plateau":
                    stop = row["hours_after"]
                    break
            stops.append("no plateau" if math.isinf(stop) else f"{stop:.1f}")
        lines.append(f"| {seed} | {method} | {reach:.1f} | {chain[-1]['hours_after']:.1f} | " + " | ".join(stops) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="folder of a finished `ichal.experiment hours` run")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["random", "uncertainty", "cost_sensitive", "oracle_cost"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 16], help="audit stacks per worklist")
    parser.add_argument("--prequential", type=Path,
                        help="prequential.jsonl of benchmarks/prequential_curve.py on the same run: adds today's design")
    parser.add_argument("--window", type=int, default=StoppingRule.window)
    parser.add_argument("--min-gain-per-hour", type=float, default=StoppingRule.min_gain_per_hour)
    parser.add_argument("--report-only", action="store_true", help="reread OUT/audit_gain.jsonl instead of scoring")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = saved_config(args.run, "hours")
    sizes = sorted(args.sizes)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "audit_gain.jsonl"
    if args.report_only:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for row in rows:  # JSON keys are strings
            row["audit_gain"] = {int(n): gain for n, gain in row["audit_gain"].items()}
    else:
        rows = [row for seed in args.seeds for method in tqdm(args.methods, desc=f"seed {seed}")
                for row in chain_rows(args.run, config, seed, method, sizes)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prequential = prequential_gains([json.loads(line) for line in args.prequential.read_text().splitlines()]) \
        if args.prequential else []
    rule = StoppingRule(window=args.window, min_gain_per_hour=args.min_gain_per_hour)
    table = report(rows, sizes, prequential) + f"\nStopping rule: {rule}\n\n" + stop_table(rows, args.run, sizes, rule)
    (args.out / "audit_gain.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
