"""One validating reader for CT series as scanners and PACS store them: a (Z, Y, X) HU volume and its RAS affine,
or `SeriesRejected` with the reason the series cannot be a head-CT stack.

DESIGN.md "Ingestion is a quarantine, not a crash": every series passes here before the app serves it. Handles any
transfer syntax the installed codecs decode (pydicom's handlers first, then GDCM inside SimpleITK, e.g. for JPEG-LS
and 12-bit JPEG), classic single-frame and enhanced multi-frame CT, MONOCHROME1, padding, and checks the geometry.
HU come from the Modality LUT (RescaleSlope/Intercept) only: the photometric interpretation is a display matter
(MONOCHROME1 inverts the grey scale, not the HU), which SimpleITK's series reader gets wrong (it inverts).
Reasons name tags and numbers only, never patient identifiers.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset

from ichal.io import CT_MAX_PLAUSIBLE_HU, VolumeError, check_ct_hu

AIR_HU = -1024
# A head-CT stack has 27-38 slices; fewer than this cannot be scored (3D components, top-K patches) nor labeled usefully.
MIN_SLICES = 3
# The slice normal may lean this far from the patient's head-feet axis (oblique axial); beyond it the series is a
# coronal/sagittal reformat, which the committee (trained on axial slices) cannot read.
MAX_AXIAL_OBLIQUITY_DEGREES = 45.0
# Slices stacked off their normal by more than this (gantry tilt) would be sheared on a regular grid.
MAX_GANTRY_TILT_DEGREES = 0.5
# Gaps between slices may differ by this fraction of the median gap (rounding in positions); more means missing slices.
SLICE_GAP_TOLERANCE = 0.1
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


class SeriesRejected(VolumeError):
    """A series that cannot be served as a head-CT stack; the message is the reason (tags and numbers, no identifiers)."""


@dataclass(frozen=True)
class CtFrame:
    """One image plane of a series: `frame_index` (0-based) of instance `dataset`, with its geometry and rescale."""

    dataset: Dataset
    frame_index: int
    position_lps: np.ndarray
    orientation: np.ndarray
    pixel_spacing_mm: tuple[float, float]
    slope: float
    intercept: float


@dataclass(frozen=True)
class CtVolume:
    """A validated series: `hu` int16 (Z, Y, X), RAS `affine`, `frames` in z order, and how many voxels were masked
    to air (pixel padding, values below air)."""

    hu: np.ndarray
    affine: np.ndarray
    frames: list[CtFrame]
    masked_voxels: int


def _functional_group_value(per_frame: Dataset, shared: Dataset, sequence: str, keyword: str) -> object:
    """`keyword` from functional group `sequence`, per-frame first, then shared; None when neither has it."""
    for groups in (per_frame, shared):
        items = groups.get(sequence)
        if items and keyword in items[0]:
            return items[0].get(keyword)
    return None


def _required(value: object, keyword: str) -> object:
    if value is None or value == "" or (isinstance(value, (list, pydicom.multival.MultiValue)) and len(value) == 0):
        raise SeriesRejected(f"no {keyword}: the stored values cannot be placed or read as HU")
    return value


def _frame(dataset: Dataset, frame_index: int, position: object, orientation: object, spacing: object,
           slope: object, intercept: object) -> CtFrame:
    if slope is None or intercept is None:
        # CT Image Storage makes them Type 1; assuming slope 1 / intercept 0 would shift such a series by +1024 HU.
        raise SeriesRejected("no RescaleSlope/RescaleIntercept: stored values are not known to be HU")
    return CtFrame(
        dataset=dataset,
        frame_index=frame_index,
        position_lps=np.asarray(_required(position, "ImagePositionPatient"), dtype=float),
        orientation=np.asarray(_required(orientation, "ImageOrientationPatient"), dtype=float),
        pixel_spacing_mm=tuple(float(v) for v in _required(spacing, "PixelSpacing")),  # type: ignore[arg-type]
        slope=float(slope),  # type: ignore[arg-type]
        intercept=float(intercept),  # type: ignore[arg-type]
    )


def instance_frames(dataset: Dataset) -> list[CtFrame]:
    """The image planes of one instance: one for classic CT, one per frame for enhanced multi-frame CT."""
    if "PerFrameFunctionalGroupsSequence" in dataset:
        shared_items = dataset.get("SharedFunctionalGroupsSequence")
        shared = shared_items[0] if shared_items else Dataset()
        frames = []
        for index, per_frame in enumerate(dataset.PerFrameFunctionalGroupsSequence):
            def value(sequence: str, keyword: str) -> object:
                return _functional_group_value(per_frame, shared, sequence, keyword)

            frames.append(_frame(
                dataset, index,
                value("PlanePositionSequence", "ImagePositionPatient"),
                value("PlaneOrientationSequence", "ImageOrientationPatient"),
                value("PixelMeasuresSequence", "PixelSpacing"),
                value("PixelValueTransformationSequence", "RescaleSlope"),
                value("PixelValueTransformationSequence", "RescaleIntercept"),
            ))
        return frames
    if int(dataset.get("NumberOfFrames", 1) or 1) != 1:
        raise SeriesRejected("multi-frame instance without per-frame functional groups: frame positions unknown")
    return [_frame(dataset, 0, dataset.get("ImagePositionPatient"), dataset.get("ImageOrientationPatient"),
                   dataset.get("PixelSpacing"), dataset.get("RescaleSlope"), dataset.get("RescaleIntercept"))]


def _decode_with_gdcm(dataset: Dataset) -> np.ndarray:
    """Stored values (frames, rows, columns) decoded by the GDCM inside SimpleITK, for transfer syntaxes pydicom's
    installed handlers cannot decode (JPEG-LS, 12-bit JPEG). GDCM would apply the rescale and invert MONOCHROME1
    itself, so it reads a copy holding only the pixel module, marked MONOCHROME2."""
    pixels_only = Dataset()
    pixels_only.file_meta = dataset.file_meta
    for keyword in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
                    "PixelRepresentation", "SamplesPerPixel", "NumberOfFrames", "PixelData"):
        if keyword in dataset:
            setattr(pixels_only, keyword, dataset[keyword].value)
    pixels_only.PhotometricInterpretation = "MONOCHROME2"
    with tempfile.TemporaryDirectory(prefix="ichal-decode-") as folder:
        path = Path(folder) / "instance.dcm"
        pydicom.dcmwrite(path, pixels_only, write_like_original=False)
        try:
            array = sitk.GetArrayFromImage(sitk.ReadImage(str(path), imageIO="GDCMImageIO"))
        except RuntimeError as error:
            raise SeriesRejected(f"pixel data in {dataset.file_meta.TransferSyntaxUID.name} cannot be decoded "
                                 f"by pydicom or GDCM ({str(error).strip().splitlines()[-1][:120]})") from None
    return array.reshape(-1, int(dataset.Rows), int(dataset.Columns))


def decode_stored_frames(dataset: Dataset) -> np.ndarray:
    """Stored pixel values (frames, rows, columns) of one instance, whatever its transfer syntax."""
    try:
        array = dataset.pixel_array
    except (NotImplementedError, RuntimeError, OSError):
        # pydicom lacks the codec (NotImplementedError/RuntimeError) or Pillow cannot decode it (OSError): try GDCM.
        array = _decode_with_gdcm(dataset)
    return np.asarray(array).reshape(-1, int(dataset.Rows), int(dataset.Columns))


def _padding_mask(dataset: Dataset, stored: np.ndarray) -> np.ndarray:
    """Where `stored` holds PixelPaddingValue (up to PixelPaddingRangeLimit): outside the scanned field."""
    padding = dataset.get("PixelPaddingValue")
    if padding is None or isinstance(padding, bytes):
        return np.zeros(stored.shape, dtype=bool)
    limit = dataset.get("PixelPaddingRangeLimit")
    if limit is None or isinstance(limit, bytes):
        return stored == int(padding)
    low, high = sorted((int(padding), int(limit)))
    return (stored >= low) & (stored <= high)


def _angle_degrees(a: np.ndarray, b: np.ndarray) -> float:
    cosine = abs(float(np.dot(a, b))) / (float(np.linalg.norm(a)) * float(np.linalg.norm(b)))
    return float(np.degrees(np.arccos(min(1.0, cosine))))


def _check_photometric(dataset: Dataset) -> None:
    photometric = str(dataset.get("PhotometricInterpretation", ""))
    if int(dataset.get("SamplesPerPixel", 1)) != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise SeriesRejected(f"photometric interpretation {photometric or '(none)'} is not greyscale CT")


def _sorted_frames(frames: list[CtFrame]) -> tuple[list[CtFrame], np.ndarray]:
    """Frames in ascending position along the slice normal, after the geometry checks; and the mean slice step (LPS mm)."""
    if len(frames) < MIN_SLICES:
        raise SeriesRejected(f"{len(frames)} slice(s): a head-CT stack needs at least {MIN_SLICES}")
    orientation = frames[0].orientation
    if orientation.shape != (6,) or any(not np.allclose(f.orientation, orientation, atol=1e-3) for f in frames):
        raise SeriesRejected("slices differ in ImageOrientationPatient: not one stack")
    if any(not np.allclose(f.pixel_spacing_mm, frames[0].pixel_spacing_mm, rtol=1e-3) for f in frames):
        raise SeriesRejected("slices differ in PixelSpacing: not one stack")
    shapes = {(int(f.dataset.Rows), int(f.dataset.Columns)) for f in frames}
    if len(shapes) != 1:
        raise SeriesRejected(f"slices differ in size {sorted(shapes)}: not one stack")
    normal = np.cross(orientation[:3], orientation[3:])
    obliquity = _angle_degrees(normal, np.array([0.0, 0.0, 1.0]))
    if obliquity > MAX_AXIAL_OBLIQUITY_DEGREES:
        raise SeriesRejected(f"not axial: slice normal {obliquity:.0f} degrees from the head-feet axis (coronal/sagittal)")
    ordered = sorted(frames, key=lambda f: float(np.dot(normal, f.position_lps)))
    steps = np.diff(np.array([f.position_lps for f in ordered]), axis=0)
    gaps = np.linalg.norm(steps, axis=1)
    if gaps.min() < 1e-3:
        raise SeriesRejected("two slices share one position: duplicated or overlapping acquisitions")
    median_gap = float(np.median(gaps))
    if float(np.abs(gaps - median_gap).max()) > SLICE_GAP_TOLERANCE * median_gap:
        raise SeriesRejected(f"uneven slice gaps ({gaps.min():.2f}-{gaps.max():.2f} mm): missing slices")
    step = steps.mean(axis=0)
    tilt = _angle_degrees(step, normal)
    if tilt > MAX_GANTRY_TILT_DEGREES:
        raise SeriesRejected(f"gantry tilt {tilt:.1f} degrees (slices stacked off their normal): not resampled")
    return ordered, step


def read_ct_volume(datasets: Sequence[Dataset]) -> CtVolume:
    """The HU volume of one CT series given as its instances (any order), or `SeriesRejected` with the reason.

    Padding (PixelPaddingValue/RangeLimit) and values below air (-1024 HU, e.g. -2000 or -3995 outside the
    reconstruction circle) become air; values above the plausible CT range (extended-range metal) are clipped to it.
    """
    if not datasets:
        raise SeriesRejected("no instances")
    if len({str(ds.get("SeriesInstanceUID", "")) for ds in datasets}) != 1:
        raise SeriesRejected("instances of several series")
    for dataset in datasets:
        if "PixelData" not in dataset:
            raise SeriesRejected("an instance has no pixel data")
        _check_photometric(dataset)
    frames, step = _sorted_frames([frame for ds in datasets for frame in instance_frames(ds)])
    decoded: dict[str, np.ndarray] = {}
    masked: dict[str, np.ndarray] = {}
    for dataset in datasets:
        stored = decode_stored_frames(dataset)
        decoded[str(dataset.SOPInstanceUID)] = stored
        masked[str(dataset.SOPInstanceUID)] = _padding_mask(dataset, stored)
    rows, columns = int(frames[0].dataset.Rows), int(frames[0].dataset.Columns)
    hu = np.empty((len(frames), rows, columns), dtype=np.float64)
    padding = np.empty(hu.shape, dtype=bool)
    for z, frame in enumerate(frames):
        uid = str(frame.dataset.SOPInstanceUID)
        hu[z] = decoded[uid][frame.frame_index] * frame.slope + frame.intercept
        padding[z] = masked[uid][frame.frame_index]
    to_air = padding | (hu < AIR_HU)
    hu[to_air] = AIR_HU
    np.minimum(hu, CT_MAX_PLAUSIBLE_HU, out=hu)
    volume = np.rint(hu).astype(np.int16)
    try:
        check_ct_hu(volume, name="series")
    except VolumeError as error:
        raise SeriesRejected(str(error)) from None
    orientation = frames[0].orientation
    row_spacing, column_spacing = frames[0].pixel_spacing_mm
    lps = np.eye(4)
    # Array axes (Z, Y, X): X runs along a row (first IOP triplet, column spacing), Y down the columns.
    lps[:3, 0] = orientation[:3] * column_spacing
    lps[:3, 1] = orientation[3:] * row_spacing
    lps[:3, 2] = step
    lps[:3, 3] = frames[0].position_lps
    return CtVolume(hu=volume, affine=RAS_TO_LPS @ lps, frames=frames, masked_voxels=int(to_air.sum()))


def read_series_folder(folder: str | Path) -> list[Dataset]:
    """Every `*.dcm` instance directly in `folder`, read with pydicom."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VolumeError(f"no such DICOM folder: {folder}")
    files = sorted(folder.glob("*.dcm"))
    if not files:
        raise VolumeError(f"no DICOM series found in {folder}")
    return [pydicom.dcmread(path) for path in files]
