"""Engine `ray`: pool scoring, committee training and the experiment grid spread over a Ray cluster.

The default engine, `local`, never imports this module's Ray code: it runs everything in this process
(scoring, training) or in local processes (`python -m ichal.experiment --workers N`). With `ray`, the
same functions run inside Ray workers (docs/scale.md):

- scoring: `score_on_ray` starts one actor per GPU (or per CPU core), each loads the committee once and
  runs `ichal.committee_scores.committee_scores`; results come back as each stack finishes, and a worker
  that dies is restarted by Ray, which reruns only the stacks it held;
- training: `train_on_ray` trains groups of committee members in parallel, each group with torch
  DistributedDataParallel over its processes on one node (gloo on CPU, nccl on GPU), and merges the
  groups' members into one committee (`ichal.ensemble.merge_ensembles`), saved in the usual format;
- experiments: `RayTaskPool` runs the grid's tasks as Ray tasks, retried when their worker dies.

Ray is imported only here, inside functions, so a machine without it imports this module and gets a
`ClusterError` naming the missing package only when it asks for the engine.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType

from ichal.committee_scores import committee_scores
from ichal.cost import LabelTimeModel
from ichal.ensemble import EnsembleModel, load_ensemble, merge_ensembles, weights_digest
from ichal.train import DataParallel, TrainItem, TrainSettings, train_ensemble

ENGINES = ("local", "ray")
# How often Ray restarts a dead scoring or training worker (and reruns the calls it held) before the run fails.
WORKER_RESTARTS = 3
# Stacks queued on each scoring worker: one running, one waiting, so a worker never idles for a round trip.
STACKS_IN_FLIGHT_PER_WORKER = 2
# How long a training group waits for its devices on one node before the run fails with the reason.
PLACEMENT_TIMEOUT_SECONDS = 300


class ClusterError(RuntimeError):
    """The Ray engine cannot be used as configured: Ray is missing, or the cluster cannot be reached."""


def check_engine(engine: str) -> None:
    """Raise `ClusterError` naming the problem when `engine` is unknown or is `ray` without Ray installed."""
    if engine not in ENGINES:
        raise ClusterError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "ray":
        require_ray()


def require_ray() -> ModuleType:
    """The `ray` module, or a `ClusterError` saying how to install it."""
    try:
        import ray
    except ImportError as error:
        raise ClusterError("engine ray needs the Ray package, which is not installed: "
                           "pip install -e '.[cluster]' (the pinned version, see pyproject.toml)") from error
    return ray


def check_address(address: str, timeout_seconds: float = 5.0) -> None:
    """Fail fast, with the address in the message, when a `host:port` cluster address does not answer.
    Other forms (`auto`, `ray://...`) are left to `ray.init`."""
    host, separator, port = address.rpartition(":")
    if not separator or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_seconds).close()
    except OSError as error:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {error}. Start it with "
                           f"`ray start --head --port {port}` on {host} (docs/scale.md)") from error


def connect(address: str | None = None, *, num_cpus: int | None = None, temp_dir: str | None = None) -> ModuleType:
    """Join the Ray cluster at `address` (`host:port`, `auto`, `ray://host:port`), or with None start a
    Ray instance on this machine that ends with this process (`num_cpus`, `temp_dir` apply to that one).
    A second call in a process keeps the first connection. Returns the `ray` module."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    if address:
        check_address(address)
        try:
            ray.init(address=address, log_to_driver=False)
        except Exception as error:  # ray.init raises many types: connection, authentication token, version mismatch
            raise ClusterError(f"cannot join the Ray cluster at {address}: {error}") from error
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir)
    return ray


def cluster_devices() -> tuple[str, int]:
    """("gpu", number of GPUs) when the cluster has any, else ("cpu", number of CPU cores)."""
    ray = require_ray()
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    return ("gpu", gpus) if gpus else ("cpu", int(resources.get("CPU", 1)))


# -- pool scoring ------------------------------------------------------------------------------


class ScoringWorker:
    """A Ray actor: loads the committee once, then scores stacks by path with `committee_scores`."""

    def __init__(self, model_path: str, time_model: LabelTimeModel, device: str, overlap: float) -> None:
        self.model = load_ensemble(model_path, device=device)
        self.time_model, self.device, self.overlap = time_model, device, overlap

    def score(self, image_id: str, image_path: str) -> tuple[str, dict]:
        return image_id, committee_scores(self.model, image_path, self.time_model, device=self.device,
                                          overlap=self.overlap)

    def pid(self) -> int:
        return os.getpid()


