"""Active-learning strategies: a budgeted worklist and the next stack for the asking annotator.

Each strategy ranks the unlabeled stacks that nobody else holds, picks a worklist whose total time stays
within the budget with the asked confidence (`ichal.selection`, `ichal.time_intervals`), audit stacks drawn
at random included, checks its first free stack out to the client and logs that it was served with what
the app knew. The client's next request with the same strategy, budget, confidence and audit stacks
continues that worklist until it is labeled.
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from monailabel.interfaces.tasks.strategy import Strategy

from ichal.selection import (
    Selection,
    acft_select,
    cold_start_select,
    draw_audit_stacks,
    knapsack_select,
    random_select,
    select_with_audits,
    uncertainty_select,
)

from ichal.time_intervals import (IntervalError, LogErrorModel, applied_confidence, batch_outcomes, check_confidence,
                                  confidence_offset, log_error_model, select_within_budget_at_applied_confidence)
from .autolabel import MACHINE_TAG
from .context import AppContext
from .errors import client_error
from .scoring import SCORE_KEY, current_scores, image_features, scoring_in_progress

logger = logging.getLogger(__name__)


MAX_BUDGET_MINUTES = 7 * 24 * 60


def budget_seconds_from(request: dict, default_minutes: float) -> float:
    """The worklist budget in seconds from `budget_minutes` (a number of minutes, at most a week); 400 otherwise."""
    raw = request.get("budget_minutes", default_minutes)
    if isinstance(raw, bool):
        # bool is an int in Python: `true` would silently mean 1 minute.
        raise client_error(f"budget_minutes must be a number of minutes, got {raw!r}")
    try:
        minutes = float(raw)
    except (TypeError, ValueError, OverflowError):
        raise client_error(f"budget_minutes must be a number of minutes, got {raw!r}") from None
    if not math.isfinite(minutes) or not 0 < minutes <= MAX_BUDGET_MINUTES:
        raise client_error(f"budget_minutes must be a positive number of minutes up to {MAX_BUDGET_MINUTES} (a week), got {raw!r}")
    return minutes * 60.0


def confidence_from(request: dict, default: float) -> float:
    """The worklist's confidence (probability that its total time stays within the budget); 400 outside (0, 1)."""
    raw = request.get("confidence", default)
    try:
        return check_confidence(float(raw) if isinstance(raw, str) else raw)
    except (IntervalError, ValueError):
        raise client_error(f"confidence must be a probability strictly between 0 and 1 (e.g. 0.8), got {raw!r}") from None


def audit_stacks_from(request: dict, default: int) -> int:
    """How many random audit stacks a worklist includes, from `audit_stacks` (a whole number >= 0); 400 otherwise."""
    raw = request.get("audit_stacks", default)
    if isinstance(raw, str) and raw.strip().isdigit():
        raw = int(raw)
    # bool is an int in Python: `true` would silently mean 1 stack.
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise client_error(f"audit_stacks must be a whole number of stacks, 0 or more (0: no audit), got {raw!r}")
    return raw


@dataclass(frozen=True)
class WorklistRequest:
    """What a worklist request asks for; a request asking the same continues the client's open worklist."""

    budget_seconds: float
    confidence: float
    audit_stacks: int


@dataclass(frozen=True)
class TimeEstimate:
    """Per-stack labeling seconds: median, expected (bias-corrected mean), and the central interval;
    `raw_median_seconds` is the time model's own prediction, before recalibration."""

    median_seconds: np.ndarray
    expected_seconds: np.ndarray
    low_seconds: np.ndarray
    high_seconds: np.ndarray
    errors: LogErrorModel

    raw_median_seconds: np.ndarray

    @classmethod
    def of(cls, raw_medians: np.ndarray, errors: LogErrorModel, confidence: float) -> "TimeEstimate":
        """From the time model's raw medians, recalibrated on the served stacks' measured times."""
        medians = np.exp(errors.adjust(np.log(raw_medians)))
        low, high = errors.interval(confidence)
        return cls(medians, medians * errors.mean_factor(), medians * np.exp(low), medians * np.exp(high), errors,
                   raw_medians)


