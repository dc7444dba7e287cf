"""Train task: the committee on every stack with a final label but the withheld audit stacks, in the
background (MONAI Label runs it as a subprocess). The new ensemble replaces the old one only when training
completes (atomic save); then the old and new committees are scored on the audit stacks it was not trained on."""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from monailabel.interfaces.tasks.train import TrainTask

from ichal.ensemble import save_ensemble
from ichal.io import read_nifti
from ichal.prequential import audit_point, batch_metrics, trained_hours
from ichal.train import MODES, TrainItem, TrainSettings, train_ensemble

from .context import AppContext
from .errors import client_error

logger = logging.getLogger(__name__)


def _alive(pid: object) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


MAX_ITERATIONS = 1_000_000


def parse_train_request(request: dict, settings: Any) -> tuple[str, int]:
    """(mode, iterations) of a training request, defaults from `settings`; a 400 naming the bad field.

    Called by the server before it starts the training subprocess, so a bad request is refused at
    once instead of being accepted and failing later (issue 16, item 6), and again in the subprocess."""
    mode = request.get("mode", settings.train_mode)
    if mode not in MODES:
        raise client_error(f"mode must be one of {list(MODES)}, got {mode!r}")
    iterations = request.get("iterations", settings.train_iterations)
    if isinstance(iterations, str) and iterations.strip().isdigit():
        iterations = int(iterations)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or not 1 <= iterations <= MAX_ITERATIONS:
        raise client_error(f"iterations must be a whole number of optimizer steps from 1 to {MAX_ITERATIONS}, got {iterations!r}")
    return mode, iterations


