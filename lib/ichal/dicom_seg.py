"""DICOM Segmentation (SEG) write/read for hemorrhage labels with highdicom (no dcmqi).
Serving layer (DESIGN.md "Serving"): saved labels (MANUAL) and predictions (AUTOMATIC) go back to the PACS.
"""

from __future__ import annotations

from typing import Literal, Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from ichal.ct_ingest import instance_frames
from ichal.io import VolumeError, check_label

SEGMENT_LABEL = "hemorrhage"
SEGMENT_NUMBER = 1
# SNOMED-CT: category "Morphologically Abnormal Structure" (49755003), type "Hemorrhage" (50960005).
SEGMENT_CATEGORY = codes.SCT.MorphologicallyAbnormalStructure
SEGMENT_TYPE = codes.SCT.Hemorrhage
MANUFACTURER = "ichal"
SOFTWARE_VERSION = "0.1.0"


class SegError(ValueError):
    """A SEG or its source series is not usable (wrong series, geometry, segments)."""


def sort_source_slices(source_datasets: Sequence[Dataset]) -> list[Dataset]:
    """Source CT slices in volume order: ascending position along the slice normal.

    This is the (Z, Y, X) convention of `ichal.io`/NIfTI (z index grows along
    row x column direction). Raises SegError for mixed series or missing geometry.
    """
    if not source_datasets:
        raise SegError("no source slices given")
    series_uids = {str(ds.SeriesInstanceUID) for ds in source_datasets}
    if len(series_uids) != 1:
        raise SegError(f"source slices come from {len(series_uids)} series, expected one: {sorted(series_uids)}")
    try:
        orientation = np.asarray(source_datasets[0].ImageOrientationPatient, dtype=np.float64)
        normal = np.cross(orientation[:3], orientation[3:])
        positions = [float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float))) for ds in source_datasets]
    except AttributeError as error:
        raise SegError(f"source slices lack geometry tags: {error}") from None
    return [ds for _, ds in sorted(zip(positions, source_datasets), key=lambda pair: pair[0])]


def _multiframe_source(source_datasets: Sequence[Dataset]) -> list[int] | None:
    """For one enhanced multi-frame source instance: its frame indices (0-based) in z order, ascending along the
    slice normal as `ichal.ct_ingest` orders them; None for classic single-frame sources."""
    if len(source_datasets) != 1 or int(source_datasets[0].get("NumberOfFrames", 1) or 1) <= 1:
        return None
    try:
        frames = instance_frames(source_datasets[0])
    except VolumeError as error:
        raise SegError(f"multi-frame source lacks geometry: {error}") from None
    normal = np.cross(frames[0].orientation[:3], frames[0].orientation[3:])
    return [f.frame_index for f in sorted(frames, key=lambda f: float(np.dot(normal, f.position_lps)))]


def label_to_seg(
    label_zyx: np.ndarray,
    source_datasets: Sequence[Dataset],
    algorithm_type: Literal["manual", "automatic"] = "manual",
    algorithm_name: str = "ichal PatchFCN ensemble",
    content_creator_name: str | None = None,
    series_number: int = 300,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> Dataset:
    """Binary DICOM SEG of `label_zyx` over the source CT series.

    label_zyx: uint8 {0, 1}, shape (Z, Rows, Columns); slice z is the z-th source slice in
    `sort_source_slices` order (the order `ichal.dicom.read_ct_series` returns).
    algorithm_type: "manual" for a saved expert label, "automatic" for a model prediction
    (then `algorithm_name` names the model). `series_instance_uid`/`sop_instance_uid`: fixed UIDs (a retried
    upload then stores the same instance), fresh ones when None. One segment "hemorrhage" (SNOMED-CT coded).
    The SEG references the source series and every source instance, shares its frame of
    reference and geometry, and has one frame per source slice (empty ones included: about
    Z*Rows*Columns/8 bytes, so stock readers such as pydicom-seg, which crop to the frames
    present, return the whole volume; an all-empty label is a valid SEG). Returns the dataset;
    write it with `save_as` or upload it with `ichal.pacs.stow_series(url, [seg])`.
    """
    frame_order = _multiframe_source(source_datasets)
    sources = list(source_datasets) if frame_order is not None else sort_source_slices(source_datasets)
    depth = len(frame_order) if frame_order is not None else len(sources)
    image_shape = (depth, int(sources[0].Rows), int(sources[0].Columns))
    mask = check_label(np.asarray(label_zyx), image_shape, name="label for DICOM SEG")
    if frame_order is not None:
        # highdicom takes a multi-frame source's frames in their stored order: slice z goes to frame frame_order[z].
        stored_order = np.empty_like(mask)
        stored_order[frame_order] = mask
        mask = stored_order
    if algorithm_type == "manual":
        algorithm = hd.seg.SegmentAlgorithmTypeValues.MANUAL
        identification = None
        description = "Hemorrhage label (manual)"
    elif algorithm_type == "automatic":
        algorithm = hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        identification = hd.AlgorithmIdentificationSequence(
            name=algorithm_name, family=codes.cid7162.ArtificialIntelligence, version=SOFTWARE_VERSION
        )
        description = "Hemorrhage prediction"
    else:
        raise SegError(f"algorithm_type must be 'manual' or 'automatic', got '{algorithm_type}'")
    segment = hd.seg.SegmentDescription(
        segment_number=SEGMENT_NUMBER,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=SEGMENT_CATEGORY,
        segmented_property_type=SEGMENT_TYPE,
        algorithm_type=algorithm,
        algorithm_identification=identification,
    )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="ichal hemorrhage",
        software_versions=SOFTWARE_VERSION,
        device_serial_number="0",
        content_description=description,
        content_creator_name=content_creator_name,
        content_label="HEMORRHAGE",
        series_description=description,
        omit_empty_frames=False,
    )
    return seg


