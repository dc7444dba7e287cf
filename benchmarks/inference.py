"""Inference cost of the PatchFCN ensemble: seconds per stack, peak memory, FLOPs, fraction of peak.

Kuo et al. 2018, section 2 (sliding-window PatchFCN) and its claim of speed and small memory. Each
configuration runs in a fresh subprocess so its peak RSS is its own. The model spacing is the
input's native spacing unless --model-spacing-mm is given (native is the paper's setting: 160 px
patches at ~0.45 mm for 512 x 512 slices; a model trained at a coarser spacing resamples first).

    python benchmarks/inference.py --sizes 256 512 --slices 32 --preset cpu_small --members 4 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch
from torch import nn

from ichal.config import DEFAULT_CONFIG
from ichal.ensemble import EnsembleModel, predict_stack, windows_to_meta
from ichal.metrics import stack_score
from ichal.models import build_network, resolve_preset

FIELD_OF_VIEW_MM = 230.0  # head CT field of view: 512 px at ~0.45 mm
# Peak fp32 FLOP/s per core, AVX2 with two 256-bit FMA units: 2 units x 8 lanes x 2 FLOP per cycle.
AVX2_FMA_FLOP_PER_CYCLE = 32


def _synthetic_head(size: int, slices: int, seed: int = 0) -> np.ndarray:
    """(slices, size, size) int16 HU: air, skull ring, 30 HU brain with noise (timing is content-free)."""
    yy, xx = np.mgrid[:size, :size]
    radius = np.hypot(yy - size / 2, xx - size / 2) / size
    plane = np.select([radius < 0.40, radius < 0.44], [30.0, 1000.0], -1000.0)
    noise = np.random.default_rng(seed).normal(0, 5, (slices, size, size))
    return (plane[None] + noise).astype(np.int16)


def _ensemble(preset: str, members: int, spacing_mm: float) -> EnsembleModel:
    networks = []
    for seed in range(members):
        torch.manual_seed(seed)
        networks.append(build_network(preset, len(DEFAULT_CONFIG.hu_windows)).eval())
    meta = {"preset": resolve_preset(preset).to_dict(), "channels": windows_to_meta(DEFAULT_CONFIG.hu_windows),
            "patch_px": DEFAULT_CONFIG.patch_px(spacing_mm), "spacing_mm": spacing_mm}
    return EnsembleModel(members=networks, meta=meta)


def _count_conv_macs(model: EnsembleModel, image: np.ndarray, spacing: tuple, device: str) -> int:
    """Multiply-accumulates of every convolution run while predicting `image` with the first member."""
    macs = 0

    def hook(module: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal macs
        kernel = module.kernel_size[0] * module.kernel_size[1]
        macs += output.numel() * (module.in_channels // module.groups) * kernel

    member = model.members[0]
    handles = [m.register_forward_hook(hook) for m in member.modules() if isinstance(m, nn.Conv2d)]
    predict_stack(EnsembleModel([member], model.meta), image, spacing, device=device)
    for handle in handles:
        handle.remove()
    return macs


def _cpu_peak_flops(threads: int) -> float | None:
    """Peak fp32 FLOP/s of `threads` cores from /proc/cpuinfo (AVX2 FMA assumed); None if unknown."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return None
    mhz = [float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
    if not mhz or " fma " not in info or " avx2 " not in info:
        return None
    return max(mhz) * 1e6 * AVX2_FMA_FLOP_PER_CYCLE * threads


def worker(size: int, slices: int, preset: str, members: int, threads: int, device: str, repeats: int,
           model_spacing_mm: float) -> dict:
    """Time `repeats` predictions of one (slices, size, size) stack; returns figures as a dict."""
    torch.set_num_threads(threads)
    spacing = (5.0, FIELD_OF_VIEW_MM / size, FIELD_OF_VIEW_MM / size)
    image = _synthetic_head(size, slices)
    model = _ensemble(preset, members, model_spacing_mm)
    for member in model.members:
        member.to(device)
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    predict_stack(model, image[:2], spacing, device=device)  # warm-up
    seconds = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        predict_stack(model, image, spacing, device=device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    # The stack score's own cost (issue 19: a partial sort of the map) on a map where every voxel above 40 HU
    # of the synthetic head is called, far more than a trained model calls.
    called = np.clip((image - 40.0) / 40.0, 0.0, 1.0).astype(np.float32)
    start = time.perf_counter()
    stack_score(called, spacing)
    stack_score_seconds = time.perf_counter() - start
    result = {
        "size": size, "slices": slices, "preset": preset, "members": members, "threads": threads, "device": device,
        "model_spacing_mm": model_spacing_mm, "patch_px": model.patch_px, "seconds_per_stack": min(seconds),
        "stack_score_seconds": stack_score_seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_predict_mib": baseline_kb / 1024,
    }
    if device.startswith("cuda"):
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--preset", default="cpu_small")
    parser.add_argument("--members", type=int, default=DEFAULT_CONFIG.ensemble_size)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model-spacing-mm", type=float, help="in-plane model spacing (default: native)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worker", type=str, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(**json.loads(args.worker))))
        return
    torch.set_num_threads(args.threads)
    peak = _cpu_peak_flops(args.threads) if args.device == "cpu" else None
    print(f"device={args.device} threads={args.threads} preset={args.preset} load average={os.getloadavg()}")
    rows = []
    for size in args.sizes:
        spacing_mm = FIELD_OF_VIEW_MM / size
        model_spacing_mm = args.model_spacing_mm or spacing_mm
        macs = _count_conv_macs(_ensemble(args.preset, 1, model_spacing_mm), _synthetic_head(size, args.slices),
                                (5.0, spacing_mm, spacing_mm), args.device)
        for members in (1, args.members):
            job = dict(size=size, slices=args.slices, preset=args.preset, members=members, threads=args.threads,
                       device=args.device, repeats=args.repeats, model_spacing_mm=model_spacing_mm)
            output = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], check=True,
                                    capture_output=True, text=True).stdout
            row = json.loads(output.strip().splitlines()[-1])
            row["gflop_per_stack"] = 2 * macs * members / 1e9
            row["achieved_gflops"] = row["gflop_per_stack"] / row["seconds_per_stack"]
            row["fraction_of_peak"] = row["achieved_gflops"] * 1e9 / peak if peak else None
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| stack | preset | model mm | patch px | members | s / stack | peak RSS MiB (+ during predict) "
          "| GFLOP / stack | GFLOP/s | of peak | stack score s (share of s / stack) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fraction = f"{100 * r['fraction_of_peak']:.1f}%" if r["fraction_of_peak"] else "n/a"
        grown = r["peak_rss_mib"] - r["rss_before_predict_mib"]
        print(f"| {r['slices']}x{r['size']}x{r['size']} | {r['preset']} | {r['model_spacing_mm']:.2f} "
              f"| {r['patch_px']} "
              f"| {r['members']} | {r['seconds_per_stack']:.2f} | {r['peak_rss_mib']:.0f} (+{grown:.0f}) "
              f"| {r['gflop_per_stack']:.1f} "
              f"| {r['achieved_gflops']:.1f} | {fraction} "
              f"| {r['stack_score_seconds']:.3f} ({100 * r['stack_score_seconds'] / r['seconds_per_stack']:.1f}%) |")
    if peak:
        print(f"peak assumed: {peak / 1e9:.0f} GFLOP/s fp32 ({args.threads} core(s) x max cpu MHz x "
              f"{AVX2_FMA_FLOP_PER_CYCLE} FLOP/cycle, AVX2 FMA)")


if __name__ == "__main__":
    main()
