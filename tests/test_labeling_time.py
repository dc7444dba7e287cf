"""Active labeling seconds from annotator events, the durable event log, and check-outs."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from ichal.checkout import CheckoutRegistry
from ichal.labeling_time import EventLog, LabelEvent, active_seconds, measured_times
from ichal.state import JsonStore, StateDB, StateError


def test_active_seconds_caps_each_idle_gap():
    assert active_seconds([0, 100, 150, 2000], idle_limit_seconds=300) == 100 + 50 + 300


def test_active_seconds_rejects_a_non_positive_idle_limit():
    with pytest.raises(ValueError, match="idle limit"):
        active_seconds([0, 1], idle_limit_seconds=0)


def test_measured_time_runs_from_served_to_saved_per_client():
    events = [
        LabelEvent(0, "a", "ct_1", "served"),
        LabelEvent(5, "b", "ct_2", "served"),
        LabelEvent(60, "a", "ct_1", "infer"),
        LabelEvent(400, "b", "ct_2", "saved"),
        LabelEvent(1000, "a", "ct_1", "saved"),
    ]
    times = {(m.client, m.image): m.seconds for m in measured_times(events, idle_limit_seconds=300)}
    assert times == {("b", "ct_2"): 300.0, ("a", "ct_1"): 60.0 + 300.0}


def test_a_save_without_a_served_stack_is_not_measured():
    events = [LabelEvent(0, "a", "ct_1", "infer"), LabelEvent(50, "a", "ct_1", "saved")]
    assert measured_times(events, idle_limit_seconds=300) == []


def test_a_second_round_on_the_same_stack_starts_after_the_previous_save():
    events = [LabelEvent(t, "a", "ct_1", k) for t, k in [(0, "served"), (100, "saved"), (500, "served"), (520, "saved")]]
    assert [m.seconds for m in measured_times(events, idle_limit_seconds=300)] == [100.0, 20.0]


def test_event_log_is_durable_and_rejects_unknown_kinds(tmp_path):
    log = EventLog(StateDB.open(tmp_path))
    log.record("a", "ct_1", "served", ts=1.0)
    log.record("a", "ct_1", "saved", ts=9.0)
    with pytest.raises(ValueError, match="unknown event kind"):
        log.record("a", "ct_1", "coffee")
    reopened = EventLog(StateDB.open(tmp_path))
    assert reopened.events() == [LabelEvent(1.0, "a", "ct_1", "served"), LabelEvent(9.0, "a", "ct_1", "saved")]


def test_concurrent_event_records_from_threads_lose_nothing(tmp_path):
    log = EventLog(StateDB.open(tmp_path))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: log.record("a", f"ct_{i}", "served", ts=float(i)), range(200)))
    assert sorted(e.ts for e in log.events()) == [float(i) for i in range(200)]


def test_concurrent_updates_lose_nothing(tmp_path):
    store = JsonStore(tmp_path / "list.json", default=list)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: store.update(lambda items: items.append(i)), range(200)))
    assert sorted(store.read()) == list(range(200))


def test_an_unreadable_state_file_is_reported_and_left_alone(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("{ half a document")
    with pytest.raises(StateError, match="unreadable"):
        JsonStore(path, default=dict).update(lambda d: d.update(x=1))
    assert path.read_text() == "{ half a document"


def test_checked_out_stacks_are_not_served_to_others_until_expiry(tmp_path):
    registry = CheckoutRegistry(StateDB.open(tmp_path), expiry_seconds=60)
    assert registry.checkout_first_free("a", ["ct_1", "ct_2"], now=0) == "ct_1"
    assert registry.checkout_first_free("b", ["ct_1", "ct_2"], now=10) == "ct_2"
    assert registry.checkout_first_free("c", ["ct_1", "ct_2"], now=20) is None
    assert registry.held_by_others("a", now=20) == {"ct_2"}
    assert registry.checkout_first_free("c", ["ct_1", "ct_2"], now=61) == "ct_1"  # a's check-out expired
    registry.release("ct_2")
    assert registry.holder("ct_2", now=62) is None


def test_a_client_asking_again_keeps_its_own_stack(tmp_path):
    registry = CheckoutRegistry(StateDB.open(tmp_path), expiry_seconds=60)
    assert registry.checkout_first_free("a", ["ct_1"], now=0) == "ct_1"
    assert registry.checkout_first_free("a", ["ct_1"], now=5) == "ct_1"


def test_a_client_served_another_stack_releases_the_one_it_held(tmp_path):
    registry = CheckoutRegistry(StateDB.open(tmp_path), expiry_seconds=60)
    assert registry.checkout_first_free("a", ["ct_1"], now=0) == "ct_1"
    assert registry.checkout_first_free("a", ["ct_2"], now=5) == "ct_2"  # e.g. a new worklist asked for
    assert registry.held_by_others("b", now=6) == {"ct_2"}
    assert registry.checkout_first_free("b", ["ct_1", "ct_2"], now=7) == "ct_1"


def test_events_of_one_client_on_one_image(tmp_path):
    log = EventLog(StateDB.open(tmp_path))
    for client, image, kind in [("a", "ct_1", "served"), ("b", "ct_1", "served"), ("a", "ct_2", "served"), ("a", "ct_1", "saved")]:
        log.record(client, image, kind)
    assert [(e.client, e.image, e.kind) for e in log.events("a", "ct_1")] == [("a", "ct_1", "served"), ("a", "ct_1", "saved")]
    assert len(log.events()) == 4
    with pytest.raises(ValueError, match="both client and image"):
        log.events("a")
