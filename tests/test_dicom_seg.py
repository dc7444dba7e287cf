"""ichal.dicom_seg: SEG written with highdicom reads back (highdicom and pydicom-seg) voxel for voxel,
references its source series, survives a trip through Orthanc."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pydicom
import pydicom_seg
import pytest
from pydicom.uid import generate_uid

from ichal import dicom_seg, pacs
from ichal.io import VolumeError

pytest_plugins = ["pacs_fixtures"]  # orthanc_url, ct_series_dir, small_ct_label


def read_sources(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(path) for path in sorted(folder.glob("*.dcm"))]


def reread(dataset: pydicom.Dataset) -> pydicom.Dataset:
    """Serialise and parse again, as a file or STOW body would be."""
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def read_sources_as_new_series(sources: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    series_uid = generate_uid()
    copies = [reread(ds) for ds in sources]
    for ds in copies:
        ds.SeriesInstanceUID = series_uid
    return copies


@pytest.fixture
def sources(ct_series_dir: Path) -> list[pydicom.Dataset]:
    return read_sources(ct_series_dir)


@pytest.fixture
def label(small_ct_label: np.ndarray) -> np.ndarray:
    return small_ct_label


def test_seg_reads_back_voxel_for_voxel_with_highdicom_and_pydicom_seg(sources, label):
    assert 0 < label.sum() and label[0].sum() == 0  # a slice without hemorrhage is part of the test
    seg = reread(dicom_seg.label_to_seg(label, sources))

    np.testing.assert_array_equal(dicom_seg.seg_to_label(seg, sources), label)
    result = pydicom_seg.SegmentReader().read(seg)
    assert result.available_segments == {1}
    np.testing.assert_array_equal(result.segment_data(1), label)


def test_seg_references_the_source_series_and_every_instance(sources, label):
    seg = reread(dicom_seg.label_to_seg(label, sources))
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} == {
        ds.SOPInstanceUID for ds in sources
    }
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.Modality == "SEG" and seg.NumberOfFrames == len(sources)


def test_segment_is_snomed_coded_hemorrhage_manual_or_automatic(sources, label):
    manual = dicom_seg.label_to_seg(label, sources).SegmentSequence[0]
    assert manual.SegmentLabel == "hemorrhage"
    assert manual.SegmentAlgorithmType == "MANUAL"
    assert manual.SegmentedPropertyTypeCodeSequence[0].CodeValue == "50960005"
    assert manual.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
    assert manual.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    automatic = dicom_seg.label_to_seg(label, sources, algorithm_type="automatic", algorithm_name="model v3")
    segment = automatic.SegmentSequence[0]
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentAlgorithmName == "model v3"


def test_frames_follow_slice_position_not_file_order(sources, label):
    shuffled = list(sources)
    random.Random(3).shuffle(shuffled)
    seg = reread(dicom_seg.label_to_seg(label, shuffled))
    random.Random(4).shuffle(shuffled)
    np.testing.assert_array_equal(dicom_seg.seg_to_label(seg, shuffled), label)


def test_empty_label_is_a_valid_seg(sources, label):
    seg = reread(dicom_seg.label_to_seg(np.zeros_like(label), sources))
    assert dicom_seg.seg_to_label(seg, sources).sum() == 0
    assert pydicom_seg.SegmentReader().read(seg).segment_data(1).shape == label.shape


def test_bad_labels_and_foreign_segs_are_refused(sources, label):
    with pytest.raises(VolumeError, match="shape"):
        dicom_seg.label_to_seg(label[1:], sources)
    with pytest.raises(VolumeError, match="binary"):
        dicom_seg.label_to_seg(label * 2, sources)
    with pytest.raises(dicom_seg.SegError, match="algorithm_type"):
        dicom_seg.label_to_seg(label, sources, algorithm_type="semi")
    seg = reread(dicom_seg.label_to_seg(label, sources))
    other_series = read_sources_as_new_series(sources)
    with pytest.raises(dicom_seg.SegError, match="references series"):
        dicom_seg.seg_to_label(seg, other_series)


def test_seg_stored_in_orthanc_marks_its_series_labeled(orthanc_url: str, ct_series_dir: Path, tmp_path: Path, label):
    sources = read_sources(ct_series_dir)
    study_uid, series_uid = pacs.stow_series(orthanc_url, sources)
    seg = dicom_seg.label_to_seg(label, sources)
    assert pacs.stow_series(orthanc_url, [seg]) == (study_uid, seg.SeriesInstanceUID)

    assert pacs.list_labeled_series(orthanc_url)[series_uid] == seg.SeriesInstanceUID
    assert seg.SeriesInstanceUID not in {ref.series_uid for ref in pacs.list_ct_series(orthanc_url)}
    folder = pacs.fetch_series_to_cache(orthanc_url, study_uid, seg.SeriesInstanceUID, tmp_path / "cache")
    (seg_file,) = folder.glob("*.dcm")
    np.testing.assert_array_equal(dicom_seg.seg_to_label(pydicom.dcmread(seg_file), sources), label)
