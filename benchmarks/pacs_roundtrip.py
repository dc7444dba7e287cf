"""Seconds to move one phantom head-CT stack through a real Orthanc: STOW, list, fetch (cold and cached),
read to HU, write + STOW its SEG, derive labeled status. Serving layer (DESIGN.md "Real components").

Usage: python benchmarks/pacs_roundtrip.py [--size 512] [--repeats 3]
Starts its own Orthanc (scripts/orthanc.sh) in a temp folder on a free port and stops it afterwards.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np
import pydicom

from ichal import dicom_seg, pacs
from ichal.dicom import read_ct_series, write_ct_series
from ichal.phantom.generator import generate_stack

ORTHANC_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "orthanc.sh"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def one_round(url: str, image_hu: np.ndarray, label: np.ndarray, affine: np.ndarray, work: Path) -> dict[str, float]:
    """Seconds for each step on a fresh copy (new UIDs) of the stack."""
    series_dir = work / "ct"
    write_ct_series(image_hu, affine, series_dir)
    seconds: dict[str, float] = {}
    (study_uid, series_uid), seconds["stow"] = timed(pacs.stow_series, url, series_dir)
    _, seconds["list_ct"] = timed(pacs.list_ct_series, url)
    folder, seconds["fetch_cold"] = timed(pacs.fetch_series_to_cache, url, study_uid, series_uid, work / "cache")
    _, seconds["fetch_cached"] = timed(pacs.fetch_series_to_cache, url, study_uid, series_uid, work / "cache")
    (fetched_hu, _), seconds["read_hu"] = timed(read_ct_series, folder)
    if not np.array_equal(fetched_hu, image_hu):
        raise AssertionError("HU fetched from the PACS differ from the original")
    sources = [pydicom.dcmread(path) for path in sorted(folder.glob("*.dcm"))]
    seg, seconds["seg_write"] = timed(dicom_seg.label_to_seg, label, sources)
    _, seconds["seg_stow"] = timed(pacs.stow_series, url, [seg])
    labeled, seconds["list_labeled"] = timed(pacs.list_labeled_series, url)
    if labeled.get(series_uid) != seg.SeriesInstanceUID:
        raise AssertionError("the SEG does not mark its series labeled")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="in-plane pixels of the phantom stack")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    stack = generate_stack(seed=args.seed, size=args.size)
    with tempfile.TemporaryDirectory(prefix="pacs_bench_") as tmp:
        orthanc_dir = Path(tmp) / "orthanc"
        port = free_port()
        subprocess.run([str(ORTHANC_SCRIPT), "start", str(orthanc_dir), str(port)], check=True, capture_output=True)
        try:
            url = f"http://127.0.0.1:{port}/dicom-web"
            rounds = [
                one_round(url, stack.image_hu, stack.label, stack.affine, Path(tmp) / f"round{i}")
                for i in range(args.repeats)
            ]
        finally:
            subprocess.run([str(ORTHANC_SCRIPT), "stop", str(orthanc_dir)], check=True, capture_output=True)
    z, y, x = stack.image_hu.shape
    print(f"stack {z}x{y}x{x} int16 ({stack.image_hu.nbytes / 1e6:.1f} MB), {args.repeats} rounds, median seconds:")
    for step in rounds[0]:
        values = [r[step] for r in rounds]
        print(f"  {step:<13} {median(values):7.3f}   (min {min(values):.3f}, max {max(values):.3f})")


if __name__ == "__main__":
    main()
