"""Fixtures for PACS tests: a real Orthanc (scripts/orthanc.sh) on a free port, tiny generated CT series.
Use them from a test module with `pytest_plugins = ["pacs_fixtures"]`.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from server_fixtures import REPO, free_port

ORTHANC_SCRIPT = REPO / "scripts" / "orthanc.sh"
ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
SMALL_SHAPE_ZYX = (4, 64, 64)


def start_orthanc(folder: Path, port: int) -> str:
    """Start Orthanc for `folder` on `port` (scripts/orthanc.sh); returns its DICOMweb root URL."""
    subprocess.run([str(ORTHANC_SCRIPT), "start", str(folder), str(port)], check=True, capture_output=True, timeout=90)
    return f"http://127.0.0.1:{port}/dicom-web"


def stop_orthanc(folder: Path) -> None:
    subprocess.run([str(ORTHANC_SCRIPT), "stop", str(folder)], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def orthanc_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """DICOMweb root of a fresh Orthanc for the test session (storage in a temp folder)."""
    if not ORTHANC_BINARY.exists() or shutil.which("curl") is None:
        pytest.fail("Orthanc is not installed: run scripts/install_system_deps.sh (the test command does)")
    folder = tmp_path_factory.mktemp("orthanc")
    url = start_orthanc(folder, free_port())
    try:
        yield url
    finally:
        stop_orthanc(folder)


def small_ct_volume(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A tiny int16 HU volume (Z, Y, X) = SMALL_SHAPE_ZYX with a bright blob, and its RAS affine
    (0.5 mm pixels, 5 mm slices; columns to the patient's left, rows posterior, like the phantom)."""
    rng = np.random.default_rng(seed)
    z, y, x = SMALL_SHAPE_ZYX
    zz, yy, xx = np.mgrid[:z, :y, :x]
    head = (yy - y / 2) ** 2 + (xx - x / 2) ** 2 < (0.4 * x) ** 2
    image = np.where(head, 35, -1000) + rng.integers(-5, 6, size=SMALL_SHAPE_ZYX)
    image[(zz >= 1) & ((yy - 30) ** 2 + (xx - 34) ** 2 < 36)] = 70
    affine = np.diag([-0.5, -0.5, 5.0, 1.0])
    affine[:3, 3] = [16.0, 16.0, -10.0]
    return image.astype(np.int16), affine


def small_label(image_zyx: np.ndarray) -> np.ndarray:
    """uint8 label of the bright blob of `small_ct_volume` (empty on slice 0)."""
    return (image_zyx >= 60).astype(np.uint8)


@pytest.fixture
def small_ct_hu() -> np.ndarray:
    """The HU volume (Z, Y, X) that `ct_series_dir` holds."""
    return small_ct_volume(seed=0)[0]


@pytest.fixture
def small_ct_label(small_ct_hu: np.ndarray) -> np.ndarray:
    """A uint8 label over `small_ct_hu` (hemorrhage on slices 1-3, none on slice 0)."""
    return small_label(small_ct_hu)


@pytest.fixture
def ct_series_dir(tmp_path: Path) -> Path:
    """A folder with a fresh tiny CT series (new UIDs each time) written by `ichal.dicom.write_ct_series`."""
    from ichal.dicom import write_ct_series

    image, affine = small_ct_volume(seed=0)
    folder = tmp_path / "ct"
    write_ct_series(image, affine, folder)
    return folder
