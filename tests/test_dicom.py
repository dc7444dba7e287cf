"""Tests of the DICOM CT series writer/reader: SimpleITK round trip against the NIfTI, tags, UIDs, bad input."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from ichal.dicom import read_ct_series, write_ct_series
from ichal.io import VolumeError, write_nifti
from ichal.phantom import generate_stack


@pytest.fixture(scope="module")
def stack():
    return generate_stack(6, 48, stack_id="ct_0006")


@pytest.fixture(scope="module")
def written(stack, tmp_path_factory):
    folder = tmp_path_factory.mktemp("series")
    paths = write_ct_series(stack.image_hu, stack.affine, folder / "dicom", patient_id="PHANTOM-0006")
    write_nifti(stack.image_hu, stack.affine, folder / "ct_0006.nii.gz")
    return folder, paths


def test_simpleitk_reads_the_series_as_the_nifti_of_the_same_stack(written):
    folder, _ = written
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder / "dicom")))
    from_dicom = reader.Execute()
    from_nifti = sitk.ReadImage(str(folder / "ct_0006.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(from_dicom), sitk.GetArrayFromImage(from_nifti))
    np.testing.assert_allclose(from_dicom.GetOrigin(), from_nifti.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(from_dicom.GetSpacing(), from_nifti.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(from_dicom.GetDirection(), from_nifti.GetDirection(), atol=1e-6)


def test_read_ct_series_returns_the_hu_array_and_ras_affine(stack, written):
    folder, _ = written
    array, affine = read_ct_series(folder / "dicom")
    assert array.dtype == np.int16
    np.testing.assert_array_equal(array, stack.image_hu)
    np.testing.assert_allclose(affine, stack.affine, atol=1e-4)


def test_tags_describe_a_synthetic_ct_series_with_consistent_geometry(stack, written):
    _, paths = written
    datasets = [pydicom.dcmread(path) for path in paths]
    assert len(datasets) == stack.image_hu.shape[0]
    first = datasets[0]
    assert first.SOPClassUID == pydicom.uid.CTImageStorage and first.Modality == "CT"
    assert first.PatientID == "PHANTOM-0006" and "Phantom" in str(first.PatientName)
    assert float(first.RescaleIntercept) == -1024.0 and float(first.RescaleSlope) == 1.0
    assert [float(v) for v in first.PixelSpacing] == pytest.approx([stack.spacing_mm[1], stack.spacing_mm[2]])
    assert float(first.SliceThickness) == pytest.approx(stack.spacing_mm[0])
    assert [float(v) for v in first.ImageOrientationPatient] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1 and len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    np.testing.assert_allclose(np.diff(positions[:, 2]), stack.spacing_mm[0])
    # LPS x of the first column equals minus the RAS x of the affine's origin.
    assert positions[0, 0] == pytest.approx(-stack.affine[0, 3], abs=1e-4)
    np.testing.assert_array_equal(first.pixel_array.astype(np.int32) - 1024, stack.image_hu[0])
    for ds in datasets:
        assert ds.StudyDate and ds.SeriesDate and ds.FrameOfReferenceUID == first.FrameOfReferenceUID


def test_each_write_makes_fresh_uids_unless_a_study_is_given(stack, tmp_path):
    study = pydicom.uid.generate_uid()
    one = pydicom.dcmread(write_ct_series(stack.image_hu, stack.affine, tmp_path / "a", study_instance_uid=study)[0])
    two = pydicom.dcmread(write_ct_series(stack.image_hu, stack.affine, tmp_path / "b", study_instance_uid=study)[0])
    three = pydicom.dcmread(write_ct_series(stack.image_hu, stack.affine, tmp_path / "c")[0])
    assert one.StudyInstanceUID == two.StudyInstanceUID == study != three.StudyInstanceUID
    assert one.SeriesInstanceUID != two.SeriesInstanceUID and one.SOPInstanceUID != two.SOPInstanceUID


def test_bad_input_is_rejected_with_a_clear_message(stack, tmp_path):
    with pytest.raises(VolumeError, match="expected"):
        write_ct_series(stack.image_hu[0], stack.affine, tmp_path / "flat")
    sheared = stack.affine.copy()
    sheared[0, 1] = 0.3
    with pytest.raises(VolumeError, match="orthogonal"):
        write_ct_series(stack.image_hu, sheared, tmp_path / "sheared")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeError, match="no DICOM series"):
        read_ct_series(tmp_path / "empty")
    with pytest.raises(VolumeError, match="no such"):
        read_ct_series(tmp_path / "missing")
