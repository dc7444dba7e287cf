"""Scoring method `committee`: run the ensemble once per unlabeled stack and store its value and cost features.

Stores, in each image's datastore info under `ichal`, the stack uncertainty V (paper eq. 1, top-K patch mean),
the cost features B and M, the predicted labeling seconds, ACFT's score, the model version and a timestamp.
Stacks already scored by the current model are skipped, and each stack is stored as soon as it is scored,
so an interrupted run loses nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.utils.async_tasks.utils import tasks as async_tasks
from tqdm import tqdm

from ichal.committee_scores import committee_scores
from ichal.io import read_nifti
from ichal.selection import cheap_image_features

from .context import AppContext

logger = logging.getLogger(__name__)

SCORE_KEY = "ichal"
FEATURE_KEY = "ichal_image_features"


def score_stack(model: Any, image_path: str, context: AppContext) -> dict:
    """Committee value, cost features and predicted seconds of one stack (no datastore access)."""
    return committee_scores(model, image_path, context.time_model(), device=context.settings.device,
                            overlap=context.settings.overlap)


def current_scores(datastore: Any, ids: list[str], model: Any) -> dict[str, dict]:
    """Stored scores of `ids` that the current model made (older models' scores are stale)."""
    if model is None:
        return {}
    version = model.meta["version"]
    scores = {}
    for image_id, info in datastore.image_infos(ids).items():
        stored = info.get(SCORE_KEY)
        # Anything but our own record (e.g. written by an older client before fields were reserved) is "unscored".
        if isinstance(stored, dict) and stored.get("model_version") == version:
            scores[image_id] = stored
    return scores


def image_features(datastore: Any, ids: list[str], store_every: int = 0) -> dict[str, list[float]]:
    """Cheap image features (cold start's k-center space) of `ids`, kept in each image's info: those
    missing are computed and stored, in one datastore write, or every `store_every` stacks when given
    (so a long run in a subprocess loses nothing when interrupted)."""
    features = {i: info[FEATURE_KEY] for i, info in datastore.image_infos(ids).items() if FEATURE_KEY in info}
    missing = [i for i in ids if i not in features]
    pending: dict[str, dict] = {}
    for image_id in tqdm(missing, desc="image features", unit="stack", disable=len(missing) < 20):
        features[image_id] = cheap_image_features(read_nifti(datastore.get_image_uri(image_id)).array).tolist()
        pending[image_id] = {FEATURE_KEY: features[image_id]}
        if store_every and len(pending) >= store_every:
            datastore.update_image_infos(pending)
            pending = {}
    if pending:
        datastore.update_image_infos(pending)
    return features


def scoring_in_progress() -> bool:
    """A scoring task of this server is queued or running (MONAI Label's async task list)."""
    return any(task.get("status") in ("SUBMITTED", "RUNNING") for task in async_tasks("scoring"))


def scoring_needed(datastore: Any, model: Any) -> bool:
    """Whether a scoring run has work: an unlabeled stack without image features, or, with a model,
    without the current model's scores."""
    unlabeled = datastore.get_unlabeled_images()
    infos = datastore.image_infos(unlabeled)
    if any(FEATURE_KEY not in info for info in infos.values()):
        return True
    return model is not None and len(current_scores(datastore, unlabeled, model)) < len(unlabeled)


class CommitteeScoring(ScoringMethod):
    def __init__(self, context: AppContext):
        super().__init__("Image features for cold start; committee disagreement (Jensen-Shannon, top-K patches) and predicted labeling time")
        self.context = context

    def __call__(self, request: dict, datastore: Any) -> dict:
        datastore.reload()
        unlabeled = sorted(datastore.get_unlabeled_images())
        # Cold start's features are computed here, in the background, not in an annotator's request.
        image_features(datastore, unlabeled, store_every=10)
        model = self.context.load_model()
        if model is None:
            logger.info("committee scoring skipped: no trained model yet")
            return {"scored": 0, "skipped": 0, "reason": "no trained model yet"}
        todo = [i for i in unlabeled if i not in current_scores(datastore, unlabeled, model)]
        logger.info(f"committee scoring: {len(todo)} of {len(unlabeled)} unlabeled stacks need model {model.meta['version'][:12]}")
        started = time.time()
        paths = {image_id: datastore.get_image_uri(image_id) for image_id in todo}
        for image_id, scores in tqdm(self._scores(model, paths), total=len(todo), desc="committee scoring", unit="stack"):
            datastore.update_image_info(image_id, {SCORE_KEY: scores})
        return {"scored": len(todo), "skipped": len(unlabeled) - len(todo), "seconds": round(time.time() - started, 2)}

    def _scores(self, model: Any, paths: dict[str, str]) -> Iterator[tuple[str, dict]]:
        """(image id, scores) as each stack is scored: here, or with `--conf engine ray` by the Ray cluster's
        workers (each loads the saved committee once)."""
        settings = self.context.settings
        if settings.engine == "ray":
            from ichal.cluster import connect, score_on_ray, start_scoring_workers

            connect(settings.ray_address or None)
            workers = start_scoring_workers(settings.model_path, self.context.time_model(), overlap=settings.overlap)
            yield from score_on_ray(paths, workers)
            return
        for image_id, path in paths.items():
            yield image_id, score_stack(model, path, self.context)
