"""Engine `ray` (issue 21) on a Ray instance this module starts on this machine with 2 CPU workers: scoring
through Ray equals local scoring on sample data and survives a killed worker, committee members train in
parallel and by 2-process DDP (gloo) into loadable checkpoints, the experiment grid on Ray equals the local one."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray
import torch

from ichal.cluster import (
    ClusterError,
    TrainLayout,
    check_address,
    member_chunks,
    plan_training,
    score_on_ray,
    start_scoring_workers,
    train_on_ray,
)
from ichal.committee_scores import committee_scores
from ichal.cost import LabelTimeModel
from ichal.ensemble import load_ensemble, save_ensemble
from ichal.experiment import ExperimentConfig, run_protocol
from ichal.train import TrainSettings, load_pool_items, train_ensemble

from test_train import TINY, _flat_weights, _stack



ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
MINI = ExperimentConfig(name="mini_ray", pool_count=12, test_count=2, size=32, rounds=1, members=2, iterations=4,
                        batch_size=4)
# The literature prior, as the server's before any labeling time is measured.
PRIOR_TIME_MODEL = LabelTimeModel().fit(np.zeros((0, 2)), np.zeros(0))


@pytest.fixture(scope="module")
def cluster():
    # A short temp dir: Ray's socket paths must stay under the OS limit of ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="ichal-ray-", dir="/tmp")
    ray.init(num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False, log_to_driver=False,
             _temp_dir=temp_dir)
    yield
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def committee(tmp_path_factory):
    """A tiny 2-member committee trained on the sample pool's labeled stacks, saved as the server saves it."""
    torch.set_num_threads(1)
    items = load_pool_items(SAMPLE)[:2]
    model = train_ensemble(items, TrainSettings(preset=TINY, ensemble_size=2, iterations=4, batch_size=4, seed=1,
                                                spacing_mm=1.8))
    path = tmp_path_factory.mktemp("model") / "ensemble.pt"
    save_ensemble(model, path)
    return path


def _unlabeled_sample_paths(count: int) -> dict[str, str]:
    labeled = {p.name for p in (SAMPLE / "labels" / "final").glob("*.nii.gz")}
    images = sorted(p for p in SAMPLE.glob("*.nii.gz") if p.name not in labeled)[:count]
    return {p.name.removesuffix(".nii.gz"): str(p) for p in images}


def _local_scores(committee: Path, paths: dict[str, str]) -> dict[str, dict]:
    model = load_ensemble(committee)
    return {image_id: committee_scores(model, path, PRIOR_TIME_MODEL) for image_id, path in paths.items()}


