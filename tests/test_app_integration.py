"""The real MONAI Label server with the hemorrhage app, driven by MONAI Label's own client
(what 3D Slicer's extension uses) on a tiny generated pool. Tests run in file order: they follow
an annotator's day (cold start, train, score, budgeted worklists, infer, save)."""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from ichal.phantom import write_pool
from ichal.state import StateDB
from server_fixtures import generated_pool_fixture, running_server, server_fixture, wait_for

pytestmark = pytest.mark.integration

CONF = {"ensemble_size": "2", "train_iterations": "4", "train_batch_size": "4", "budget_minutes": "45", "model_spacing_mm": "3.6",
        "checkout_minutes": "30", "train_lookalike_fraction": "1.0", "train_hard_negative_fraction": "0.5"}


pool = generated_pool_fixture(count=10, seed=11, labeled_count=3)
server = server_fixture(CONF)


def labeled_ids(pool: Path) -> set[str]:
    return {p.name.removesuffix(".nii.gz") for p in (pool / "labels" / "final").glob("*.nii.gz")}


def client(server: str, name: str, tmp_path: Path) -> MONAILabelClient:
    # Client and server share /tmp here: a client dir of its own keeps the server's clean-up off its files.
    folder = tmp_path / f"client-{name}"
    folder.mkdir(exist_ok=True)
    return MONAILabelClient(server, client_id=name, tmpdir=str(folder))


def status_of(error: MONAILabelClientException) -> int:
    return int(str(error.msg).split("Status: ")[1].split(";")[0])


def state_fingerprint(pool: Path) -> dict[str, str]:
    """Hashes of every label file and of the labeling-time records: what bad requests must not touch."""
    files = sorted((pool / "labels" / "final").glob("*.nii.gz"))
    prints = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    prints["label_times"] = json.dumps(StateDB.open(pool / ".ichal").label_times(), sort_keys=True)
    return prints


def test_info_lists_the_pool_tasks_and_time_model(server, pool):
    info = MONAILabelClient(server).info()
    assert info["datastore"]["total"] == 10 and info["datastore"]["completed"] == 3
    assert set(info["strategies"]) == {"cost_sensitive", "uncertainty", "random", "acft", "cold_start", "review"}
    assert {"hemorrhage", "hemorrhage_uncertainty"} <= set(info["models"])
    assert info["ichal"]["time_model"]["source"] == "prior"
    assert info["ichal"]["model"] is None


def test_infer_before_training_is_a_clear_conflict(server, tmp_path):
    with pytest.raises(MONAILabelClientException) as caught:
        client(server, "early", tmp_path).infer("hemorrhage", "ct_0005", {})
    assert status_of(caught.value) == 409 and "no trained model yet" in str(caught.value.msg)


def test_cold_start_serves_an_unlabeled_stack_with_a_worklist_in_budget(server, pool, tmp_path):
    answer = client(server, "coldie", tmp_path).next_sample("cold_start", {"budget_minutes": 25})
    assert answer["id"] not in labeled_ids(pool)
    assert answer["worklist"][0]["id"] == answer["id"]
    assert answer["total_predicted_minutes"] <= 25 + 1e-9
    assert sum(item["predicted_minutes"] for item in answer["worklist"]) == pytest.approx(answer["total_predicted_minutes"], abs=0.05)


def test_score_needing_strategies_before_any_model_explain_what_to_do(server, tmp_path):
    with pytest.raises(MONAILabelClientException) as caught:
        client(server, "eager", tmp_path).next_sample("cost_sensitive", {"budget_minutes": 30})
    assert status_of(caught.value) == 409 and "cold_start" in str(caught.value.msg)


def test_training_produces_a_model_reported_in_info(server, pool):
    c = MONAILabelClient(server)
    c.train_start("hemorrhage", {"mode": "retrain"})
    model = wait_for(lambda: c.info()["ichal"]["model"], 600, "the trained ensemble")
    assert sorted(model["train_ids"]) == sorted(labeled_ids(pool))
    assert model["metrics"]["settings"]["hard_negative_fraction"] == 0.5  # --conf train_hard_negative_fraction
    assert all("hard_negative_stacks" in member for member in model["metrics"]["members"])
    stats = c.info()["train_stats"]["hemorrhage"]
    assert stats["state"] == "DONE" and stats["stacks"] == 3


def test_a_stopped_training_leaves_the_previous_model_serving(server, pool):
    c = MONAILabelClient(server)
    before = c.info()["ichal"]["model"]["version"]
    wait_for(lambda: not c.train_status(check_if_running=True), 120, "the previous training task to end")
    c.train_start("hemorrhage", {"mode": "retrain", "iterations": 100000})
    wait_for(lambda: c.info()["train_stats"]["hemorrhage"].get("progress"), 300, "training to make progress")
    c.train_stop()
    stats = wait_for(lambda: (s := c.info()["train_stats"]["hemorrhage"])["state"] == "STOPPED" and s, 60, "STOPPED")
    assert stats["state"] == "STOPPED"
    assert c.info()["ichal"]["model"]["version"] == before


