"""Active-learning experiments on generated pools: core-set growth, cost-sensitive and per-hour budget rounds.

Kuo et al. 2018, sections 5.1 (core-set: seed 1/32, doubled per round) and 5.2 (seed = half the pool,
+10% of the pool's labeling time per round); DESIGN.md "Evaluation protocol"; issue 18 (`hours`: a small
seed set, then rounds of 5% of the pool's true labeling time, each seed with its own generated pool).

    python -m ichal.experiment coreset --config quick --out out/experiments/quick --seeds 0 1 2
    python -m ichal.experiment cost --config quick --out out/experiments/quick --seeds 0 1 2 --resume
    python -m ichal.experiment hours --config hours --out out/experiments/hours --seeds 0 1 2 3 4 5 6 7 --workers 2

Every (method, seed, round) cell is persisted as JSON (after its checkpoint) under
OUT/<protocol>/seed<s>/; a rerun with --resume skips finished cells. With --workers N the seeds' shared
cells and then each (seed, method)'s rounds run in N processes; with --engine ray [--address HOST:PORT] they
run as Ray tasks on a cluster (docs/scale.md). Results: OUT/<protocol>_results.csv,
OUT/<protocol>_ap.png and OUT/<protocol>_table.md (see `ichal.experiment_plots`; for `hours` also
`ichal.experiment_hours`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import multiprocessing
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ichal.config import DEFAULT_CONFIG
from ichal.cost import LabelTimeModel, MaskFeatures, mask_features
from ichal.ensemble import EnsembleModel, load_ensemble, predict_stack, save_ensemble
from ichal.io import atomic_write_bytes
from ichal.metrics import DetectionEvaluator, stack_score
from ichal.phantom import PhantomStack, generate_pool
from ichal.selection import (
    Selection,
    acft_select,
    knapsack_select,
    random_select,
    roi_select,
    uncertainty_select,
)
from ichal.time_intervals import (BATCH_TAILS, CONFIDENCE_STEP, DEFAULT_BATCH_TAIL, LogErrorModel, applied_confidence,
                                  confidence_offset, fit_log_error_model, select_within_budget_at_applied_confidence)
from ichal.train import TrainItem, TrainSettings, train_ensemble
from ichal.uncertainty import acft_scores, patch_scores, stack_uncertainty

PROTOCOLS = ("coreset", "cost", "hours")
# `oracle_cost`: the knapsack on the TRUE seconds (an upper bound that separates the value measure from
# time-estimate errors); `roi`: value per predicted second, greedy.
METHODS = ("random", "uncertainty", "cost_sensitive", "acft", "foreground_random", "oracle_cost", "roi")
# With one second per stack the knapsack maximizes the summed value of n stacks: the top n by value,
# i.e. exactly `uncertainty`; the core-set protocol therefore runs the other four.
PROTOCOL_METHODS = {
    "coreset": ("random", "uncertainty", "acft", "foreground_random"),
    "cost": ("random", "uncertainty", "cost_sensitive", "acft", "foreground_random"),
    "hours": ("random", "foreground_random", "uncertainty", "cost_sensitive", "oracle_cost", "roi", "acft"),
}
TEST_SEED_OFFSET = 1000  # the test set comes from generator seed data_seed + 1000: disjoint from the pool
# Per-hour protocol: seed s's pool comes from generator seed data_seed + PER_SEED_DATA_STRIDE * (s + 1), so
# no seed's pool or test set meets another's, nor the shared pool of the other protocols.
PER_SEED_DATA_STRIDE = 10_000
FULL_POOL = "full_pool"  # reference (core-set and per-hour): an ensemble trained on the whole pool


class ExperimentError(ValueError):
    """Bad experiment arguments, or an output folder that does not match the run asked for."""


@dataclass(frozen=True)
class ExperimentConfig:
    """Sizes of one experiment. Seconds are simulated annotator seconds; sizes in stacks or pixels.

    `coreset_seed_fraction`: share of the pool labeled at round 0 of the core-set protocol (paper 1/32);
    `cost_seed_fraction`: same for the cost protocol (paper 1/2); `budget_fraction`: each cost round's
    budget as a share of the whole pool's true labeling seconds (paper 10%). `hours_seed_fraction` and
    `hours_budget_fraction`: the same two for the per-hour protocol (issue 18). `foreground_threshold`:
    stack score at or above which `foreground_random` counts a stack as positive.
    """

    name: str
    pool_count: int
    test_count: int
    size: int
    rounds: int
    members: int
    iterations: int
    batch_size: int = 16
    preset: str = "cpu_small"
    lr: float = 2e-3
    coreset_seed_fraction: float = 1 / 32
    cost_seed_fraction: float = 0.5
    budget_fraction: float = 0.10
    hours_seed_fraction: float = 1 / 8
    hours_budget_fraction: float = 0.05
    data_seed: int = 0
    foreground_threshold: float = 0.5
    knapsack_resolution_seconds: float = 10.0
    device: str = "cpu"
    batch_slices: int = 16
    lookalike_fraction: float = 0.5  # TrainSettings.lookalike_fraction; docs/results.md runs predate it (0)
    hard_negative_fraction: float = TrainSettings.hard_negative_fraction
    budget_confidence: float = 0.8  # cost rounds: P(batch's true seconds <= budget) under the batch interval
    batch_tail: str = DEFAULT_BATCH_TAIL  # ichal.time_intervals.LogErrorModel.tail
    # Each round's batch quantile raised by the earlier rounds' overruns (ichal.time_intervals.confidence_offset;
    # 0: the asked confidence, always).
    confidence_step: float = CONFIDENCE_STEP
    # Cost protocol: folds of the seed set whose committees predict the held-out fold (never seen), giving
    # round 1 pick-time time errors to recalibrate on (0: round 1 has none, only the fallback spread).
    crossfit_folds: int = 2

    def validate(self) -> None:
        """Raise `ExperimentError` naming the first value out of range."""
        for name in ("pool_count", "test_count", "rounds", "members", "iterations", "batch_size"):
            if getattr(self, name) < 1:
                raise ExperimentError(f"config {self.name!r}: {name} must be at least 1, got {getattr(self, name)}")
        for name in ("coreset_seed_fraction", "cost_seed_fraction", "budget_fraction", "hours_seed_fraction",
                     "hours_budget_fraction", "budget_confidence"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ExperimentError(f"config {self.name!r}: {name} must be in (0, 1), got {getattr(self, name)}")
        if self.crossfit_folds == 1 or self.crossfit_folds < 0:
            raise ExperimentError(f"config {self.name!r}: crossfit_folds must be 0 or at least 2, got {self.crossfit_folds}")
        if self.batch_tail not in BATCH_TAILS:
            raise ExperimentError(f"config {self.name!r}: batch_tail must be one of {BATCH_TAILS}, got {self.batch_tail!r}")
        if not (math.isfinite(self.confidence_step) and self.confidence_step >= 0):
            raise ExperimentError(f"config {self.name!r}: confidence_step must be 0 or more, got {self.confidence_step}")
        for name in ("lookalike_fraction", "hard_negative_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ExperimentError(f"config {self.name!r}: {name} must be in [0, 1], got {getattr(self, name)}")


CONFIGS: dict[str, ExperimentConfig] = {
    # CPU: 64 px stacks (3.6 mm pixels), 40-stack pool, 16 test stacks, 400 iterations per member (with 150
    # the whole pool scored no better than 6 stacks: docs/results.md); 12-20 min per seed and protocol
    # on one shared CPU core.
    "quick": ExperimentConfig(name="quick", pool_count=40, test_count=16, size=64, rounds=2, members=2,
                              iterations=400, coreset_seed_fraction=1 / 8),
    # Per-hour protocol (issue 18) on 2 CPU cores: 120-stack pools (one per seed), 60 test stacks, 2 members.
    # 3200 iterations: the shortest measured training at which pixel, frame and stack AP all rose with every
    # doubling of 15 -> 120 labeled stacks (benchmarks/iterations_curve.py; at 1600, 30 stacks scored below
    # 15). Estimated 6 h for 8 seeds on 2 otherwise idle cores, over the 4 h aimed at (docs/results.md).
    "hours": ExperimentConfig(name="hours", pool_count=120, test_count=60, size=64, rounds=5, members=2,
                              iterations=3200),
    # Paper-sized (section 4/5: 934 train-val, 313 test, seed 1/32 doubled to the whole set, 4 members): a GPU.
    "full": ExperimentConfig(name="full", pool_count=934, test_count=313, size=256, rounds=5, members=4,
                             iterations=4000, batch_size=32, preset="drn38", device="cuda", batch_slices=32),
}


@dataclass(frozen=True)
class StackScores:
    """What selection needs from one unlabeled stack under one model.

    `value`: QBC stack value V (mean of the top-K patch JS, nats); `acft`: ACFT total a; `stack_score`:
    highest ensemble-mean probability; `features`: boundary/components of the mean prediction.
    """

    value: float
    acft: float
    stack_score: float
    features: MaskFeatures


@dataclass
class Data:
    """The pool (to label) and the held-out test set, plus each pool stack's TRUE mask features."""

    pool: list[PhantomStack]
    test: list[PhantomStack]
    true_features: dict[str, MaskFeatures]

    def fingerprint(self) -> str:
        """SHA-256 (16 hex digits) of every stack's id, image, label and simulated seconds: detects a changed
        generator between an interrupted run and its resumption."""
        digest = hashlib.sha256()
        for stack in [*self.pool, *self.test]:
            digest.update(f"{stack.id}:{stack.meta['simulated_seconds']}:{stack.image_hu.shape}".encode())
            digest.update(stack.image_hu.tobytes())
            digest.update(stack.label.tobytes())
        return digest.hexdigest()[:16]

    @property
    def pool_ids(self) -> list[str]:
        return [stack.id for stack in self.pool]

    def true_seconds(self, ids: Sequence[str]) -> float:
        """Summed simulated annotator seconds of the pool stacks `ids`."""
        by_id = {stack.id: stack for stack in self.pool}
        return math.fsum(float(by_id[i].meta["simulated_seconds"]) for i in ids)


