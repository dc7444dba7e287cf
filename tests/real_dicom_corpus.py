"""Real-scanner DICOM variants built at test time from what installed packages ship (pydicom's test files, highdicom's
legacy converter), each made into a small head-CT-like series. Nothing is downloaded.

Every variant repeats one real instance (its pixel data bytes untouched: a real JPEG 2000, JPEG-LS, RLE... bitstream)
as slices of a series with fresh UIDs, 5 mm apart, and says what the app must do with it: `reason` None = served,
otherwise a fragment of the reason it is skipped with.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import highdicom as hd
import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.valuerep import DA, TM
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, generate_uid

SLICES = 4
SLICE_GAP_MM = 5.0


@dataclass(frozen=True)
class Variant:
    name: str
    source: str  # the pydicom test file it is made from
    what: str  # what is real about it, for docs/pacs.md
    reason: str | None  # None: served; else part of the skip reason
    build: Callable[[], list[Dataset]]


def _as_ct(ds: Dataset) -> Dataset:
    """An MR/NM test instance re-labelled as CT with an HU rescale (pixel data untouched)."""
    ds.Modality = "CT"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = "1", "-1024", "HU"
    ds.ImageOrientationPatient = ds.get("ImageOrientationPatient") or [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = ds.get("ImagePositionPatient") or [0, 0, 0]
    ds.PixelSpacing = ds.get("PixelSpacing") or [0.5, 0.5]
    ds.FrameOfReferenceUID = ds.get("FrameOfReferenceUID") or generate_uid()
    return ds


def stack_of(ds: Dataset, slices: int = SLICES, step_lps: tuple[float, float, float] | None = None) -> list[Dataset]:
    """`slices` copies of `ds` as one new series: fresh UIDs, no real identifiers, positions `step_lps` apart
    (default: SLICE_GAP_MM along the slice normal)."""
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
    step = np.asarray(step_lps) if step_lps is not None else SLICE_GAP_MM * np.cross(orientation[:3], orientation[3:])
    origin = np.asarray(ds.ImagePositionPatient, dtype=float)
    study, series = generate_uid(), generate_uid()
    frame_of_reference = generate_uid() if "FrameOfReferenceUID" in ds else None
    out = []
    for k in range(slices):
        item = copy.deepcopy(ds)
        item.StudyInstanceUID, item.SeriesInstanceUID = study, series
        item.SOPInstanceUID = item.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if frame_of_reference:
            item.FrameOfReferenceUID = frame_of_reference
        item.PatientID, item.PatientName = "REALDICOM-TEST", "Test^RealDicom"
        item.InstanceNumber = k + 1
        item.ImagePositionPatient = [f"{v:.4f}" for v in origin + k * step]
        item.SliceThickness = str(SLICE_GAP_MM)
        out.append(item)
    return out


def _read(name: str) -> Dataset:
    return pydicom.dcmread(get_testdata_file(name))


def ct_small() -> list[Dataset]:
    return stack_of(_read("CT_small.dcm"))


def jpeg2000() -> list[Dataset]:
    return stack_of(_read("693_J2KI.dcm"))


def jpeg_ls() -> list[Dataset]:
    return stack_of(_as_ct(_read("MR_small_jpeg_ls_lossless.dcm")))


def rle() -> list[Dataset]:
    return stack_of(_as_ct(_read("MR_small_RLE.dcm")))


def jpeg2000_lossless() -> list[Dataset]:
    return stack_of(_as_ct(_read("MR_small_jp2klossless.dcm")))


def uncompressed_mr_twin() -> list[Dataset]:
    """MR_small.dcm, the uncompressed original of the JPEG-LS / RLE / JPEG 2000 lossless files."""
    return stack_of(_as_ct(_read("MR_small.dcm")))


def deflate() -> list[Dataset]:
    series = ct_small()
    for ds in series:
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return series


def monochrome1() -> list[Dataset]:
    series = ct_small()
    for ds in series:
        ds.PhotometricInterpretation = "MONOCHROME1"
    return series


def padded() -> list[Dataset]:
    """CT_small with its declared PixelPaddingValue (-2000) written outside the field of view, and one corner far
    below air (-3995 HU, as in 693_J2KI.dcm)."""
    series = ct_small()
    for ds in series:
        pixels = ds.pixel_array.copy()
        pixels[:, :10] = int(ds.PixelPaddingValue)
        pixels[:5, -5:] = -3995 + 1024
        ds.PixelData = pixels.astype("<i2").tobytes()
    return series


def no_rescale() -> list[Dataset]:
    series = ct_small()
    for ds in series:
        del ds.RescaleSlope, ds.RescaleIntercept
    return series


def no_frame_of_reference() -> list[Dataset]:
    series = ct_small()
    for ds in series:
        del ds.FrameOfReferenceUID
    return series


def single_slice() -> list[Dataset]:
    return stack_of(_read("CT_small.dcm"), slices=1)


def coronal() -> list[Dataset]:
    ds = _read("CT_small.dcm")
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    return stack_of(ds)


def gantry_tilt() -> list[Dataset]:
    """J2K_pixelrep_mismatch.dcm: a real CT slice with a tilted orientation (22 degrees), stacked along the table
    (patient z) as a tilted gantry acquires it, so slices are sheared."""
    return stack_of(_read("J2K_pixelrep_mismatch.dcm"), step_lps=(0.0, 0.0, SLICE_GAP_MM))


def enhanced_multiframe() -> list[Dataset]:
    """The CT_small series converted by highdicom into one Legacy Converted Enhanced CT instance (per-frame
    functional groups, shared rescale)."""
    series = ct_small()
    for ds in series:
        # highdicom combines these as datetime objects (pydicom keeps them as strings unless told otherwise).
        ds.AcquisitionDate, ds.AcquisitionTime = DA(ds.AcquisitionDate), TM(ds.AcquisitionTime)
    converted = hd.legacy.LegacyConvertedEnhancedCTImage(
        series, series_instance_uid=generate_uid(), series_number=2, sop_instance_uid=generate_uid(), instance_number=1
    )
    return [converted]


VARIANTS = [
    Variant("ct_small", "CT_small.dcm", "uncompressed CT slice, 128x128", None, ct_small),
    Variant("jpeg2000", "693_J2KI.dcm", "JPEG 2000 (lossy) CT, 512x512, no FrameOfReferenceUID, values to -3995 HU", None, jpeg2000),
    Variant("jpeg2000_lossless", "MR_small_jp2klossless.dcm", "JPEG 2000 lossless", None, jpeg2000_lossless),
    Variant("jpeg_ls", "MR_small_jpeg_ls_lossless.dcm", "JPEG-LS lossless (no pydicom handler: decoded by GDCM)", None, jpeg_ls),
    Variant("rle", "MR_small_RLE.dcm", "RLE lossless", None, rle),
    Variant("deflate", "CT_small.dcm", "Deflated Explicit VR Little Endian", None, deflate),
    Variant("monochrome1", "CT_small.dcm", "MONOCHROME1", None, monochrome1),
    Variant("padded", "CT_small.dcm", "PixelPaddingValue -2000 and -3995 HU outside the field of view", None, padded),
    Variant("enhanced_multiframe", "CT_small.dcm", "Legacy Converted Enhanced CT (one multi-frame instance, highdicom)", None, enhanced_multiframe),
    Variant("no_frame_of_reference", "CT_small.dcm", "no FrameOfReferenceUID", None, no_frame_of_reference),
    Variant("no_rescale", "CT_small.dcm", "RescaleSlope/RescaleIntercept missing", "no RescaleSlope/RescaleIntercept", no_rescale),
    Variant("single_slice", "CT_small.dcm", "one slice", "1 slice(s)", single_slice),
    Variant("coronal", "CT_small.dcm", "coronal orientation", "not axial", coronal),
    Variant("gantry_tilt", "J2K_pixelrep_mismatch.dcm", "22 degree tilted CT (JPEG 2000 lossless), stacked along z", "gantry tilt", gantry_tilt),
]