def test_scoring_stores_value_features_and_model_version_for_every_unlabeled_stack(server):
    c = MONAILabelClient(server)
    version = c.info()["ichal"]["model"]["version"]
    requests.post(f"{server}/scoring/committee", timeout=30)

    def scored():
        objects = c.datastore()["objects"]
        unlabeled = [o for o in objects.values() if "final" not in o["labels"]]
        infos = [o["image"]["info"].get("ichal", {}) for o in unlabeled]
        return infos if all(i.get("model_version") == version for i in infos) else None

    infos = wait_for(scored, 600, "committee scores")
    for info in infos:
        assert 0.0 <= info["value"] <= math.log(2)
        assert info["predicted_seconds"] > 0 and info["boundary_mm"] >= 0 and info["n_components"] >= 0


def test_cost_sensitive_worklist_fits_the_budget(server, pool, tmp_path):
    answer = client(server, "alice", tmp_path).next_sample("cost_sensitive", {"budget_minutes": 12})
    assert answer["strategy"] == "cost_sensitive" and answer["unscored"] == 0
    assert answer["total_predicted_minutes"] <= 12 + 1e-9
    assert answer["worklist"] and answer["worklist"][0]["id"] == answer["id"]
    # The budget holds at the default confidence, under the batch total's interval, not only on average.
    assert answer["confidence"] == 0.8 and answer["total_minutes_high"] <= 12 + 1e-9
    for item in answer["worklist"]:
        assert 0 < item["predicted_minutes_low"] <= item["predicted_minutes"] <= item["predicted_minutes_high"]
    stricter = client(server, "alice", tmp_path).next_sample("cost_sensitive", {"budget_minutes": 12, "confidence": 0.95})
    assert stricter["confidence"] == 0.95 and stricter["total_minutes_high"] <= 12 + 1e-9
    assert answer["id"] not in labeled_ids(pool)


def test_infer_returns_a_label_volume_on_the_input_grid(server, pool, tmp_path):
    path, params = client(server, "alice", tmp_path).infer("hemorrhage", "ct_0005", {})
    label, image = nib.load(path), nib.load(pool / "ct_0005.nii.gz")
    assert label.shape == image.shape
    np.testing.assert_allclose(label.affine, image.affine, atol=1e-4)
    assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1}
    assert len(params["frame_scores"]) == image.shape[2] and 0.0 <= params["stack_score"] <= 1.0

    heat_path, _ = client(server, "alice", tmp_path).infer("hemorrhage_uncertainty", "ct_0005", {})
    heat = np.asarray(nib.load(heat_path).dataobj)
    assert heat.shape == image.shape and heat.min() >= 0.0 and heat.max() <= math.log(2) + 1e-6


def test_saving_a_final_label_records_the_annotators_time(server, pool, tmp_path):
    bob = client(server, "bob", tmp_path)
    served = bob.next_sample("random", {"budget_minutes": 30})["id"]
    time.sleep(1.5)
    truth = pool / "phantom_truth" / f"{served}.nii.gz"
    bob.save_label(served, str(truth), tag="final")
    records = StateDB.open(pool / ".ichal").label_times()
    mine = [r for r in records if r["image"] == served and r["client"] == "bob"]
    assert len(mine) == 1 and 1.0 <= mine[0]["seconds"] < 60.0
    # What the app knew when it picked the stack rides with the measured seconds (issue 17's training data).
    at_serve = mine[0]["at_serve"]
    assert at_serve["strategy"] == "random" and at_serve["budget_seconds"] == 30 * 60 and at_serve["predicted_seconds"] > 0
    assert at_serve["model_version"] == bob.info()["ichal"]["model"]["version"]
    assert at_serve["predicted_boundary_mm"] >= 0 and at_serve["predicted_n_components"] >= 0
    assert at_serve["predicted_seconds_low"] <= math.exp(at_serve["served_log_seconds"]) <= at_serve["predicted_seconds_high"]
    calibration = bob.info()["ichal"]["time_model"]["calibration"]
    assert calibration["n"] >= 1 and calibration["interval_confidences"] == [0.8]
    info = bob.info()
    assert info["ichal"]["measured_label_times"] == len(records)
    assert info["ichal"]["time_model"]["n"] == len(records)
    saved = np.asarray(nib.load(pool / "labels" / "final" / f"{served}.nii.gz").dataobj)
    np.testing.assert_array_equal(saved, np.asarray(nib.load(truth).dataobj))