def true_mask_features(stack: PhantomStack) -> MaskFeatures:
    """The time model's features of a stack's TRUE mask (what the site measures once it is labeled)."""
    return mask_features(stack.label.astype(np.float32), stack.spacing_mm, DEFAULT_CONFIG.feature_thresholds)


def seed_set_ids(pool_ids: Sequence[str], fraction: float, seed: int) -> list[str]:
    """Round 0's labeled stacks: a random `fraction` of the pool (at least one), drawn from `seed`; sorted."""
    count = max(1, int(round(fraction * len(pool_ids))))
    order = np.random.default_rng([seed, 0]).permutation(len(pool_ids))
    return sorted(pool_ids[i] for i in order[:count])


def make_data(config: ExperimentConfig, progress: bool = True) -> Data:
    """Generate the pool (seed `data_seed`) and the test set (seed `data_seed + 1000`), in memory."""
    pool = list(tqdm(generate_pool(config.pool_count, config.size, config.data_seed), total=config.pool_count,
                     desc="generating pool", unit="stack", disable=not progress))
    test = list(tqdm(generate_pool(config.test_count, config.size, config.data_seed + TEST_SEED_OFFSET),
                     total=config.test_count, desc="generating test set", unit="stack", disable=not progress))
    return Data(pool=pool, test=test, true_features={s.id: true_mask_features(s) for s in pool})


def protocol_data_config(protocol: str, config: ExperimentConfig, seed: int) -> ExperimentConfig:
    """`config` with the `data_seed` of seed `seed`'s pool: the seed's own for `hours`, else the shared one."""
    if protocol != "hours":
        return config
    return dataclasses.replace(config, data_seed=config.data_seed + PER_SEED_DATA_STRIDE * (seed + 1))


