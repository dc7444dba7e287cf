"""Issue 20 through the real server: labeled batches become the prequential curve and the stopping advice in
/info/, POST /autolabel/ stores machine labels apart from radiologists', the `review` strategy serves them
and times their review apart, and GET /dashboard/ draws it all in the real Chromium. Tests run in file order."""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
from monailabel.client import MONAILabelClient
from playwright.sync_api import sync_playwright

from browser_fixtures import launch_chromium, screenshot_path
from ichal.state import StateDB
from server_fixtures import generated_pool_fixture, server_fixture, wait_for

pytestmark = pytest.mark.integration

# No audit stacks: every labeled stack here is a strategy's pick, so the prequential curve is what is tested
# (tests/test_audit_stacks.py tests the audits).
CONF = {"ensemble_size": "2", "train_iterations": "4", "train_batch_size": "4", "model_spacing_mm": "3.6",
        "train_lookalike_fraction": "1.0", "stop_window": "3", "audit_stacks": "0"}
ROUNDS = 3  # labeled batches after the first committee: stop_window points, so the advice can speak


pool = generated_pool_fixture(count=14, seed=5, labeled_count=3)
server = server_fixture(CONF)


def state(pool: Path) -> StateDB:
    return StateDB.open(pool / ".ichal")


def final_ids(pool: Path, tag: str = "final") -> set[str]:
    return {p.name.removesuffix(".nii.gz") for p in (pool / "labels" / tag).glob("*.nii.gz")}


def train(server: str) -> str:
    """Train from scratch and wait until the new committee serves; its version."""
    c = MONAILabelClient(server)
    before = (c.info()["ichal"]["model"] or {}).get("version")
    wait_for(lambda: not c.train_status(check_if_running=True), 300, "the previous training to end")
    c.train_start("hemorrhage", {"mode": "retrain"})
    model = wait_for(lambda: (m := c.info()["ichal"]["model"]) and m["version"] != before and m, 600, "a new committee")
    return model["version"]


def label_batch(server: str, pool: Path, name: str, tmp_path: Path, stacks: int = 2) -> list[str]:
    """Annotator `name` labels `stacks` served stacks (random strategy) with the phantom's true masks."""
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    annotator = MONAILabelClient(server, client_id=name, tmpdir=str(folder))
    saved = []
    for _ in range(stacks):
        served = annotator.next_sample("random", {"budget_minutes": 120})["id"]
        time.sleep(1.0)
        annotator.save_label(served, str(pool / "phantom_truth" / f"{served}.nii.gz"), tag="final")
        saved.append(served)
    return saved


def test_before_any_batch_the_advice_says_not_enough_batches(server):
    stopping = MONAILabelClient(server).info()["ichal"]["stopping"]
    assert stopping["verdict"] == "not_enough_batches" and stopping["message"].startswith("not enough batches yet")
    assert stopping["curve"] == [] and stopping["rule"]["window"] == 3
    assert stopping["source"] == "prequential (biased on actively picked stacks)" and stopping["audit_points"] == []


def test_each_batch_is_scored_by_the_committee_that_picked_it_before_training(server, pool, tmp_path):
    versions = [train(server)]  # on the 3 seed labels: nothing new to score yet
    assert state(pool).curve_points() == []
    batches = []
    for round_index in range(ROUNDS):
        batches.append(label_batch(server, pool, f"reader{round_index % 2}", tmp_path))
        versions.append(train(server))
    points = state(pool).curve_points()
    assert [p["model_version"] for p in points] == versions[:-1]
    assert [sorted(p["images"]) for p in points] == [sorted(b) for b in batches]
    times = state(pool).label_times()
    for point, trained_on in zip(points, [set(final_ids(pool)) - set(sum(batches[i:], [])) for i in range(ROUNDS)]):
        # Hours: the measured labeling time of the stacks the committee was trained on (seed labels have none).
        assert point["hours"] == pytest.approx(sum(r["seconds"] for r in times if r["image"] in trained_on) / 3600)
        assert point["unmeasured_stacks"] == 3 and point["stacks"] == 2
        assert set(point["metrics"]) == {"pixel_ap", "stack_ap", "dice"}
        assert point["metrics"]["dice"] is not None and 0.0 <= point["metrics"]["dice"] <= 1.0
    assert points[0]["hours"] == 0.0 < points[1]["hours"] < points[2]["hours"]


