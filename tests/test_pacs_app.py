"""The hemorrhage app served from a real Orthanc over DICOMweb: listing, next sample, infer, DICOM-SEG
write-back, labeled status derived from the PACS across restarts, and a PACS that goes down."""

from __future__ import annotations

import re
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom_seg
import pytest
import highdicom as hd
from monailabel.client import MONAILabelClient

from ichal.dicom import write_ct_series
from ichal.dicom_seg import seg_to_label
from ichal.ensemble import save_ensemble
from ichal.pacs import fetch_series_to_cache, list_labeled_series, stow_series
from ichal.phantom import generate_stack
from ichal.train import TrainItem, TrainSettings, train_ensemble
from pacs_fixtures import ORTHANC_BINARY, start_orthanc, stop_orthanc
from server_fixtures import free_port, running_server

pytestmark = pytest.mark.integration

CONF = {"ensemble_size": "2", "pacs_sync_seconds": "1"}


def status_of(error) -> int:
    return int(re.search(r"Status: (\d+)", str(error.msg)).group(1))


@pytest.fixture(scope="module")
def stacks():
    return [generate_stack(seed=100 + i, size=64, stack_id=f"ct_{i:04d}") for i in range(3)]


@pytest.fixture(scope="module")
def tiny_model_path(stacks, tmp_path_factory) -> Path:
    """A tiny trained committee, so infer has a model without a training run through the server."""
    items = [TrainItem(s.id, s.image_hu, s.label, s.spacing_mm) for s in stacks]
    model = train_ensemble(items, TrainSettings(ensemble_size=2, iterations=2, batch_size=2))
    path = tmp_path_factory.mktemp("model") / "ensemble.pt"
    save_ensemble(model, path)
    return path


@pytest.fixture(scope="module")
def pacs(stacks, tmp_path_factory):
    """An Orthanc of this module's own, holding the stacks as CT series and one MR series."""
    if not ORTHANC_BINARY.exists():
        pytest.fail("Orthanc is not installed: run scripts/install_system_deps.sh (the test command does)")
    folder = tmp_path_factory.mktemp("orthanc")
    port = free_port()
    url = start_orthanc(folder, port)
    series = {}
    for stack in stacks:
        dicom_dir = tmp_path_factory.mktemp(stack.id)
        write_ct_series(stack.image_hu, stack.affine, dicom_dir)
        series[stow_series(url, dicom_dir)[1]] = stack
    mr_dir = tmp_path_factory.mktemp("mr")
    write_ct_series(stacks[0].image_hu, stacks[0].affine, mr_dir)
    mr = [pydicom.dcmread(p) for p in sorted(mr_dir.glob("*.dcm"))]
    mr_uid = pydicom.uid.generate_uid()
    for ds in mr:
        ds.Modality, ds.SeriesInstanceUID, ds.SOPInstanceUID = "MR", mr_uid, pydicom.uid.generate_uid()
    stow_series(url, mr)
    yield {"url": url, "folder": folder, "port": port, "series": series, "mr": mr_uid}
    stop_orthanc(folder)


def state_with_model(tmp_path: Path, model_path: Path) -> Path:
    state = tmp_path / "state"
    (state / "models").mkdir(parents=True)
    (state / "models" / "ensemble.pt").write_bytes(model_path.read_bytes())
    return state