def _label_segment_numbers(seg: Dataset) -> list[int]:
    """Segments read as hemorrhage: labelled "hemorrhage" (any case) or typed SNOMED-CT Hemorrhage; a SEG another
    tool wrote with other names (3D Slicer's "Segment 1") has all its segments read, merged."""
    descriptions = list(seg.SegmentSequence)
    named = [
        int(d.SegmentNumber) for d in descriptions
        if str(d.SegmentLabel).strip().lower() == SEGMENT_LABEL
        or any(code.CodeValue == SEGMENT_TYPE.value for code in d.get("SegmentedPropertyTypeCodeSequence", []))
    ]
    return named or [int(d.SegmentNumber) for d in descriptions]


def _label_by_plane_position(seg: Dataset, sources: list[Dataset], segment_numbers: list[int]) -> np.ndarray:
    """The label of a SEG whose frames do not reference source instances: each frame placed on the source slice at
    its ImagePositionPatient (same frame of reference and in-plane grid assumed, as a SEG requires)."""
    normal = np.cross(*np.asarray(sources[0].ImageOrientationPatient, dtype=float).reshape(2, 3))
    slice_positions = np.array([float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float))) for ds in sources])
    shape = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    if (int(seg.Rows), int(seg.Columns)) != shape[1:]:
        raise SegError(f"SEG frames are {seg.Rows}x{seg.Columns}, source slices {shape[1]}x{shape[2]}")
    frames = np.asarray(seg.pixel_array).reshape(-1, *shape[1:])
    label = np.zeros(shape, dtype=np.uint8)
    for index, groups in enumerate(seg.PerFrameFunctionalGroupsSequence):
        if int(groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber) not in segment_numbers:
            continue
        position = float(np.dot(normal, np.asarray(groups.PlanePositionSequence[0].ImagePositionPatient, dtype=float)))
        z = int(np.argmin(np.abs(slice_positions - position)))
        if abs(slice_positions[z] - position) > 0.01:
            raise SegError(f"SEG frame {index + 1} lies between source slices (position {position:.2f} mm)")
        label[z] |= (frames[index] > 0).astype(np.uint8)
    return label


def seg_to_label(seg_dataset: Dataset, source_datasets: Sequence[Dataset]) -> np.ndarray:
    """uint8 {0, 1} label (Z, Rows, Columns) of the hemorrhage segment of a SEG (see `_label_segment_numbers`).

    `seg_dataset`: a SEG read with pydicom, or the object `label_to_seg` returned.
    Frames are mapped to source slices through the SEG's references to source instances, or, for a SEG
    without them, through their plane positions; z follows `sort_source_slices(source_datasets)`; slices
    without a frame are empty. Raises SegError if the SEG references another series.
    """
    frame_order = _multiframe_source(source_datasets)
    sources = list(source_datasets) if frame_order is not None else sort_source_slices(source_datasets)
    if "SegmentSequence" not in seg_dataset:
        raise SegError(f"dataset {seg_dataset.get('SOPInstanceUID', '')} is not a DICOM SEG (no SegmentSequence)")
    source_series_uid = str(sources[0].SeriesInstanceUID)
    referenced = {str(item.SeriesInstanceUID) for item in seg_dataset.get("ReferencedSeriesSequence", [])}
    if source_series_uid not in referenced:
        raise SegError(f"SEG {seg_dataset.SOPInstanceUID} references series {sorted(referenced)}, not {source_series_uid}")
    numbers = _label_segment_numbers(seg_dataset)
    try:
        seg = seg_dataset if isinstance(seg_dataset, hd.seg.Segmentation) else hd.seg.Segmentation.from_dataset(seg_dataset)
        if frame_order is not None:
            pixels = seg.get_pixels_by_source_frame(
                source_sop_instance_uid=str(sources[0].SOPInstanceUID),
                source_frame_numbers=[index + 1 for index in frame_order],
                segment_numbers=numbers,
                assert_missing_frames_are_empty=True,
            )
        else:
            pixels = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in sources],
                segment_numbers=numbers,
                assert_missing_frames_are_empty=True,
            )
    except (ValueError, KeyError, AttributeError):
        if frame_order is not None:
            raise SegError("SEG frames do not reference the multi-frame source's frames") from None
        # highdicom needs per-frame references to source instances; some tools write positions only.
        return _label_by_plane_position(seg_dataset, sources, numbers)
    return (pixels > 0).any(axis=-1).astype(np.uint8)
