"""Datastore backed by a DICOMweb PACS (Orthanc): a local NIfTI mirror of its CT series, with final
labels written back as DICOM SEG (highdicom, no dcmqi) so labeled status lives in the PACS.

Series are fetched once into a cache and converted to NIfTI; everything else in the app (scoring,
strategies, training, infer) works on the mirror. A PACS that is down at start or during a save never
crashes the app: it serves what is cached, keeps saved labels locally and uploads them when it is back.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict

import pydicom

from ichal.dicom import read_ct_series
from ichal.dicom_seg import label_to_seg, seg_to_label
from ichal.io import read_nifti, write_nifti
from ichal.pacs import PacsError, PacsUnavailable, fetch_series_to_cache, list_ct_series, list_labeled_series, stow_series
from ichal.state import JsonStore

from .datastore import HemorrhageDatastore
from .errors import client_error

logger = logging.getLogger(__name__)


def _read_series(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]


class PacsDatastore(HemorrhageDatastore):
    def __init__(self, url: str, cache_dir: str | Path, sync_seconds: float = 30.0):
        self.url = url.rstrip("/")
        self.sync_seconds = sync_seconds
        self._cache = Path(cache_dir)
        self._dicom_dir = self._cache / "dicom"
        self._pending = JsonStore(self._cache / "pending_seg_uploads.json", default=list)
        self._studies = JsonStore(self._cache / "series_studies.json", default=dict)
        self._last_sync = 0.0
        super().__init__(str(self._cache / "nifti"), extensions=("*.nii.gz",), auto_reload=False)
        self.sync()

    def reload(self) -> None:
        if time.time() - self._last_sync >= self.sync_seconds:
            self.sync()
        super().reload()

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
        return {**super().status(), "pacs": self.url, "pending_seg_uploads": len(self._pending.read())}

    def sync(self) -> None:
        """Mirror new CT series and SEG-derived labels from the PACS; retry pending SEG uploads."""
        self._last_sync = time.time()
        try:
            series = list_ct_series(self.url)
            labeled = list_labeled_series(self.url)
            for ref in series:
                self._mirror_series(ref.study_uid, ref.series_uid)
            for source_uid, seg_uid in labeled.items():
                if source_uid in {ref.series_uid for ref in series}:
                    self._mirror_label(source_uid, seg_uid)
            self._upload_pending()
        except PacsUnavailable as error:
            logger.error(f"{error}; serving the {len(self.list_images())} series already cached")
        self._reconcile_datastore()

    def _image_path(self, series_uid: str) -> Path:
        return Path(self._datastore.image_path()) / f"{series_uid}.nii.gz"

    def _mirror_series(self, study_uid: str, series_uid: str) -> None:
        if self._image_path(series_uid).exists():
            return
        folder = fetch_series_to_cache(self.url, study_uid, series_uid, self._dicom_dir)
        image_hu, affine = read_ct_series(folder)
        write_nifti(image_hu.astype("int16"), affine, self._image_path(series_uid))
        self._studies.update(lambda studies: studies.__setitem__(series_uid, study_uid))

    def _mirror_label(self, source_uid: str, seg_uid: str) -> None:
        label_path = Path(self._datastore.label_path("final")) / f"{source_uid}.nii.gz"
        if label_path.exists():
            return  # a local label is newer or the same (saves upload after writing locally)
        study_uid = self._studies.read()[source_uid]
        seg_folder = fetch_series_to_cache(self.url, study_uid, seg_uid, self._dicom_dir)
        seg = _read_series(seg_folder)[0]
        label = seg_to_label(seg, _read_series(self._dicom_dir / source_uid))
        write_nifti(label, read_nifti(self._image_path(source_uid)).affine, label_path)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        label_id = super().save_label(image_id, label_filename, label_tag, label_info)
        if label_tag == "final":
            self._pending.update(lambda pending: pending.append(image_id) if image_id not in pending else None)
            try:
                self._upload_pending()
            except PacsUnavailable as error:
                logger.error(f"label for {image_id} kept locally, SEG upload will be retried: {error}")
        return label_id

    def _upload_pending(self) -> None:
        for image_id in list(self._pending.read()):
            label = read_nifti(Path(self._datastore.label_path("final")) / f"{image_id}.nii.gz")
            seg = label_to_seg(label.array, _read_series(self._dicom_dir / image_id), algorithm_type="manual")
            try:
                stow_series(self.url, [seg])
            except PacsError as error:
                if isinstance(error, PacsUnavailable):
                    raise
                logger.error(f"PACS rejected the SEG of {image_id}; kept locally: {error}")
                continue
            self._pending.update(lambda pending: [i for i in pending if i != image_id])
            logger.info(f"SEG for {image_id} stored in the PACS")
