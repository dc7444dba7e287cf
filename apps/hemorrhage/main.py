"""MONAI Label app for head-CT hemorrhage with cost-sensitive active learning (Kuo et al. 2018).

Wiring only: every computation is in the `ichal` library. Tasks: infer `hemorrhage` and
`hemorrhage_uncertainty`, train `hemorrhage`, scoring `committee`, strategies `cost_sensitive`,
`uncertainty`, `random`, `acft`, `cold_start` and `review` (machine labels from POST /autolabel/).
GET /dashboard/ shows the learning curves and the stopping advice. Configuration: `--conf` keys in lib/settings.py.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Dict

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore

import ichal
from ichal.io import Volume
from ichal.time_intervals import calibration_summary
from lib.context import AppContext
from lib.datastore import HemorrhageDatastore
from lib.errors import check_image_id, client_error
from lib.lifeline import die_with_server, is_task_subprocess, kill_stale_subprocess, mark_server_process
from lib.infers import EnsembleInfer
from lib.pacs_datastore import PacsDatastore
from lib.scoring import CommitteeScoring, scoring_in_progress, scoring_needed
from lib.settings import CONF_KEYS, AppSettings, check_exposure, server_host
from lib.autolabel import AutoLabeler
from lib.strategies import STRATEGY_DESCRIPTIONS, BudgetedStrategy, ReviewStrategy
from lib.trainers import EnsembleTrain
from api_guard import install_guarded_routes
from ohif_route import fix_ohif_route

logger = logging.getLogger(__name__)


class HemorrhageApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]):
        self.settings = AppSettings.from_conf(conf or {}, studies)
        # In a training/scoring subprocess: end with the server (a no-op in the server itself).
        die_with_server()
        self.context = AppContext(self.settings)
        self.autolabeler = AutoLabeler(self.context, self.datastore, self._infer_label)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="hemorrhage",
            description="Intracranial hemorrhage on head CT: PatchFCN committee, cost-sensitive active labeling",
            version=ichal.__version__,
            # A list, as MONAI Label's sample apps send it: OHIF's panel appends model labels to it.
            labels=["hemorrhage"],
        )

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            datastore = PacsDatastore(
                self.studies, cache_dir=os.path.join(self.settings.state_dir, "pacs"),
                sync_seconds=self.settings.pacs_sync_seconds, talks_to_pacs=not is_task_subprocess(),
            )
        else:
            datastore = HemorrhageDatastore(self.studies, extensions=("*.nii.gz", "*.nii"), auto_reload=False)
        datastore.on_final_label = self._on_final_label
        return datastore

    def init_infers(self) -> Dict[str, Any]:
        return {
            "hemorrhage": EnsembleInfer(self.context, "label"),
            "hemorrhage_uncertainty": EnsembleInfer(self.context, "uncertainty"),
        }

    def init_trainers(self) -> Dict[str, Any]:
        return {"hemorrhage": EnsembleTrain(self.context)}

    def init_scoring_methods(self) -> Dict[str, Any]:
        return {"committee": CommitteeScoring(self.context)}

    def init_strategies(self) -> Dict[str, Any]:
        strategies: Dict[str, Any] = {name: BudgetedStrategy(name, self.context, text) for name, text in STRATEGY_DESCRIPTIONS.items()}
        return {**strategies, "review": ReviewStrategy(self.context)}

    def next_sample(self, request: dict) -> dict:
        strategy = request.get("strategy") or "cost_sensitive"
        if strategy not in self._strategies:
            raise client_error(f"unknown strategy {strategy!r}; available: {sorted(self._strategies)}", 404)
        return super().next_sample({**request, "strategy": strategy})

    def task_names(self, kind: str) -> list[str]:
        """Names of the app's `kind` tasks ("infer", "train", "scoring", "strategy"), without building /info/."""
        tasks = {"infer": self._infers, "train": self._trainers, "scoring": self._scoring_methods, "strategy": self._strategies}
        return sorted(tasks[kind])

    def infer(self, request: dict, datastore=None) -> dict:
        # Images by datastore id only: MONAI Label would also run on any server path it is given.
        image_id = check_image_id(request.get("image"))
        image_uri = (datastore or self.datastore()).get_image_uri(image_id)
        return super().infer({**request, "image": image_uri, "image_id": image_id}, datastore)

    def _infer_label(self, image_id: str) -> tuple[str, dict]:
        """The committee's label of datastore image `image_id` (a temp file) and its result fields."""
        return self._infers["hemorrhage"]({"image": self.datastore().get_image_uri(image_id), "image_id": image_id})

    def async_scoring(self, method, params=None):
        # MONAI Label calls this after every next-sample and training, and queues a subprocess each time
        # (223 queued in one 8-annotator benchmark run, each a core busy for ~20 s of start-up). Start one
        # only when there is work and none is queued or running.
        if scoring_in_progress():
            return {}
        if not scoring_needed(self.datastore(), self.context.load_model()):
            return {}
        return super().async_scoring(method, params)

    def info(self) -> dict:
        meta = super().info()
        model = self.context.load_model() if self.settings.model_path.exists() else None
        records = self.context.label_times.read()
        curve, audit_points, advice = self.context.stopping()
        meta["ichal"] = {
            # `calibration`: how the predictions made at serve time held against the measured seconds.
            "time_model": {**self.context.time_model().describe(), "calibration": calibration_summary(records, self.context.settings.confidence_step)},
            "measured_label_times": len(records),
            "model": None if model is None else {k: model.meta.get(k) for k in ("version", "created", "preset", "train_ids", "metrics")},
            "settings": {key: getattr(self.settings, key) for key in CONF_KEYS},
            # Prequential: each labeled batch scored by the committee that picked it, before training on it.
            # Audit: random stacks scored by the committees before and after the training withheld them.
            "stopping": {**advice.to_dict(), "curve": curve, "audit_points": audit_points},
        }
        return meta

    def on_init_complete(self) -> None:
        # Only the server process gets here (not the train/scoring subprocesses).
        from monailabel.app import app as server
        from monailabel.config import settings as server_settings

        check_exposure(server_host(sys.argv), server_settings.MONAI_LABEL_AUTH_ENABLE, self.settings.allow_unauthenticated)
        mark_server_process()
        self._clean_stale_training()
        fix_ohif_route(server)
        install_guarded_routes(server, self)
        super().on_init_complete()

    def _clean_stale_training(self) -> None:
        """A training left RUNNING by a server that died: kill its process if it still lives, mark it stopped."""

        def clean(status: dict) -> None:
            if status.get("state") == "RUNNING":
                kill_stale_subprocess(status.get("pid"))
                status.update(state="STOPPED", error="the server stopped while this training ran", progress=None)

        self.context.train_status.update(clean)

    def _on_final_label(self, image_id: str, client: str | None, label: Volume) -> None:
        client = client or self.context.checkouts.holder(image_id) or "anonymous"
        self.context.record_saved_label(image_id, client, label)