def test_info_gives_the_stopping_advice_with_the_numbers_it_rests_on(server):
    stopping = MONAILabelClient(server).info()["ichal"]["stopping"]
    assert len(stopping["curve"]) == ROUNDS
    scored = [p for p in stopping["curve"] if p["metrics"]["pixel_ap"] is not None]
    if len(scored) < 3:  # a batch without a bleeding voxel has no pixel AP
        assert stopping["verdict"] == "not_enough_batches"
        return
    assert stopping["verdict"] in ("keep_labeling", "plateau")
    gain = stopping["gain"]
    assert gain["batches"] == 3 and gain["low"] <= gain["per_hour"] <= gain["high"]
    assert f"{gain['per_hour']:+.3f} pixel AP per hour" in stopping["message"]


def test_clients_cannot_write_machine_labels_nor_batch_infer(server, pool, tmp_path):
    target = sorted(set(p.name.removesuffix(".nii.gz") for p in pool.glob("ct_*.nii.gz")) - final_ids(pool))[0]
    with open(pool / "phantom_truth" / f"{target}.nii.gz", "rb") as handle:
        answer = requests.put(f"{server}/datastore/label", params={"image": target, "tag": "machine"},
                              files={"label": ("label.nii.gz", handle)}, timeout=30)
    assert answer.status_code == 403 and "POST /autolabel/" in answer.json()["detail"]
    answer = requests.post(f"{server}/batch/infer/hemorrhage", json={"label_tag": "final"}, timeout=30)
    assert answer.status_code == 403 and "/autolabel/" in answer.json()["detail"]
    assert not (pool / "labels" / "machine").exists()


def test_autolabel_stores_machine_labels_apart_from_radiologists(server, pool):
    finals = {p.name: p.read_bytes() for p in (pool / "labels" / "final").glob("*.nii.gz")}
    times = state(pool).label_times()
    version = MONAILabelClient(server).info()["ichal"]["model"]["version"]
    started = requests.post(f"{server}/autolabel/", timeout=30).json()
    unlabeled = sorted(set(p.name.removesuffix(".nii.gz") for p in pool.glob("ct_*.nii.gz")) - final_ids(pool))
    assert started["state"] == "RUNNING" and started["total"] == len(unlabeled)
    status = wait_for(lambda: (s := requests.get(f"{server}/autolabel/", timeout=30).json())["state"] != "RUNNING" and s,
                      600, "auto-labeling")
    assert status == {**status, "state": "DONE", "done": len(unlabeled), "model_version": version}
    assert final_ids(pool, "machine") == set(unlabeled)
    for image_id in unlabeled:
        mask = np.asarray(nib.load(pool / "labels" / "machine" / f"{image_id}.nii.gz").dataobj)
        assert mask.shape == nib.load(pool / f"{image_id}.nii.gz").shape and set(np.unique(mask)) <= {0, 1}
    # Nothing of the radiologists' changed: their labels, their times, what training reads.
    assert {p.name: p.read_bytes() for p in (pool / "labels" / "final").glob("*.nii.gz")} == finals
    assert state(pool).label_times() == times
    info = MONAILabelClient(server).info()
    assert info["datastore"]["completed"] == len(finals)
    # A second run has nothing left to do for this committee.
    assert requests.post(f"{server}/autolabel/", timeout=30).json()["total"] == 0


