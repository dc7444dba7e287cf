"""What OHIF's MONAI Label panel needs from the app, against a real Orthanc and the real server: a label
list it can extend, a next sample it can open (study/series UIDs), pre-labels as NRRD on the series
grid, and a DICOMweb proxy that keeps study-search filters and refuses anything but DICOMweb (issue 15)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk
from PIL import Image
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from ichal.dicom import write_ct_series
from ichal.dicom_seg import label_to_seg
from ichal.ensemble import save_ensemble
from ichal.pacs import list_labeled_series, stow_series
from ichal.phantom import generate_stack
from ichal.state import StateDB
from ichal.train import TrainItem, TrainSettings, train_ensemble
from browser_fixtures import launch_chromium, screenshot_path
from pacs_fixtures import ORTHANC_BINARY, start_orthanc, stop_orthanc
from server_fixtures import free_port, running_server, wait_for

pytestmark = pytest.mark.integration

PATIENTS = ("OHIF-A", "OHIF-B")


@pytest.fixture(scope="module")
def stacks():
    return [generate_stack(seed=200 + i, size=64, stack_id=f"ohif_{i}") for i in range(len(PATIENTS))]


@pytest.fixture(scope="module")
def pacs(stacks, tmp_path_factory):
    """An Orthanc of this module's own: one study per patient, each one CT series."""
    if not ORTHANC_BINARY.exists():
        pytest.fail("Orthanc is not installed: run scripts/install_system_deps.sh (the test command does)")
    folder = tmp_path_factory.mktemp("orthanc")
    url = start_orthanc(folder, free_port())
    series = {}
    for stack, patient in zip(stacks, PATIENTS):
        dicom_dir = tmp_path_factory.mktemp(stack.id)
        write_ct_series(stack.image_hu, stack.affine, dicom_dir, patient_id=patient)
        study_uid, series_uid = stow_series(url, dicom_dir)
        series[series_uid] = {"study": study_uid, "patient": patient, "stack": stack, "dir": dicom_dir}
    yield {"url": url, "series": series}
    stop_orthanc(folder)


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
def server(pacs, stacks, state, tmp_path_factory):
    """The app on that Orthanc, with a tiny committee already trained (infer needs one; 40 iterations are
    enough for it to mark some voxels, so the viewer has a pre-label to show)."""
    items = [TrainItem(s.id, s.image_hu, s.label, s.spacing_mm) for s in stacks]
    save_ensemble(train_ensemble(items, TrainSettings(ensemble_size=2, iterations=40, batch_size=2)),
                  state / "models" / "ensemble.pt")
    log = tmp_path_factory.mktemp("log") / "server.log"
    with running_server(pacs["url"], {"ensemble_size": "2", "pacs_sync_seconds": "1", "state_dir": str(state),
                                      # the panel sends no budget: a 40-iteration committee's masks can make one
                                      # stack's 80% bound exceed the default 60 min (422, "Failed to Fetch")
                                      "budget_minutes": "600"}, log) as url:
        wait_for(lambda: committee_scored(url), 300, "the start-up committee scoring (the panel's strategy needs it)")
        yield url


def committee_scored(server: str) -> bool:
    """Every unlabeled stack carries the current committee's score."""
    client = MONAILabelClient(server)
    version = client.info()["ichal"]["model"]["version"]
    objects = client.datastore()["objects"].values()
    return all(o["image"]["info"].get("ichal", {}).get("model_version") == version
               for o in objects if "final" not in o["labels"])


def test_info_labels_are_a_list_the_panel_can_extend(server):
    info = requests.get(f"{server}/info/", timeout=30).json()
    assert info["labels"] == ["hemorrhage"]
    assert info["models"]["hemorrhage"]["labels"] == {"hemorrhage": 1}


def test_next_sample_names_the_study_and_series_a_viewer_opens(server, pacs):
    sample = requests.post(f"{server}/activelearning/random", json={"budget_minutes": 600}, timeout=60).json()
    served = pacs["series"][sample["id"]]
    assert sample["SeriesInstanceUID"] == sample["id"] and sample["StudyInstanceUID"] == served["study"]
    assert sample["Modality"] == "CT" and sample["PatientID"] == served["patient"]
    assert sample["RetrieveURL"].endswith(f"/studies/{served['study']}/series/{sample['id']}")


