"""Datastore backed by a DICOMweb PACS (Orthanc): a local NIfTI mirror of its CT series, with final
labels written back as DICOM SEG (highdicom, no dcmqi) so labeled status lives in the PACS.

Series are fetched once (in their stored transfer syntax) into a cache, validated by `ichal.ct_ingest` and
converted to NIfTI; everything else in the app (scoring, strategies, training, infer) works on the mirror.
Ingestion is a quarantine (DESIGN.md): a series or SEG that cannot be read is recorded with its reason and skipped,
so it can fail no sync, no request for another series, no training and no restart. A PACS that is down at start
or during a save never crashes the app: it serves what is cached, keeps saved labels locally and uploads them when
it is back. Only the server process talks to the PACS (a background thread every `sync_seconds`); training and
scoring subprocesses read the mirror, so one process uploads and a label save becomes at most one SEG.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Dict

import pydicom
from pydicom.uid import generate_uid

from ichal.ct_ingest import SeriesRejected, read_ct_volume, read_series_folder
from ichal.dicom_seg import label_to_seg, seg_to_label
from ichal.io import Volume, read_nifti, write_nifti
from ichal.pacs import (
    PacsError,
    PacsUnavailable,
    SeriesRef,
    fetch_series_to_cache,
    list_ct_series,
    list_labeled_series,
    stow_series,
)
from ichal.state import JsonStore

from .datastore import HemorrhageDatastore
from .errors import client_error

logger = logging.getLogger(__name__)


def _reason(error: Exception) -> str:
    return str(error) if isinstance(error, SeriesRejected) else f"{type(error).__name__}: {error}"


def _new_entry() -> dict[str, Any]:
    return {"seg_series_uid": generate_uid(), "seg_sop_uid": generate_uid(), "error": None}


class PacsDatastore(HemorrhageDatastore):
    def __init__(self, url: str, cache_dir: str | Path, sync_seconds: float = 30.0, talks_to_pacs: bool = True):
        """`talks_to_pacs`: this process syncs and uploads (the server); False in training/scoring subprocesses."""
        self.url = url.rstrip("/")
        self.sync_seconds = sync_seconds
        self._cache = Path(cache_dir)
        self._dicom_dir = self._cache / "dicom"
        # image id -> {"seg_series_uid", "seg_sop_uid", "error"}: one entry per final-label save, its UIDs fixed at
        # save time, so an upload repeated after a crash stores the same SEG instance again (the PACS keeps one).
        self._pending = JsonStore(self._cache / "pending_seg_uploads.json", default=dict)
        # Earlier versions kept a list of image ids.
        self._pending.update(lambda pending: {i: _new_entry() for i in pending} if isinstance(pending, list) else None)
        self._studies = JsonStore(self._cache / "series_studies.json", default=dict)
        # Series UID -> reason, SEG series UID -> reason; for this run of the server: each start checks them again
        # (from the cache, no download), so a reader that learned to read them serves them.
        self._quarantined: dict[str, str] = {}
        self._skipped_segs: dict[str, str] = {}
        self._sync_lock = threading.Lock()
        self._upload_lock = threading.Lock()
        super().__init__(str(self._cache / "nifti"), extensions=("*.nii.gz",), auto_reload=False)
        if talks_to_pacs:
            self.sync()
            threading.Thread(target=self._sync_forever, name="ichal-pacs-sync", daemon=True).start()

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        raise client_error("images come from the PACS: store the series there (STOW-RS) and it appears here", 405)

    def dicom_reference(self, image_id: str) -> Dict[str, Any]:
        """What a DICOMweb viewer needs to open `image_id` (a SeriesInstanceUID): its study and series UIDs,
        modality, study date/time, patient id and the PACS URL of the series; {} if it is not mirrored.
        Sent to the requesting viewer only, never logged."""
        files = sorted((self._dicom_dir / image_id).glob("*.dcm"))
        if not files:
            return {}
        header = pydicom.dcmread(files[0], stop_before_pixels=True)
        study_uid = str(header.StudyInstanceUID)
        fields = {name: str(header.get(name, "")) for name in ("Modality", "StudyDate", "StudyTime", "PatientID")}
        return {**fields, "StudyInstanceUID": study_uid, "SeriesInstanceUID": image_id,
                "RetrieveURL": f"{self.url}/studies/{study_uid}/series/{image_id}"}

    def status(self) -> Dict[str, Any]:
        pending = self._pending.read()
        return {
            **super().status(),
            "pacs": self.url,
            "pending_seg_uploads": sum(1 for entry in pending.values() if not entry["error"]),
            "seg_not_written": {image_id: entry["error"] for image_id, entry in pending.items() if entry["error"]},
            "quarantined": dict(self._quarantined),
            "skipped_segs": dict(self._skipped_segs),
        }

    def _sync_forever(self) -> None:
        # A daemon thread: it ends with the server process.
        while True:
            time.sleep(self.sync_seconds)
            try:
                self.sync()
            except Exception:  # the thread outlives any one failed sync; the next one retries
                logger.exception(f"PACS sync failed; next try in {self.sync_seconds:.0f} s")

    def sync(self) -> None:
        """Mirror new CT series and SEG-derived labels from the PACS; retry pending SEG uploads."""
        with self._sync_lock:
            try:
                series = list_ct_series(self.url)
                labeled = list_labeled_series(self.url)
                for ref in series:
                    self._mirror_series(ref)
                for source_uid, seg_uid in labeled.items():
                    if self._image_path(source_uid).exists():
                        self._mirror_label(source_uid, seg_uid)
            except PacsError as error:
                logger.error(f"{error}; serving the {len(self.list_images())} series already cached")
            self._reconcile_datastore()
        self.upload_pending()

    def _image_path(self, series_uid: str) -> Path:
        return Path(self._datastore.image_path()) / f"{series_uid}.nii.gz"

    def _mirror_series(self, ref: SeriesRef) -> None:
        if ref.series_uid in self._quarantined or self._image_path(ref.series_uid).exists():
            return
        try:
            folder = fetch_series_to_cache(self.url, ref.study_uid, ref.series_uid, self._dicom_dir)
            volume = read_ct_volume(read_series_folder(folder))
        except PacsUnavailable:
            raise
        except Exception as error:  # broad on purpose: whatever one series raises must not reach the sync
            self._quarantined[ref.series_uid] = _reason(error)
            logger.warning(f"series {ref.series_uid} quarantined (not served): {_reason(error)}")
            return
        self._studies.update(lambda studies: studies.__setitem__(ref.series_uid, ref.study_uid))
        write_nifti(volume.hu, volume.affine, self._image_path(ref.series_uid))
        if volume.masked_voxels:
            logger.info(f"series {ref.series_uid}: {volume.masked_voxels} padding/below-air voxels set to air")

    def _mirror_label(self, source_uid: str, seg_uid: str) -> None:
        label_path = Path(self._datastore.label_path("final")) / f"{source_uid}.nii.gz"
        if label_path.exists() or seg_uid in self._skipped_segs:
            return  # a local label is newer or the same (saves upload after writing locally)
        try:
            study_uid = self._studies.read()[source_uid]
            seg_folder = fetch_series_to_cache(self.url, study_uid, seg_uid, self._dicom_dir)
            label = seg_to_label(read_series_folder(seg_folder)[0], read_series_folder(self._dicom_dir / source_uid))
        except PacsUnavailable:
            raise
        except Exception as error:  # broad on purpose: a SEG another tool wrote must not fail the sync
            self._skipped_segs[seg_uid] = _reason(error)
            logger.warning(f"SEG series {seg_uid} of series {source_uid} not read: {_reason(error)}")
            return
        affine = read_nifti(self._image_path(source_uid)).affine
        write_nifti(label, affine, label_path)
        if self.on_final_label is not None:
            # A SEG stored by a viewer (OHIF) or any tool is the annotator's save: the app measures the
            # time from serving the stack to the SEG's arrival for the annotator holding it.
            self.on_final_label(source_uid, None, Volume(label, affine))

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        label_id = super().save_label(image_id, label_filename, label_tag, label_info)
        if label_tag == "final":
            entry = _new_entry()
            self._pending.update(lambda pending: pending.__setitem__(image_id, entry))
            self.upload_pending()
        return label_id

    def upload_pending(self) -> None:
        """Store each pending label as a SEG in the PACS, one upload at a time; a label that cannot become a SEG
        stays saved locally with the reason (`status()["seg_not_written"]`) until it is saved again."""
        with self._upload_lock:
            for image_id, entry in self._pending.read().items():
                if entry["error"]:
                    continue
                try:
                    label = read_nifti(Path(self._datastore.label_path("final")) / f"{image_id}.nii.gz")
                    seg = label_to_seg(
                        label.array, read_series_folder(self._dicom_dir / image_id), algorithm_type="manual",
                        series_instance_uid=entry["seg_series_uid"], sop_instance_uid=entry["seg_sop_uid"],
                    )
                except Exception as error:  # broad on purpose: highdicom refuses sources in many ways
                    self._settle(image_id, entry, error=_reason(error))
                    logger.warning(f"label of {image_id} kept locally, no SEG written: {_reason(error)}")
                    continue
                try:
                    stow_series(self.url, [seg])
                except PacsUnavailable as error:
                    logger.error(f"SEG uploads wait for the PACS ({error}); labels are kept locally")
                    return
                except PacsError as error:
                    logger.error(f"PACS rejected the SEG of {image_id}; kept locally, retried at the next sync: {error}")
                    continue
                self._settle(image_id, entry, error=None)
                logger.info(f"SEG for {image_id} stored in the PACS")

    def _settle(self, image_id: str, entry: dict, error: str | None) -> None:
        """Drop `image_id`'s pending entry (uploaded) or mark it failed with `error`, unless a newer save replaced it."""

        def settle(pending: dict) -> None:
            if pending.get(image_id) != entry:
                return
            if error is None:
                del pending[image_id]
            else:
                pending[image_id] = {**entry, "error": error}

        self._pending.update(settle)
