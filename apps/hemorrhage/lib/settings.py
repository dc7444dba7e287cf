"""The app's `--conf` keys, parsed once, and the paths of its durable state."""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

from ichal.learning_curve import CurveError, StoppingRule
from ichal.time_intervals import CONFIDENCE_STEP


def parse_bool(raw: str) -> bool:
    """`--conf` booleans: true/false, yes/no, 1/0 (any case); anything else is an error, not a silent False."""
    value = str(raw).strip().lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0"):
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


# key -> (type, default, help). The README's configuration table documents these with examples.
CONF_KEYS: dict[str, tuple[type, object, str]] = {
    "ensemble_size": (int, 4, "committee members trained per ensemble"),
    "preset": (str, "cpu_small", "network preset: cpu_small (2 CPU cores) or drn38 (GPU)"),
    "model_spacing_mm": (float, 1.8, "in-plane pixel size the committee works at (paper: ~0.45, native; 1.8 keeps CPU inference ~16x cheaper)"),
    "train_iterations": (int, 300, "optimizer steps per member per training run"),
    "train_batch_size": (int, 16, "patches per optimizer step"),
    "train_lookalike_fraction": (float, 0.5, "share of negative training patches centred on blood-density look-alikes (dense sinuses, arteries, calcifications)"),
    "train_hard_negative_fraction": (float, 0.5, "share of negative training patches centred on the member's own false positives, mined halfway through its training"),
    "train_mode": (str, "retrain", "default training mode: retrain (from scratch) or continual (fine-tune)"),
    "device": (str, "cpu", "torch device for inference, scoring and training (cpu, cuda, cuda:1)"),
    "budget_minutes": (float, 60.0, "default labeling budget of a worklist when a request gives none"),
    "budget_confidence": (float, 0.8, "probability that a worklist's total labeling time stays within its budget (request parameter confidence)"),
    "confidence_step": (float, CONFIDENCE_STEP, "how much each worklist over its budget raises the confidence the next ones are budgeted at (each within it lowers it back toward the asked one; 0: never raised)"),
    "audit_stacks": (int, 2, "random stacks per worklist, within its budget, withheld from one training to measure its gain (request parameter audit_stacks; 0: none)"),
    "checkout_minutes": (float, 30.0, "how long a served stack stays reserved for the annotator it was served to"),
    "idle_limit_seconds": (float, 300.0, "gaps between an annotator's events longer than this count only this much"),
    "unscored_stack_minutes": (float, 10.0, "labeling time assumed for a stack no model has scored, until times are measured"),
    "min_time_samples": (int, 10, "measured labeling times needed before the time model replaces its prior"),
    "overlap": (float, 0.25, "sliding-window overlap at inference"),
    "seed": (int, 0, "random seed for training and the random strategies"),
    "pacs_sync_seconds": (float, 30.0, "with a DICOMweb --studies: how often new series and SEGs are pulled from the PACS"),
    "enable_dataset_download": (parse_bool, False, "offer GET /datastore/dataset (a zip of every image and label) to annotators"),
    "allow_unauthenticated": (parse_bool, False, "serve on a non-loopback address without MONAI Label's auth (MONAI_LABEL_AUTH_ENABLE)"),
    "stop_metric": (str, "pixel_ap", "the learning curve's metric the stopping advice reads: pixel_ap, stack_ap or dice"),
    "stop_window": (int, 4, "last labeled batches (audit points, once there are this many) the stopping advice measures the gain per labeled hour over"),
    "stop_min_gain_per_hour": (float, 0.01, "gain per labeled hour (stop_metric units) below which the advice says plateau"),
    "engine": (str, "local", "local (this machine) or ray (scoring and training on a Ray cluster, docs/scale.md; needs the [cluster] extra)"),
    "ray_address": (str, "", "with engine ray: the cluster to join (host:port of `ray start --head`); empty: a Ray instance on this machine"),
    "state_dir": (str, "", "models, time records, check-outs (default: <datastore>/.ichal, or ~/.cache/ichal/pacs-<url hash>)"),
}