class BudgetedStrategy(Strategy):
    """One named selector (cost_sensitive, uncertainty, random, acft, cold_start) under a time budget."""

    NEEDS_SCORES = {"cost_sensitive": True, "uncertainty": True, "acft": True, "random": False, "cold_start": False}

    def __init__(self, name: str, context: AppContext, description: str):
        super().__init__(description)
        self.name = name
        self.context = context

    def info(self) -> dict:
        # `config` is what clients that show per-task options (e.g. 3D Slicer's Options section) offer to edit.
        s = self.context.settings
        return {**super().info(), "config": {"budget_minutes": s.budget_minutes, "audit_stacks": s.audit_stacks}}

    # Annotators asking at the same moment get similar worklists; one that loses every stack of its worklist
    # to the others between ranking and check-out ranks again (without this, 1 of 8 benchmark annotators
    # was told "nothing left" with 70 stacks unlabeled).
    CLAIM_ATTEMPTS = 5

    def __call__(self, request: dict, datastore: Any) -> dict:
        s = self.context.settings
        asked = WorklistRequest(budget_seconds_from(request, s.budget_minutes), confidence_from(request, s.budget_confidence),
                                audit_stacks_from(request, s.audit_stacks))
        client = str(request.get("client_id") or "anonymous")
        for _ in range(self.CLAIM_ATTEMPTS):
            answer = self._serve(client, asked, datastore)
            if answer is not None:
                return answer
        raise client_error("every stack of your worklist was just taken by other annotators: ask again", status=409)

    def _serve(self, client: str, asked: WorklistRequest, datastore: Any) -> dict | None:
        """The client's open worklist continued, or a new one picked: check its first free unlabeled stack
        out to `client`; the answer. {} when no unlabeled stack is free; None when others took every
        stack of a new worklist meanwhile."""
        datastore.reload()
        worklist = self._open_worklist(client, asked)
        if worklist is not None:
            answer = self._claim(client, worklist, datastore)
            if answer is not None:
                return answer
        worklist = self._new_worklist(client, asked, datastore)
        return worklist if not worklist else self._claim(client, worklist, datastore)

    def _open_worklist(self, client: str, asked: WorklistRequest) -> dict | None:
        """The worklist last served to `client` when this request asks for the same one (strategy, budget,
        confidence, audit stacks): a worklist is worked through as promised, so its total can be checked
        against the measured minutes (`/info/` time_model.calibration). A different request starts a new worklist."""
        last = self.context.state.latest_serve(client)
        worklist = (last or {}).get("worklist")
        # A worklist served before audit stacks existed has no `audit_stacks`: it is not continued.
        if not worklist or (worklist["strategy"], worklist["budget_seconds"], worklist["confidence"],
                            worklist.get("audit_stacks")) != (self.name, asked.budget_seconds, asked.confidence, asked.audit_stacks):
            return None
        return worklist

    def _new_worklist(self, client: str, asked: WorklistRequest, datastore: Any) -> dict:
        """Rank the unlabeled stacks nobody else holds and pick a worklist whose total stays within the
        budget with probability `confidence`: `asked.audit_stacks` of them drawn uniformly at random from
        all those stacks (fewer when they do not fit), the strategy's picks under the budget left; {} when
        no unlabeled stack is free."""
        held = self.context.checkouts.held_by_others(client)
        free = sorted(i for i in datastore.get_unlabeled_images() if i not in held)
        if not free:
            return {}
        model = self.context.load_model()
        scores = current_scores(datastore, free, model)
        unscored = [i for i in free if i not in scores]
        # Drawn before the strategy looks: an audit stack must be random, not one the committee would pick.
        drawn = draw_audit_stacks(len(free), asked.audit_stacks, self.context.settings.seed, self.context.state.serves_recorded())
        audit_ids = [free[i] for i in drawn]
        candidates = [i for i in free if i not in audit_ids]
        if self.NEEDS_SCORES[self.name]:
            if not scores:
                remedy = ("the committee is scoring the pool now: ask again in a minute" if scoring_in_progress() else
                          "no unlabeled stack is scored by the current model yet: train (POST /train/hemorrhage), "
                          "score (POST /scoring/committee)")
                raise client_error(f"strategy '{self.name}' needs committee scores and {remedy}, or use 'cold_start'",
                                   status=409)
            candidates = [i for i in candidates if i in scores]
        ids = audit_ids + candidates  # the audits are indices 0 .. len(audit_ids) - 1
        records = self.context.label_times.read()
        estimate = self._time_estimate(ids, scores, asked.confidence, records)
        # The batch total's quantile: the asked confidence, raised while this site's worklists overran their
        # budgets more often than 1 - confidence (`ichal.time_intervals.confidence_offset`).
        applied = applied_confidence(asked.confidence,
                                     confidence_offset(batch_outcomes(records), self.context.settings.confidence_step))
        values = np.array([scores[i]["value"] if i in scores else 0.0 for i in ids])

        def select_rest(rest: np.ndarray, times: np.ndarray, budget: float) -> np.ndarray:
            return self._select([ids[k] for k in rest], values[rest], times, budget, datastore).indices

        def select(times: np.ndarray, budget: float) -> np.ndarray:
            return select_with_audits(times, budget, np.arange(len(audit_ids)), select_rest)

        picked, total_high, applied = select_within_budget_at_applied_confidence(
            select, estimate.median_seconds, asked.budget_seconds, estimate.errors, asked.confidence, applied,
            seed=self.context.settings.seed)
        if not len(picked):
            quickest = float(estimate.high_seconds.min()) / 60
            raise client_error(
                f"no unlabeled stack fits a budget of {asked.budget_seconds / 60:.1f} min at confidence {asked.confidence}: "
                f"the quickest may take up to {quickest:.1f} min; raise budget_minutes or lower confidence",
                status=422,
            )
        time_model_source = self.context.time_model().describe()["source"]
        return {
            "id": uuid.uuid4().hex,
            "strategy": self.name,
            "budget_seconds": asked.budget_seconds,
            "confidence": asked.confidence,
            "applied_confidence": applied,
            "audit_stacks": asked.audit_stacks,
            "committee_version": None if model is None else model.meta["version"],
            "predicted_seconds": float(estimate.expected_seconds[picked].sum()),
            "high_seconds": total_high,
            "time_model_source": time_model_source,
            "interval_source": "measured" if estimate.errors.empirical else "prior",
            "unscored": len(unscored),
            "items": [self._item(ids[i], scores, estimate, i, float(values[i]), audit=i < len(audit_ids)) for i in picked.tolist()],
        }

    @staticmethod
    def _item(image_id: str, scores: dict[str, dict], estimate: "TimeEstimate", index: int, value: float,
              audit: bool) -> dict:
        """One worklist stack as the app saw it when it picked it: kept with its serve and joined to the
        measured seconds at save (issue 17: the time model learns from what it sees at pick time)."""
        score = scores.get(image_id, {})
        return {
            "id": image_id,
            "value": value,
            # Drawn at random, not picked: withheld from the next training, scored before and after it.
            "audit": audit,
            "model_version": score.get("model_version"),
            "predicted_boundary_mm": score.get("boundary_mm"),
            "predicted_n_components": score.get("n_components"),
            # Only the time model's predictions on committee masks feed the next recalibration.
            "predicted_from": "committee" if image_id in scores else "site median",
            "predicted_seconds": float(estimate.expected_seconds[index]),
            # Raw: what the next recalibration regresses on; served: what this worklist was built on.
            "predicted_log_seconds": float(np.log(estimate.raw_median_seconds[index])),
            "served_log_seconds": float(np.log(estimate.median_seconds[index])),
            "predicted_seconds_low": float(estimate.low_seconds[index]),
            "predicted_seconds_high": float(estimate.high_seconds[index]),
        }

    def _claim(self, client: str, worklist: dict, datastore: Any) -> dict | None:
        """Check out to `client` the first stack of `worklist` that is unlabeled and free, log the serve with
        what the app knew; the answer, or None when none is left."""
        # The check-out and its `served` event in one transaction (one sync): never one without the other.
        with self.context.state.transaction():
            remaining = [item for item in worklist["items"] if not datastore.has_final_label(item["id"])]
            while True:
                next_id = self.context.checkouts.checkout_first_free(client, [item["id"] for item in remaining])
                if next_id is None:
                    return None
                # Another annotator may have saved it since we ranked: a save stores the label before it
                # releases the check-out, so a stack free now but labeled shows up here, never served twice.
                if not datastore.has_final_label(next_id):
                    break
                self.context.checkouts.release(next_id)
                remaining = [item for item in remaining if item["id"] != next_id]
            served = self.context.events.record(client, next_id, "served")
            item = next(item for item in remaining if item["id"] == next_id)
            self.context.state.record_serve(served.ts, client, next_id, {
                **{key: value for key, value in item.items() if key != "id"},
                "strategy": self.name, "budget_seconds": worklist["budget_seconds"], "confidence": worklist["confidence"],
                "time_model_source": worklist["time_model_source"], "worklist": worklist,
            })
            if item["audit"]:
                self.context.state.record_audit_serve(next_id, served.ts, worklist["committee_version"], client, worklist["id"])
            else:
                self.context.state.forget_withheld_audit(next_id)
        return {
            "id": next_id,
            "strategy": self.name,
            "client_id": client,
            "budget_minutes": worklist["budget_seconds"] / 60.0,
            "worklist_id": worklist["id"],
            # The stacks of the worklist still to label, this one included.
            "worklist": [
                {"id": item["id"], "value": item["value"], "audit": item["audit"]} | {
                    name: round(item[f"predicted_{key}"] / 60.0, 2)
                    for name, key in (("predicted_minutes", "seconds"), ("predicted_minutes_low", "seconds_low"),
                                      ("predicted_minutes_high", "seconds_high"))}
                for item in remaining
            ],
            # The whole worklist as picked: the promise /info/'s calibration checks against measured minutes.
            "total_predicted_minutes": round(worklist["predicted_seconds"] / 60.0, 2),
            "total_minutes_high": round(worklist["high_seconds"] / 60.0, 2),
            "confidence": worklist["confidence"],
            # The quantile `total_minutes_high` is at: `confidence`, raised after this site's overruns. A worklist
            # served before the rule was at `confidence`.
            "applied_confidence": worklist.get("applied_confidence", worklist["confidence"]),
            "total_value": float(sum(item["value"] for item in worklist["items"])),
            "time_model": worklist["time_model_source"],
            "interval_source": worklist["interval_source"],
            "unscored": worklist["unscored"],
        }

    def _time_estimate(self, ids: list[str], scores: dict[str, dict], confidence: float, records: list[dict]) -> "TimeEstimate":
        """Median, expected, low and high seconds per stack. Medians: the time model on committee features;
        for stacks no model has seen, the median measured labeling time at this site, or
        `unscored_stack_minutes` before any is measured. Spread and bias: the log errors of what the app
        predicted for the stacks it served before (`records`, `ichal.time_intervals`)."""
        time_model = self.context.time_model()
        features = np.array([[scores[i]["boundary_mm"], scores[i]["n_components"]] for i in ids if i in scores])
        predicted = iter(np.exp(time_model.predict_log(features)) if len(features) else [])
        measured = [r["seconds"] for r in records]
        unseen = float(np.median(measured)) if measured else self.context.settings.unscored_stack_minutes * 60.0
        medians = np.array([next(predicted) if i in scores else unseen for i in ids], dtype=np.float64)
        return TimeEstimate.of(medians, log_error_model(records, time_model.residual_std_), confidence)

    def _select(self, ids, values, seconds, budget_seconds, datastore) -> Selection:
        rng = np.random.default_rng(self.context.settings.seed + len(ids))
        selectors: dict[str, Callable[[], Selection]] = {
            "cost_sensitive": lambda: knapsack_select(values, seconds, budget_seconds),
            "uncertainty": lambda: uncertainty_select(values, seconds, budget_seconds),
            "random": lambda: random_select(seconds, budget_seconds, rng, values=values),
            "acft": lambda: acft_select(self._acft(ids, datastore), seconds, budget_seconds, rng),
            "cold_start": lambda: cold_start_select(self._feature_matrix(ids, datastore), seconds, budget_seconds, rng),
        }
        return selectors[self.name]()

    @staticmethod
    def _feature_matrix(ids: list[str], datastore: Any) -> np.ndarray:
        """Rows of cheap image features in `ids` order; the scoring task usually computed them already."""
        features = image_features(datastore, ids)
        return np.array([features[i] for i in ids], dtype=np.float64)

    @staticmethod
    def _acft(ids: list[str], datastore: Any) -> np.ndarray:
        infos = datastore.image_infos(ids)
        return np.array([infos[i][SCORE_KEY]["acft"] for i in ids])


