"""Issue 20 through the real server: audit stacks, drawn at random into each worklist within its budget, are
withheld from the next training, scored by the committees before and after it (an audit point), then
trained on by the one after. Tests run in file order."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests
from monailabel.client import MONAILabelClient

from ichal.state import StateDB
from server_fixtures import generated_pool_fixture, server_fixture, wait_for

pytestmark = pytest.mark.integration

CONF = {"ensemble_size": "2", "train_iterations": "4", "train_batch_size": "4", "model_spacing_mm": "3.6",
        "train_lookalike_fraction": "1.0", "audit_stacks": "2", "stop_window": "3"}
REQUEST = {"budget_minutes": 120}


pool = generated_pool_fixture(count=12, seed=5, labeled_count=3)
server = server_fixture(CONF)


@pytest.fixture(scope="module")
def annotator(server, tmp_path_factory) -> MONAILabelClient:
    return MONAILabelClient(server, client_id="audrey", tmpdir=str(tmp_path_factory.mktemp("audrey")))


def state(pool: Path) -> StateDB:
    return StateDB.open(pool / ".ichal")


def train(server: str) -> dict:
    """Train from scratch and wait until the training task has ended (audits are scored after the new
    committee is committed); the new committee's /info/ model."""
    c = MONAILabelClient(server)
    before = (c.info()["ichal"]["model"] or {}).get("version")
    wait_for(lambda: not c.train_status(check_if_running=True), 300, "the previous training to end")
    c.train_start("hemorrhage", {"mode": "retrain"})
    model = wait_for(lambda: (m := c.info()["ichal"]["model"]) and m["version"] != before and m, 600, "a new committee")
    wait_for(lambda: not c.train_status(check_if_running=True), 300, "the training task to end")
    return model


@pytest.mark.parametrize("bad", [-1, "two", 1.5, True])
def test_a_bad_audit_stacks_is_a_400_naming_the_field(server, pool, bad):
    answer = requests.post(f"{server}/activelearning/random", json={**REQUEST, "client_id": "mallory", "audit_stacks": bad},
                           timeout=60)
    assert answer.status_code == 400 and "audit_stacks" in answer.json()["detail"], answer.text
    assert state(pool).audits() == []


def test_a_worklist_carries_its_audit_stacks_first_within_the_budget(server, pool, annotator, tmp_path):
    first = train(server)
    assert state(pool).audit_points() == []
    # 0 turns audits off for a request. Asked first: a stack checked out to paul is in no one else's worklist.
    plain = MONAILabelClient(server, client_id="paul", tmpdir=str(tmp_path)).next_sample("random", {**REQUEST, "audit_stacks": 0})
    assert plain["worklist"] and not any(item["audit"] for item in plain["worklist"])
    answer = annotator.next_sample("random", REQUEST)
    audit = [item["audit"] for item in answer["worklist"]]
    assert audit[:2] == [True, True] and not any(audit[2:]) and len(audit) > 2
    assert answer["id"] == answer["worklist"][0]["id"]
    assert answer["total_minutes_high"] <= REQUEST["budget_minutes"] + 1e-9
    served = state(pool).audits("withheld")
    assert [(a["image"], a["client"], a["served_by_version"]) for a in served] == [(answer["id"], "audrey", first["version"])]


def test_labeled_audit_stacks_are_withheld_from_training_and_scored_before_and_after_it(server, pool, annotator):
    labeled = []
    for _ in range(3):  # both audit stacks and one the strategy picked
        answer = annotator.next_sample("random", REQUEST)
        time.sleep(1.0)
        annotator.save_label(answer["id"], str(pool / "phantom_truth" / f"{answer['id']}.nii.gz"), tag="final")
        labeled.append(answer["id"])
    audits, picked = labeled[:2], labeled[2]
    old = MONAILabelClient(server).info()["ichal"]["model"]
    new = train(server)
    assert not set(audits) & set(new["train_ids"]) and picked in new["train_ids"]
    assert MONAILabelClient(server).info()["train_stats"]["hemorrhage"]["withheld_audit_stacks"] == 2
    [point] = state(pool).audit_points()
    assert (point["old_version"], point["new_version"], point["stacks"]) == (old["version"], new["version"], 2)
    assert sorted(point["images"]) == sorted(audits)
    assert point["old_hours"] == 0.0 < point["new_hours"]  # the seed labels have no measured time; `picked` has
    assert set(point["gains"]) == {"pixel_ap", "stack_ap", "dice"}
    for metric, gain in point["gains"].items():
        before, after = point["old_metrics"][metric], point["new_metrics"][metric]
        assert gain is None if None in (before, after) else gain == pytest.approx(after - before)
    assert point["old_metrics"]["dice"] is not None  # Dice is defined on any two stacks
    # Random, not picked: the audit stacks are no prequential test stacks.
    [prequential] = state(pool).curve_points()
    assert prequential["model_version"] == old["version"] and prequential["images"] == [picked]
    assert {a["image"]: a["released_by_version"] for a in state(pool).audits("released")} == dict.fromkeys(audits, new["version"])


def test_the_next_training_trains_on_the_released_audit_stacks(server, pool):
    trained = train(server)
    assert set(state(pool).audit_points()[0]["images"]) <= set(trained["train_ids"])
    assert len(state(pool).audit_points()) == 1 and len(state(pool).curve_points()) == 1  # nothing new to score


def test_info_and_the_dashboard_show_the_audit_points(server):
    stopping = MONAILabelClient(server).info()["ichal"]["stopping"]
    assert len(stopping["audit_points"]) == 1
    assert stopping["source"] == "prequential (biased on actively picked stacks)"  # fewer audit points than stop_window
    data = requests.get(f"{server}/dashboard/data.json", timeout=60).json()
    assert data["stopping"]["audit_points"] == stopping["audit_points"]
    assert [p["cumulative_gain"]["dice"] for p in data["stopping"]["audit_curve"]] == pytest.approx(
        [0.0, stopping["audit_points"][0]["gains"]["dice"]])
    page = requests.get(f"{server}/dashboard/", timeout=60).text
    assert 'id="audit-curve"' in page and 'id="series-audit-dice"' in page
