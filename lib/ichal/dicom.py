"""DICOM CT series: write a (Z, Y, X) HU volume as CT Image Storage files, and read a series back (ichal.ct_ingest).

DESIGN.md "Data" and "Real components": the phantom's stacks go to the PACS (Orthanc, STOW-RS) as real CT series
whose geometry tags agree with the NIfTI affine (RAS on disk in NIfTI, LPS in DICOM).
"""

from __future__ import annotations

import datetime
import io
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.valuerep import DSfloat
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

from ichal.ct_ingest import RAS_TO_LPS, read_ct_volume, read_series_folder
from ichal.io import VolumeError, atomic_write_bytes, check_ct_hu

RESCALE_INTERCEPT_HU = -1024.0


def _geometry(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """LPS (4x4) affine, unit direction columns (3x3) and (x, y, z) spacing in mm of a RAS NIfTI affine."""
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise VolumeError(f"affine must be a finite 4x4 matrix, got shape {affine.shape}")
    lps = RAS_TO_LPS @ affine
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    if (spacing <= 0).any():
        raise VolumeError(f"affine has a zero-length axis (spacing {spacing.tolist()} mm)")
    directions = lps[:3, :3] / spacing
    if abs(float(np.dot(directions[:, 0], directions[:, 1]))) > 1e-4:
        raise VolumeError("affine rows and columns are not orthogonal; DICOM needs an orthogonal in-plane grid")
    return lps, directions, (float(spacing[0]), float(spacing[1]), float(spacing[2]))


def _decimal(value: float) -> str:
    """A DICOM decimal string (DS): the most precise form that fits in 16 characters."""
    return str(DSfloat(float(value), auto_format=True))


def write_ct_series(
    image_hu_zyx: np.ndarray,
    affine: np.ndarray,
    folder: str | Path,
    *,
    series_description: str = "Synthetic head CT (ichal phantom)",
    patient_id: str = "PHANTOM-0000",
    patient_name: str = "Phantom^Synthetic",
    study_instance_uid: str | None = None,
    series_number: int = 1,
) -> list[Path]:
    """Write `image_hu_zyx` (Z, Y, X) HU as a CT Image Storage series, one file per slice, into `folder`.

    Geometry follows the RAS `affine`: ImagePositionPatient / ImageOrientationPatient in LPS, PixelSpacing
    (row, column) and SliceThickness in mm. HU are stored as int16 with RescaleIntercept -1024, slope 1. Every
    call makes fresh Series/SOP/FrameOfReference UIDs (and a Study UID unless given); no real identifiers.
    Returns the written paths ordered by slice index.
    """
    image = np.asarray(image_hu_zyx)
    check_ct_hu(image, name="CT volume for DICOM")
    lps, directions, (dx, dy, dz) = _geometry(affine)
    # check_ct_hu bounds HU to [-1100, 4000], so HU + 1024 always fits int16.
    stored = (np.rint(image).astype(np.int32) - int(RESCALE_INTERCEPT_HU)).astype(np.int16)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    study_uid = study_instance_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    orientation = [float(round(c, 6)) for c in (*directions[:, 0], *directions[:, 1])]
    paths = []
    for k in range(image.shape[0]):
        position = lps[:3, :3] @ np.array([0.0, 0.0, float(k)]) + lps[:3, 3]
        dataset = _slice_dataset(
            stored[k], position, orientation, (dy, dx), dz, k,
            uids=(study_uid, series_uid, frame_uid), date=date, time=time,
            patient=(patient_id, patient_name), series=(series_number, series_description),
        )
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, dataset, write_like_original=False)
        path = folder / f"{k:04d}.dcm"
        atomic_write_bytes(path, buffer.getvalue())
        paths.append(path)
    return paths


def _slice_dataset(
    pixels: np.ndarray,
    position_lps: np.ndarray,
    orientation: list[float],
    pixel_spacing_mm: tuple[float, float],
    slice_thickness_mm: float,
    index: int,
    *,
    uids: tuple[str, str, str],
    date: str,
    time: str,
    patient: tuple[str, str],
    series: tuple[int, str],
) -> Dataset:
    """One CT Image Storage instance (slice `index`, int16 stored pixels (Y, X))."""
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = time
    ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "", "", "1"
    ds.Modality, ds.Manufacturer, ds.InstitutionName = "CT", "ichal synthetic phantom", "SYNTHETIC"
    ds.StudyDescription, ds.BodyPartExamined = "Head CT without contrast (synthetic)", "HEAD"
    ds.SeriesNumber, ds.SeriesDescription = series
    ds.PatientID, ds.PatientName = patient
    ds.PatientBirthDate, ds.PatientSex, ds.PatientPosition = "", "O", "HFS"
    ds.InstanceNumber = ds.AcquisitionNumber = index + 1
    ds.ImagePositionPatient = [_decimal(float(c)) for c in position_lps]
    ds.ImageOrientationPatient = [_decimal(c) for c in orientation]
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _decimal(float(position_lps[2]))
    ds.SliceThickness = ds.SpacingBetweenSlices = _decimal(slice_thickness_mm)
    ds.PixelSpacing = [_decimal(pixel_spacing_mm[0]), _decimal(pixel_spacing_mm[1])]
    ds.KVP = "120"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = _decimal(RESCALE_INTERCEPT_HU), "1", "HU"
    ds.WindowCenter, ds.WindowWidth = "40", "80"
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    return ds


def read_ct_series(folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read the one CT series in `folder`: (Z, Y, X) HU array (int16) and its RAS affine.
    Validated by `ichal.ct_ingest.read_ct_volume` (raises its `SeriesRejected`, a VolumeError, with the reason)."""
    volume = read_ct_volume(read_series_folder(folder))
    return volume.hu, volume.affine
