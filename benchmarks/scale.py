"""Pool-scoring throughput, local vs Ray (1 and 2 workers), the Ray overhead per stack, and a projection
of the hours to re-score an archive (issue 21, docs/scale.md).

Scores the sample pool's unlabeled stacks (cycled to --stacks) with the server's default committee
(cpu_small x 4 members at 1.8 mm, untrained: the time does not depend on the weights) in this process
with 1 and with all cores' torch threads, then through a Ray instance started here with 1 and 2 scoring
workers of one core each. Ray's start and the workers' committee loading are timed apart from scoring.

    python benchmarks/scale.py --stacks 12
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ichal.cluster import connect, score_on_ray, start_scoring_workers
from ichal.committee_scores import committee_scores
from ichal.config import DEFAULT_CONFIG
from ichal.cost import LabelTimeModel
from ichal.ensemble import EnsembleModel, load_ensemble, save_ensemble, windows_to_meta
from ichal.models import build_network, resolve_preset
from ichal.train import software_versions

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE_STACKS = 20_000
PROJECTED_WORKERS = (1, 2, 4, 8, 16, 32, 64)
ROUND_TRIPS = 200


def _committee(path: Path, preset: str, members: int, spacing_mm: float) -> None:
    """A randomly initialised committee saved as the server saves its trained one."""
    networks = []
    for seed in range(members):
        torch.manual_seed(seed)
        networks.append(build_network(preset, len(DEFAULT_CONFIG.hu_windows)).eval())
    meta = {"preset": resolve_preset(preset).to_dict(), "channels": windows_to_meta(DEFAULT_CONFIG.hu_windows),
            "patch_px": DEFAULT_CONFIG.patch_px(spacing_mm), "spacing_mm": spacing_mm, "train_ids": [],
            "metrics": {}, "versions": software_versions(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    save_ensemble(EnsembleModel(members=networks, meta=meta), path)


def _stacks(count: int) -> dict[str, str]:
    """`count` unlabeled sample stacks (cycled when the pool has fewer), id -> path."""
    labeled = {p.name for p in (ROOT / "sample_data" / "labels" / "final").glob("*.nii.gz")}
    images = sorted(p for p in (ROOT / "sample_data").glob("*.nii.gz") if p.name not in labeled)
    return {f"{i:03d}_{images[i % len(images)].name}": str(images[i % len(images)]) for i in range(count)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stacks", type=int, default=12, help="stacks scored per configuration")
    parser.add_argument("--preset", default="cpu_small")
    parser.add_argument("--members", type=int, default=DEFAULT_CONFIG.ensemble_size)
    parser.add_argument("--model-spacing-mm", type=float, default=1.8)
    parser.add_argument("--local-cap-seconds", type=float, default=180.0,
                        help="a local configuration stops after this long (at least 2 stacks): a loaded machine "
                             "can make multi-threaded torch very slow")
    parser.add_argument("--gpu-seconds-per-stack", type=float,
                        help="one GPU worker's measured seconds per stack (benchmarks/inference.py --device cuda on "
                             "a GPU machine): adds a projection for N GPUs")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    print(f"{cores} cores; load average at start {os.getloadavg()[0]:.2f}, {os.getloadavg()[1]:.2f}, "
          f"{os.getloadavg()[2]:.2f} (1, 5, 15 min)")
    time_model = LabelTimeModel().fit(np.zeros((0, 2)), np.zeros(0))
    paths = _stacks(args.stacks)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ichal-scale-", dir="/tmp") as temp:
        model_path = Path(temp) / "ensemble.pt"
        _committee(model_path, args.preset, args.members, args.model_spacing_mm)
        model = load_ensemble(model_path)
        for threads in sorted({1, cores}):
            torch.set_num_threads(threads)
            started, scored = time.perf_counter(), 0
            for path in paths.values():
                committee_scores(model, path, time_model)
                scored += 1
                if time.perf_counter() - started > args.local_cap_seconds and scored >= 2:
                    break
            rows.append(("local", 1, threads, scored, time.perf_counter() - started, 0.0))
        started = time.perf_counter()
        ray = connect(num_cpus=cores, temp_dir=str(Path(temp) / "ray"))
        ray_start = time.perf_counter() - started
        for count in (1, 2):
            started = time.perf_counter()
            workers = start_scoring_workers(model_path, time_model, workers=count)
            ray.get([worker.pid.remote() for worker in workers])  # each has loaded the committee
            worker_start = time.perf_counter() - started
            if count == 1:
                # Ray's own cost of a call: a round trip to the worker that computes nothing.
                started = time.perf_counter()
                for _ in range(ROUND_TRIPS):
                    ray.get(workers[0].pid.remote())
                round_trip = (time.perf_counter() - started) / ROUND_TRIPS
            started = time.perf_counter()
            scored = sum(1 for _ in score_on_ray(paths, workers))
            assert scored == len(paths)
            rows.append(("ray", count, 1, scored, time.perf_counter() - started, worker_start))
            for worker in workers:
                ray.kill(worker)
        ray.shutdown()
    n = len(paths)
    print(f"\n{n} stacks per Ray run (local runs stop after {args.local_cap_seconds:.0f} s); {args.preset} x "
          f"{args.members} members at {args.model_spacing_mm} mm; Ray started in "
          f"{ray_start:.1f} s\n")
    print("| engine | workers | torch threads each | stacks | seconds | stacks/s | s per stack | workers' start (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for engine, count, threads, scored, seconds, start in rows:
        start_text = f"{start:.1f}" if engine == "ray" else ""
        print(f"| {engine} | {count} | {threads} | {scored} | {seconds:.1f} | {scored / seconds:.3f} | "
              f"{seconds / scored:.2f} | {start_text} |")
    by_key = {(engine, count, threads): seconds / scored for engine, count, threads, scored, seconds, _ in rows}
    local_one, ray_one, ray_two = by_key[("local", 1, 1)], by_key[("ray", 1, 1)], by_key[("ray", 2, 1)]
    local_all = by_key[("local", 1, cores)]
    efficiency = ray_one / (2 * ray_two)
    print(f"\nRay overhead per stack (1 worker vs this process, both one thread): {ray_one - local_one:+.2f} s "
          f"({(ray_one - local_one) / local_one:+.0%}); a round trip to a worker that computes nothing: "
          f"{round_trip * 1000:.1f} ms (mean of {ROUND_TRIPS})")
    print(f"2 Ray workers vs 1: x{ray_one / ray_two:.2f} (efficiency {efficiency:.0%}); "
          f"vs local with {cores} threads: x{local_all / ray_two:.2f}")
    print(f"load average at end {os.getloadavg()[0]:.2f}, {os.getloadavg()[1]:.2f}, {os.getloadavg()[2]:.2f}")
    print(f"\nPROJECTION (not measured): hours to re-score {ARCHIVE_STACKS:,} stacks = {ARCHIVE_STACKS:,} x one "
          "worker's s per stack / N workers, assuming linear scaling (each worker its own device and the stacks "
          "independent; the 2-worker efficiency above is what this machine gave), workers' start excluded")
    overhead = max(0.0, ray_one - local_one)
    header = f"| N workers | one-core CPU workers like this machine's ({ray_one:.2f} s/stack) |"
    if args.gpu_seconds_per_stack:
        header += f" GPU workers ({args.gpu_seconds_per_stack:.2f} s/stack + {overhead:.2f} s Ray overhead) |"
    print(header)
    print("|---:|---:|" + ("---:|" if args.gpu_seconds_per_stack else ""))
    for workers in PROJECTED_WORKERS:
        line = f"| {workers} | {ARCHIVE_STACKS * ray_one / workers / 3600:.1f} |"
        if args.gpu_seconds_per_stack:
            line += f" {ARCHIVE_STACKS * (args.gpu_seconds_per_stack + overhead) / workers / 3600:.2f} |"
        print(line)
    if not args.gpu_seconds_per_stack:
        print("GPU workers: measure one GPU's s per stack (benchmarks/inference.py --device cuda) and pass "
              "--gpu-seconds-per-stack; this machine has no GPU")

if __name__ == "__main__":
    main()