def start_scoring_workers(model_path: str | Path, time_model: LabelTimeModel, *, workers: int | None = None,
                          overlap: float = 0.25) -> list:
    """`workers` scoring actors (None: one per GPU of the cluster, else one per CPU core), each with one GPU
    when the cluster has GPUs, else one CPU core (one torch thread). Ray restarts an actor that dies."""
    ray = require_ray()
    kind, devices = cluster_devices()
    count = workers or devices
    if count < 1:
        raise ClusterError(f"scoring workers must be at least 1, got {count}")
    resources = {"num_gpus": 1, "num_cpus": 1} if kind == "gpu" else {"num_cpus": 1}
    # Ray makes the actor's one GPU `cuda` (CUDA_VISIBLE_DEVICES); it sets one torch thread per CPU asked.
    device = "cuda" if kind == "gpu" else "cpu"
    actor = ray.remote(ScoringWorker).options(max_restarts=WORKER_RESTARTS, max_task_retries=WORKER_RESTARTS,
                                              **resources)
    return [actor.remote(str(model_path), time_model, device, overlap) for _ in range(count)]


def score_on_ray(image_paths: Mapping[str, str], workers: Sequence) -> Iterator[tuple[str, dict]]:
    """(image id, scores) of every stack in `image_paths` (id -> path readable on every node), in the
    order they finish, so the caller stores each at once. Each worker holds at most
    `STACKS_IN_FLIGHT_PER_WORKER` stacks; when one dies, Ray restarts it and reruns those stacks only."""
    ray = require_ray()
    queue = deque(image_paths.items())
    running: dict = {}  # object ref -> worker holding it

    def submit(worker) -> None:
        image_id, path = queue.popleft()
        running[worker.score.remote(image_id, path)] = worker

    for worker in workers:
        for _ in range(STACKS_IN_FLIGHT_PER_WORKER):
            if queue:
                submit(worker)
    while running:
        [done], _ = ray.wait(list(running), num_returns=1)
        worker = running.pop(done)
        yield ray.get(done)
        if queue:
            submit(worker)


# -- training -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainLayout:
    """How a committee is trained on the cluster: `groups` of members trained in parallel, each group by
    `processes` DDP processes on one node, each process on `device` ("cpu" or "gpu")."""

    groups: int
    processes: int
    device: str


def plan_training(ensemble_size: int, devices: int, device: str, devices_per_node: int) -> TrainLayout:
    """Members in parallel first (no communication), then the devices left over per member as DDP processes,
    at most a node's worth per member (DDP runs within a node here)."""
    groups = max(1, min(ensemble_size, devices))
    processes = max(1, min(devices // groups, devices_per_node))
    return TrainLayout(groups, processes, device)


def member_chunks(first_member: int, ensemble_size: int, groups: int) -> list[tuple[int, int]]:
    """(first member, member count) of each group: `ensemble_size` members from `first_member`, split as
    evenly as possible into `groups` contiguous runs."""
    base, extra = divmod(ensemble_size, groups)
    chunks, start = [], first_member
    for group in range(groups):
        count = base + (group < extra)
        if count:
            chunks.append((start, count))
        start += count
    return chunks


class TrainingProcess:
    """A Ray actor: one rank of a DDP group training committee members with `train_ensemble`."""

    def __init__(self, rank: int, world_size: int, device: str) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device

    def rendezvous(self) -> str:
        """tcp://ip:port of a free port on this node, where the group meets (asked of rank 0)."""
        import ray

        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def train(self, rendezvous: str | None, items: list[TrainItem], settings: TrainSettings, mode: str,
              previous: EnsembleModel | None) -> tuple[EnsembleModel | None, str]:
        """Train; returns the model (rank 0; None elsewhere) and a digest of this rank's trained parameters."""
        import torch
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        settings = replace(settings, device="cuda" if self.device == "gpu" else "cpu")
        if self.world_size == 1:
            model = train_ensemble(items, settings, mode=mode, previous=previous)
            return model, parameters_digest(model)
        backend = "nccl" if self.device == "gpu" else "gloo"
        dist.init_process_group(backend, init_method=rendezvous, rank=self.rank, world_size=self.world_size)
        try:
            def wrap(member: torch.nn.Module) -> torch.nn.Module:
                return DistributedDataParallel(member, device_ids=[0] if self.device == "gpu" else None)

            model = train_ensemble(items, settings, mode=mode, previous=previous,
                                   data_parallel=DataParallel(self.rank, self.world_size, wrap))
        finally:
            dist.destroy_process_group()
        return (model if self.rank == 0 else None), parameters_digest(model)


def parameters_digest(model: EnsembleModel) -> str:
    """Digest of the members' trainable parameters: equal on every rank of a DDP group, which averages their
    gradients (batch-norm running statistics are left out: each rank updates its own)."""
    return weights_digest([dict(member.named_parameters()) for member in model.members])


def _train_group(ray: ModuleType, items_ref, settings: TrainSettings, mode: str, previous: EnsembleModel | None,
                 processes: int, device: str):
    """Start one group's DDP processes on one node; returns their results (refs, rank 0 first) and the
    group's placement group."""
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle = {"GPU": 1, "CPU": 1} if device == "gpu" else {"CPU": 1}
    group = placement_group([bundle] * processes, strategy="STRICT_PACK")
    try:
        ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_SECONDS)
    except ray.exceptions.GetTimeoutError as error:
        ray.util.remove_placement_group(group)
        raise ClusterError(f"no node of the cluster offers {processes} x {bundle} for one member's training "
                           f"within {PLACEMENT_TIMEOUT_SECONDS} s") from error
    actor = ray.remote(TrainingProcess)
    ranks = [actor.options(num_cpus=1, num_gpus=1 if device == "gpu" else 0,
                           scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank)
                           ).remote(rank, processes, device) for rank in range(processes)]
    rendezvous = ray.get(ranks[0].rendezvous.remote()) if processes > 1 else None
    return [rank.train.remote(rendezvous, items_ref, settings, mode, previous) for rank in ranks], group


