"""Active-learning strategies: a budgeted worklist and the next stack for the asking annotator.

Each strategy ranks the unlabeled stacks that nobody else holds, picks a worklist that fits the budget
(`ichal.selection`), checks its first free stack out to the client and logs that it was served.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import numpy as np
from monailabel.interfaces.tasks.strategy import Strategy

from ichal.selection import (
    Selection,
    acft_select,
    cold_start_select,
    knapsack_select,
    random_select,
    uncertainty_select,
)

from .context import AppContext
from .errors import client_error
from .scoring import SCORE_KEY, current_scores, image_features

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


class BudgetedStrategy(Strategy):
    """One named selector (cost_sensitive, uncertainty, random, acft, cold_start) under a time budget."""

    NEEDS_SCORES = {"cost_sensitive": True, "uncertainty": True, "acft": True, "random": False, "cold_start": False}

    def __init__(self, name: str, context: AppContext, description: str):
        super().__init__(description)
        self.name = name
        self.context = context

    def info(self) -> dict:
        # `config` is what clients that show per-task options (e.g. 3D Slicer's Options section) offer to edit.
        return {**super().info(), "config": {"budget_minutes": self.context.settings.budget_minutes}}

    # Annotators asking at the same moment get similar worklists; one that loses every stack of its worklist
    # to the others between ranking and check-out ranks again (without this, 1 of 8 benchmark annotators
    # was told "nothing left" with 70 stacks unlabeled).
    CLAIM_ATTEMPTS = 5

    def __call__(self, request: dict, datastore: Any) -> dict:
        budget_seconds = budget_seconds_from(request, self.context.settings.budget_minutes)
        client = str(request.get("client_id") or "anonymous")
        for _ in range(self.CLAIM_ATTEMPTS):
            answer = self._serve(client, budget_seconds, datastore)
            if answer is not None:
                return answer
        raise client_error("every stack of your worklist was just taken by other annotators: ask again", status=409)

    def _serve(self, client: str, budget_seconds: float, datastore: Any) -> dict | None:
        """Rank, pick the worklist, check its first free stack out to `client`: the answer; {} when no
        unlabeled stack is free; None when others took every stack of the worklist meanwhile."""
        datastore.reload()
        held = self.context.checkouts.held_by_others(client)
        ids = sorted(i for i in datastore.get_unlabeled_images() if i not in held)
        if not ids:
            return {}
        model = self.context.load_model()
        scores = current_scores(datastore, ids, model)
        unscored = [i for i in ids if i not in scores]
        if self.NEEDS_SCORES[self.name]:
            ids = [i for i in ids if i in scores]
            if not ids:
                raise client_error(
                    f"strategy '{self.name}' needs committee scores and no unlabeled stack is scored by the current "
                    "model yet: train (POST /train/hemorrhage), score (POST /scoring/committee), or use 'cold_start'",
                    status=409,
                )
        seconds = self._predicted_seconds(ids, scores)
        values = np.array([scores[i]["value"] if i in scores else 0.0 for i in ids])
        selection = self._select(ids, values, seconds, budget_seconds, datastore)
        order = [ids[i] for i in selection.indices]
        if not order:
            raise client_error(
                f"no unlabeled stack fits a budget of {budget_seconds / 60:.1f} min: the quickest is predicted "
                f"to take {seconds.min() / 60:.1f} min",
                status=422,
            )
        # The check-out and its `served` event in one transaction (one sync): never one without the other.
        with self.context.state.transaction():
            while True:
                next_id = self.context.checkouts.checkout_first_free(client, order)
                if next_id is None:
                    return None
                # Another annotator may have saved it since we ranked: a save stores the label before it
                # releases the check-out, so a stack free now but labeled shows up here, never served twice.
                if not datastore.has_final_label(next_id):
                    break
                self.context.checkouts.release(next_id)
                order = [i for i in order if i != next_id]
            served = self.context.events.record(client, next_id, "served")
            self.context.state.record_serve(served.ts, client, next_id, self._snapshot(next_id, ids, seconds, scores, budget_seconds))
        worklist = [
            {"id": ids[i], "predicted_minutes": round(float(seconds[i]) / 60.0, 2), "value": float(values[i])}
            for i in selection.indices
        ]
        return {
            "id": next_id,
            "strategy": self.name,
            "client_id": client,
            "budget_minutes": budget_seconds / 60.0,
            "worklist": worklist,
            "total_predicted_minutes": round(selection.total_seconds / 60.0, 2),
            "total_value": selection.total_value,
            "time_model": self.context.time_model().describe()["source"],
            "unscored": len(unscored),
        }

    def _snapshot(self, image_id: str, ids: list[str], seconds: np.ndarray, scores: dict[str, dict], budget_seconds: float) -> dict:
        """What the app knew when it picked `image_id`: stored with the serve, joined to the measured
        seconds at save (issue 17: the time model should learn from what it sees at pick time)."""
        score = scores.get(image_id, {})
        return {
            "strategy": self.name,
            "budget_seconds": budget_seconds,
            "predicted_seconds": float(seconds[ids.index(image_id)]),
            "time_model_source": self.context.time_model().describe()["source"],
            "model_version": score.get("model_version"),
            "predicted_boundary_mm": score.get("boundary_mm"),
            "predicted_n_components": score.get("n_components"),
            "value": score.get("value"),
        }

    def _predicted_seconds(self, ids: list[str], scores: dict[str, dict]) -> np.ndarray:
        """Seconds per stack: the time model on committee features; for stacks no model has seen, the
        median measured labeling time at this site, or `unscored_stack_minutes` before any is measured."""
        features = np.array([[scores[i]["boundary_mm"], scores[i]["n_components"]] for i in ids if i in scores])
        predicted = iter(self.context.time_model().predict(features) if len(features) else [])
        measured = [r["seconds"] for r in self.context.label_times.read()]
        unseen = float(np.median(measured)) if measured else self.context.settings.unscored_stack_minutes * 60.0
        return np.array([next(predicted) if i in scores else unseen for i in ids], dtype=np.float64)

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


STRATEGY_DESCRIPTIONS = {
    "cost_sensitive": "Most committee disagreement per labeling minute: exact 0/1 knapsack under the budget",
    "uncertainty": "Most committee disagreement first (uniform cost), added while it fits the budget",
    "random": "Random stacks, added while they fit the budget",
    "acft": "ACFT: entropy + diversity of the top patches, sampled from the top 5x candidates",
    "cold_start": "No model needed: diverse stacks by k-center on cheap image features",
}
