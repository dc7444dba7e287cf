"""Points of the learning curves (issue 20; `ichal.learning_curve` reads them), no held-out set spent:
prequential, the committee scored on the labeled batch it picked before it is trained on it; audit, the
committees before and after a training scored on the same random stacks, withheld from that training.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from ichal.ensemble import EnsembleModel, predict_stack
from ichal.learning_curve import CURVE_METRICS, AuditPoint
from ichal.metrics import DetectionEvaluator
from ichal.train import TrainItem


def batch_metrics(model: EnsembleModel, batch: Sequence[TrainItem], *, device: str = "cpu",
                  overlap: float = 0.25) -> dict[str, float | None]:
    """Pixel AP, stack AP and Dice of `model` on `batch` (`CURVE_METRICS`); None where a metric is undefined
    on it: pixel AP without a bleeding voxel, stack AP unless the batch holds stacks with and without bleed
    (with positives only, every ranking scores 1.0)."""
    evaluator = DetectionEvaluator()
    for item in batch:
        prediction = predict_stack(model, item.image_hu, item.spacing_mm, device=device, overlap=overlap)
        evaluator.update(prediction.mean_prob, item.label, item.spacing_mm)
    result = evaluator.result()
    positives = sum(bool(item.label.any()) for item in batch)
    if not 0 < positives < len(batch):
        result["stack_ap"] = math.nan
    return {key: (float(result[key]) if math.isfinite(result[key]) else None) for key in CURVE_METRICS}


def trained_hours(label_times: Iterable[dict[str, Any]], train_ids: Iterable[str]) -> tuple[float, int]:
    """(measured labeling hours, stacks without a measured time) of the stacks a committee was trained on.
    `label_times`: radiologist time records (image, seconds); a stack labeled in several sessions sums them."""
    ids = set(train_ids)
    seconds: dict[str, float] = {}
    for record in label_times:
        if record["image"] in ids:
            seconds[record["image"]] = seconds.get(record["image"], 0.0) + float(record["seconds"])
    return math.fsum(seconds.values()) / 3600.0, len(ids - set(seconds))


def audit_point(old: EnsembleModel, new: EnsembleModel, audit_stacks: Sequence[TrainItem],
                label_times: Sequence[dict[str, Any]], *, device: str = "cpu", overlap: float = 0.25) -> AuditPoint:
    """The paired test of a training: committee `old` (serving when it started) and `new` (the one it trained)
    scored on the same `audit_stacks`, which neither was trained on; hours from the radiologists' time
    records `label_times` of each committee's `train_ids`."""
    old_hours, _ = trained_hours(label_times, old.meta["train_ids"])
    new_hours, _ = trained_hours(label_times, new.meta["train_ids"])
    return AuditPoint(old.meta["version"], new.meta["version"], old_hours, new_hours, len(audit_stacks),
                      batch_metrics(old, audit_stacks, device=device, overlap=overlap),
                      batch_metrics(new, audit_stacks, device=device, overlap=overlap))
