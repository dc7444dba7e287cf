"""Real-scanner DICOM (tests/real_dicom_corpus.py: pydicom's test files built into small series) through the reader,
then through the real Orthanc and the real MONAI Label server: each variant served or quarantined with its reason,
and no bad series able to fail a request for another series, a sync, a SEG upload, training or a restart."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes

from ichal.ct_ingest import AIR_HU, SeriesRejected, read_ct_volume
from ichal.dicom_seg import label_to_seg, seg_to_label
from ichal.ensemble import save_ensemble
from ichal.pacs import list_labeled_series, list_series, stow_series
from ichal.phantom import generate_stack
from ichal.train import TrainItem, TrainSettings, train_ensemble
from pacs_fixtures import ORTHANC_BINARY, start_orthanc, stop_orthanc
from real_dicom_corpus import VARIANTS, Variant, ct_small, enhanced_multiframe, jpeg2000, padded, rle, uncompressed_mr_twin
from server_fixtures import free_port, running_server, wait_for

SERVED = [v for v in VARIANTS if v.reason is None]
SKIPPED = [v for v in VARIANTS if v.reason is not None]


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name for v in VARIANTS])
def test_each_variant_is_read_or_rejected_with_its_reason(variant: Variant):
    if variant.reason is None:
        volume = read_ct_volume(variant.build())
        assert volume.hu.dtype == np.int16 and volume.hu.shape[0] >= 3
        assert int(volume.hu.min()) >= AIR_HU and int(volume.hu.max()) > 300
    else:
        with pytest.raises(SeriesRejected, match=re.escape(variant.reason)):
            read_ct_volume(variant.build())


def test_lossless_codecs_decode_to_the_uncompressed_original():
    original = read_ct_volume(uncompressed_mr_twin())
    for name in ("jpeg_ls", "rle", "jpeg2000_lossless"):
        decoded = read_ct_volume(next(v for v in VARIANTS if v.name == name).build())
        np.testing.assert_array_equal(decoded.hu, original.hu, err_msg=name)


@pytest.mark.parametrize("name", ["monochrome1", "deflate", "enhanced_multiframe", "no_frame_of_reference"])
def test_same_pixels_in_another_encoding_give_the_same_hu_and_geometry(name: str):
    reference = read_ct_volume(ct_small())
    volume = read_ct_volume(next(v for v in VARIANTS if v.name == name).build())
    np.testing.assert_array_equal(volume.hu, reference.hu)  # MONOCHROME1: not inverted (SimpleITK inverts it)
    np.testing.assert_allclose(volume.affine, reference.affine, atol=1e-4)
    assert reference.hu.min() == -896  # CT_small's HU: stored 128 with intercept -1024, nothing masked


def test_padding_and_values_below_air_become_air():
    reference = read_ct_volume(ct_small()).hu
    volume = read_ct_volume(padded())
    assert (volume.hu[:, :, :10] == AIR_HU).all() and (volume.hu[:, :5, -5:] == AIR_HU).all()
    np.testing.assert_array_equal(volume.hu[:, 5:, 10:], reference[:, 5:, 10:])
    assert volume.masked_voxels == 4 * (128 * 10 + 5 * 5)
    raw = jpeg2000()
    stored_min = int(raw[0].pixel_array.min()) + int(raw[0].RescaleIntercept)
    assert stored_min == -3995  # the real file's values outside the reconstruction circle
    assert int(read_ct_volume(raw).hu.min()) == AIR_HU


def test_a_label_over_an_enhanced_multiframe_series_round_trips_through_a_seg():
    sources = enhanced_multiframe()
    volume = read_ct_volume(sources)
    label = np.zeros(volume.hu.shape, np.uint8)
    label[3, 50:60, 50:70] = 1
    seg = label_to_seg(label, sources)
    np.testing.assert_array_equal(seg_to_label(seg, sources), label)
    frame = next(i for i, pixels in enumerate(seg.pixel_array) if pixels.any())
    position = seg.PerFrameFunctionalGroupsSequence[frame].PlanePositionSequence[0].ImagePositionPatient
    np.testing.assert_allclose([float(v) for v in position], volume.frames[3].position_lps, atol=1e-3)


# -- through the real Orthanc and the real server ------------------------------------------------------------------

CONF = {"ensemble_size": "2", "pacs_sync_seconds": "1", "train_iterations": "3", "train_batch_size": "2",
        "model_spacing_mm": "3.6"}


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory) -> Path:
    stacks = [generate_stack(seed=200 + i, size=64, stack_id=f"ct_{i}") for i in range(2)]
    items = [TrainItem(s.id, s.image_hu, s.label, s.spacing_mm) for s in stacks]
    model = train_ensemble(items, TrainSettings(ensemble_size=2, iterations=2, batch_size=2, spacing_mm=3.6))
    path = tmp_path_factory.mktemp("model") / "ensemble.pt"
    save_ensemble(model, path)
    return path


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """An Orthanc of this module's own holding every variant, and pydicom's liver SEG (it references a series
    that is not there)."""
    if not ORTHANC_BINARY.exists():
        pytest.fail("Orthanc is not installed: run scripts/install_system_deps.sh (the test command does)")
    folder = tmp_path_factory.mktemp("orthanc")
    url = start_orthanc(folder, free_port())
    series = {variant.name: stow_series(url, variant.build())[1] for variant in VARIANTS}
    stow_series(url, [pydicom.dcmread(get_testdata_file("liver_1frame.dcm"))])
    yield {"url": url, "series": series}
    stop_orthanc(folder)


class Tally:
    """HTTP outcomes of the requests made for served series (status per request)."""

    def __init__(self) -> None:
        self.statuses: list[tuple[str, int]] = []

    def call(self, what: str, fn, *args, **kwargs):
        try:
            result = fn(*args, **kwargs)
        except MONAILabelClientException as error:
            self.statuses.append((what, int(re.search(r"Status: (\d+)", str(error.msg)).group(1))))
            return None
        self.statuses.append((what, 200))
        return result

    def failed(self) -> list[tuple[str, int]]:
        return [(what, status) for what, status in self.statuses if status >= 400]


def seg_count(url: str, source_uid: str) -> int:
    """SEG instances in the PACS that reference series `source_uid`."""
    from ichal.pacs import make_client

    client, count = make_client(url), 0
    for ref in list_series(url, modality="SEG"):
        for metadata in client.retrieve_series_metadata(ref.study_uid, ref.series_uid):
            seg = pydicom.Dataset.from_json(metadata, bulk_data_uri_handler=lambda uri: b"")
            referenced = seg.get("ReferencedSeriesSequence")
            count += bool(referenced) and referenced[0].SeriesInstanceUID == source_uid
    return count


def label_file(state: Path, image_id: str, label_zyx: np.ndarray, folder: Path) -> str:
    affine = nib.load(state / "pacs" / "nifti" / f"{image_id}.nii.gz").affine
    path = folder / f"{image_id}-label.nii.gz"
    nib.save(nib.Nifti1Image(np.transpose(label_zyx, (2, 1, 0)).astype(np.uint8), affine), str(path))
    return str(path)


def foreign_seg(sources: list[pydicom.Dataset], label_zyx: np.ndarray) -> pydicom.Dataset:
    """A SEG as another tool writes it: segment "Segment 1" (3D Slicer's default), frames placed by position only."""
    sources = sorted(sources, key=lambda ds: float(ds.ImagePositionPatient[2]))
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Segment 1", segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=label_zyx, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=hd.UID(), series_number=9, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="another tool", manufacturer_model_name="x", software_versions="1",
        device_serial_number="1", omit_empty_frames=False,
    )
    for groups in seg.PerFrameFunctionalGroupsSequence:
        del groups.DerivationImageSequence
    return seg


