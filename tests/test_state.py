"""The SQLite state database: WAL, no lost writes across processes, atomic check-outs, one time record
per session, a one-time import of the JSON files of earlier versions, and survival of kill -9."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from ichal.checkout import CheckoutRegistry
from ichal.io import Volume
from ichal.labeling_time import EventLog, LabelEvent
import ichal.state as state_module
from ichal.state import SCHEMA_VERSION, STATE_DB_NAME, StateDB, StateError

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "hemorrhage"
# Fresh interpreters, as MONAI Label's training and scoring subprocesses are.
SPAWN = multiprocessing.get_context("spawn")


def _label_time(image: str = "ct_1", client: str = "a", started: float = 0.0, **fields: float) -> dict:
    record = {"image": image, "client": client, "started": started, "saved": 100.0, "seconds": 90.0,
              "boundary_mm": 50.0, "n_components": 1}
    return {**record, **fields}


# -- workers for the multi-process tests (module level, so spawned interpreters can import them) ----
def _write_events(state_dir: str, client: str, count: int) -> None:
    log = EventLog(StateDB.open(state_dir))
    for i in range(count):
        log.record(client, f"ct_{i}", "served", ts=float(i))


def _slow_checkout_writes(statement: str) -> None:
    # A slow disk: each check-out write starts 5 ms after its statement is issued, which widens any gap
    # between reading who holds a stack and claiming it.
    if statement.startswith("INSERT OR REPLACE INTO checkouts"):
        time.sleep(0.005)


def _claim_first_free_repeatedly(state_dir: str, name: str, images: list[str], barrier, results) -> None:
    db = StateDB.open(state_dir)
    db._connection().set_trace_callback(_slow_checkout_writes)
    registry = CheckoutRegistry(db, expiry_seconds=600)
    barrier.wait()
    clients = [f"{name}-{k}" for k in range(len(images) // 2)]
    results.put([(client, registry.checkout_first_free(client, images)) for client in clients])


def _write_until_killed(state_dir: str, committed) -> None:
    log = EventLog(StateDB.open(state_dir))
    i = 0
    while True:
        log.record("a", "ct_1", "served", ts=float(i))
        committed.value = i + 1
        i += 1


# -- the database ------------------------------------------------------------------------------
def test_the_database_is_in_wal_mode_with_full_sync_and_a_schema_version(tmp_path):
    db = StateDB.open(tmp_path)
    other = sqlite3.connect(tmp_path / STATE_DB_NAME)
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert other.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    assert db._connection().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_a_version_1_database_is_upgraded_in_place_keeping_its_rows(tmp_path):
    with sqlite3.connect(tmp_path / STATE_DB_NAME) as connection:
        connection.executescript(state_module._SCHEMA)
        connection.execute("INSERT INTO label_times (image, client, started, saved, seconds, boundary_mm, n_components) "
                           "VALUES ('ct_1', 'a', 1.0, 61.0, 60.0, 10.0, 1)")
        connection.execute("PRAGMA user_version = 1")
    db = StateDB.open(tmp_path)
    assert db.schema_version() == 3
    assert [r["seconds"] for r in db.label_times()] == [60.0]
    db.save_curve_point("v1", 2.5, 3, {"metrics": {"pixel_ap": 0.4}})
    assert db.curve_points()[0]["metrics"] == {"pixel_ap": 0.4}
    db.record_audit_serve("ct_2", 5.0, None, "a", "w1")
    assert [a["image"] for a in db.audits("withheld")] == ["ct_2"]


def test_a_version_2_database_gains_the_audit_tables_keeping_its_curve(tmp_path):
    with sqlite3.connect(tmp_path / STATE_DB_NAME) as connection:
        connection.executescript(state_module._SCHEMA + state_module._SCHEMA_V2)
        connection.execute("INSERT INTO curve_points (model_version, ts, hours, stacks, document) "
                           "VALUES ('v1', 1.0, 2.0, 3, '{\"metrics\": {}}')")
        connection.execute("PRAGMA user_version = 2")
    db = StateDB.open(tmp_path)
    assert db.schema_version() == 3
    assert [(p["model_version"], p["hours"]) for p in db.curve_points()] == [("v1", 2.0)]
    assert db.audits() == [] and db.audit_points() == []


def test_audit_stacks_are_withheld_until_released_and_survive_a_restart(tmp_path):
    db = StateDB.open(tmp_path)
    db.record_audit_serve("ct_1", 1.0, "v1", "a", "w1")
    db.record_audit_serve("ct_2", 2.0, "v1", "a", "w1")
    db.record_audit_serve("ct_3", 3.0, "v1", "b", "w2")
    db.forget_withheld_audit("ct_3")  # served again as a strategy's pick: no longer random
    db.release_audits(["ct_1"], "v2")
    db.forget_withheld_audit("ct_1")  # a released audit stays one: it must never enter a prequential batch
    reopened = StateDB.open(tmp_path)
    assert [a["image"] for a in reopened.audits("withheld")] == ["ct_2"]
    assert reopened.audits("released") == [{"image": "ct_1", "served_ts": 1.0, "served_by_version": "v1", "client": "a",
                                            "worklist_id": "w1", "status": "released", "released_by_version": "v2"}]
    assert [a["image"] for a in reopened.audits()] == ["ct_1", "ct_2"]
    with pytest.raises(ValueError, match="audit status"):
        reopened.audits("pending")


def test_an_audit_point_is_stored_once_per_new_committee_in_training_order(tmp_path):
    db = StateDB.open(tmp_path)
    point = {"old_version": "v1", "new_version": "v2", "old_hours": 1.0, "new_hours": 2.0, "stacks": 2,
             "old_metrics": {"dice": 0.25}, "new_metrics": {"dice": 0.5}, "gains": {"dice": 0.25}, "images": ["a", "b"]}
    db.save_audit_point(point, ts=1.0)
    db.save_audit_point({**point, "old_version": "v2", "new_version": "v3"}, ts=2.0)
    db.save_audit_point({**point, "stacks": 3}, ts=3.0)  # v2's training scored again: replaces its point
    assert [(p["new_version"], p["stacks"]) for p in StateDB.open(tmp_path).audit_points()] == [("v3", 2), ("v2", 3)]
    assert db.audit_points()[1] == {**point, "stacks": 3, "ts": 3.0}
    with pytest.raises(ValueError, match="lacks"):
        db.save_audit_point({"new_version": "v4"})


def test_a_committee_scored_twice_keeps_one_curve_point_and_reviews_stay_apart(tmp_path):
    db = StateDB.open(tmp_path)
    db.save_curve_point("v1", 2.0, 3, {"metrics": {"pixel_ap": 0.4}}, ts=1.0)
    db.save_curve_point("v2", 3.0, 2, {"metrics": {"pixel_ap": 0.5}}, ts=2.0)
    db.save_curve_point("v1", 2.0, 4, {"metrics": {"pixel_ap": 0.45}}, ts=3.0)  # training of v1's batch retried
    assert [(p["model_version"], p["stacks"]) for p in db.curve_points()] == [("v2", 2), ("v1", 4)]
    db.upsert_review_time("ct_1", "a", 10.0, 25.0, 15.0)
    db.upsert_review_time("ct_1", "a", 10.0, 30.0, 20.0)  # saved again in the same session
    assert db.review_times() == [{"image": "ct_1", "client": "a", "started": 10.0, "saved": 30.0, "seconds": 20.0}]
    assert db.label_times() == []


def test_a_database_from_a_newer_version_is_refused(tmp_path):
    StateDB.open(tmp_path)
    with sqlite3.connect(tmp_path / STATE_DB_NAME) as connection:
        connection.execute("PRAGMA user_version = 99")
    with pytest.raises(StateError, match="schema version 99"):
        StateDB.open(tmp_path)


def test_a_failed_transaction_leaves_nothing_behind(tmp_path):
    db = StateDB.open(tmp_path)
    with pytest.raises(RuntimeError):
        with db.transaction():
            db.record_event(LabelEvent(1.0, "a", "ct_1", "served"))
            db.upsert_label_time(_label_time())
            raise RuntimeError("crash between two writes")
    assert db.events() == [] and db.label_times() == []


def test_two_processes_writing_events_lose_none(tmp_path):
    StateDB.open(tmp_path)
    workers = [SPAWN.Process(target=_write_events, args=(str(tmp_path), client, 150)) for client in ("a", "b")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    events = StateDB.open(tmp_path).events()
    assert len(events) == 300
    assert {(e.client, e.image) for e in events} == {(c, f"ct_{i}") for c in ("a", "b") for i in range(150)}


def test_two_processes_racing_for_the_same_stacks_check_out_each_exactly_once(tmp_path):
    StateDB.open(tmp_path)
    images = [f"ct_{i}" for i in range(60)]
    barrier, results = SPAWN.Barrier(2), SPAWN.Queue()
    workers = [SPAWN.Process(target=_claim_first_free_repeatedly, args=(str(tmp_path), name, images, barrier, results))
               for name in ("a", "b")]
    for worker in workers:
        worker.start()
    claims = results.get(timeout=60) + results.get(timeout=60)
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    claimed = [image for _, image in claims]
    assert sorted(claimed) == sorted(images)  # every client got a stack, and no stack went to two clients
    registry = CheckoutRegistry(StateDB.open(tmp_path), expiry_seconds=600)
    assert all(registry.holder(image) == client for client, image in claims)


def test_a_writer_killed_mid_loop_leaves_every_committed_event(tmp_path):
    StateDB.open(tmp_path)
    committed = SPAWN.Value("i", 0, lock=False)  # a lock held by the killed writer would never be released
    writer = SPAWN.Process(target=_write_until_killed, args=(str(tmp_path), committed))
    writer.start()
    deadline = time.time() + 60
    while committed.value < 200 and time.time() < deadline:
        time.sleep(0.05)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join(10)
    assert writer.exitcode == -signal.SIGKILL
    db = StateDB.open(tmp_path)
    assert db._connection().execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    times = [e.ts for e in db.events()]
    assert len(times) >= committed.value >= 200
    assert times == [float(i) for i in range(len(times))]  # no gap and no half-written row
    db.record_event(LabelEvent(-1.0, "b", "ct_2", "served"))  # and it still takes writes
    assert len(db.events()) == len(times) + 1


def test_saving_again_after_the_same_serve_updates_the_record(tmp_path):
    db = StateDB.open(tmp_path)
    for boundary_mm in (50.0, 60.0, 70.0):
        db.upsert_label_time(_label_time(boundary_mm=boundary_mm, note="kept in extra"))
    db.upsert_label_time(_label_time(started=500.0, saved=600.0))  # the next session on the same stack
    records = StateDB.open(tmp_path).label_times()
    assert [(r["started"], r["boundary_mm"]) for r in records] == [(0.0, 70.0), (500.0, 50.0)]
    assert records[0]["note"] == "kept in extra"


def test_calibration_records_are_appended_and_listed_in_order(tmp_path):
    db = StateDB.open(tmp_path)
    first = db.append_calibration({"slope": 1.0}, ts=1.0)
    db.append_calibration({"slope": 1.2}, ts=2.0)
    assert [(r.id > first, r.document["slope"]) for r in db.calibrations()] == [(False, 1.0), (True, 1.2)]


# -- the one-time import of the JSON files of earlier versions ---------------------------------
def _write_legacy(state_dir: Path) -> dict[str, object]:
    documents: dict[str, object] = {
        "label_events.json": [
            {"ts": 0.0, "client": "a", "image": "ct_1", "kind": "served"},
            {"ts": 100.0, "client": "a", "image": "ct_1", "kind": "saved"},
            {"ts": 130.0, "client": "a", "image": "ct_1", "kind": "saved"},
            {"ts": 200.0, "client": "b", "image": "ct_2", "kind": "served"},
            {"ts": 260.0, "client": "b", "image": "ct_2", "kind": "saved"},
        ],
        # Three saves after one serve wrote three identical records (issue 16, item 7).
        "label_times.json": [{"image": "ct_1", "client": "a", "seconds": 100.0, "saved": 100.0, "boundary_mm": 40.0, "n_components": 1}] * 3 + [
            {"image": "ct_2", "client": "b", "seconds": 60.0, "saved": 260.0, "boundary_mm": 30.0, "n_components": 2},
            {"image": "ct_9", "client": "c", "seconds": 50.0, "saved": 900.0, "boundary_mm": 20.0, "n_components": 1},
        ],
        "checkouts.json": {"ct_3": {"client": "c", "ts": 5.0}},
        "train_status.json": {"state": "DONE", "mode": "retrain", "version": 3, "metrics": {"dice": 0.5},
                              "started": 1.0, "ended": 2.0, "pid": 123, "error": None},
    }
    for name, document in documents.items():
        (state_dir / name).write_text(json.dumps(document))
    return documents


def test_json_files_are_imported_once_and_renamed(tmp_path):
    documents = _write_legacy(tmp_path)
    db = StateDB.open(tmp_path)
    assert [e.ts for e in db.events()] == [0.0, 100.0, 130.0, 200.0, 260.0]
    times = {r["image"]: r for r in db.label_times()}
    assert len(db.label_times()) == 3  # the three ct_1 duplicates collapsed into one
    assert times["ct_1"]["started"] == 0.0 and times["ct_2"]["started"] == 200.0  # recovered from the events
    assert times["ct_9"]["started"] == 850.0  # no events: saved - seconds
    assert CheckoutRegistry(db, expiry_seconds=60).holder("ct_3", now=10.0) == "c"
    assert db.latest_train_run().status() == documents["train_status.json"]
    for name, document in documents.items():
        assert not (tmp_path / name).exists()
        assert json.loads((tmp_path / f"{name}.migrated").read_text()) == document

    (tmp_path / "label_events.json").write_text(json.dumps(documents["label_events.json"]))
    assert len(StateDB.open(tmp_path).events()) == 5  # a second open imports nothing
    assert (tmp_path / "label_events.json").exists()


@pytest.mark.parametrize("broken", ["{ half a document", '[{"image": "ct_1", "client": "a"}]'])
def test_an_unreadable_json_file_is_named_and_nothing_is_imported(tmp_path, broken):
    _write_legacy(tmp_path)
    (tmp_path / "label_times.json").write_text(broken)
    with pytest.raises(StateError, match="label_times.json"):
        StateDB.open(tmp_path)
    assert not (tmp_path / STATE_DB_NAME).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["label_events.json", "label_times.json", "checkouts.json", "train_status.json"])


# -- the app's use of it -------------------------------------------------------------------------
@pytest.fixture()
def context(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(APP_DIR))
    from lib.context import AppContext
    from lib.settings import AppSettings

    return AppContext(AppSettings.from_conf({"state_dir": str(tmp_path / "state")}, studies=str(tmp_path)))


def test_three_saves_after_one_serve_give_one_updated_time_record(context, tmp_path):
    context.events.record("a", "ct_1", "served", ts=time.time() - 100)
    boundaries = []
    for size in (2, 4, 6):
        label = np.zeros((4, 16, 16), np.uint8)
        label[1:3, 4:4 + size, 4:4 + size] = 1
        boundaries.append(context.record_saved_label("ct_1", "a", Volume(label, np.eye(4)))["boundary_mm"])
    records = context.label_times.read()
    assert len(records) == 1
    assert records[0]["boundary_mm"] == boundaries[-1] != boundaries[0]
    assert [e.kind for e in context.events.events()] == ["served", "saved", "saved", "saved"]


def test_train_status_merges_into_the_current_run_and_a_new_start_opens_a_new_run(context):
    def merge(update: dict):
        return lambda status: status.update(update)

    context.train_status.update(merge({"state": "RUNNING", "started": 1.0, "pid": 11}))
    context.train_status.update(merge({"progress": {"iteration": 5}}))
    context.train_status.update(merge({"state": "DONE", "ended": 2.0, "version": 1}))
    assert context.train_status.read() == {"state": "DONE", "started": 1.0, "pid": 11, "ended": 2.0,
                                           "progress": {"iteration": 5}, "version": 1}
    context.train_status.update(merge({"state": "RUNNING", "started": 3.0, "pid": 12}))
    context.train_status.update(lambda _: {"state": "RUNNING", "run_id": "r3", "started": 4.0, "pid": 13})
    context.train_status.update(merge({"state": "DONE", "started": 5.0}))  # a run_id, not `started`, names this run
    runs = context.state._connection().execute("SELECT run_id, state, started FROM train_runs ORDER BY rowid").fetchall()
    assert [(state, started) for _, state, started in runs] == [("DONE", 1.0), ("RUNNING", 3.0), ("DONE", 5.0)]
    assert runs[2][0] == "r3"
    assert context.train_status.read() == {"state": "DONE", "run_id": "r3", "started": 5.0, "pid": 13}


def test_the_serve_snapshot_is_the_last_serve_before_the_save(tmp_path):
    db = StateDB.open(tmp_path)
    db.record_serve(10.0, "a", "ct_1", {"predicted_seconds": 100.0})
    db.record_serve(20.0, "b", "ct_1", {"predicted_seconds": 200.0})
    db.record_serve(30.0, "a", "ct_1", {"predicted_seconds": 300.0})
    assert db.serve_snapshot("a", "ct_1", at_or_before=25.0) == {"predicted_seconds": 100.0}
    assert db.serve_snapshot("a", "ct_1", at_or_before=35.0) == {"predicted_seconds": 300.0}
    assert db.serve_snapshot("a", "ct_1", at_or_before=5.0) is None
    assert db.serve_snapshot("c", "ct_1", at_or_before=35.0) is None


def test_a_save_after_a_serve_keeps_what_the_app_knew_at_serve_time(context):
    served = context.events.record("a", "ct_1", "served", ts=time.time() - 60)
    context.state.record_serve(served.ts, "a", "ct_1", {"predicted_seconds": 42.0, "model_version": "abc"})
    label = np.zeros((4, 16, 16), np.uint8)
    label[1:3, 4:8, 4:8] = 1
    record = context.record_saved_label("ct_1", "a", Volume(label, np.eye(4)))
    assert record["at_serve"] == {"predicted_seconds": 42.0, "model_version": "abc"}
    assert context.label_times.read()[0]["at_serve"]["predicted_seconds"] == 42.0

