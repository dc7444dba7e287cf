"""ichal.io: the header-only grid reader agrees with the full reader, and errors never show server paths."""

from __future__ import annotations

import numpy as np
import pytest

from ichal.io import VolumeError, read_nifti, read_nifti_grid, write_nifti


def test_the_grid_from_the_header_is_the_full_readers_shape_and_affine(tmp_path):
    affine = np.diag([0.45, 0.5, 5.0, 1.0])
    affine[:3, 3] = (-100.0, -110.0, 20.0)
    path = tmp_path / "ct.nii.gz"
    write_nifti(np.zeros((7, 20, 24), np.int16), affine, path)
    shape, grid_affine = read_nifti_grid(path)
    volume = read_nifti(path)
    assert shape == volume.array.shape == (7, 20, 24)
    np.testing.assert_allclose(grid_affine, volume.affine)


@pytest.mark.parametrize("reader", [read_nifti, read_nifti_grid])
def test_unreadable_files_are_named_without_their_folder(tmp_path, reader):
    path = tmp_path / "secret-folder" / "upload.nii.gz"
    path.parent.mkdir()
    path.write_bytes(b"\x1f\x8b not a NIfTI")
    with pytest.raises(VolumeError) as caught:
        reader(path)
    assert "upload.nii.gz" in str(caught.value) and "secret-folder" not in str(caught.value)


def test_a_2d_image_is_not_a_volume(tmp_path):
    path = tmp_path / "flat.nii.gz"
    write_nifti(np.zeros((1, 20, 24), np.int16), np.eye(4), path)
    with pytest.raises(VolumeError, match="expected a 3D volume"):
        read_nifti_grid(path)