def train_on_ray(items: Sequence[TrainItem], settings: TrainSettings, *, mode: str = "retrain",
                 previous: EnsembleModel | None = None, layout: TrainLayout | None = None) -> EnsembleModel:
    """`train_ensemble` on the cluster: retrain mode trains `layout.groups` groups of members in parallel
    (each its share of `settings.ensemble_size`, with its own member indices, hence seeds) and merges them;
    continual mode fine-tunes the previous committee in one group. Each group runs `layout.processes` DDP
    processes on one node. `layout` None: `plan_training` over the cluster's devices."""
    ray = require_ray()
    if layout is None:
        kind, devices = cluster_devices()
        per_node = max(int(node["Resources"].get("GPU" if kind == "gpu" else "CPU", 0))
                       for node in ray.nodes() if node["Alive"])
        layout = plan_training(settings.ensemble_size, devices, kind, per_node)
    chunks = member_chunks(settings.first_member, settings.ensemble_size, layout.groups if mode == "retrain" else 1)
    items_ref = ray.put(list(items))
    started = [_train_group(ray, items_ref, replace(settings, first_member=first, ensemble_size=count), mode,
                            previous, layout.processes, layout.device) for first, count in chunks]
    try:
        results = [ray.get(refs) for refs, _ in started]
    finally:
        for _, group in started:
            ray.util.remove_placement_group(group)
    for ranks in results:
        if len({digest for _, digest in ranks}) > 1:
            raise ClusterError("the DDP processes of a member ended with different weights: gradients were not "
                               "averaged (torch.distributed misconfigured?)")
    models = [ranks[0][0] for ranks in results]
    return models[0] if len(models) == 1 else merge_ensembles(models)


# -- experiment grid ----------------------------------------------------------------------------


def _run_with_threads(function: Callable, threads: int, argument: object) -> object:
    import torch

    torch.set_num_threads(threads)
    return function(argument)


class RayTaskPool:
    """The `submit`/`shutdown` part of `concurrent.futures.Executor` over Ray tasks of `threads` CPU cores
    each, as many at once as the cluster has cores for. A task whose worker dies is run again (its
    finished work must be on disk for the rerun to skip it, as the experiment grid's cells are)."""

    def __init__(self, threads: int = 1) -> None:
        self.ray = require_ray()
        self.threads = threads
        self._remote = self.ray.remote(_run_with_threads).options(num_cpus=threads, max_retries=WORKER_RESTARTS)
        self._refs: list = []

    @property
    def slots(self) -> int:
        """How many tasks the cluster runs at once: its CPU cores over `threads`, at least one."""
        return max(1, int(self.ray.cluster_resources().get("CPU", 1)) // self.threads)

    def submit(self, function: Callable, argument: object) -> Future:
        ref = self._remote.remote(function, self.threads, argument)
        self._refs.append(ref)
        return ref.future()

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        if cancel_futures:
            for ref in self._refs:
                self.ray.cancel(ref)
        if wait and self._refs:
            self.ray.wait(self._refs, num_returns=len(self._refs))

    def __enter__(self) -> RayTaskPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown(wait=True)
