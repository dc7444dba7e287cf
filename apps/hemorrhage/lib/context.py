"""What every task of the app shares: settings, durable state, the current model and time model."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ichal.checkout import CheckoutRegistry
from ichal.cost import LabelTimeModel, MaskFeatures, mask_features
from ichal.io import read_nifti
from ichal.labeling_time import EventLog, measured_times
from ichal.state import JsonStore

from .settings import AppSettings

logger = logging.getLogger(__name__)


@dataclass
class AppContext:
    settings: AppSettings

    def __post_init__(self) -> None:
        Path(self.settings.state_dir).mkdir(parents=True, exist_ok=True)
        self.events = EventLog(self.settings.events_path)
        self.checkouts = CheckoutRegistry(self.settings.checkouts_path, self.settings.checkout_minutes * 60.0)
        self.label_times = JsonStore(self.settings.label_times_path, default=list)
        self.train_status = JsonStore(self.settings.train_status_path, default=dict)
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

    # -- labeling time ------------------------------------------------------------------------
    def time_model(self) -> LabelTimeModel:
        """The fitted labeling-time model; the literature prior until enough times are measured."""
        if self.settings.time_model_path.exists():
            return LabelTimeModel.load(self.settings.time_model_path)
        return LabelTimeModel(min_samples=self.settings.min_time_samples).fit(np.zeros((0, 2)), np.zeros(0))

    def record_saved_label(self, image_id: str, client: str, label_path: str) -> dict | None:
        """Log the save, turn the client's session into measured seconds, refit the time model."""
        self.events.record(client, image_id, "saved")
        sessions = [m for m in measured_times(self.events.events(), self.settings.idle_limit_seconds)]
        latest = next((m for m in reversed(sessions) if m.image == image_id and m.client == client), None)
        if latest is None:
            return None
        label = read_nifti(label_path)
        features = mask_features(label.array.astype(np.float32), label.spacing_mm)
        record = {
            "image": image_id,
            "client": client,
            "seconds": latest.seconds,
            "saved": latest.saved,
            "boundary_mm": features.boundary_mm,
            "n_components": features.n_components,
        }

        def append(records: list) -> None:
            records.append(record)

        records = self.label_times.update(append)
        model = LabelTimeModel(min_samples=self.settings.min_time_samples).fit(
            [MaskFeatures(r["boundary_mm"], r["n_components"]) for r in records],
            np.array([r["seconds"] for r in records]),
        )
        model.save(self.settings.time_model_path)
        logger.info(f"labeling time recorded: {latest.seconds:.0f} s; time model n={model.n_} source={model.source_}")
        return record