def test_four_concurrent_annotators_get_distinct_stacks(server, tmp_path):
    answers: dict[str, str] = {}

    def ask(name: str) -> None:
        answers[name] = client(server, name, tmp_path).next_sample("cost_sensitive", {"budget_minutes": 600})["id"]

    threads = [threading.Thread(target=ask, args=(f"reader{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(answers) == 4
    assert len(set(answers.values())) == 4, answers


@pytest.mark.parametrize(
    "case",
    ["unknown_strategy", "negative_budget", "nan_budget", "wrong_shape", "corrupt_file", "unknown_image", "path_like_id"],
)
def test_bad_requests_get_clear_errors_and_leave_state_intact(server, pool, tmp_path, case):
    c = client(server, "mallory", tmp_path)
    target = min({f"ct_{i:04d}" for i in range(10)} - labeled_ids(pool))
    before = state_fingerprint(pool)
    good_label = str(pool / "phantom_truth" / f"{target}.nii.gz")
    wrong_shape = tmp_path / "wrong.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((12, 12, 3), np.uint8), np.eye(4)), str(wrong_shape))
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b this is not a NIfTI file")
    calls = {
        "unknown_strategy": (lambda: c.next_sample("most_expensive", {}), 404, "unknown strategy"),
        "negative_budget": (lambda: c.next_sample("cost_sensitive", {"budget_minutes": -5}), 400, "budget_minutes"),
        "nan_budget": (lambda: c.next_sample("cost_sensitive", {"budget_minutes": "nan"}), 400, "budget_minutes"),
        "wrong_shape": (lambda: c.save_label(target, str(wrong_shape), tag="final"), 422, "does not match image"),
        "corrupt_file": (lambda: c.save_label(target, str(corrupt), tag="final"), 422, "cannot read"),
        "unknown_image": (lambda: c.save_label("ct_4242", good_label, tag="final"), 404, "unknown image id"),
        "path_like_id": (lambda: c.save_label(f"../{target}", good_label, tag="final"), 400, "never paths"),
    }
    call, status, words = calls[case]
    with pytest.raises(MONAILabelClientException) as caught:
        call()
    assert status_of(caught.value) == status and words in str(caught.value.msg)
    assert state_fingerprint(pool) == before
    assert not (pool / "labels" / "final" / f"{target}.nii.gz").exists()


def test_a_worklist_is_worked_through_and_its_total_checked_against_the_measured_minutes_across_a_restart(tmp_path):
    """A server of its own: the worklist must not compete with the other tests' check-outs."""
    pool = tmp_path / "pool"
    write_pool(pool, count=6, size=48, seed=5, labeled_count=0, progress=False)
    with running_server(pool, CONF, tmp_path / "server.log") as url:
        carol = client(url, "carol", tmp_path)
        first = carol.next_sample("random", {"budget_minutes": 25})
        planned = [item["id"] for item in first["worklist"]]
        assert planned and first["id"] == planned[0] and first["total_minutes_high"] <= 25 + 1e-9
        served = []
        answer = first
        while answer["worklist_id"] == first["worklist_id"] and answer["id"] not in served:
            served.append(answer["id"])
            carol.save_label(answer["id"], str(pool / "phantom_truth" / f"{answer['id']}.nii.gz"), tag="final")
            answer = carol.next_sample("random", {"budget_minutes": 25})
        # The same request continued the worklist as picked, stack by stack; then a new one began.
        assert served == planned and answer["worklist_id"] != first["worklist_id"]
        calibration = carol.info()["ichal"]["time_model"]["calibration"]
        assert calibration["batches"] == 1 and calibration["n"] == len(planned)
        # Labeled in seconds against a prediction of minutes: far under the total, within the budget.
        assert calibration["median_batch_error"] < -0.9 and calibration["share_over_budget"] == 0.0
        other = carol.next_sample("random", {"budget_minutes": 40})
        assert other["worklist_id"] != answer["worklist_id"] and other["applied_confidence"] == 0.8
    # Calibration is kept in the state database: a restarted server reports the same.
    with running_server(pool, CONF, tmp_path / "server-restarted.log") as url:
        assert client(url, "carol", tmp_path).info()["ichal"]["time_model"]["calibration"] == calibration


def test_after_a_worklist_overruns_its_budget_the_next_is_budgeted_at_a_raised_confidence(tmp_path):
    """Unscored stacks predicted at 0.6 s each: a 3 s worklist holds a few of them. Labeled after a 4 s pause, it
    overruns; /info/ shows the offset and the next worklist's total is at the raised quantile (0.8 + 0.15 x 0.8)."""
    pool = tmp_path / "pool"
    write_pool(pool, count=8, size=48, seed=6, labeled_count=0, progress=False)
    with running_server(pool, CONF | {"unscored_stack_minutes": "0.01"}, tmp_path / "server.log") as url:
        dave = client(url, "dave", tmp_path)
        first = dave.next_sample("random", {"budget_minutes": 0.05, "audit_stacks": 0})
        assert first["applied_confidence"] == first["confidence"] == 0.8 and len(first["worklist"]) < 8
        time.sleep(4)
        answer = first
        while answer.get("worklist_id") == first["worklist_id"]:
            dave.save_label(answer["id"], str(pool / "phantom_truth" / f"{answer['id']}.nii.gz"), tag="final")
            answer = dave.next_sample("random", {"budget_minutes": 0.05, "audit_stacks": 0})
        calibration = dave.info()["ichal"]["time_model"]["calibration"]
        assert calibration["batches"] == 1 and calibration["share_over_budget"] == 1.0
        assert calibration["confidence_offset"] == pytest.approx(0.15 * 0.8)
        raised = dave.next_sample("random", {"budget_minutes": 40})
        assert raised["confidence"] == 0.8 and raised["applied_confidence"] == pytest.approx(0.92)