def test_serving_labeling_and_seg_write_back_through_the_pacs(pacs, tiny_model_path, tmp_path):
    url, series = pacs["url"], pacs["series"]
    state = state_with_model(tmp_path, tiny_model_path)
    log = tmp_path / "server.log"
    with running_server(url, {**CONF, "state_dir": str(state)}, log) as server:
        reader = MONAILabelClient(server, client_id="reader", tmpdir=str(tmp_path))
        info = reader.info()
        assert info["datastore"]["total"] == 3 and info["datastore"]["completed"] == 0
        assert f"skipping series {pacs['mr']}: modality MR is not CT" in log.read_text()

        sample = reader.next_sample("cold_start", {"budget_minutes": 60})
        assert sample["id"] in series
        label_path, _ = reader.infer("hemorrhage", sample["id"], {})
        mirrored = nib.load(state / "pacs" / "nifti" / f"{sample['id']}.nii.gz")
        assert nib.load(label_path).shape == mirrored.shape
        np.testing.assert_allclose(nib.load(label_path).affine, mirrored.affine, atol=1e-4)

        truth = series[sample["id"]].label
        truth_path = tmp_path / "truth.nii.gz"
        nib.save(nib.Nifti1Image(np.transpose(truth, (2, 1, 0)), mirrored.affine), str(truth_path))
        reader.save_label(sample["id"], str(truth_path), tag="final")

    seg_uid = list_labeled_series(url)[sample["id"]]
    study_uid = pydicom.dcmread(next((state / "pacs" / "dicom" / sample["id"]).glob("*.dcm"))).StudyInstanceUID
    seg_file = next(fetch_series_to_cache(url, study_uid, seg_uid, tmp_path / "fetched").glob("*.dcm"))
    seg = pydicom.dcmread(seg_file)
    sources = [pydicom.dcmread(p) for p in (state / "pacs" / "dicom" / sample["id"]).glob("*.dcm")]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sample["id"]
    np.testing.assert_array_equal(seg_to_label(seg, sources), truth)
    assert hd.seg.Segmentation.from_dataset(seg).number_of_segments == 1
    read_back = pydicom_seg.SegmentReader().read(seg)
    assert int(read_back.segment_data(1).sum()) == int(truth.sum())

    # A restart with an empty cache still knows the stack is labeled: the SEG in the PACS says so.
    fresh = state_with_model(tmp_path / "restart", tiny_model_path)
    with running_server(url, {**CONF, "state_dir": str(fresh)}, tmp_path / "restart.log") as server:
        info = MONAILabelClient(server).info()
        assert info["datastore"]["completed"] == 1
        restored = nib.load(fresh / "pacs" / "nifti" / "labels" / "final" / f"{sample['id']}.nii.gz")
        np.testing.assert_array_equal(np.transpose(np.asarray(restored.dataobj), (2, 1, 0)), truth)


def test_a_save_while_the_pacs_is_down_is_kept_and_uploaded_when_it_is_back(pacs, tiny_model_path, tmp_path):
    url, series = pacs["url"], pacs["series"]
    state = state_with_model(tmp_path, tiny_model_path)
    with running_server(url, {**CONF, "state_dir": str(state)}, tmp_path / "server.log") as server:
        reader = MONAILabelClient(server, client_id="night-shift", tmpdir=str(tmp_path))
        image_id = reader.next_sample("random", {"budget_minutes": 600})["id"]
        mirrored = nib.load(state / "pacs" / "nifti" / f"{image_id}.nii.gz")
        label = tmp_path / "label.nii.gz"
        nib.save(nib.Nifti1Image(np.transpose(series[image_id].label, (2, 1, 0)), mirrored.affine), str(label))
        stop_orthanc(pacs["folder"])
        try:
            reader.save_label(image_id, str(label), tag="final")
            assert (state / "pacs" / "nifti" / "labels" / "final" / f"{image_id}.nii.gz").exists()
            assert reader.info()["datastore"]["pending_seg_uploads"] == 1
        finally:
            start_orthanc(pacs["folder"], pacs["port"])
        time.sleep(1.5)
        reader.next_sample("random", {"budget_minutes": 600})  # any request that syncs retries the upload
        assert reader.info()["datastore"]["pending_seg_uploads"] == 0
    assert image_id in list_labeled_series(url)


def test_the_app_starts_with_the_pacs_down_and_serves_once_it_is_up(stacks, tmp_path):
    if not ORTHANC_BINARY.exists():
        pytest.fail("Orthanc is not installed: run scripts/install_system_deps.sh (the test command does)")
    port = free_port()
    url = f"http://127.0.0.1:{port}/dicom-web"
    log = tmp_path / "server.log"
    with running_server(url, {**CONF, "state_dir": str(tmp_path / "state")}, log) as server:
        reader = MONAILabelClient(server, client_id="early-bird", tmpdir=str(tmp_path))
        assert reader.info()["datastore"]["total"] == 0
        assert "is not reachable" in log.read_text()
        folder = tmp_path / "orthanc"
        start_orthanc(folder, port)
        try:
            dicom_dir = tmp_path / "ct"
            write_ct_series(stacks[0].image_hu, stacks[0].affine, dicom_dir)
            series_uid = stow_series(url, dicom_dir)[1]
            time.sleep(1.5)
            assert reader.next_sample("cold_start", {"budget_minutes": 60})["id"] == series_uid
        finally:
            stop_orthanc(folder)