def train_labeled(config: ExperimentConfig, data: Data, labeled_ids: Sequence[str], train_seed: int,
                  progress: bool) -> tuple[EnsembleModel, float]:
    """Retrain an ensemble from scratch on `labeled_ids` (paper: retrained every round); returns (model, seconds)."""
    by_id = {stack.id: stack for stack in data.pool}
    items = [TrainItem(i, by_id[i].image_hu, by_id[i].label, by_id[i].spacing_mm) for i in labeled_ids]
    settings = TrainSettings(preset=config.preset, ensemble_size=config.members, iterations=config.iterations,
                             batch_size=config.batch_size, lr=config.lr, lookalike_fraction=config.lookalike_fraction,
                             hard_negative_fraction=config.hard_negative_fraction,
                             seed=train_seed, device=config.device)
    start = time.perf_counter()
    with tqdm(total=config.members * config.iterations, desc=f"training on {len(items)}", unit="it",
              leave=False, disable=not progress) as bar:
        model = train_ensemble(items, settings, progress=lambda event: bar.update("loss" in event))
    for member in model.members:  # train_ensemble hands members back on the CPU
        member.to(config.device)
    return model, time.perf_counter() - start


def evaluate(config: ExperimentConfig, model: EnsembleModel, test: Sequence[PhantomStack],
             progress: bool = False) -> dict[str, float]:
    """Pixel/region/frame/stack AP and Dice of `model` on the test stacks (`DetectionEvaluator.result`)."""
    evaluator = DetectionEvaluator()
    for stack in tqdm(test, desc="evaluating", unit="stack", leave=False, disable=not progress):
        prediction = predict_stack(model, stack.image_hu, stack.spacing_mm, device=config.device,
                                   batch_slices=config.batch_slices)
        evaluator.update(prediction.mean_prob, stack.label, stack.spacing_mm)
    return evaluator.result()


def score_stacks(config: ExperimentConfig, model: EnsembleModel, stacks: Sequence[PhantomStack],
                 progress: bool = False) -> dict[str, StackScores]:
    """Predict each stack with the ensemble and compute its selection scores (patch = training patch in mm)."""
    scores = {}
    for stack in tqdm(stacks, desc="scoring pool", unit="stack", leave=False, disable=not progress):
        prediction = predict_stack(model, stack.image_hu, stack.spacing_mm, device=config.device,
                                   batch_slices=config.batch_slices)
        patch_px = DEFAULT_CONFIG.patch_px(stack.spacing_mm[1])
        scores[stack.id] = StackScores(
            value=stack_uncertainty(patch_scores(prediction.js, patch_px), DEFAULT_CONFIG.top_k_patches),
            acft=acft_scores(prediction.mean_prob, patch_px).total,
            stack_score=stack_score(prediction.mean_prob, stack.spacing_mm),
            features=mask_features(prediction.mean_prob, stack.spacing_mm, DEFAULT_CONFIG.feature_thresholds),
        )
    return scores


def foreground_random_select(stack_score: np.ndarray, seconds: np.ndarray, budget_seconds: float,
                             rng: np.random.Generator, threshold: float = 0.5) -> Selection:
    """Foreground-aware random: stacks scored >= `threshold` in random order, added while they fit, then
    the others in random order while they fit. `stack_score`, `seconds`: (n,); returns pool indices."""
    positive = np.flatnonzero(np.asarray(stack_score) >= threshold)
    negative = np.flatnonzero(np.asarray(stack_score) < threshold)
    first = random_select(seconds[positive], budget_seconds, rng)
    rest = random_select(seconds[negative], max(0.0, budget_seconds - first.total_seconds), rng)
    indices = np.concatenate([positive[first.indices], negative[rest.indices]]).astype(np.int64)
    return Selection(indices=indices, total_value=0.0, total_seconds=math.fsum(seconds[indices]))


def select_batch(method: str, scores: Sequence[StackScores], seconds: np.ndarray, budget_seconds: float,
                 rng: np.random.Generator, config: ExperimentConfig) -> Selection:
    """Run selector `method` on unlabeled stacks (their scores and `seconds`, (n,): predicted seconds, for
    `oracle_cost` the true ones) under the budget."""
    values = np.array([s.value for s in scores])
    if method == "random":
        return random_select(seconds, budget_seconds, rng, values)
    if method == "uncertainty":
        return uncertainty_select(values, seconds, budget_seconds)
    if method in ("cost_sensitive", "oracle_cost"):
        return knapsack_select(values, seconds, budget_seconds, config.knapsack_resolution_seconds)
    if method == "roi":
        return roi_select(values, seconds, budget_seconds)
    if method == "acft":
        return acft_select(np.array([s.acft for s in scores]), seconds, budget_seconds, rng)
    if method == "foreground_random":
        return foreground_random_select(np.array([s.stack_score for s in scores]), seconds, budget_seconds, rng,
                                        config.foreground_threshold)
    raise ExperimentError(f"unknown method {method!r}; expected one of {METHODS}")


def pick_time_errors(history: Sequence[dict], fallback_std: float) -> LogErrorModel:
    """The recalibration line and log errors of earlier picks (`history`: each stack's raw predicted
    log-seconds at pick time and its true seconds, in the order they were labeled)."""
    return fit_log_error_model(np.array([h["predicted_log_seconds"] for h in history]),
                               np.log([h["true_seconds"] for h in history]), fallback_std)


