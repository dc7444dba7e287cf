"""ichal.pacs against a real Orthanc: STOW, CT listing (non-CT skipped), cached fetch, PACS down."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import MRImageStorage, generate_uid
from server_fixtures import free_port

from ichal import pacs
from ichal.dicom import read_ct_series

pytest_plugins = ["pacs_fixtures"]  # orthanc_url, ct_series_dir, small_ct_hu


def test_stow_list_fetch_returns_the_same_hu(orthanc_url: str, ct_series_dir: Path, small_ct_hu, tmp_path, monkeypatch):
    study_uid, series_uid = pacs.stow_series(orthanc_url, ct_series_dir)

    listed = {ref.series_uid: ref for ref in pacs.list_ct_series(orthanc_url)}
    assert series_uid in listed
    assert listed[series_uid].study_uid == study_uid
    assert listed[series_uid].instance_count == len(list(ct_series_dir.glob("*.dcm")))

    cached = pacs.fetch_series_to_cache(orthanc_url, study_uid, series_uid, tmp_path / "cache")
    fetched_hu, _ = read_ct_series(cached)
    np.testing.assert_array_equal(fetched_hu, small_ct_hu)

    def no_network(url: str):
        raise AssertionError("second fetch went to the PACS")

    monkeypatch.setattr(pacs, "make_client", no_network)
    assert pacs.fetch_series_to_cache(orthanc_url, study_uid, series_uid, tmp_path / "cache") == cached


def test_interrupted_fetch_is_fetched_again(orthanc_url: str, ct_series_dir: Path, tmp_path: Path):
    study_uid, series_uid = pacs.stow_series(orthanc_url, ct_series_dir)
    stale = tmp_path / "cache" / series_uid
    stale.mkdir(parents=True)
    (stale / "half.dcm").write_bytes(b"not dicom")  # no completion marker
    cached = pacs.fetch_series_to_cache(orthanc_url, study_uid, series_uid, tmp_path / "cache")
    assert not (cached / "half.dcm").exists()
    assert (cached / pacs.COMPLETE_MARKER).is_file()


def test_non_ct_series_is_skipped_with_a_log_line(orthanc_url: str, ct_series_dir: Path, caplog):
    mr_series_uid = generate_uid()
    datasets = [pydicom.dcmread(path) for path in sorted(ct_series_dir.glob("*.dcm"))]
    for ds in datasets:
        ds.Modality = "MR"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = mr_series_uid
    pacs.stow_series(orthanc_url, datasets)
    with caplog.at_level(logging.INFO, logger="ichal.pacs"):
        listed = [ref.series_uid for ref in pacs.list_ct_series(orthanc_url)]
    assert mr_series_uid not in listed
    assert f"skipping series {mr_series_uid}: modality MR is not CT" in caplog.text


def test_stow_refuses_several_series_in_one_call(ct_series_dir: Path):
    first, second = (pydicom.dcmread(path) for path in sorted(ct_series_dir.glob("*.dcm"))[:2])
    second.SeriesInstanceUID = generate_uid()
    with pytest.raises(ValueError, match="one series at a time"):
        pacs.stow_series("http://127.0.0.1:9/dicom-web", [first, second])


def test_pacs_down_raises_pacs_unavailable_with_a_clear_message(tmp_path: Path, ct_series_dir: Path):
    url = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens there
    with pytest.raises(pacs.PacsUnavailable, match=f"PACS at {url} is not reachable.*is Orthanc running"):
        pacs.list_ct_series(url)
    with pytest.raises(pacs.PacsUnavailable):
        pacs.stow_series(url, ct_series_dir)
    with pytest.raises(pacs.PacsUnavailable):
        pacs.fetch_series_to_cache(url, "1.2.3", "1.2.3.4", tmp_path)
    started = time.monotonic()
    with pytest.raises(pacs.PacsUnavailable, match="waited"):
        pacs.wait_for_pacs(url, timeout_seconds=0.5)
    assert time.monotonic() - started < 5.0


def test_wait_for_pacs_returns_when_orthanc_answers(orthanc_url: str):
    pacs.wait_for_pacs(orthanc_url, timeout_seconds=5.0)
