"""Infer tasks: `hemorrhage` (ensemble-mean label volume with detection scores) and
`hemorrhage_uncertainty` (the voxelwise Jensen-Shannon heatmap to overlay)."""

from __future__ import annotations

import logging
import os
import tempfile

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from ichal.config import DEFAULT_CONFIG
from ichal.ensemble import predict_stack
from ichal.io import RESULT_EXTENSIONS, VolumeError, read_nifti, write_result_volume
from ichal.metrics import frame_scores, region_scores, stack_score

from .context import AppContext
from .errors import client_error

logger = logging.getLogger(__name__)


class EnsembleInfer(InferTask):
    """Runs the committee on one stack; `output` is "label" or "uncertainty"."""

    def __init__(self, context: AppContext, output: str):
        description = {
            "label": "Hemorrhage segmentation: ensemble mean >= threshold, with region/frame/stack scores",
            "uncertainty": "Committee disagreement heatmap (Jensen-Shannon divergence, nats, 0 to ln 2)",
        }[output]
        super().__init__(type=InferType.SEGMENTATION, labels={"hemorrhage": 1}, dimension=3, description=description)
        self.context = context
        self.output = output

    def is_valid(self) -> bool:
        # Listed even before training, so a request gets a clear "train first" answer, not "no such model".
        return True

    def info(self) -> dict:
        model_path = self.context.settings.model_path
        return {**super().info(), "trained": model_path.exists()}

    def __call__(self, request: dict) -> tuple[str, dict]:
        extension = request.get("result_extension") or ".nii.gz"
        if extension not in RESULT_EXTENSIONS:
            raise client_error(f"result_extension must be one of {list(RESULT_EXTENSIONS)}, got {extension!r}")
        model = self.context.load_model()
        if model is None:
            raise client_error("no trained model yet: save a few final labels and train (POST /train/hemorrhage)", 409)
        image_path = request["image"]
        try:
            volume = read_nifti(image_path)
            prediction = predict_stack(
                model, volume.array, volume.spacing_mm, device=self.context.settings.device,
                overlap=self.context.settings.overlap,
            )
        except VolumeError as error:
            raise client_error(f"cannot run inference on this image: {error}", 422) from error
        image_id = request.get("image_id") or os.path.basename(image_path).split(".")[0]
        holder = self.context.checkouts.holder(image_id)
        if holder is not None:
            self.context.events.record(holder, image_id, "infer")
        result = {"model_version": model.meta["version"], "output": self.output}
        if self.output == "label":
            threshold = DEFAULT_CONFIG.detection_threshold
            volume_out = (prediction.mean_prob >= threshold).astype(np.uint8)
            _, regions = region_scores(prediction.mean_prob, threshold)
            result.update(
                stack_score=stack_score(prediction.mean_prob, volume.spacing_mm),
                frame_scores=[round(float(s), 4) for s in frame_scores(prediction.mean_prob)],
                region_scores=[round(float(s), 4) for s in regions],
                threshold=threshold,
            )
        else:
            volume_out = prediction.js.astype(np.float32)
        out_path = tempfile.NamedTemporaryFile(suffix=extension, delete=False).name
        write_result_volume(volume_out, volume.affine, out_path)
        return out_path, result