def budget_at_confidence(method: str, scores: Sequence[StackScores], raw_log: np.ndarray, history: Sequence[dict],
                         fallback_std: float, budget_seconds: float, applied: float, config: ExperimentConfig,
                         rng_seed: Sequence[int], draw_seed: int) -> tuple[np.ndarray, np.ndarray, float, float, LogErrorModel]:
    """As the app budgets a worklist: the raw predicted log-seconds `raw_log` recalibrated on the earlier
    picks' errors, and `method`'s batch chosen so that its total stays within `budget_seconds` with
    probability `applied` (`worklist_confidence`; `config.budget_confidence` when nothing fits at `applied`)
    under batch totals drawn with `config.batch_tail`. Every trial selection draws from a fresh generator seeded
    with `rng_seed`, so a random order stays the same while the time inflation is searched. Returns (indices,
    recalibrated median seconds of every stack, the batch total's quantile, the confidence it is at, the error
    model)."""
    errors = dataclasses.replace(pick_time_errors(history, fallback_std), tail=config.batch_tail)
    medians = np.exp(errors.adjust(raw_log))

    def select(times: np.ndarray, budget: float) -> np.ndarray:
        return select_batch(method, scores, times, budget, np.random.default_rng(list(rng_seed)), config).indices

    indices, high_total, used = select_within_budget_at_applied_confidence(
        select, medians, budget_seconds, errors, config.budget_confidence, applied, seed=draw_seed)
    return np.asarray(indices, dtype=int), medians, high_total, used, errors


def worklist_confidence(outcomes: Sequence[dict], config: ExperimentConfig) -> float:
    """The batch quantile a round budgets at, as the app does: `config.budget_confidence` raised by the overruns
    of the earlier rounds' batches (`outcomes`: `ichal.time_intervals.batch_outcomes` records, in order)."""
    return applied_confidence(config.budget_confidence, confidence_offset(outcomes, config.confidence_step))


def batch_outcome(budget_seconds: float, true_seconds: float, confidence: float) -> dict:
    """One labeled batch as `ichal.time_intervals.confidence_offset` reads it: the confidence asked."""
    return {"measured_seconds": true_seconds, "budget_seconds": budget_seconds, "confidence": confidence}


def _mean_or_nan(values: np.ndarray) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def _rng_seed(seed: int, method: str, round_index: int) -> list[int]:
    return [seed, METHODS.index(method) + 1, round_index]


def _rng(seed: int, method: str, round_index: int) -> np.random.Generator:
    return np.random.default_rng(_rng_seed(seed, method, round_index))


def _write_json(path: Path, record: dict) -> None:
    atomic_write_bytes(path, (json.dumps(record, indent=1) + "\n").encode())


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