def test_review_serves_machine_labels_most_disagreement_first_and_times_the_review_apart(server, pool, tmp_path):
    c = MONAILabelClient(server)
    version = c.info()["ichal"]["model"]["version"]
    requests.post(f"{server}/scoring/committee", timeout=30)
    objects = wait_for(lambda: (o := c.datastore()["objects"]) and all(
        v["image"]["info"].get("ichal", {}).get("model_version") == version for v in o.values() if "final" not in v["labels"]) and o,
        600, "committee scores of the machine-labeled stacks")
    values = {k: v["image"]["info"]["ichal"]["value"] for k, v in objects.items() if "final" not in v["labels"]}
    answer = requests.post(f"{server}/activelearning/review", json={"client_id": "rita"}, timeout=30).json()
    assert answer["strategy"] == "review" and answer["label_tag"] == "machine"
    assert answer["id"] == max(values, key=lambda k: (values[k], [-ord(ch) for ch in k]))
    assert answer["to_review"] == len(values)
    # The reviewer opens the machine label, accepts it as is: saved as the final label.
    machine = requests.get(f"{server}/datastore/label", params={"label": answer["id"], "tag": "machine"}, timeout=30)
    assert machine.status_code == 200
    accepted = tmp_path / "accepted.nii.gz"
    accepted.write_bytes(machine.content)
    time.sleep(1.0)
    times_before = state(pool).label_times()
    saved = requests.put(f"{server}/datastore/label", params={"image": answer["id"], "tag": "final"},
                         data={"params": json.dumps({"client_id": "rita"})},
                         files={"label": ("label.nii.gz", accepted.open("rb"))}, timeout=30)
    assert saved.status_code == 200, saved.text
    reviews = state(pool).review_times()
    assert [(r["image"], r["client"]) for r in reviews] == [(answer["id"], "rita")] and 1.0 <= reviews[0]["seconds"] < 60
    assert state(pool).label_times() == times_before  # no labeling time, no time-model refit from a review
    # The next review is another stack; the accepted one is now labeled.
    following = requests.post(f"{server}/activelearning/review", json={"client_id": "rita"}, timeout=30).json()
    assert following["id"] != answer["id"] and following["to_review"] == len(values) - 1


def test_a_reviewed_label_is_no_prequential_test_stack(server, pool, tmp_path):
    reviewed = state(pool).review_times()[0]["image"]
    batch = label_batch(server, pool, "reader0", tmp_path, stacks=1)
    train(server)
    latest = max(state(pool).curve_points(), key=lambda p: p["ts"])
    assert latest["images"] == batch and reviewed not in latest["images"]


def test_dashboard_data_holds_the_curve_calibration_worklists_annotators_and_runs(server):
    data = requests.get(f"{server}/dashboard/data.json", timeout=60).json()
    assert len(data["stopping"]["curve"]) == ROUNDS + 1
    assert len(data["calibration"]["stacks"]) == 2 * ROUNDS + 1
    assert all(s["predicted_minutes"] > 0 and s["measured_minutes"] > 0 for s in data["calibration"]["stacks"])
    annotators = {a["client"]: a for a in data["annotators"]}
    assert set(annotators) == {"reader0", "reader1", "rita"}
    assert annotators["rita"]["labeling_hours"] == 0 and annotators["rita"]["review_hours"] > 0
    assert {w["client"] for w in data["worklists"]} == {"reader0", "reader1"}  # rita reviewed: no worklist
    assert [r["state"] for r in data["train_runs"]][:ROUNDS + 2] == ["DONE"] * (ROUNDS + 2)
    assert data["busy"] is False


def test_dashboard_page_draws_its_charts_with_data_in_chromium(server, tmp_path):
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            answer = page.goto(f"{server}/dashboard/")
            assert answer is not None and answer.status == 200
            verdict = page.locator("#verdict")
            assert verdict.get_attribute("data-verdict") in ("not_enough_batches", "keep_labeling", "plateau")
            assert verdict.inner_text().strip()
            # Each chart is drawn, with its data series (matplotlib SVG groups with our ids), not an empty frame.
            for chart, series in (("#learning-curve", "series-dice"), ("#calibration", "series-stacks"),
                                  ("#annotators", "series-annotators")):
                box = page.locator(f"{chart} svg").bounding_box()
                assert box is not None and box["width"] > 300 and box["height"] > 200
                drawn = page.locator(f'{chart} [id^="{series}"]').locator("path, use")
                assert drawn.count() >= 1 and drawn.first.bounding_box() is not None, f"{chart} has no {series} drawn"
            assert page.locator("table").count() == 2  # open worklists, training runs
            page.screenshot(path=str(screenshot_path("dashboard.png", tmp_path)), full_page=True)
        finally:
            browser.close()