def test_infer_answers_nrrd_on_the_dicom_series_grid(server, pacs, tmp_path):
    image_id = next(iter(pacs["series"]))
    client = MONAILabelClient(server, client_id="ohif", tmpdir=str(tmp_path))
    nrrd_path, _ = client.infer("hemorrhage", image_id, {"result_extension": ".nrrd", "result_dtype": "uint8"})
    nifti_path, _ = client.infer("hemorrhage", image_id, {})
    assert Path(nrrd_path).read_bytes()[:4] == b"NRRD"
    nrrd = sitk.ReadImage(nrrd_path)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(pacs["series"][image_id]["dir"])))
    series = reader.Execute()
    # The voxel grid of the series as a DICOM reader (OHIF, ITK) lays it out: same size, origin, axes.
    assert nrrd.GetSize() == series.GetSize()
    np.testing.assert_allclose(nrrd.GetOrigin(), series.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(nrrd.GetSpacing(), series.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(nrrd.GetDirection(), series.GetDirection(), atol=1e-6)
    nifti_zyx = np.transpose(np.asarray(nib.load(nifti_path).dataobj), (2, 1, 0))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(nrrd), nifti_zyx)
    with pytest.raises(MONAILabelClientException) as caught:
        client.infer("hemorrhage", image_id, {"result_extension": ".exe"})
    assert "result_extension" in str(caught.value.msg)


def connect_panel(page, server: str) -> None:
    """Type the server's URL into the MONAI Label panel and connect, as a user does."""
    page.wait_for_selector("#monailabelServerURL", timeout=120_000)
    notice = page.get_by_text("Confirm and Hide")
    if notice.count():
        notice.first.click()
    page.locator("#monailabelServerURL").fill(f"{server}/")
    page.locator("#monailabelServerURL").locator("xpath=../../td[3]/button").click()
    page.get_by_text("Active Learning", exact=True).wait_for(timeout=60_000)


def coloured_pixels(png: bytes) -> int:
    """Pixels with colour in the middle of a viewport screenshot, where the head is: the CT is grey, the
    segmentation overlay is not (the margins hold OHIF's coloured text and icons)."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    height, width = rgb.shape[:2]
    middle = rgb[height // 5: height * 4 // 5, width // 5: width * 4 // 5]
    return int(((middle.max(axis=2) - middle.min(axis=2)) > 60).sum())


def show_pre_label(page, nrrd: bytes, tmp_path: Path) -> int:
    """Scroll OHIF's axial view to the slice where the pre-label has most voxels; the coloured pixels seen.
    OHIF's slice order may run either way along the NRRD's z: both are tried."""
    path = tmp_path / "prelabel.nrrd"
    path.write_bytes(nrrd)
    per_slice = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).sum(axis=(1, 2))
    viewport = page.locator("canvas.cornerstone-canvas").first
    box = viewport.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    best = int(np.argmax(per_slice))
    position = 0  # OHIF opens the stack at its middle; count wheel steps from there
    seen = 0
    for target in (best, len(per_slice) - 1 - best):
        offset = target - len(per_slice) // 2
        for _ in range(abs(offset - position)):
            page.mouse.wheel(0, 120 if offset > position else -120)
            page.wait_for_timeout(60)
        position = offset
        page.wait_for_timeout(1_000)
        seen = coloured_pixels(viewport.screenshot())
        if seen:
            break
    return seen


STOW_FROM_PAGE = """async ({url, seg}) => {
    const bytes = Uint8Array.from(atob(seg), c => c.charCodeAt(0));
    const boundary = "ohif-stow-boundary";
    const body = new Blob([`--${boundary}\\r\\nContent-Type: application/dicom\\r\\n\\r\\n`, bytes, `\\r\\n--${boundary}--\\r\\n`]);
    const answer = await fetch(url, {method: "POST", body, headers: {
        "Content-Type": `multipart/related; type="application/dicom"; boundary=${boundary}`,
        "Accept": "application/dicom+json"}});
    return answer.status;
}"""


def seg_of(pacs: dict, image_id: str) -> bytes:
    """The stack's true mask as a DICOM SEG over its series: the label an annotator's correction ends as."""
    served = pacs["series"][image_id]
    sources = [pydicom.dcmread(p) for p in sorted(served["dir"].glob("*.dcm"))]
    buffer = io.BytesIO()
    label_to_seg(served["stack"].label, sources, algorithm_type="manual").save_as(buffer, write_like_original=False)
    return buffer.getvalue()


def timed_saves(state: Path, image_id: str) -> list[dict]:
    return [r for r in StateDB.open(state).label_times() if r["image"] == image_id]


def test_ohif_panel_connects_opens_the_next_sample_and_overlays_the_pre_label_and_a_stored_seg_is_the_label(
        server, pacs, state, tmp_path):
    from playwright import sync_api

    first_study = next(iter(pacs["series"].values()))["study"]
    console: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("console", lambda message: console.append(message.text))
            page.on("dialog", lambda dialog: dialog.accept())  # "This action will reload current page"
            page.goto(f"{server}/ohif/monai-label?StudyInstanceUIDs={first_study}", timeout=120_000)
            connect_panel(page, server)
            page.screenshot(path=str(screenshot_path("ohif_panel_connected.png", tmp_path)))

            page.get_by_text("Active Learning", exact=True).click()
            with page.expect_response(lambda r: "/activelearning/" in r.url) as served:
                page.get_by_role("button", name="Next Sample").click()
            assert served.value.status == 200, served.value.text()
            sample = served.value.json()
            form = page.locator(".nextSampleForm")
            form.get_by_text(sample["StudyInstanceUID"]).wait_for(timeout=30_000)
            page.screenshot(path=str(screenshot_path("ohif_next_sample.png", tmp_path)))
            form.get_by_role("button", name="OK").click()
            page.wait_for_url(f"**StudyInstanceUIDs={sample['StudyInstanceUID']}", timeout=60_000)

            connect_panel(page, server)
            page.get_by_text("Auto-Segmentation", exact=True).click()
            with page.expect_response(lambda r: "/infer/hemorrhage" in r.url, timeout=180_000) as inferred:
                page.locator('button[title="Run Segmentation"]').click()
            answer = inferred.value
            assert answer.status == 200 and answer.body()[:4] == b"NRRD"
            deadline = 60
            while "updated the segmentation's scalar data" not in console and deadline:
                page.wait_for_timeout(1_000)
                deadline -= 1
            overlay_pixels = show_pre_label(page, answer.body(), tmp_path)
            page.screenshot(path=str(screenshot_path("ohif_prelabel.png", tmp_path)))

            # The save: the page stores the corrected label as a DICOM SEG through the app's DICOMweb proxy,
            # the request OHIF's DICOMweb client makes (the bundled panel has no save button).
            stored = page.evaluate(STOW_FROM_PAGE, {"url": f"{server}/proxy/dicom/wado/studies",
                                                    "seg": base64.b64encode(seg_of(pacs, sample["id"])).decode()})
            assert stored == 200
            records = wait_for(lambda: timed_saves(state, sample["id"]), 60, "the SEG to become the label, timed")
            page.reload()
            page.get_by_text("SEG", exact=True).first.wait_for(timeout=60_000)  # the study now lists the SEG
            page.screenshot(path=str(screenshot_path("ohif_label_saved.png", tmp_path)))
        finally:
            browser.close()
    assert len(records) == 1 and records[0]["seconds"] > 0
    assert sample["id"] in pacs["series"] and f"image={sample['id']}" in answer.url
    assert "updated the segmentation's scalar data" in console, console[-20:]
    assert overlay_pixels > 0, "the pre-label's slice shows no coloured overlay"
    assert not [line for line in console if "not an NRRD" in line or "all_labels.push" in line]


def test_the_dicomweb_proxy_keeps_search_filters(server, pacs):
    studies = requests.get(f"{server}/proxy/dicom/qido/studies", params={"PatientID": PATIENTS[1]}, timeout=30).json()
    wanted = next(s["study"] for s in pacs["series"].values() if s["patient"] == PATIENTS[1])
    assert [s["0020000D"]["Value"][0] for s in studies] == [wanted]
    everyone = requests.get(f"{server}/proxy/dicom/qido/studies", timeout=30).json()
    assert len(everyone) == len(PATIENTS)
    metadata = requests.get(f"{server}/proxy/dicom/wado/studies/{wanted}/metadata", timeout=30)
    assert metadata.status_code == 200 and metadata.json()[0]["00080060"]["Value"] == ["CT"]


@pytest.mark.parametrize("method, path", [
    ("GET", "qido/studies/../../tools/now"), ("GET", "qido/../system"), ("GET", "wado/instances/%2e%2e/%2e%2e/system"),
    ("POST", "qido/studies"), ("POST", "wado/studies/1.2/series"), ("GET", "stow/studies"), ("GET", "admin/studies"),
])
def test_the_dicomweb_proxy_reaches_nothing_but_dicomweb(server, method, path):
    answer = requests.request(method, f"{server}/proxy/dicom/{path}", timeout=30)
    assert answer.status_code == 404, answer.text[:300]


def test_a_seg_stored_through_the_proxy_becomes_the_label_with_the_annotators_time(server, pacs, state):
    """The DICOMweb-native save a viewer makes: STOW-RS of a SEG through the app's proxy. The app mirrors it
    as the stack's label and measures the time from serving the stack to the SEG's arrival."""
    sample = requests.post(f"{server}/activelearning/random", json={"budget_minutes": 600}, timeout=60).json()
    image_id, served = sample["id"], pacs["series"][sample["id"]]
    seg = seg_of(pacs, image_id)
    boundary = "ichal-test-boundary"
    body = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + seg + f"\r\n--{boundary}--\r\n".encode()
    answer = requests.post(f"{server}/proxy/dicom/wado/studies", data=body, timeout=60, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}', "Accept": "application/dicom+json"})
    assert answer.status_code == 200, answer.text[:300]
    seg_series = str(pydicom.dcmread(io.BytesIO(seg)).SeriesInstanceUID)
    assert list_labeled_series(pacs["url"]).get(image_id) == seg_series

    records = wait_for(lambda: timed_saves(state, image_id), 60, "the SEG to be mirrored as the label and timed")
    assert len(records) == 1 and records[0]["client"] == "anonymous" and records[0]["seconds"] > 0
    assert records[0]["at_serve"]["strategy"] == "random"
    label = nib.load(state / "pacs" / "nifti" / "labels" / "final" / f"{image_id}.nii.gz")
    np.testing.assert_array_equal(np.transpose(np.asarray(label.dataobj), (2, 1, 0)), served["stack"].label)
    assert requests.get(f"{server}/info/", timeout=30).json()["datastore"]["completed"] >= 1