class _Run:
    """One protocol on one data set (shared by the seeds, or one seed's own) in folder `out`; every finished cell
    is a JSON record."""

    def __init__(self, protocol: str, config: ExperimentConfig, data: Data, out: Path,
                 progress: bool, on_record: Callable[[dict], None] | None) -> None:
        self.protocol, self.config, self.data, self.out = protocol, config, data, out
        self.progress, self.on_record = progress, on_record
        self.total_seconds = data.true_seconds(data.pool_ids)
        self.finished: list[dict] = []  # records of the cells this object computed, in order
        self._score_cache: dict[str, dict[str, StackScores]] = {}
        self.seed_fraction = {"coreset": config.coreset_seed_fraction, "cost": config.cost_seed_fraction,
                              "hours": config.hours_seed_fraction}[protocol]
        self.budget_fraction = config.hours_budget_fraction if protocol == "hours" else config.budget_fraction

    def cell_dir(self, seed: int, method: str | None) -> Path:
        return self.out / self.protocol / f"seed{seed}" / (method or "shared")

    def _finish(self, seed: int, method: str | None, round_index: int, model: EnsembleModel, record: dict) -> dict:
        """Save the checkpoint, then the record (its existence marks the cell finished)."""
        folder = self.cell_dir(seed, method)
        save_ensemble(model, folder / f"round{round_index}.pt")
        _write_json(folder / f"round{round_index}.json", record)
        self.finished.append(record)
        if self.on_record is not None:
            self.on_record(record)
        return record

    def _record(self, seed: int, method: str, round_index: int, labeled_ids: Sequence[str], metrics: dict,
                train_seconds: float, **batch: object) -> dict:
        return {
            "protocol": self.protocol, "method": method, "seed": seed, "round": round_index,
            "n_labeled": len(labeled_ids), "labeled_fraction": len(labeled_ids) / len(self.data.pool),
            "labeled_hours": self.data.true_seconds(labeled_ids) / 3600.0,
            "labeled_ids": sorted(labeled_ids), "metrics": metrics, "train_seconds": round(train_seconds, 2),
        } | batch

    def _train_and_finish(self, seed: int, method: str | None, round_index: int, labeled_ids: list[str],
                          **batch: object) -> dict:
        model, train_seconds = train_labeled(self.config, self.data, labeled_ids, seed * 100 + round_index,
                                             self.progress)
        metrics = evaluate(self.config, model, self.data.test, self.progress)
        record = self._record(seed, method or "seed_set", round_index, labeled_ids, metrics, train_seconds, **batch)
        return self._finish(seed, method, round_index, model, record)

    def seed_cell(self, seed: int) -> dict:
        """Round 0, shared by all methods: a random seed set of the pool, trained and evaluated once."""
        path = self.cell_dir(seed, None) / "round0.json"
        if (record := _read_json(path)) is not None:
            return record
        return self._train_and_finish(seed, None, 0, seed_set_ids(self.data.pool_ids, self.seed_fraction, seed))

    def full_pool_cell(self, seed: int) -> dict:
        """Reference of the core-set (the paper's S1) and per-hour protocols: the whole pool labeled."""
        path = self.cell_dir(seed, FULL_POOL) / "round0.json"
        if (record := _read_json(path)) is not None:
            return record
        return self._train_and_finish(seed, FULL_POOL, 0, list(self.data.pool_ids))

    def crossfit_history(self, seed: int, seed_ids: Sequence[str]) -> list[dict]:
        """Pick-time errors for round 1, before anything was picked: each fold of the seed set predicted by a
        committee trained on the other folds (a committee that never saw it, as a picked stack is never
        seen), through the time model of round 1 (true masks of the whole seed set). Cached per seed."""
        path = self.cell_dir(seed, None) / "crossfit.json"
        if (cached := _read_json(path)) is not None:
            return cached["history"]
        time_model = LabelTimeModel().fit([self.data.true_features[i] for i in seed_ids],
                                          [self.data.true_seconds([i]) for i in seed_ids])
        order = np.random.default_rng([seed, 7]).permutation(len(seed_ids))
        folds = [sorted(seed_ids[i] for i in order[k::self.config.crossfit_folds]) for k in range(self.config.crossfit_folds)]
        by_id = {stack.id: stack for stack in self.data.pool}
        history = []
        for k, held_out in enumerate(folds):
            rest = [i for i in seed_ids if i not in set(held_out)]
            model, _ = train_labeled(self.config, self.data, rest, seed * 100 + 90 + k, self.progress)
            scores = score_stacks(self.config, model, [by_id[i] for i in held_out], self.progress)
            raw_log = time_model.predict_log([scores[i].features for i in held_out])
            history += [{"id": i, "predicted_log_seconds": float(r), "true_seconds": self.data.true_seconds([i]),
                         "source": "crossfit"} for i, r in zip(held_out, raw_log)]
        _write_json(path, {"folds": folds, "history": history})
        return history

    def _scores(self, model_path: Path, unlabeled: Sequence[PhantomStack]) -> dict[str, StackScores]:
        """Scores of `unlabeled` under the checkpoint at `model_path`, cached (round 0 is shared by all methods)."""
        cached = self._score_cache.setdefault(str(model_path), {})
        missing = [stack for stack in unlabeled if stack.id not in cached]
        if missing:
            cached |= score_stacks(self.config, load_ensemble(model_path, self.config.device), missing,
                                   self.progress)
        return {stack.id: cached[stack.id] for stack in unlabeled}

    def round_cell(self, seed: int, method: str, round_index: int, previous: dict, previous_model: Path) -> dict:
        """Select with `method` using the previous round's model, label the batch, retrain, evaluate.

        An exhausted pool gives an empty batch (the labeled set is retrained as is).
        """
        path = self.cell_dir(seed, method) / f"round{round_index}.json"
        if (record := _read_json(path)) is not None:
            return record
        labeled = set(previous["labeled_ids"])
        unlabeled = [stack for stack in self.data.pool if stack.id not in labeled]
        time_model = LabelTimeModel().fit([self.data.true_features[i] for i in previous["labeled_ids"]],
                                          [self.data.true_seconds([i]) for i in previous["labeled_ids"]])
        scores_by_id = self._scores(previous_model, unlabeled)
        scores = [scores_by_id[stack.id] for stack in unlabeled]
        true_seconds = np.array([self.data.true_seconds([stack.id]) for stack in unlabeled])
        true_log = np.log(true_seconds)
        # As the app does: the true-mask time model on the committee's predicted masks, recalibrated on
        # what earlier rounds of this run predicted at pick time and then measured (`ichal.time_intervals`).
        history = previous.get("pick_history")
        if history is None:  # round 1: the seed set's cross-fitted errors stand in for earlier picks
            history = self.crossfit_history(seed, previous["labeled_ids"]) \
                if self.protocol != "coreset" and self.config.crossfit_folds else []
        raw_log = time_model.predict_log([s.features for s in scores])
        budget = self.budget_fraction * self.total_seconds
        outcomes = previous.get("batch_outcomes", [])
        confidence = worklist_confidence(outcomes, self.config)
        budgeted = self.protocol != "coreset" and method != "oracle_cost"
        if self.protocol == "coreset":  # doubling: as many new stacks as are labeled, one "second" each
            errors = pick_time_errors(history, time_model.residual_std_)
            medians = np.exp(errors.adjust(raw_log))
            indices = select_batch(method, scores, np.ones(len(unlabeled)), float(len(labeled)),
                                   _rng(seed, method, round_index), self.config).indices
            high_total = float("nan")
        elif method == "oracle_cost":  # knows the true seconds: the batch's total is exact, no interval needed
            errors = pick_time_errors(history, time_model.residual_std_)
            medians = np.exp(errors.adjust(raw_log))
            indices = select_batch(method, scores, true_seconds, budget, _rng(seed, method, round_index),
                                   self.config).indices
            high_total = math.fsum(true_seconds[indices])
        else:
            indices, medians, high_total, confidence, errors = budget_at_confidence(
                method, scores, raw_log, history, time_model.residual_std_, budget, confidence, self.config,
                _rng_seed(seed, method, round_index), seed * 1000 + round_index)
        expected = medians * errors.mean_factor()
        indices = np.asarray(indices, dtype=int)
        picked = [unlabeled[i].id for i in indices]
        picked_predicted = math.fsum(expected[indices])
        picked_true = self.data.true_seconds(picked)
        low, high = errors.interval(self.config.budget_confidence)
        in_interval = (true_log[indices] >= np.log(medians[indices]) + low) & (true_log[indices] <= np.log(medians[indices]) + high)
        # The same time model on the picked stacks' TRUE masks: separates the regressor's error from the
        # error of predicting masks with the ensemble.
        picked_oracle = math.fsum(time_model.predict([self.data.true_features[i] for i in picked])) if picked \
            else 0.0
        batch = {
            "budget": float(len(labeled)) if self.protocol == "coreset" else budget,
            "budget_unit": "stacks" if self.protocol == "coreset"
            else "true seconds, exact (oracle)" if method == "oracle_cost" else "true seconds at confidence",
            "budget_confidence": self.config.budget_confidence,
            "applied_confidence": confidence if budgeted else None,
            "picked_ids": picked, "n_picked": len(picked),
            "picked_budget_used": float(len(picked)) if self.protocol == "coreset"
            else picked_true if method == "oracle_cost" else picked_predicted,
            "picked_predicted_seconds": picked_predicted, "picked_high_seconds": high_total,
            # Today's (before issue 17) estimate: the true-mask model's mean on predicted masks, no recalibration.
            "picked_raw_predicted_seconds": math.fsum(np.exp(raw_log[indices] + 0.5 * time_model.residual_std_**2)),
            "picked_true_seconds": picked_true, "picked_oracle_seconds": picked_oracle,
            "batch_time_rel_error": (picked_predicted - picked_true) / picked_true if picked_true > 0 else float("nan"),
            "picked_in_interval": int(in_interval.sum()),
            # Log errors (true - predicted): picked vs all unlabeled stacks, raw and recalibrated. Their
            # difference on the picked stacks is the selection effect (winner's curse).
            "log_error": {
                "picked_raw": _mean_or_nan(true_log[indices] - raw_log[indices]),
                "picked_recalibrated": _mean_or_nan(true_log[indices] - np.log(medians[indices])),
                "pool_raw": _mean_or_nan(true_log - raw_log),
                "pool_recalibrated": _mean_or_nan(true_log - np.log(medians)),
                "picked_abs_recalibrated": [float(v) for v in np.abs(true_log[indices] - np.log(medians[indices]))],
            },
            "recalibration": {"n": len(history), "intercept": errors.intercept, "slope": errors.slope,
                              "empirical": errors.empirical},
            # Budgeted batches labeled so far, for the next round's applied confidence (the app never serves an
            # empty worklist, so an empty batch is not one).
            "batch_outcomes": outcomes + ([batch_outcome(budget, picked_true, self.config.budget_confidence)]
                                          if budgeted and picked else []),
            "pick_history": history + [{"id": unlabeled[i].id, "predicted_log_seconds": float(raw_log[i]),
                                        "true_seconds": float(np.exp(true_log[i]))} for i in indices],
            "picked_positive": sum(bool(unlabeled[i].label.any()) for i in indices),
            "time_model": {"a": float(time_model.coef_[0]), "b": float(time_model.coef_[1]),
                           "c": time_model.intercept_, "n": time_model.n_, "source": time_model.source_,
                           "r2": time_model.r2_},
        }
        return self._train_and_finish(seed, method, round_index, sorted(labeled | set(picked)), **batch)

    def shared_cells(self, seed: int) -> None:
        """What every method of `seed` starts from: round 0, the whole-pool reference (core-set and per-hour),
        and the seed set's cross-fitted time errors (cost and per-hour)."""
        start = self.seed_cell(seed)
        if self.protocol in ("coreset", "hours"):
            self.full_pool_cell(seed)
        if self.protocol != "coreset" and self.config.crossfit_folds:
            self.crossfit_history(seed, start["labeled_ids"])

    def method_cells(self, seed: int, method: str) -> None:
        """Rounds 1..R of `method` from `seed`'s round 0 (run `shared_cells` first)."""
        previous, model_path = self.seed_cell(seed), self.cell_dir(seed, None) / "round0.pt"
        for round_index in range(1, self.config.rounds + 1):
            previous = self.round_cell(seed, method, round_index, previous, model_path)
            model_path = self.cell_dir(seed, method) / f"round{round_index}.pt"


