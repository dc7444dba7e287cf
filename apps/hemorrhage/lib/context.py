"""What every task of the app shares: settings, durable state, the current model and time model."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ichal.checkout import CheckoutRegistry
from ichal.cost import LabelTimeModel, MaskFeatures, mask_features
from ichal.io import Volume
from ichal.labeling_time import EventLog, measured_times
from ichal.learning_curve import AuditPoint, CurvePoint, StoppingAdvice, advice_from_curves
from ichal.state import StateDB
from ichal.time_intervals import worklist_summary

from .settings import AppSettings

logger = logging.getLogger(__name__)


class LabelTimes:
    """The measured labeling times, one dict per saved label (image, client, seconds, saved, started,
    boundary_mm, n_components), as `read()` for the tasks that count or fit them."""

    def __init__(self, state: StateDB):
        self._state = state

    def read(self) -> list[dict[str, Any]]:
        return self._state.label_times()


class TrainStatus:
    """The current training run as one dict: `read()`, and `update(fn)` that applies `fn` (in place or
    returning a new dict) and stores the result in one transaction.

    Each run is one row of `train_runs`: a status with a `run_id` is stored as that run; without one,
    an update that changes `started` begins a new run and any other updates the current one.
    """

    def __init__(self, state: StateDB):
        self._state = state

    def read(self) -> dict[str, Any]:
        run = self._state.latest_train_run()
        return run.status() if run is not None else {}

    def update(self, fn: Callable[[dict[str, Any]], dict[str, Any] | None]) -> dict[str, Any]:
        with self._state.transaction():
            run = self._state.latest_train_run()
            status = run.status() if run is not None else {}
            result = fn(status)
            status = status if result is None else result
            if isinstance(status.get("run_id"), str):
                run_id = status["run_id"]
            elif run is not None and status.get("started") == run.started:
                run_id = run.run_id
            else:
                run_id = uuid.uuid4().hex
            self._state.save_train_run(run_id, status)
        return status


@dataclass
class AppContext:
    settings: AppSettings

    def __post_init__(self) -> None:
        self.state = StateDB.open(self.settings.state_dir)
        self.events = EventLog(self.state)
        self.checkouts = CheckoutRegistry(self.state, self.settings.checkout_minutes * 60.0)
        self.label_times = LabelTimes(self.state)
        self.train_status = TrainStatus(self.state)
        self._model_lock = threading.Lock()
        self._model_cache: tuple[float, object] | None = None

    # -- the ensemble -------------------------------------------------------------------------
    def load_model(self):
        """The current ensemble, reloaded when its file changes; None before the first training."""
        from ichal.ensemble import load_ensemble

        path = self.settings.model_path
        if not path.exists():
            return None
        with self._model_lock:
            mtime = os.stat(path).st_mtime
            if self._model_cache is None or self._model_cache[0] != mtime:
                self._model_cache = (mtime, load_ensemble(path, device=self.settings.device))
            return self._model_cache[1]

    # -- the learning curves and when to stop --------------------------------------------------
    def stopping(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], StoppingAdvice]:
        """The stored prequential and audit points (oldest first) and the stopping advice they give under the
        settings' rule: the audit curve's once it has `stop_window` points, the prequential one's before."""
        records, audit_records = self.state.curve_points(), self.state.audit_points()
        points = [CurvePoint(r["model_version"], r["hours"], r["stacks"], r["metrics"]) for r in records]
        audits = [AuditPoint.of(r) for r in audit_records]
        return records, audit_records, advice_from_curves(points, audits, self.settings.stopping_rule)

    def dashboard_data(self, datastore: Any, autolabel_running: bool = False) -> dict[str, Any]:
        """What GET /dashboard/ shows (`ichal.dashboard.dashboard_data`), from the state database and `datastore`."""
        from ichal.dashboard import dashboard_data  # matplotlib: only the server process draws

        curve, audit_points, advice = self.stopping()
        worklists = []
        for client, snapshot in self.state.latest_serves().items():
            worklist = snapshot.get("worklist")
            if not worklist:  # a review serve: one machine label, no worklist
                continue
            ids = [item["id"] for item in worklist.get("items", [])]
            worklists.append({"client": client, "strategy": worklist.get("strategy"), "ids": ids,
                              "labeled": [i for i in ids if datastore.has_final_label(i)],
                              "predicted_minutes": worklist.get("predicted_seconds", 0.0) / 60.0,
                              "budget_minutes": worklist.get("budget_seconds", 0.0) / 60.0})
        runs = [{"state": run.state, "mode": run.document.get("mode"), "stacks": run.document.get("stacks"),
                 "version": run.document.get("version"), "seconds": run.document.get("seconds"),
                 "started_iso": time.strftime("%Y-%m-%d %H:%M", time.gmtime(run.started)) if run.started else None}
                for run in self.state.train_runs()]
        busy = autolabel_running or self.train_status.read().get("state") == "RUNNING"
        return dashboard_data(curve, audit_points, advice, self.label_times.read(), self.state.review_times(), worklists, runs, busy)

    # -- labeling time ------------------------------------------------------------------------
    def time_model(self) -> LabelTimeModel:
        """The fitted labeling-time model; the literature prior until enough times are measured."""
        if self.settings.time_model_path.exists():
            return LabelTimeModel.load(self.settings.time_model_path)
        return LabelTimeModel(min_samples=self.settings.min_time_samples).fit(np.zeros((0, 2)), np.zeros(0))

    def record_saved_label(self, image_id: str, client: str, label: Volume) -> dict | None:
        """A final label was saved: log it, end the stack's check-out, turn the client's session into
        measured seconds (one record per session), refit the time model. `label`: the saved mask, whose
        boundary and components are the time model's features. Returns the time record, None when the
        save followed no serve (nothing to measure) or was a review (its time goes to `review_times`)."""
        features = mask_features(label.array.astype(np.float32), label.spacing_mm)
        # One transaction (one sync) for the event, the time record and the check-out: all or none.
        with self.state.transaction():
            self.events.record(client, image_id, "saved")
            self.checkouts.release(image_id)
            # A session involves only this client's events on this image: no need to replay the whole history.
            sessions = measured_times(self.events.events(client, image_id), self.settings.idle_limit_seconds)
            if not sessions:
                return None
            latest = sessions[-1]
            at_serve = self.state.serve_snapshot(client, image_id, latest.saved)
            if (at_serve or {}).get("strategy") == "review":
                # An accepted or corrected machine label: a review time, kept apart from labeling times.
                self.state.upsert_review_time(image_id, client, latest.started, latest.saved, latest.seconds)
                return None
            record = {
                "image": image_id,
                "client": client,
                "seconds": latest.seconds,
                "saved": latest.saved,
                "started": latest.started,
                "boundary_mm": features.boundary_mm,
                "n_components": features.n_components,
            }
            if at_serve is not None:
                record["at_serve"] = worklist_summary(at_serve)
            # A second save after the same serve measures the same session: it updates that record, not adds one.
            self.state.upsert_label_time(record)
            records = self.state.label_times()
        model = LabelTimeModel(min_samples=self.settings.min_time_samples).fit(
            [MaskFeatures(r["boundary_mm"], r["n_components"]) for r in records],
            np.array([r["seconds"] for r in records]),
        )
        model.save(self.settings.time_model_path)
        logger.info(f"labeling time recorded: {latest.seconds:.0f} s; time model n={model.n_} source={model.source_}")
        return record