def test_real_dicom_through_orthanc_and_the_server(pacs, tiny_model_path, tmp_path):
    url, series = pacs["url"], pacs["series"]
    served = {v.name: series[v.name] for v in SERVED}
    state = tmp_path / "state"
    (state / "models").mkdir(parents=True)
    (state / "models" / "ensemble.pt").write_bytes(tiny_model_path.read_bytes())
    tally = Tally()
    log = tmp_path / "server.log"
    with running_server(url, {**CONF, "state_dir": str(state)}, log) as server:
        reader = MONAILabelClient(server, client_id="reader", tmpdir=str(tmp_path))
        datastore = reader.info()["datastore"]
        assert datastore["total"] == len(SERVED)
        quarantined = datastore["quarantined"]
        assert set(quarantined) == {series[v.name] for v in SKIPPED}
        for variant in SKIPPED:
            assert variant.reason in quarantined[series[variant.name]]
        assert "REALDICOM" not in log.read_text()  # reasons and log lines name UIDs, never patients

        for name, image_id in served.items():
            result = tally.call(f"infer {name}", reader.infer, "hemorrhage", image_id, {})
            assert result is not None and nib.load(result[0]).shape[2] >= 3
        for strategy in ("cold_start", "random"):
            tally.call(f"next {strategy}", reader.next_sample, strategy, {"budget_minutes": 600})

        # A label over a series with a frame of reference becomes exactly one SEG, however many syncs retry uploads.
        base = read_ct_volume(ct_small()).hu
        tally.call("save ct_small", reader.save_label, served["ct_small"],
                   label_file(state, served["ct_small"], (base > 600).astype(np.uint8), tmp_path), tag="final")
        # Without FrameOfReferenceUID (the real JPEG 2000 file has none) no SEG can be written: saved locally, reason shown.
        j2k_shape = nib.load(state / "pacs" / "nifti" / f"{served['jpeg2000']}.nii.gz").shape
        tally.call("save jpeg2000", reader.save_label, served["jpeg2000"],
                   label_file(state, served["jpeg2000"], np.zeros(j2k_shape[::-1], np.uint8), tmp_path), tag="final")
        # The enhanced multi-frame series: its SEG references the frames of its one instance.
        multiframe_shape = nib.load(state / "pacs" / "nifti" / f"{served['enhanced_multiframe']}.nii.gz").shape
        tally.call("save enhanced_multiframe", reader.save_label, served["enhanced_multiframe"],
                   label_file(state, served["enhanced_multiframe"], np.zeros(multiframe_shape[::-1], np.uint8), tmp_path),
                   tag="final")
        time.sleep(3.0)  # three more background syncs, each retrying pending uploads
        assert seg_count(url, served["ct_small"]) == 1 and seg_count(url, served["enhanced_multiframe"]) == 1
        datastore = reader.info()["datastore"]
        assert datastore["pending_seg_uploads"] == 0
        assert list(datastore["seg_not_written"]) == [served["jpeg2000"]]
        assert "Frame Of Reference" in datastore["seg_not_written"][served["jpeg2000"]]
        assert datastore["completed"] == 3

        # A SEG another tool wrote, and a new series: both appear by themselves (no request makes them).
        rle_sources = [pydicom.dcmread(p) for p in (state / "pacs" / "dicom" / served["rle"]).glob("*.dcm")]
        rle_label = np.zeros((4, 64, 64), np.uint8)
        rle_label[1:3, 20:30, 20:40] = 1
        stow_series(url, [foreign_seg(rle_sources, rle_label)])
        new_uid = stow_series(url, rle())[1]
        foreign_path = state / "pacs" / "nifti" / "labels" / "final" / f"{served['rle']}.nii.gz"
        wait_for(lambda: foreign_path.exists() and (state / "pacs" / "nifti" / f"{new_uid}.nii.gz").exists(), 30,
                 "the foreign SEG and the new series mirrored by the background sync")
        stored = np.transpose(np.asarray(nib.load(foreign_path).dataobj), (2, 1, 0))
        np.testing.assert_array_equal(stored, rle_label)

        # Training on what was labeled, quarantined series in the PACS notwithstanding.
        tally.call("train", reader.train_start, "hemorrhage", {"mode": "retrain"})
        status = wait_for(lambda: reader.info()["train_stats"]["hemorrhage"].get("state") in ("DONE", "FAILED", "STOPPED")
                          and reader.info()["train_stats"]["hemorrhage"], 600, "training to end")
        assert status["state"] == "DONE", status
        for name in ("ct_small", "jpeg2000"):
            tally.call(f"infer after training {name}", reader.infer, "hemorrhage", served[name], {})

    # A restart over the same cache comes up, with the same series served and quarantined.
    with running_server(url, {**CONF, "state_dir": str(state)}, tmp_path / "restart.log") as server:
        datastore = MONAILabelClient(server).info()["datastore"]
        assert datastore["total"] == len(SERVED) + 1 and set(datastore["quarantined"]) == set(quarantined)
        assert seg_count(url, served["ct_small"]) == 1 and served["rle"] in list_labeled_series(url)

    figures = {"requests": len(tally.statuses), "failed": tally.failed(), "served": len(SERVED), "skipped": len(SKIPPED)}
    print(f"\nreal DICOM figures: {json.dumps(figures)}")
    assert tally.failed() == []
