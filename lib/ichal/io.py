"""Reading and writing CT volumes and label masks (NIfTI), with the checks every entry point needs.

Arrays in `ichal` are (Z, Y, X): axial slices first, as the 2D PatchFCN consumes them. Spacing is
(z, y, x) in mm. On disk, NIfTI keeps nibabel's (X, Y, Z) voxel order and the 4x4 affine.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

# A head CT in HU has air near -1000 and bone well above 300; anything else is not a CT in HU.
CT_MIN_PLAUSIBLE_HU = -1100.0
CT_MAX_PLAUSIBLE_HU = 4000.0


class VolumeError(ValueError):
    """A file or array is not a usable CT volume or label mask; the message says why."""


@dataclass(frozen=True)
class Volume:
    """A 3D array in (Z, Y, X) order with its NIfTI affine and (z, y, x) spacing in mm."""

    array: np.ndarray
    affine: np.ndarray

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        sx, sy, sz = np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
        return float(sz), float(sy), float(sx)


def read_nifti(path: str | Path) -> Volume:
    """Load a 3D NIfTI file as a (Z, Y, X) `Volume`; raises `VolumeError` naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise VolumeError(f"no such file: {path}")
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel raises many types for corrupt files
        # nibabel's messages quote the full path; only the file's name belongs in what a client sees.
        reason = str(error).replace(str(path), path.name)
        raise VolumeError(f"cannot read {path.name} as NIfTI: {reason}") from error
    data = np.squeeze(data)
    if data.ndim != 3:
        raise VolumeError(f"{path.name} has shape {data.shape}; expected a 3D volume")
    return Volume(array=np.ascontiguousarray(np.transpose(data, (2, 1, 0))), affine=image.affine.copy())


def read_nifti_grid(path: str | Path) -> tuple[tuple[int, ...], np.ndarray]:
    """The (Z, Y, X) shape and affine of a 3D NIfTI file, read from its header only (no voxels):
    what `read_nifti(path)` would give as `array.shape` and `affine`. Raises `VolumeError` like it."""
    path = Path(path)
    if not path.is_file():
        raise VolumeError(f"no such file: {path.name}")
    try:
        image = nib.load(str(path))
    except Exception as error:  # nibabel raises many types for corrupt files
        raise VolumeError(f"cannot read {path.name} as NIfTI: {str(error).replace(str(path), path.name)}") from error
    shape = tuple(int(d) for d in image.shape if d != 1)
    if len(shape) != 3:
        raise VolumeError(f"{path.name} has shape {tuple(image.shape)}; expected a 3D volume")
    return shape[::-1], image.affine.copy()


def check_ct_hu(array: np.ndarray, name: str = "volume") -> None:
    """Raise `VolumeError` unless `array` looks like a 3D CT in Hounsfield units."""
    if array.ndim != 3:
        raise VolumeError(f"{name} has shape {array.shape}; expected (Z, Y, X)")
    if min(array.shape) < 1 or array.shape[1] < 16 or array.shape[2] < 16:
        raise VolumeError(f"{name} has shape {array.shape}; slices must be at least 16x16")
    values = array.astype(np.float32, copy=False)
    if not np.isfinite(values).all():
        raise VolumeError(f"{name} contains NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if low < CT_MIN_PLAUSIBLE_HU or high > CT_MAX_PLAUSIBLE_HU or high - low < 200.0:
        raise VolumeError(
            f"{name} values span [{low:.0f}, {high:.0f}], not a CT in Hounsfield units "
            f"(expected air near -1000 and bone above 300)"
        )


def check_label(label: np.ndarray, image_shape: tuple[int, ...], name: str = "label") -> np.ndarray:
    """Return `label` as uint8 {0, 1} after checking shape and values against the image."""
    if tuple(label.shape) != tuple(image_shape):
        raise VolumeError(f"{name} shape {tuple(label.shape)} does not match image {tuple(image_shape)}")
    if not np.isfinite(label.astype(np.float32, copy=False)).all():
        raise VolumeError(f"{name} contains NaN or infinite values")
    values = np.unique(label)
    if not set(values.tolist()) <= {0, 1}:
        raise VolumeError(f"{name} must be binary (0 background, 1 hemorrhage); found values {values[:10].tolist()}")
    return label.astype(np.uint8)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_nifti(array_zyx: np.ndarray, affine: np.ndarray, path: str | Path) -> None:
    """Atomically write a (Z, Y, X) array as NIfTI (.nii or .nii.gz) with `affine`."""
    path = Path(path)
    image = nib.Nifti1Image(np.ascontiguousarray(np.transpose(array_zyx, (2, 1, 0))), affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    with tempfile.TemporaryDirectory(dir=path.parent if path.parent.exists() else None) as tmp:
        staged = Path(tmp) / f"staged{suffix}"
        nib.save(image, str(staged))
        atomic_write_bytes(path, staged.read_bytes())


# What infer can answer in, by `result_extension` (MONAI Label's client parameter; OHIF asks for NRRD).
RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd")


def write_result_volume(array_zyx: np.ndarray, affine: np.ndarray, path: str | Path) -> None:
    """Write a (Z, Y, X) result in the format `path`'s extension names (`RESULT_EXTENSIONS`): NIfTI as
    `write_nifti`; NRRD with SimpleITK in LPS, voxels in DICOM order (x along rows, slices last), the
    layout OHIF puts on the series it shows."""
    import SimpleITK as sitk

    path = Path(path)
    if path.name.endswith((".nii.gz", ".nii")):
        write_nifti(array_zyx, affine, path)
        return
    if not path.name.endswith(".nrrd"):
        raise VolumeError(f"result format of {path.name!r} is not one of {RESULT_EXTENSIONS}")
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=float)
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx))
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    image.SetDirection((lps[:3, :3] / spacing).flatten().tolist())
    with tempfile.TemporaryDirectory(dir=path.parent if path.parent.exists() else None) as tmp:
        staged = Path(tmp) / "staged.nrrd"
        sitk.WriteImage(image, str(staged), useCompression=False)
        atomic_write_bytes(path, staged.read_bytes())
