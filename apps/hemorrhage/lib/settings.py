"""The app's `--conf` keys, parsed once, and the paths of its durable state."""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

# key -> (type, default, help). The README's configuration table documents these with examples.
CONF_KEYS: dict[str, tuple[type, object, str]] = {
    "ensemble_size": (int, 4, "committee members trained per ensemble"),
    "preset": (str, "cpu_small", "network preset: cpu_small (2 CPU cores) or drn38 (GPU)"),
    "model_spacing_mm": (float, 1.8, "in-plane pixel size the committee works at (paper: ~0.45, native; 1.8 keeps CPU inference ~16x cheaper)"),
    "train_iterations": (int, 300, "optimizer steps per member per training run"),
    "train_batch_size": (int, 16, "patches per optimizer step"),
    "train_lookalike_fraction": (float, 0.5, "share of negative training patches centred on blood-density look-alikes (dense sinuses, arteries, calcifications)"),
    "train_mode": (str, "retrain", "default training mode: retrain (from scratch) or continual (fine-tune)"),
    "device": (str, "cpu", "torch device for inference, scoring and training (cpu, cuda, cuda:1)"),
    "budget_minutes": (float, 60.0, "default labeling budget of a worklist when a request gives none"),
    "checkout_minutes": (float, 30.0, "how long a served stack stays reserved for the annotator it was served to"),
    "idle_limit_seconds": (float, 300.0, "gaps between an annotator's events longer than this count only this much"),
    "unscored_stack_minutes": (float, 10.0, "labeling time assumed for a stack no model has scored, until times are measured"),
    "min_time_samples": (int, 10, "measured labeling times needed before the time model replaces its prior"),
    "overlap": (float, 0.25, "sliding-window overlap at inference"),
    "seed": (int, 0, "random seed for training and the random strategies"),
    "pacs_sync_seconds": (float, 30.0, "with a DICOMweb --studies: how often new series and SEGs are pulled from the PACS"),
    "state_dir": (str, "", "models, time records, check-outs (default: <datastore>/.ichal, or ~/.cache/ichal/pacs-<url hash>)"),
}


class ConfError(ValueError):
    """A `--conf` value is missing its type or range; the message names the key."""


@dataclass(frozen=True)
class AppSettings:
    ensemble_size: int
    preset: str
    model_spacing_mm: float
    train_iterations: int
    train_batch_size: int
    train_lookalike_fraction: float
    train_mode: str
    device: str
    budget_minutes: float
    checkout_minutes: float
    idle_limit_seconds: float
    unscored_stack_minutes: float
    min_time_samples: int
    overlap: float
    seed: int
    pacs_sync_seconds: float
    state_dir: str

    @classmethod
    def from_conf(cls, conf: dict[str, str], studies: str) -> "AppSettings":
        values: dict[str, object] = {}
        for name, (kind, default, _) in CONF_KEYS.items():
            raw = conf.get(name)
            try:
                values[name] = default if raw in (None, "") else kind(raw)
            except ValueError as error:
                raise ConfError(f"--conf {name} {raw!r}: expected {kind.__name__}") from error
        settings = cls(**values)  # type: ignore[arg-type]
        settings._check()
        if not settings.state_dir:
            if studies.startswith(("http://", "https://")):
                key = hashlib.sha256(studies.rstrip("/").encode()).hexdigest()[:12]
                state_dir = Path(os.path.expanduser("~/.cache/ichal")) / f"pacs-{key}"
            else:
                state_dir = Path(studies) / ".ichal"
            settings = replace(settings, state_dir=str(state_dir))
        return settings

    def _check(self) -> None:
        positive = ("ensemble_size", "model_spacing_mm", "train_iterations", "train_batch_size", "budget_minutes", "checkout_minutes", "idle_limit_seconds",
                    "unscored_stack_minutes", "pacs_sync_seconds")
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfError(f"--conf {name} must be a positive number, got {value}")
        if self.train_mode not in ("retrain", "continual"):
            raise ConfError(f"--conf train_mode must be retrain or continual, got {self.train_mode!r}")
        if not 0.0 <= self.train_lookalike_fraction <= 1.0:
            raise ConfError(f"--conf train_lookalike_fraction must be in [0, 1], got {self.train_lookalike_fraction}")
        if not 0.0 <= self.overlap < 1.0:
            raise ConfError(f"--conf overlap must be in [0, 1), got {self.overlap}")

    # Durable state, one folder per datastore.
    @property
    def model_path(self) -> Path:
        return Path(self.state_dir) / "models" / "ensemble.pt"

    @property
    def train_status_path(self) -> Path:
        return Path(self.state_dir) / "train_status.json"

    @property
    def events_path(self) -> Path:
        return Path(self.state_dir) / "label_events.json"

    @property
    def label_times_path(self) -> Path:
        return Path(self.state_dir) / "label_times.json"

    @property
    def time_model_path(self) -> Path:
        return Path(self.state_dir) / "time_model.json"

    @property
    def checkouts_path(self) -> Path:
        return Path(self.state_dir) / "checkouts.json"
