"""DICOM Segmentation (SEG) write/read for hemorrhage labels with highdicom (no dcmqi).
Serving layer (DESIGN.md "Serving"): saved labels (MANUAL) and predictions (AUTOMATIC) go back to the PACS.
"""

from __future__ import annotations

from typing import Literal, Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from ichal.io import check_label

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


def label_to_seg(
    label_zyx: np.ndarray,
    source_datasets: Sequence[Dataset],
    algorithm_type: Literal["manual", "automatic"] = "manual",
    algorithm_name: str = "ichal PatchFCN ensemble",
    content_creator_name: str | None = None,
    series_number: int = 300,
) -> Dataset:
    """Binary DICOM SEG of `label_zyx` over the source CT series.

    label_zyx: uint8 {0, 1}, shape (Z, Rows, Columns); slice z is the z-th source slice in
    `sort_source_slices` order (the order `ichal.dicom.read_ct_series` returns).
    algorithm_type: "manual" for a saved expert label, "automatic" for a model prediction
    (then `algorithm_name` names the model). One segment "hemorrhage" (SNOMED-CT coded).
    The SEG references the source series and every source instance, shares its frame of
    reference and geometry, and has one frame per source slice (empty ones included: about
    Z*Rows*Columns/8 bytes, so stock readers such as pydicom-seg, which crop to the frames
    present, return the whole volume; an all-empty label is a valid SEG). Returns the dataset;
    write it with `save_as` or upload it with `ichal.pacs.stow_series(url, [seg])`.
    """
    sources = sort_source_slices(source_datasets)
    image_shape = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    mask = check_label(np.asarray(label_zyx), image_shape, name="label for DICOM SEG")
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
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
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


def seg_to_label(seg_dataset: Dataset, source_datasets: Sequence[Dataset]) -> np.ndarray:
    """uint8 {0, 1} label (Z, Rows, Columns) of the "hemorrhage" segment of a SEG.

    `seg_dataset`: a SEG read with pydicom, or the object `label_to_seg` returned.
    Frames are mapped to source slices through the SEG's references to source instances, so
    z follows `sort_source_slices(source_datasets)`; slices without a frame are empty.
    Raises SegError if the SEG references another series or has no "hemorrhage" segment.
    """
    sources = sort_source_slices(source_datasets)
    seg = seg_dataset
    if not isinstance(seg, hd.seg.Segmentation):
        try:
            seg = hd.seg.Segmentation.from_dataset(seg_dataset)
        except (AttributeError, ValueError) as error:
            raise SegError(f"dataset is not a readable DICOM SEG: {error}") from None
    source_series_uid = str(sources[0].SeriesInstanceUID)
    referenced = {str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence", [])}
    if source_series_uid not in referenced:
        raise SegError(f"SEG {seg.SOPInstanceUID} references series {sorted(referenced)}, not {source_series_uid}")
    numbers = seg.get_segment_numbers(segment_label=SEGMENT_LABEL)
    if not numbers:
        raise SegError(f"SEG {seg.SOPInstanceUID} has no segment labelled '{SEGMENT_LABEL}'")
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in sources],
        segment_numbers=numbers[:1],
        assert_missing_frames_are_empty=True,
    )
    return (pixels[..., 0] > 0).astype(np.uint8)
