"""One stack's committee scores: the value and cost features that pool scoring stores per unlabeled stack.

Shared by the server's local scoring loop and the Ray scoring workers (`ichal.cluster`), so both engines
compute the same thing.
"""

from __future__ import annotations

import time
from pathlib import Path

from ichal.config import DEFAULT_CONFIG
from ichal.cost import LabelTimeModel, mask_features
from ichal.ensemble import EnsembleModel, predict_stack
from ichal.io import read_nifti
from ichal.uncertainty import acft_scores, patch_scores, stack_uncertainty


def committee_scores(model: EnsembleModel, image_path: str | Path, time_model: LabelTimeModel, *,
                     device: str = "cpu", overlap: float = 0.25) -> dict:
    """Committee value V (paper eq. 1, top-K patch mean of the Jensen-Shannon map), cost features B and M,
    predicted labeling seconds, ACFT's score, the model version and a timestamp of the stack at `image_path`."""
    volume = read_nifti(image_path)
    prediction = predict_stack(model, volume.array, volume.spacing_mm, device=device, overlap=overlap)
    patch_px = max(1, int(round(model.patch_px * model.spacing_mm / volume.spacing_mm[1])))
    features = mask_features(prediction.mean_prob, volume.spacing_mm, DEFAULT_CONFIG.feature_thresholds)
    return {
        "value": stack_uncertainty(patch_scores(prediction.js, patch_px), k=DEFAULT_CONFIG.top_k_patches),
        "boundary_mm": features.boundary_mm,
        "n_components": features.n_components,
        "predicted_seconds": float(time_model.predict([features])[0]),
        "acft": acft_scores(prediction.mean_prob, patch_px).total,
        "model_version": model.meta["version"],
        "scored_at": time.time(),
    }