class ReviewStrategy(Strategy):
    """`review`: the next machine label (POST /autolabel/) to accept or correct, most committee disagreement
    first (the current committee's stored score; unscored stacks last). Saving the final label records a
    review time, not a labeling time (`AppContext.record_saved_label`)."""

    def __init__(self, context: AppContext):
        super().__init__(REVIEW_DESCRIPTION)
        self.context = context

    def __call__(self, request: dict, datastore: Any) -> dict:
        client = str(request.get("client_id") or "anonymous")
        datastore.reload()
        machine = datastore.labels_tagged(MACHINE_TAG)
        held = self.context.checkouts.held_by_others(client)
        pending = [i for i in datastore.get_unlabeled_images() if i in machine and i not in held]
        if not pending:
            return {}
        scores = current_scores(datastore, pending, self.context.load_model())
        ordered = sorted(pending, key=lambda i: (-scores[i]["value"] if i in scores else math.inf, i))
        with self.context.state.transaction():
            image_id = self.context.checkouts.checkout_first_free(client, ordered)
            if image_id is None:
                raise client_error("every machine label left to review was just taken by other annotators: ask again", 409)
            served = self.context.events.record(client, image_id, "served")
            value = scores.get(image_id, {}).get("value")
            self.context.state.record_serve(served.ts, client, image_id, {
                "strategy": "review", "value": value, "machine_model_version": machine[image_id].get("model_version")})
        return {"id": image_id, "strategy": "review", "client_id": client, "label_tag": MACHINE_TAG,
                "value": value, "machine_model_version": machine[image_id].get("model_version"),
                "to_review": len(pending)}


REVIEW_DESCRIPTION = "Review machine labels (POST /autolabel/): accept or correct, most committee disagreement first"

STRATEGY_DESCRIPTIONS = {
    "cost_sensitive": "Most committee disagreement per labeling minute: exact 0/1 knapsack under the budget",
    "uncertainty": "Most committee disagreement first (uniform cost), added while it fits the budget",
    "random": "Random stacks, added while they fit the budget",
    "acft": "ACFT: entropy + diversity of the top patches, sampled from the top 5x candidates",
    "cold_start": "No model needed: diverse stacks by k-center on cheap image features",
}
