"""Train task: the committee on every stack with a final label, in the background (MONAI Label runs it
as a subprocess). The new ensemble replaces the old one only when training completes (atomic save)."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from monailabel.interfaces.tasks.train import TrainTask

from ichal.ensemble import save_ensemble
from ichal.io import read_nifti
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
        mode = request.get("mode", s.train_mode)
        if mode not in MODES:
            raise client_error(f"mode must be one of {MODES}, got {mode!r}")
        try:
            iterations = int(request.get("iterations", s.train_iterations))
        except (TypeError, ValueError):
            raise client_error(f"iterations must be an integer, got {request.get('iterations')!r}") from None
        datastore.reload()
        labeled = sorted(datastore.get_labeled_images())
        if not labeled:
            raise client_error("no stack has a final label yet: save at least one label before training", 409)
        previous = self.context.load_model() if mode == "continual" else None
        if mode == "continual" and previous is None:
            logger.info("continual training asked for but no model exists: training from scratch")
            mode = "retrain"
        items = []
        for image_id in labeled:
            image = read_nifti(datastore.get_image_uri(image_id))
            label = read_nifti(datastore.get_label_uri(image_id, "final"))
            items.append(TrainItem(image_id, image.array, label.array, image.spacing_mm))
        settings = TrainSettings(
            preset=s.preset, ensemble_size=s.ensemble_size, iterations=iterations, batch_size=s.train_batch_size,
            lookalike_fraction=s.train_lookalike_fraction, seed=s.seed, device=s.device, spacing_mm=s.model_spacing_mm,
        )
        started = time.time()
        self._status({"state": "RUNNING", "mode": mode, "stacks": len(items), "started": started, "pid": os.getpid(),
                      "error": None})
        last_report = [0.0]

        def progress(event: dict) -> None:
            # Throttled: one status write (and log line) every 2 s is plenty for a progress display.
            if "iteration" in event and time.time() - last_report[0] > 2.0:
                last_report[0] = time.time()
                logger.info(f"train member {event['member'] + 1}/{settings.ensemble_size} "
                            f"step {event['iteration']}/{event['iterations']} loss {event['loss']:.4f}")
                self._status({"state": "RUNNING", "progress": event})

        try:
            model = train_ensemble(items, settings, mode=mode, previous=previous, progress=progress)
            save_ensemble(model, s.model_path)
        except BaseException as error:
            self._status({"state": "FAILED", "error": str(error), "ended": time.time()})
            raise
        result = {"state": "DONE", "mode": mode, "stacks": len(items), "version": model.meta.get("version"),
                  "seconds": round(time.time() - started, 1), "metrics": model.meta.get("metrics", {}), "ended": time.time(), "progress": None}
        self._status(result)
        return result

    def _status(self, update: dict) -> None:
        def merge(status: dict) -> None:
            status.update(update)

        self.context.train_status.update(merge)