class EnsembleTrain(TrainTask):
    def __init__(self, context: AppContext):
        super().__init__("PatchFCN committee (retrain from scratch or continual fine-tuning)")
        self.context = context

    def config(self) -> dict:
        s = self.context.settings
        return {"mode": s.train_mode, "iterations": s.train_iterations, "ensemble_size": s.ensemble_size}

    def stats(self) -> dict:
        status = self.context.train_status.read()
        if status.get("state") == "RUNNING" and not _alive(status.get("pid")):
            # The run was stopped (DELETE /train/) or killed before it could say so; its model was never saved.
            status["state"] = "STOPPED"
        return status

    def __call__(self, request: dict, datastore: Any) -> dict:
        s = self.context.settings
        mode, iterations = parse_train_request(request, s)
        datastore.reload()
        labeled = sorted(datastore.get_labeled_images())
        if not labeled:
            raise client_error("no stack has a final label yet: save at least one label before training", 409)
        current = self.context.load_model()
        previous = current if mode == "continual" else None
        if mode == "continual" and previous is None:
            logger.info("continual training asked for but no model exists: training from scratch")
            mode = "retrain"
        # Labeled audit stacks wait for a committee trained without them. Before the first committee there is
        # none to compare with: they are trained on, and released with the first committee.
        audit_ids = sorted(set(labeled) & {a["image"] for a in self.context.state.audits("withheld")})
        withheld = audit_ids if current is not None else []
        items = [self._train_item(datastore, image_id) for image_id in labeled if image_id not in withheld]
        if not items:
            raise client_error(f"every labeled stack is an audit stack withheld until a committee trained without "
                               f"it scores it ({len(withheld)}): label a worklist's other stacks before training", 409)
        if current is not None:
            self._score_new_batch(current, items)
        settings = TrainSettings(
            preset=s.preset, ensemble_size=s.ensemble_size, iterations=iterations, batch_size=s.train_batch_size,
            lookalike_fraction=s.train_lookalike_fraction, hard_negative_fraction=s.train_hard_negative_fraction, seed=s.seed, device=s.device, spacing_mm=s.model_spacing_mm,
        )
        started = time.time()
        run_id = uuid.uuid4().hex
        # The newest started run owns the model file: an older run still going (an orphan of a killed
        # server) finds another run_id at its commit and discards its model instead of replacing a newer one.
        # A fresh document, not a merge: a failing run must not show the previous run's version and metrics.
        self.context.train_status.update(lambda _: {"state": "RUNNING", "run_id": run_id, "mode": mode, "stacks": len(items),
                                                    "withheld_audit_stacks": len(withheld), "started": started,
                                                    "pid": os.getpid(), "error": None, "progress": None})
        last_report = [0.0]

        def progress(event: dict) -> None:
            # Throttled: one status write (and log line) every 2 s is plenty for a progress display.
            if "iteration" in event and time.time() - last_report[0] > 2.0:
                last_report[0] = time.time()
                logger.info(f"train member {event['member'] + 1}/{settings.ensemble_size} "
                            f"step {event['iteration']}/{event['iterations']} loss {event['loss']:.4f}")
                self._status({"state": "RUNNING", "progress": event}, run_id)

        candidate = s.model_path.with_name(f"{s.model_path.name}.{run_id}.candidate")
        try:
            if s.engine == "ray":
                # Members in parallel, each by DDP over a node's devices (docs/scale.md); no per-step progress.
                from ichal.cluster import connect, train_on_ray

                connect(s.ray_address or None)
                model = train_on_ray(items, settings, mode=mode, previous=previous)
            else:
                model = train_ensemble(items, settings, mode=mode, previous=previous, progress=progress)
            save_ensemble(model, candidate)
        except BaseException as error:
            candidate.unlink(missing_ok=True)
            self._status({"state": "FAILED", "error": str(error), "ended": time.time()}, run_id)
            raise
        result = {"state": "DONE", "mode": mode, "stacks": len(items), "withheld_audit_stacks": len(withheld),
                  "version": model.meta.get("version"),
                  "seconds": round(time.time() - started, 1), "metrics": model.meta.get("metrics", {}), "ended": time.time(), "progress": None}
        if not self._commit(candidate, run_id, result):
            logger.warning(f"training run {run_id[:8]} was superseded by a newer run: its model is discarded")
            return {**result, "state": "SUPERSEDED"}
        if withheld:
            self._score_audits(current, model, [self._train_item(datastore, image_id) for image_id in withheld])
        self.context.state.release_audits(audit_ids, model.meta["version"])
        return result

    @staticmethod
    def _train_item(datastore: Any, image_id: str) -> TrainItem:
        """Stack `image_id` with its final label."""
        image = read_nifti(datastore.get_image_uri(image_id))
        label = read_nifti(datastore.get_label_uri(image_id, "final"))
        return TrainItem(image_id, image.array, label.array, image.spacing_mm)

    def _score_audits(self, old: Any, new: Any, audit_stacks: list[TrainItem]) -> None:
        """One audit point (issue 20): committee `old` (serving when the training started) and `new` (trained
        without `audit_stacks`) scored on them, stored with their paired gains. Reviewed machine labels are
        left out: the old committee drew them itself."""
        reviewed = {record["image"] for record in self.context.state.review_times()}
        scored = [item for item in audit_stacks if item.id not in reviewed]
        if not scored:
            return
        s = self.context.settings
        point = audit_point(old, new, scored, self.context.label_times.read(), device=s.device, overlap=s.overlap)
        self.context.state.save_audit_point({**asdict(point), "gains": point.gains(), "images": [item.id for item in scored]})
        logger.info(f"audit point: {point.old_version[:12]} -> {point.new_version[:12]} on {len(scored)} audit stacks: "
                    f"gains {point.gains()}")

    def _score_new_batch(self, model: Any, items: list[TrainItem]) -> None:
        """One point of the prequential curve (issue 20): the serving committee scored on the labels saved
        since it was trained, before they are trained on. Reviewed machine labels are left out: the
        committee drew them itself; so are audit stacks, withheld or released: drawn at random, not picked."""
        seen = set(model.meta["train_ids"])
        reviewed = {record["image"] for record in self.context.state.review_times()}
        audits = {record["image"] for record in self.context.state.audits()}
        left_out = seen | reviewed | audits
        batch = [item for item in items if item.id not in left_out]
        if not batch:
            return
        hours, unmeasured = trained_hours(self.context.label_times.read(), seen)
        metrics = batch_metrics(model, batch, device=self.context.settings.device, overlap=self.context.settings.overlap)
        self.context.state.save_curve_point(model.meta["version"], hours, len(batch), {
            "metrics": metrics, "images": [item.id for item in batch], "trained_stacks": len(seen),
            "unmeasured_stacks": unmeasured})
        logger.info(f"prequential point: committee {model.meta['version'][:12]} ({hours:.2f} h) on {len(batch)} new stacks: {metrics}")

    def _commit(self, candidate: Path, run_id: str, result: dict) -> bool:
        """Rename `candidate` over the served model only if `run_id` is still the newest run; checked and
        renamed under the train-status lock, so no newer run can start in between."""
        committed = [False]

        def commit(status: dict) -> None:
            if status.get("run_id") != run_id:
                candidate.unlink(missing_ok=True)
                return
            os.replace(candidate, self.context.settings.model_path)
            status.update(result)
            committed[0] = True

        self.context.train_status.update(commit)
        return committed[0]

    def _status(self, update: dict, run_id: str | None = None) -> None:
        """Merge `update` into the train status; with `run_id`, only while that run is still the newest."""
        def merge(status: dict) -> None:
            if run_id is None or status.get("run_id") == run_id:
                status.update(update)

        self.context.train_status.update(merge)