class ConfError(ValueError):
    """A `--conf` value is missing its type or range; the message names the key."""


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def server_host(argv: list[str]) -> str:
    """The address `monailabel start_server` binds, from its command line (its default is 0.0.0.0)."""
    for i, arg in enumerate(argv):
        if arg in ("--host", "-i") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--host="):
            return arg.split("=", 1)[1]
    return "0.0.0.0"


def check_exposure(host: str, auth_enabled: bool, allow_unauthenticated: bool) -> None:
    """Refuse to serve patient images on a network address with no authentication, unless told to."""
    if host in LOOPBACK_HOSTS or host.startswith("127.") or auth_enabled or allow_unauthenticated:
        return
    raise ConfError(
        f"refusing to serve on {host} without authentication: anyone who can reach it could read images and "
        "write labels. Enable MONAI Label's auth (MONAI_LABEL_AUTH_ENABLE=true with a Keycloak realm, "
        "see docs/reliability.md), bind 127.0.0.1 behind an authenticating proxy, or pass "
        "--conf allow_unauthenticated true on a trusted network"
    )


@dataclass(frozen=True)
class AppSettings:
    ensemble_size: int
    preset: str
    model_spacing_mm: float
    train_iterations: int
    train_batch_size: int
    train_lookalike_fraction: float
    train_hard_negative_fraction: float
    train_mode: str
    device: str
    budget_minutes: float
    budget_confidence: float
    confidence_step: float
    audit_stacks: int
    checkout_minutes: float
    idle_limit_seconds: float
    unscored_stack_minutes: float
    min_time_samples: int
    overlap: float
    seed: int
    pacs_sync_seconds: float
    enable_dataset_download: bool
    allow_unauthenticated: bool
    stop_metric: str
    stop_window: int
    stop_min_gain_per_hour: float
    engine: str
    ray_address: str
    state_dir: str

    @classmethod
    def from_conf(cls, conf: dict[str, str], studies: str) -> "AppSettings":
        values: dict[str, object] = {}
        for name, (kind, default, _) in CONF_KEYS.items():
            raw = conf.get(name)
            try:
                values[name] = default if raw in (None, "") else kind(raw)
            except ValueError as error:
                raise ConfError(f"--conf {name} {raw!r}: expected {getattr(kind, '__name__', kind)} ({error})") from error
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
        for name in ("train_lookalike_fraction", "train_hard_negative_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfError(f"--conf {name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.budget_confidence < 1.0:
            raise ConfError(f"--conf budget_confidence must be strictly between 0 and 1, got {self.budget_confidence}")
        if not (math.isfinite(self.confidence_step) and self.confidence_step >= 0):
            raise ConfError(f"--conf confidence_step must be 0 or more, got {self.confidence_step}")
        if self.audit_stacks < 0:
            raise ConfError(f"--conf audit_stacks must be 0 or more stacks, got {self.audit_stacks}")
        if not 0.0 <= self.overlap < 1.0:
            raise ConfError(f"--conf overlap must be in [0, 1), got {self.overlap}")
        try:
            self.stopping_rule.check()
        except CurveError as error:
            raise ConfError(f"--conf stop_*: {error}") from error
        if self.engine not in ("local", "ray"):
            raise ConfError(f"--conf engine must be local or ray, got {self.engine!r}")
        if self.engine == "ray":
            # Imported only when asked for: the default engine never loads Ray.
            from ichal.cluster import ClusterError, check_address, require_ray

            try:
                require_ray()
                if self.ray_address:
                    check_address(self.ray_address)
            except ClusterError as error:
                raise ConfError(f"--conf engine ray: {error}") from error

    @property
    def stopping_rule(self) -> StoppingRule:
        return StoppingRule(metric=self.stop_metric, window=self.stop_window, min_gain_per_hour=self.stop_min_gain_per_hour)

    # Durable state, one folder per datastore.
    @property
    def model_path(self) -> Path:
        return Path(self.state_dir) / "models" / "ensemble.pt"

    @property
    def time_model_path(self) -> Path:
        return Path(self.state_dir) / "time_model.json"
