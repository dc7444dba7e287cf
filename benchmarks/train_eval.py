"""Does more labeled data help? Train the PatchFCN ensemble on N generated stacks, test on held-out ones.

Kuo et al. 2018, section 5 (pixel/region/frame/stack AP); issue 3's check: 60 vs 200 training stacks,
120 held-out stacks (default) from a different generator seed. Prints a markdown table; --json writes the figures.
`--eval-train N` also scores the first N training stacks: a test figure far below the training figure means
the model overfits (more data should help), equal figures mean the model itself is the limit.

    python benchmarks/train_eval.py --size 128 --train-counts 60 200 --iterations 1500   # 120 held-out stacks

`--evaluate CKPT...` trains nothing: it scores saved checkpoints (`--checkpoints` of an earlier run) on stacks
`--eval-start` to `--eval-start + --test-count` of generator seed `--seed`, e.g. other test stacks or the
training stacks only one of the checkpoints saw. With two or more checkpoints it also prints each one's
difference to the first (or, with `--pairs`, the 2nd to the 1st, the 4th to the 3rd, ...) in pixel AP, stack AP
and pooled Dice, with a 95% paired-bootstrap interval over the stacks
(`ichal.metrics.paired_bootstrap`): an interval above 0 means the later checkpoint is better on such stacks.
With `--pairs` and several pairs (e.g. 60 vs. 200 from several training pools) a last row gives the mean
difference over the pairs, with an interval that resamples the pairs as well as the stacks.
"""

from __future__ import annotations

import argparse
import json
import pickle
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ichal.ensemble import load_ensemble, predict_stack, save_ensemble
from ichal.experiment_plots import plot_paired_differences
from ichal.io import atomic_write_bytes
from ichal.metrics import STACK_SCORE, STACK_SCORE_CANDIDATES, DetectionEvaluator, paired_bootstrap
from ichal.phantom import generate_pool
from ichal.train import TrainItem, TrainSettings, train_ensemble

TEST_POOL_SEED_OFFSET = 1000  # test stacks come from generator seed `seed + 1000`: disjoint from training


def _items(count: int, size: int, seed: int, desc: str, start: int = 0) -> list[TrainItem]:
    return [TrainItem(s.id, s.image_hu, s.label, s.spacing_mm)
            for s in tqdm(generate_pool(count, size, seed, start), total=count, desc=desc, unit="stack")]


def _evaluate(model, items: list[TrainItem], desc: str) -> tuple[DetectionEvaluator, float]:
    """The evaluator fed with `model`'s predictions on `items`, and the seconds it took."""
    evaluator = DetectionEvaluator()
    start = time.perf_counter()
    for item in tqdm(items, desc=desc, unit="stack"):
        evaluator.update(predict_stack(model, item.image_hu, item.spacing_mm).mean_prob, item.label, item.spacing_mm)
    return evaluator, time.perf_counter() - start


def run(train_counts: list[int], test_count: int, size: int, settings: TrainSettings, seed: int,
        checkpoint_dir: Path | None, eval_train: int = 0) -> list[dict]:
    """Train one ensemble per count (nested subsets of one generated pool) and evaluate each on the test pool
    (and, with `eval_train`, on the first `eval_train` training stacks)."""
    train_items = _items(max(train_counts), size, seed, "generating training stacks")
    test_items = _items(test_count, size, seed + TEST_POOL_SEED_OFFSET, "generating test stacks")
    rows = []
    for count in train_counts:
        subset = train_items[:count]
        total = settings.ensemble_size * settings.iterations
        start = time.perf_counter()
        with tqdm(total=total, desc=f"training on {count}", unit="it") as bar:
            model = train_ensemble(subset, settings, progress=lambda event: bar.update(1))
        train_seconds = time.perf_counter() - start
        if checkpoint_dir is not None:
            save_ensemble(model, checkpoint_dir / f"train_eval_{count}.pt")
        test_evaluator, eval_seconds = _evaluate(model, test_items, "evaluating")
        test_metrics = test_evaluator.result()
        row = {"train_stacks": count, "positive_train_stacks": sum(bool(i.label.any()) for i in subset),
               "positive_test_stacks": sum(bool(i.label.any()) for i in test_items),
               "train_seconds": train_seconds, "eval_seconds": eval_seconds} | test_metrics
        row["stack_scores"] = test_evaluator.stack_score_comparison()
        if eval_train:
            train_evaluator, _ = _evaluate(model, subset[:eval_train], "evaluating on training stacks")
            row |= {f"train_set_{name}": value for name, value in train_evaluator.result().items()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown_table(rows: list[dict]) -> str:
    header = ("| train stacks | pixel AP (bin bound) | region AP | frame AP | stack AP | Dice (pooled) "
              "| mean Dice, bleed stacks | train s | eval s |")
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['train_stacks']} | {r['pixel_ap']:.3f} ({r['pixel_ap_bound']:.0e}) | {r['region_ap']:.3f} "
            f"| {r['frame_ap']:.3f} | {r['stack_ap']:.3f} | {r['dice']:.3f} | {r['mean_dice_positive']:.3f} "
            f"| {r['train_seconds']:.0f} | {r['eval_seconds']:.0f} |")
    if any("train_set_pixel_ap" in r for r in rows):
        lines += ["", "| train stacks | on training stacks: pixel AP | stack AP | Dice (pooled) | on test stacks: pixel AP | stack AP | Dice (pooled) |",
                  "|" + "---|" * 7]
        lines += [f"| {r['train_stacks']} | {r['train_set_pixel_ap']:.3f} | {r['train_set_stack_ap']:.3f} | {r['train_set_dice']:.3f} "
                  f"| {r['pixel_ap']:.3f} | {r['stack_ap']:.3f} | {r['dice']:.3f} |" for r in rows if "train_set_pixel_ap" in r]
    return "\n".join(lines)


