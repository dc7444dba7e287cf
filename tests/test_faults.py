"""Faults a hospital server meets: the server killed (-9) or stopped mid-training and mid-save, a
restart, an exposed address without authentication (issue 16). Real processes and the real server:
nothing here is mocked. Unit tests of the pieces come first, then the server scenarios."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest
import requests
from fastapi import HTTPException
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from ichal.phantom import write_pool
from ichal.state import StateDB
from server_fixtures import APP_DIR, free_port, server_command, server_env, start_server, stop_group, wait_for

sys.path.insert(0, str(APP_DIR))
from lib.context import AppContext  # noqa: E402  (the app's own package, as the server imports it)
from lib.lifeline import SERVER_PID_ENV, kill_stale_subprocess  # noqa: E402
from lib.settings import AppSettings, ConfError, check_exposure, server_host  # noqa: E402
from lib.trainers import EnsembleTrain, parse_train_request  # noqa: E402

CONF = {"ensemble_size": "2", "train_iterations": "4", "train_batch_size": "4", "model_spacing_mm": "3.6",
        "train_lookalike_fraction": "1.0"}


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- the pieces -------------------------------------------------------------------------------------

def test_an_older_training_run_cannot_replace_the_newer_runs_model(tmp_path):
    context = AppContext(AppSettings.from_conf({}, str(tmp_path)))
    trainer = EnsembleTrain(context)
    model_path = context.settings.model_path
    model_path.parent.mkdir(parents=True)
    model_path.write_bytes(b"model of run B")
    context.train_status.update(lambda _: {"state": "RUNNING", "run_id": "run-b", "started": 2.0})
    orphan = model_path.with_name("ensemble.pt.run-a.candidate")
    orphan.write_bytes(b"model of run A")

    assert trainer._commit(orphan, "run-a", {"state": "DONE"}) is False
    assert model_path.read_bytes() == b"model of run B" and not orphan.exists()
    assert context.train_status.read()["state"] == "RUNNING"

    newest = model_path.with_name("ensemble.pt.run-b.candidate")
    newest.write_bytes(b"model of run B, trained")
    assert trainer._commit(newest, "run-b", {"state": "DONE"}) is True
    assert model_path.read_bytes() == b"model of run B, trained"
    assert context.train_status.read()["state"] == "DONE"


@pytest.mark.parametrize("request_body, words", [
    ({"mode": "bogus"}, "mode must be"), ({"iterations": -5}, "iterations"), ({"iterations": True}, "iterations"),
    ({"iterations": 2.5}, "iterations"), ({"iterations": 10**9}, "iterations"),
])
def test_training_requests_are_checked_before_any_work(tmp_path, request_body, words):
    settings = AppSettings.from_conf({}, str(tmp_path))
    with pytest.raises(HTTPException) as caught:
        parse_train_request(request_body, settings)
    assert caught.value.status_code == 400 and words in caught.value.detail
    assert parse_train_request({"iterations": "12", "mode": "continual"}, settings) == ("continual", 12)


def test_a_stale_task_subprocess_is_killed_but_nothing_else(tmp_path):
    # Same command-line shape as MONAI Label's task subprocesses (python -m monailabel.interfaces.utils.app ...).
    task = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "monailabel.interfaces.utils.app"])
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.5)
        assert kill_stale_subprocess(bystander.pid) is False
        assert kill_stale_subprocess(task.pid) is True
        assert task.wait(timeout=10) == -signal.SIGKILL
        assert bystander.poll() is None
    finally:
        bystander.kill()
        task.kill()


def test_a_task_subprocess_dies_with_its_server(tmp_path):
    """A stand-in server starts a child that calls die_with_server, then the server is killed -9."""
    pid_file = tmp_path / "child.pid"
    child = (f"import sys, time; sys.path.insert(0, {str(APP_DIR)!r}); from lib.lifeline import die_with_server; "
             f"assert die_with_server(poll_seconds=0.2); open({str(pid_file)!r}, 'w').write(str(__import__('os').getpid())); "
             "time.sleep(60)")
    server = (f"import os, subprocess, sys, time; os.environ[{SERVER_PID_ENV!r}] = str(os.getpid()); "
              f"subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(60)")
    stand_in = subprocess.Popen([sys.executable, "-c", server])
    try:
        child_pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), 30, "the child to start"))
        assert alive(child_pid)
        stand_in.kill()
        stand_in.wait()
        wait_for(lambda: not alive(child_pid), 10, "the orphaned child to end itself")
    finally:
        stand_in.kill()


def test_serving_on_a_network_address_needs_authentication():
    assert server_host(["monailabel", "start_server", "--host", "10.1.2.3"]) == "10.1.2.3"
    assert server_host(["monailabel", "start_server", "--host=::1"]) == "::1"
    assert server_host(["monailabel", "start_server"]) == "0.0.0.0"  # monailabel's own default
    with pytest.raises(ConfError, match="without authentication"):
        check_exposure("0.0.0.0", auth_enabled=False, allow_unauthenticated=False)
    check_exposure("0.0.0.0", auth_enabled=True, allow_unauthenticated=False)
    check_exposure("0.0.0.0", auth_enabled=False, allow_unauthenticated=True)
    check_exposure("127.0.0.1", auth_enabled=False, allow_unauthenticated=False)


# -- the real server ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pool")
    write_pool(root, count=12, size=64, seed=3, labeled_count=3, progress=False)
    return root


def task_children(server: subprocess.Popen) -> list[int]:
    return [c.pid for c in psutil.Process(server.pid).children(recursive=True)]


def model_version(url: str) -> str | None:
    model = requests.get(f"{url}/info/", timeout=30).json()["ichal"]["model"]
    return model["version"] if model else None


@pytest.mark.integration
def test_an_exposed_server_without_auth_refuses_to_start(pool, tmp_path):
    log = tmp_path / "exposed.log"
    command = server_command(pool, CONF, free_port(), host="0.0.0.0")
    with open(log, "wb") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=server_env(), timeout=180)
    assert result.returncode != 0
    assert "refusing to serve on 0.0.0.0 without authentication" in log.read_text()


@pytest.mark.integration
def test_kill_9_mid_training_leaves_the_newest_model_serving(pool, tmp_path):
    log = tmp_path / "server.log"
    server, url = start_server(pool, CONF, log)
    try:
        requests.post(f"{url}/train/hemorrhage", json={"iterations": 4}, timeout=30).raise_for_status()
        first = wait_for(lambda: model_version(url), 600, "the first model")
        wait_for(lambda: requests.get(f"{url}/train/?check_if_running=true", timeout=30).status_code == 404, 120, "training to end")
        requests.post(f"{url}/train/hemorrhage", json={"iterations": 100000}, timeout=30).raise_for_status()
        wait_for(lambda: requests.get(f"{url}/info/", timeout=30).json()["train_stats"]["hemorrhage"].get("progress"), 300,
                 "the long training to make progress")
        orphans = task_children(server)
        assert orphans, "the training subprocess should be running"
        server.send_signal(signal.SIGKILL)
        server.wait()
        wait_for(lambda: not any(alive(pid) for pid in orphans), 15, "the orphaned training to end with its server")
    finally:
        stop_group(server)

    server, url = start_server(pool, CONF, log)
    try:
        stats = requests.get(f"{url}/info/", timeout=30).json()["train_stats"]["hemorrhage"]
        assert stats["state"] == "STOPPED"
        assert model_version(url) == first
        requests.post(f"{url}/train/hemorrhage", json={"iterations": 3}, timeout=30).raise_for_status()
        second = wait_for(lambda: (v := model_version(url)) != first and v, 600, "the retrained model")
        time.sleep(5)  # an orphan, had one survived, would now overwrite the model
        assert model_version(url) == second
    finally:
        stop_group(server)


@pytest.mark.integration
def test_stopping_the_server_stops_its_training(pool, tmp_path):
    server, url = start_server(pool, CONF, tmp_path / "server.log")
    try:
        requests.post(f"{url}/train/hemorrhage", json={"iterations": 100000}, timeout=30).raise_for_status()
        wait_for(lambda: task_children(server), 60, "the training subprocess")
        children = task_children(server)
        server.send_signal(signal.SIGTERM)  # to the server only, as `kill <pid>` or a service manager does
        server.wait(timeout=60)
        wait_for(lambda: not any(alive(pid) for pid in children), 15, "the training subprocess to end")
    finally:
        stop_group(server)


@pytest.mark.integration
def test_kill_9_mid_save_loses_no_acknowledged_save_or_time_record(pool, tmp_path):
    log = tmp_path / "server.log"
    server, url = start_server(pool, CONF, log)
    acknowledged: list[tuple[str, str]] = []
    stop = threading.Event()

    def annotate(name: str) -> None:
        folder = tmp_path / name
        folder.mkdir()
        client = MONAILabelClient(url, client_id=name, tmpdir=str(folder))
        while not stop.is_set():
            try:
                image = client.next_sample("random", {"budget_minutes": 600})["id"]
                client.save_label(image, str(pool / "phantom_truth" / f"{image}.nii.gz"), tag="final")
                acknowledged.append((name, image))
            except (MONAILabelClientException, requests.RequestException, OSError, KeyError):
                return  # the server is gone (or the pool is used up)

    threads = [threading.Thread(target=annotate, args=(f"reader{i}",)) for i in range(3)]
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: len(acknowledged) >= 3, 120, "a few acknowledged saves")
        server.send_signal(signal.SIGKILL)
        server.wait()
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        stop_group(server)

    server, url = start_server(pool, CONF, log)
    try:
        objects = requests.get(f"{url}/datastore/?output=all", timeout=30).json()["objects"]
        records = StateDB.open(pool / ".ichal").label_times()
        for client, image in acknowledged:
            assert "final" in objects[image]["labels"], f"acknowledged save of {image} lost"
            saved = np.asarray(nib.load(pool / "labels" / "final" / f"{image}.nii.gz").dataobj)
            truth = np.asarray(nib.load(pool / "phantom_truth" / f"{image}.nii.gz").dataobj)
            np.testing.assert_array_equal(saved, truth)
            assert len([r for r in records if r["image"] == image and r["client"] == client]) == 1
        # The serve-time predictions behind the time records survive the crash and the restart.
        assert requests.get(f"{url}/info/", timeout=30).json()["ichal"]["time_model"]["calibration"]["n"] >= len(acknowledged)
        keys = [(r["image"], r["client"], r["started"]) for r in records]
        assert len(keys) == len(set(keys)), "duplicated time records"
        json.loads((pool / "datastore_v2.json").read_text())
    finally:
        stop_group(server)


def test_request_threads_never_see_a_half_loaded_datastore(tmp_path):
    """Reloads (another process changed datastore_v2.json) racing with readers on request threads: every
    label path a reader resolves is inside the datastore. MONAI Label's reload published the model before
    setting its base path, and labels were saved under the server's working directory."""
    from lib.datastore import HemorrhageDatastore

    write_pool(tmp_path, count=3, size=32, seed=1, progress=False)
    store = HemorrhageDatastore(str(tmp_path), extensions=("*.nii.gz",), auto_reload=False)
    outside: list[str] = []
    stop = threading.Event()

    def reload_forever() -> None:
        while not stop.is_set():
            store._config_ts = 0.0  # as if another process had written the file
            store.reload()

    def resolve_forever() -> None:
        while not stop.is_set():
            path = store._datastore.label_path("final")
            if not path.startswith(str(tmp_path)):
                outside.append(path)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: the race needs a switch between two lines
    threads = [threading.Thread(target=reload_forever), threading.Thread(target=resolve_forever)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(3.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        sys.setswitchinterval(interval)
    assert outside == []


@pytest.mark.parametrize("key, raw, words", [
    ("audit_stacks", "-1", "audit_stacks must be 0 or more"), ("audit_stacks", "two", "audit_stacks 'two'"),
    ("budget_confidence", "1.5", "budget_confidence must be strictly between"), ("stop_window", "2", "window must be at least 3"),
    ("overlap", "1.0", "overlap must be in"), ("train_hard_negative_fraction", "2", "train_hard_negative_fraction must be in")])
def test_a_bad_conf_value_stops_the_app_naming_it(tmp_path, key, raw, words):
    with pytest.raises(ConfError, match=words):
        AppSettings.from_conf({key: raw}, str(tmp_path))
    AppSettings.from_conf({}, str(tmp_path))  # the defaults are valid