def _assert_same_scores(got: dict[str, dict], expected: dict[str, dict]) -> None:
    assert got.keys() == expected.keys()
    for image_id, scores in expected.items():
        for key, value in scores.items():
            if key == "model_version":
                assert got[image_id][key] == value
            elif key != "scored_at":
                assert got[image_id][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (image_id, key)


def test_ray_scoring_gives_the_local_scores_on_sample_data(cluster, committee):
    paths = _unlabeled_sample_paths(4)
    expected = _local_scores(committee, paths)
    workers = start_scoring_workers(committee, PRIOR_TIME_MODEL, workers=2)
    got = dict(score_on_ray(paths, workers))
    _assert_same_scores(got, expected)


def test_a_worker_killed_mid_scoring_loses_no_stack(cluster, committee):
    paths = _unlabeled_sample_paths(8)
    expected = _local_scores(committee, paths)
    workers = start_scoring_workers(committee, PRIOR_TIME_MODEL, workers=2)
    victim = ray.get(workers[0].pid.remote())
    got = {}
    for image_id, scores in score_on_ray(paths, workers):
        got[image_id] = scores
        if len(got) == 1:
            # The worker holds stacks in flight now (two per worker, eight to score): kill its process.
            os.kill(victim, signal.SIGKILL)
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE
    # Ray restarted the actor (a new process) and reran what the dead one held.
    assert ray.get(workers[0].pid.remote()) != victim
    _assert_same_scores(got, expected)


def test_members_trained_in_parallel_equal_a_local_committee(cluster, tmp_path):
    items = [_stack(i, bleed=i % 2 == 0) for i in range(4)]
    settings = TrainSettings(preset=TINY, ensemble_size=2, iterations=6, batch_size=4, seed=3)
    local = train_ensemble(items, settings)
    parallel = train_on_ray(items, settings, layout=TrainLayout(groups=2, processes=1, device="cpu"))
    save_ensemble(parallel, tmp_path / "parallel.pt")
    loaded = load_ensemble(tmp_path / "parallel.pt")
    assert len(loaded.members) == 2
    assert [m["seed"] for m in loaded.meta["metrics"]["members"]] == [m["seed"] for m in local.meta["metrics"]["members"]]
    for ours, theirs in zip(loaded.members, local.members):
        assert torch.allclose(_flat_weights(ours), _flat_weights(theirs), atol=1e-4)


def test_a_two_process_ddp_step_on_cpu_gives_a_loadable_checkpoint(cluster, tmp_path):
    items = [_stack(i, bleed=i % 2 == 0) for i in range(4)]
    # With hard-negative mining midway: the member predicts stacks while wrapped in DDP.
    settings = TrainSettings(preset=TINY, ensemble_size=1, iterations=4, batch_size=4, seed=5,
                             hard_negative_fraction=0.5)
    model = train_on_ray(items, settings, layout=TrainLayout(groups=1, processes=2, device="cpu"))
    save_ensemble(model, tmp_path / "ddp.pt")
    loaded = load_ensemble(tmp_path / "ddp.pt")
    assert loaded.meta["metrics"]["settings"]["data_parallel_processes"] == 2
    assert loaded.meta["train_ids"] == sorted(item.id for item in items)
    # Two processes drew different patches, so their averaged gradients differ from one process's run.
    alone = train_ensemble(items, settings)
    assert not torch.allclose(_flat_weights(loaded.members[0]), _flat_weights(alone.members[0]))
    probabilities = torch.sigmoid(loaded.members[0](torch.zeros(1, 3, 40, 40)))
    assert torch.isfinite(probabilities).all()


def _ray_task_processes() -> list[psutil.Process]:
    """This test's Ray workers running a grid task (Ray titles a busy worker `ray::<function>`)."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if process.cmdline()[:1] == ["ray::_run_with_threads"]:
                found.append(process)
        except psutil.Error:
            continue
    return found


def test_the_experiment_grid_on_ray_equals_the_local_one_and_recomputes_a_killed_workers_cell(cluster, tmp_path):
    torch.set_num_threads(1)
    methods = ["random", "cost_sensitive"]
    local = run_protocol("cost", MINI, tmp_path / "local", [0], methods=methods, progress=False)
    killed: list[int] = []

    def kill_a_running_cell() -> None:
        # Once round 0 is on disk, kill the first worker seen inside a task: its cell must be redone.
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            if (tmp_path / "ray" / "cost" / "seed0" / "shared" / "round0.json").exists():
                for process in _ray_task_processes():
                    process.kill()
                    killed.append(process.pid)
                    break
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_running_cell, daemon=True)
    killer.start()
    on_ray = run_protocol("cost", MINI, tmp_path / "ray", [0], methods=methods, progress=False, engine="ray")
    killer.join(timeout=1)
    assert killed, "no grid task was seen running to kill"
    key = lambda r: (r["method"], r["seed"], r["round"])  # noqa: E731
    assert sorted(map(key, on_ray)) == sorted(map(key, local))
    expected = {key(r): r for r in local}
    for record in on_ray:
        assert record["labeled_ids"] == expected[key(record)]["labeled_ids"], key(record)
        assert record["metrics"]["stack_ap"] == pytest.approx(expected[key(record)]["metrics"]["stack_ap"], nan_ok=True)


def test_training_layout_puts_members_in_parallel_before_ddp():
    assert plan_training(4, devices=2, device="cpu", devices_per_node=2) == TrainLayout(2, 1, "cpu")
    assert plan_training(4, devices=16, device="gpu", devices_per_node=8) == TrainLayout(4, 4, "gpu")
    assert plan_training(2, devices=16, device="gpu", devices_per_node=4) == TrainLayout(2, 4, "gpu")
    assert member_chunks(0, 4, 3) == [(0, 2), (2, 1), (3, 1)]
    assert member_chunks(2, 2, 4) == [(2, 1), (3, 1)]


def test_an_unreachable_address_is_named_in_the_error():
    with pytest.raises(ClusterError, match="127.0.0.1:9"):
        check_address("127.0.0.1:9")


def test_the_local_engine_never_imports_ray():
    # The default path (server settings, scoring, training, the experiment grid) in a fresh interpreter.
    code = ("import sys; sys.path[:0] = ['apps/hemorrhage']; import ichal.experiment, ichal.train, ichal.committee_scores; "
            "from lib.settings import AppSettings; AppSettings.from_conf({}, '/tmp'); "
            "import lib.scoring, lib.trainers; assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=300)


def test_engine_ray_without_ray_installed_names_the_package(tmp_path):
    # Ray hidden from a fresh interpreter: the server's settings refuse engine ray, naming the extra.
    (tmp_path / "ray.py").write_text("raise ImportError('hidden by the test')\n")
    code = ("import sys; sys.path[:0] = [sys.argv[1], 'apps/hemorrhage']; from lib.settings import AppSettings, ConfError\n"
            "try:\n    AppSettings.from_conf({'engine': 'ray'}, '/tmp')\nexcept ConfError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert "engine ray" in out and "[cluster]" in out


def test_the_server_trains_and_scores_on_ray_as_it_does_locally(cluster, tmp_path):
    """`--conf engine ray`: the app's train task trains the committee on the Ray instance (members in
    parallel, seeds as a local run's) and its scoring task stores, for every unlabeled stack, what the local
    engine stores with that model."""
    from ichal.phantom import write_pool

    sys.path.insert(0, str(ROOT / "apps" / "hemorrhage"))
    from lib.context import AppContext
    from lib.datastore import HemorrhageDatastore
    from lib.scoring import SCORE_KEY, CommitteeScoring
    from lib.settings import AppSettings
    from lib.trainers import EnsembleTrain

    write_pool(tmp_path / "ray", count=5, size=32, seed=2, labeled_count=3, progress=False)
    shutil.copytree(tmp_path / "ray", tmp_path / "local")
    conf = {"ensemble_size": "2", "train_iterations": "4", "train_batch_size": "4", "model_spacing_mm": "3.6"}
    scores = {}
    for engine in ("ray", "local"):
        settings = AppSettings.from_conf(conf | {"engine": engine}, str(tmp_path / engine))
        context = AppContext(settings)
        datastore = HemorrhageDatastore(str(tmp_path / engine), extensions=("*.nii.gz",), auto_reload=False)
        if engine == "ray":
            assert EnsembleTrain(context)({}, datastore)["state"] == "DONE"
            trained = load_ensemble(settings.model_path)
        else:
            settings.model_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(tmp_path / "ray" / ".ichal" / "models" / "ensemble.pt", settings.model_path)
        unlabeled = datastore.get_unlabeled_images()
        assert CommitteeScoring(context)({}, datastore)["scored"] == len(unlabeled) == 2
        scores[engine] = {i: info[SCORE_KEY] for i, info in datastore.image_infos(unlabeled).items()}
    assert [m["seed"] for m in trained.meta["metrics"]["members"]] == [0, 1]
    assert trained.meta["train_ids"] == sorted(datastore.get_labeled_images())
    _assert_same_scores(scores["ray"], scores["local"])