# Config fields that say where a run computes, not what: a resumed run may change them.
RUNTIME_FIELDS = ("device",)


def _check_out_dir(out: Path, protocol: str, config: ExperimentConfig, data: Data | None, resume: bool) -> None:
    """Write OUT/<protocol>_config.json (config, + the data fingerprint when seeds share the data), or check it
    matches when resuming. Per-seed data (`hours`) is checked by `_seed_data`."""
    path = out / f"{protocol}_config.json"
    wanted = dataclasses.asdict(config) | ({"data_fingerprint": data.fingerprint()} if data is not None
                                           else {"data_fingerprint": "per seed: <protocol>/seed<s>/data.json"})
    existing = _read_json(path)
    if existing is not None:  # where it runs is not what it computes: a run started on a GPU may resume on CPUs
        existing |= {name: wanted[name] for name in RUNTIME_FIELDS}
    if existing is not None and not resume:
        raise ExperimentError(f"{out} already holds a {protocol} run; pass --resume to continue it or choose "
                              "another --out")
    if existing is not None and existing != wanted:
        changed = sorted(k for k in set(existing) | set(wanted) if existing.get(k) != wanted.get(k))
        raise ExperimentError(f"cannot resume {path}: its config differs from {config.name!r} in {changed}")
    if existing is None:
        _write_json(path, wanted)


def _seed_data(protocol: str, config: ExperimentConfig, out: Path, seed: int, progress: bool) -> Data:
    """Seed `seed`'s own pool and test set (`hours`), checked against (or recorded in)
    OUT/<protocol>/seed<s>/data.json, so a resumed run refuses a changed generator."""
    data_config = protocol_data_config(protocol, config, seed)
    data = make_data(data_config, progress)
    path = out / protocol / f"seed{seed}" / "data.json"
    wanted = {"data_seed": data_config.data_seed, "data_fingerprint": data.fingerprint()}
    existing = _read_json(path)
    if existing is not None and existing != wanted:
        raise ExperimentError(f"cannot resume seed {seed}: {path} records {existing}, the generator now gives {wanted}")
    if existing is None:
        _write_json(path, wanted)
    return data


@dataclass(frozen=True)
class Task:
    """Work for one process: seed `seed`'s shared cells (`method` None) or one method's rounds."""

    protocol: str
    config: ExperimentConfig
    out: Path
    seed: int
    method: str | None


_worker_run: dict[tuple, _Run] = {}  # in a worker process: the run of the data it used last


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _run_task(task: Task) -> list[dict]:
    """Run `task` in a worker process; returns the records of the cells it computed. The worker keeps the
    last data it generated (and its round-0 scores), so consecutive tasks of one seed generate it once."""
    key = (task.protocol, task.config, task.out, task.seed if task.protocol == "hours" else None)
    if key not in _worker_run:
        _worker_run.clear()
        data = _seed_data(task.protocol, task.config, task.out, task.seed, False) if task.protocol == "hours" \
            else make_data(task.config, False)
        _worker_run[key] = _Run(task.protocol, task.config, data, task.out, False, None)
    run = _worker_run[key]
    before = len(run.finished)
    if task.method is None:
        run.shared_cells(task.seed)
    else:
        run.method_cells(task.seed, task.method)
    return run.finished[before:]