def stack_score_table(names: list[str], evaluators: list[DetectionEvaluator]) -> str:
    """Markdown: stack AP / AUC of every stack score candidate per checkpoint, and their means."""
    comparisons = [evaluator.stack_score_comparison() for evaluator in evaluators]
    lines = ["| checkpoint | " + " | ".join(f"{name}: stack AP / AUC" for name in STACK_SCORE_CANDIDATES) + " |",
             "|---|" + "---|" * len(STACK_SCORE_CANDIDATES)]
    for name, comparison in zip(names, comparisons):
        lines.append(f"| {name} | " + " | ".join(f"{comparison[c]['stack_ap']:.3f} / {comparison[c]['stack_auc']:.3f}"
                                               for c in STACK_SCORE_CANDIDATES) + " |")
    means = {c: [np.nanmean([comparison[c][m] for comparison in comparisons]) for m in ("stack_ap", "stack_auc")]
             for c in STACK_SCORE_CANDIDATES}
    lines.append(f"| mean of {len(names)} | " + " | ".join(f"{means[c][0]:.3f} / {means[c][1]:.3f}"
                                                         for c in STACK_SCORE_CANDIDATES) + " |")
    return "\n".join(lines)


def _write_json(args: argparse.Namespace, **content) -> None:
    """`content` with the command's arguments to `args.json`, atomically."""
    atomic_write_bytes(args.json, json.dumps({"args": {k: str(v) for k, v in vars(args).items()}} | content, indent=2).encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="in-plane pixels of generated stacks")
    parser.add_argument("--train-counts", type=int, nargs="+", default=[60, 200])
    parser.add_argument("--test-count", type=int, default=120,
                        help="held-out stacks (120: with 40, stack AP moved by ~0.1 between draws)")
    parser.add_argument("--preset", default="cpu_small")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--first-member", type=int, default=0,
                        help="train members first..first+members-1 (merge runs with python -m ichal.train --merge)")
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lookalike-fraction", type=float, default=TrainSettings.lookalike_fraction,
                        help="share of negative patches centred on blood-density look-alikes (0: anywhere in the head)")
    parser.add_argument("--hard-negative-fraction", type=float, default=TrainSettings.hard_negative_fraction,
                        help="share of negative patches centred on the member's own false positives, mined mid-training")
    parser.add_argument("--seed", type=int, default=0, help="generator seed of the training pool (test pool: seed + 1000)")
    parser.add_argument("--train-seed", type=int, help="seed of the ensemble's training (default: --seed)")
    parser.add_argument("--eval-train", type=int, default=0, metavar="N", help="also evaluate on the first N training stacks")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", type=Path, help="write the rows (with --evaluate: each checkpoint's figures and the differences) here")
    parser.add_argument("--checkpoints", type=Path, help="folder to save each trained ensemble")
    parser.add_argument("--evaluate", type=Path, nargs="+", metavar="CKPT", help="only evaluate these checkpoints")
    parser.add_argument("--eval-start", type=int, default=0, help="with --evaluate: first stack index of the pool")
    parser.add_argument("--pairs", action="store_true",
                        help="with --evaluate: compare the 2nd checkpoint to the 1st, the 4th to the 3rd, ... (default: all to the 1st)")
    parser.add_argument("--cache", type=Path,
                        help="with --evaluate: folder keeping each checkpoint's evaluation (reused by later commands)")
    parser.add_argument("--stack-score", choices=STACK_SCORE_CANDIDATES, default=STACK_SCORE,
                        help="with --evaluate: the stack score the paired bootstrap's stack AP ranks by")
    parser.add_argument("--plot", type=Path,
                        help="with --evaluate --pairs and two or more pairs: PNG of each pair's two figures and their mean")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.evaluate:
        items: list[TrainItem] | None = None  # generated only when a checkpoint is not in the cache
        evaluators, train_counts = [], []
        for path in args.evaluate:
            model = load_ensemble(path)
            train_counts.append(len(model.meta["train_ids"]))
            # Evaluations of a checkpoint (by weights digest) on one stack range are kept, so several commands
            # (e.g. one per training pool, run side by side) feed one final comparison without predicting again.
            cached = (args.cache / f"{model.meta['version']}_{args.size}_{args.seed}_{args.eval_start}_{args.test_count}.pkl"
                      if args.cache else None)
            if cached is not None and cached.exists():
                evaluator = pickle.loads(cached.read_bytes())
            else:
                items = items or _items(args.test_count, args.size, args.seed, "generating stacks", start=args.eval_start)
                evaluator, _ = _evaluate(model, items, f"evaluating {path}")
                if cached is not None:
                    atomic_write_bytes(cached, pickle.dumps(evaluator))
            evaluators.append(evaluator)
            print(json.dumps({"checkpoint": str(path), "seed": args.seed, "stack_range": [args.eval_start, args.eval_start + args.test_count]}
                             | evaluator.result() | {"stack_scores": evaluator.stack_score_comparison()}), flush=True)
        print(stack_score_table([str(path) for path in args.evaluate], evaluators))
        # (baseline, compared) index pairs: each checkpoint against the first, or with --pairs 1 vs 0, 3 vs 2, ...
        pairs = [(i - 1, i) for i in range(1, len(evaluators), 2)] if args.pairs else [(0, i) for i in range(1, len(evaluators))]
        if pairs:
            print("| checkpoint | minus | pixel AP (4096 logit bins) | stack AP | Dice (pooled) |")
            print("|---|---|---|---|---|")
        rows = [(str(args.evaluate[other]), str(args.evaluate[base]), [(evaluators[base], evaluators[other])])
                for base, other in pairs]
        if args.pairs and len(pairs) > 1:
            rows.append((f"mean of the {len(pairs)} pairs (pairs resampled too)", "", [p for _, _, [p] in rows]))
        differences = []
        for compared, baseline, evaluator_pairs in rows:
            differences.append(paired_bootstrap(evaluator_pairs, stack_score=args.stack_score))
            cells = [f"{d.difference:+.3f} [{d.low:+.3f}, {d.high:+.3f}]" for d in differences[-1]]
            print(f"| {compared} | {baseline} | " + " | ".join(cells) + " |")
        if args.json:
            _write_json(args, checkpoints=[{"checkpoint": str(path)} | e.result() | {"stack_scores": e.stack_score_comparison(),
                                                                                    "stack_candidates": e.stack_candidates,
                                                                                    "stack_targets": e.stack_targets}
                                           for path, e in zip(args.evaluate, evaluators)],
                        differences=[{"compared": c, "baseline": b, "metrics": [asdict(d) for d in ds]}
                                     for (c, b, _), ds in zip(rows, differences)])
        if args.plot and len(pairs) > 1:
            labels = tuple(f"{train_counts[i]} training stacks" for i in pairs[0])
            plot_paired_differences(differences[:len(pairs)], differences[-1], labels, args.plot)
        return
    settings = TrainSettings(preset=args.preset, ensemble_size=args.members, first_member=args.first_member,
                             iterations=args.iterations,
                             batch_size=args.batch_size, lookalike_fraction=args.lookalike_fraction,
                             hard_negative_fraction=args.hard_negative_fraction,
                             seed=args.seed if args.train_seed is None else args.train_seed)
    rows = run(sorted(args.train_counts), args.test_count, args.size, settings, args.seed, args.checkpoints, args.eval_train)
    print(markdown_table(rows))
    if args.json:
        _write_json(args, rows=rows)


if __name__ == "__main__":
    main()
