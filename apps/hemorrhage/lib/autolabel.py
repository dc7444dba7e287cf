"""Auto-label the rest (issue 20; "AL is 90% effective": label until the curve flattens, then review).

`POST /autolabel/` pre-labels every stack without a final label with the current committee, in a thread
of the server, and stores each as a label tagged `machine`. Training reads `final` labels only, and a
machine label gets no time record, so machine labels never mix with radiologists'. The `review`
strategy serves them for accept/correct; the saved final label's time is a review time (`review_times`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable

from .context import AppContext
from .errors import client_error

logger = logging.getLogger(__name__)

MACHINE_TAG = "machine"


class AutoLabeler:
    """One auto-labeling run at a time; `status()` says how far it got. `infer(image_id) -> (path, result)`
    runs the committee's label task on one datastore image (a temp file the caller removes)."""

    def __init__(self, context: AppContext, datastore: Callable[[], Any], infer: Callable[[str], tuple[str, dict]]):
        self.context = context
        self._datastore = datastore
        self._infer = infer
        self._lock = threading.Lock()
        self._status: dict[str, Any] = {"state": "IDLE"}

    def status(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._status)

    def running(self) -> bool:
        return self.status()["state"] == "RUNNING"

    def start(self) -> dict[str, Any]:
        """Start labeling, in the background, every stack without a final label that has no machine label
        from the current committee; 409 without a model or while a run is going."""
        model = self.context.load_model()
        if model is None:
            raise client_error("no trained model yet: label and train (POST /train/hemorrhage) before auto-labeling", 409)
        datastore = self._datastore()
        datastore.reload()
        version = model.meta["version"]
        done = datastore.labels_tagged(MACHINE_TAG)
        todo = sorted(i for i in datastore.get_unlabeled_images() if done.get(i, {}).get("model_version") != version)
        with self._lock:
            if self._status["state"] == "RUNNING":
                raise client_error("auto-labeling is already running: GET /autolabel/ shows its progress", 409)
            self._status = {"state": "RUNNING", "model_version": version, "total": len(todo), "done": 0,
                            "started": time.time(), "error": None}
        threading.Thread(target=self._run, args=(todo, version), name="ichal-autolabel", daemon=True).start()
        return self.status()

    def _run(self, todo: list[str], version: str) -> None:
        datastore = self._datastore()
        try:
            for image_id in todo:
                # Labeled by a radiologist meanwhile: theirs stands, no machine label needed.
                if datastore.has_final_label(image_id):
                    continue
                path, result = self._infer(image_id)
                try:
                    if result.get("model_version") != version:
                        raise RuntimeError("the committee changed during auto-labeling: start it again")
                    datastore.save_label(image_id, path, MACHINE_TAG, {"origin": MACHINE_TAG, "model_version": version,
                                                                       "stack_score": result.get("stack_score")})
                finally:
                    os.unlink(path)
                with self._lock:
                    self._status["done"] += 1
            final = {"state": "DONE"}
        except Exception as error:  # reported in the status; the labels stored so far stay valid
            logger.exception("auto-labeling failed")
            final = {"state": "FAILED", "error": str(error)}
        with self._lock:
            self._status.update(final, ended=time.time())