def _run_in_workers(tasks: Sequence[Task], workers: int, threads: int, on_done: Callable[[Task, list[dict]], None],
                    engine: str = "local", start_deadline: float | None = None) -> list[Task]:
    """Run `tasks` (in seed order, each seed's shared task first; `next_runnable_task` picks the next) in
    `workers` processes (spawned: a forked torch may hang), or with engine `ray` as Ray tasks over the
    cluster's cores (a task whose worker dies is rerun and skips the cells it had finished). No task starts
    after `start_deadline` (`time.monotonic()`); running ones finish. `on_done(task, records)` runs here as
    each task finishes. Returns the tasks never started. On an error the queued tasks are cancelled; running
    ones finish their current cell and stop."""
    if engine == "ray":
        from ichal.cluster import RayTaskPool

        pool_context = RayTaskPool(threads)
    else:
        pool_context = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                           initializer=_init_worker, initargs=(threads,))
    with pool_context as pool:
        slots = pool.slots if engine == "ray" else workers
        waiting, ready_seeds = list(tasks), set()
        pending: dict[Future, Task] = {}
        try:
            while True:
                while len(pending) < slots and (start_deadline is None or time.monotonic() < start_deadline):
                    task = next_runnable_task(waiting, ready_seeds)
                    if task is None:
                        break
                    waiting.remove(task)
                    pending[pool.submit(_run_task, task)] = task
                if not pending:
                    return waiting
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    task = pending.pop(future)
                    records = future.result()
                    if task.method is None:
                        ready_seeds.add(task.seed)
                    on_done(task, records)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def next_runnable_task(waiting: Sequence[Task], ready_seeds: set[int]) -> Task | None:
    """The first of `waiting` (in seed order, each seed's shared task first) that can start: a method chain
    of a seed whose shared cells are done (`ready_seeds`), or a shared task. Seeds thus finish one after
    another instead of every seed's shared cells first, so a run stopped part-way leaves whole seeds."""
    return next((task for task in waiting if task.method is None or task.seed in ready_seeds), None)


def run_protocol(protocol: str, config: ExperimentConfig, out: str | Path, seeds: Sequence[int], *,
                 resume: bool = False, methods: Sequence[str] | None = None, data: Data | None = None,
                 progress: bool = True, on_record: Callable[[dict], None] | None = None, workers: int = 1,
                 threads: int = 1, engine: str = "local", stop_starting_after: float | None = None) -> list[dict]:
    """Run `protocol` ("coreset", "cost" or "hours") for every seed; returns all records (see `load_records`).

    Core-set and cost: seeds share the pool and test set (generated from `config.data_seed`, or `data`)
    and differ by seed set, random choices and training seeds. Per-hour (`hours`): each seed generates its
    own pool and test set (`protocol_data_config`). All methods of a seed share its round 0.
    `on_record(record)` is called after each newly finished cell (tests interrupt a run there; with
    several workers, when the task holding the cell is done). `workers` > 1 runs the seeds' shared cells
    and then each (seed, method)'s rounds in that many processes of `threads` torch threads each; the
    records equal a one-process run's. Engine `ray` runs the same tasks on the Ray cluster this process
    has joined (`ichal.cluster.connect`), as many at once as it has cores. After each seed the CSV, plot
    and table are rewritten, so an interrupted run still leaves a report of what finished.
    `stop_starting_after` (seconds): no seed's shared cells or (seed, method) chain starts later than this
    after the call; started ones finish, so a run sized beyond a session stops at whole chains and is
    continued with `resume`.
    """
    from ichal.experiment_plots import write_report

    if protocol not in PROTOCOLS:
        raise ExperimentError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    config.validate()
    methods = tuple(methods or PROTOCOL_METHODS[protocol])
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ExperimentError(f"unknown methods {unknown}; expected some of {METHODS}")
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ExperimentError(f"seeds must be distinct non-negative integers, got {list(seeds)}")
    if workers < 1:
        raise ExperimentError(f"workers must be at least 1, got {workers}")
    if engine not in ("local", "ray"):
        raise ExperimentError(f"engine must be local or ray, got {engine!r}")
    parallel = workers > 1 or engine == "ray"
    if data is not None and (protocol == "hours" or parallel):
        raise ExperimentError("data can be passed only to a one-worker core-set or cost run; per-hour seeds "
                              "generate their own pools, workers their own copy")
    if stop_starting_after is not None and stop_starting_after < 0:
        raise ExperimentError(f"stop_starting_after must be at least 0 seconds, got {stop_starting_after}")
    start_deadline = None if stop_starting_after is None else time.monotonic() + stop_starting_after
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not resume and (out / f"{protocol}_config.json").exists():
        raise ExperimentError(f"{out} already holds a {protocol} run; pass --resume to continue it or choose "
                              "another --out")
    shared_data = None if protocol == "hours" else data or make_data(config, progress)
    _check_out_dir(out, protocol, config, shared_data, resume)
    cells_per_seed = 1 + (protocol != "cost") + len(methods) * config.rounds
    already = sum(1 for seed in seeds for _ in (out / protocol / f"seed{seed}").rglob("round*.json"))
    with tqdm(total=cells_per_seed * len(seeds), initial=already, desc=f"{protocol} cells", unit="cell",
              disable=not progress) as bar:
        def count(record: dict) -> None:
            bar.update(1)
            bar.set_postfix(seed=record["seed"], method=record["method"], round=record["round"])
            if on_record is not None:
                on_record(record)

        tasks = [Task(protocol, config, out, seed, method) for seed in seeds for method in (None, *methods)]
        left = {seed: 1 + len(methods) for seed in seeds}

        def done(task: Task, records: list[dict]) -> None:
            for record in records:
                count(record)
            left[task.seed] -= 1
            if not left[task.seed]:
                write_report(protocol, out, load_records(out, protocol))

        if not parallel:
            not_started = _run_in_process(tasks, shared_data, progress, count, done, start_deadline)
        else:
            not_started = _run_in_workers(tasks, workers, threads, done, engine, start_deadline)
    if not_started:
        write_report(protocol, out, load_records(out, protocol))
        print(f"stopped starting tasks after {stop_starting_after:.0f} s: {len(not_started)} of {len(tasks)} "
              f"(seed, method) tasks not started; continue with --resume", file=sys.stderr)
    return load_records(out, protocol)


def _run_in_process(tasks: Sequence[Task], shared_data: Data | None, progress: bool,
                    on_record: Callable[[dict], None], on_done: Callable[[Task, list[dict]], None],
                    start_deadline: float | None) -> list[Task]:
    """`_run_in_workers` in this process, task after task in order; returns the tasks never started."""
    run = None
    for index, task in enumerate(tasks):
        if start_deadline is not None and time.monotonic() >= start_deadline:
            return list(tasks[index:])
        if task.method is None:
            data = _seed_data(task.protocol, task.config, task.out, task.seed, progress) \
                if task.protocol == "hours" else shared_data
            run = _Run(task.protocol, task.config, data, task.out, progress, on_record)
            run.shared_cells(task.seed)
        else:
            run.method_cells(task.seed, task.method)
        on_done(task, [])
    return []


def saved_config(out: str | Path, protocol: str) -> ExperimentConfig:
    """The config a run in `out` was started with (OUT/<protocol>_config.json, without its data fingerprint)."""
    saved = _read_json(Path(out) / f"{protocol}_config.json")
    if saved is None:
        raise ExperimentError(f"{out} holds no {protocol} run: {protocol}_config.json is missing")
    return ExperimentConfig(**{k: v for k, v in saved.items() if k != "data_fingerprint"})


def load_records(out: str | Path, protocol: str) -> list[dict]:
    """All finished cell records of `protocol` under `out`; round 0 is repeated once per method that ran."""
    root = Path(out) / protocol
    records = []
    for seed_dir in sorted(root.glob("seed*")):
        shared = _read_json(seed_dir / "shared" / "round0.json")
        for method_dir in sorted(p for p in seed_dir.iterdir() if p.is_dir() and p.name != "shared"):
            rounds = sorted(method_dir.glob("round*.json"), key=lambda p: int(p.stem.removeprefix("round")))
            if shared is not None and method_dir.name != FULL_POOL and rounds:
                records.append(shared | {"method": method_dir.name})
            records.extend(json.loads(path.read_text()) for path in rounds)
    return records


def main(argv: Sequence[str] | None = None) -> int:
    from ichal.experiment_plots import write_report

    parser = argparse.ArgumentParser(prog="python -m ichal.experiment", description=__doc__.splitlines()[0])
    parser.add_argument("protocol", choices=PROTOCOLS)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="quick")
    parser.add_argument("--out", type=Path, required=True, help="run folder (records, checkpoints, CSV, PNG, table)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="default: all methods of the protocol")
    parser.add_argument("--resume", action="store_true", help="continue a run in --out, skipping finished cells")
    parser.add_argument("--report-only", action="store_true", help="rewrite CSV/PNG/table from finished cells")
    parser.add_argument("--iterations", type=int, help="training iterations per member (default: the config's)")
    parser.add_argument("--rounds", type=int, help="selection rounds after the seed set (default: the config's)")
    parser.add_argument("--seed-fraction", type=float,
                        help="share of the pool labeled at round 0 (default: the config's for the protocol)")
    parser.add_argument("--lookalike-fraction", type=float,
                        help="share of negative training patches on blood-density look-alikes (default 0.5; 0: the sampler of docs/results.md)")
    parser.add_argument("--hard-negative-fraction", type=float,
                        help=f"share of negative training patches on the member's own false positives (default {TrainSettings.hard_negative_fraction})")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (per worker)")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="where training and prediction run (default: the config's); a run may resume on another")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes running seeds' shared cells and (seed, method) round chains in parallel")
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="ray: run the cells as Ray tasks on the cluster at --address (docs/scale.md)")
    parser.add_argument("--stop-starting-after", type=float, metavar="MINUTES",
                        help="start no task later than this; started ones finish (for runs longer than a "
                             "session: continue with --resume)")
    parser.add_argument("--address", help="with --engine ray: the cluster (host:port, auto); default: a Ray "
                                          "instance on this machine")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.report_only:
        write_report(args.protocol, args.out, load_records(args.out, args.protocol))
        return 0
    try:
        config = CONFIGS[args.config]
        if args.iterations is not None:
            config = dataclasses.replace(config, iterations=args.iterations)
        if args.rounds is not None:
            config = dataclasses.replace(config, rounds=args.rounds)
        if args.lookalike_fraction is not None:
            config = dataclasses.replace(config, lookalike_fraction=args.lookalike_fraction)
        if args.hard_negative_fraction is not None:
            config = dataclasses.replace(config, hard_negative_fraction=args.hard_negative_fraction)
        if args.device is not None:
            config = dataclasses.replace(config, device=args.device)
        if config.device == "cuda" and not torch.cuda.is_available():
            raise ExperimentError(f"config {config.name!r} runs on device cuda, but torch sees no CUDA device; "
                                  "pass --device cpu")
        if args.seed_fraction is not None:
            field = f"{args.protocol}_seed_fraction"
            config = dataclasses.replace(config, **{field: args.seed_fraction})
        if args.engine == "ray":
            from ichal.cluster import ClusterError, connect

            try:
                connect(args.address)
            except ClusterError as error:
                parser.error(str(error))
        run_protocol(args.protocol, config, args.out, args.seeds, resume=args.resume, methods=args.methods,
                     workers=args.workers, threads=args.threads, engine=args.engine,
                     stop_starting_after=None if args.stop_starting_after is None else 60 * args.stop_starting_after)
    except ExperimentError as error:
        parser.error(str(error))
    print(f"wrote {args.out / f'{args.protocol}_results.csv'}, {args.protocol}_ap.png, {args.protocol}_table.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
