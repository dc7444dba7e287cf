"""Latency of each endpoint of the hemorrhage app on a pool (default: a copy of sample_data/), CPU,
and how committee scoring time grows with pool size. Starts the real server; prints a table.

    python benchmarks/app_latency.py [--pool sample_data] [--scoring-sizes 6 12 18] [--iterations 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests
from monailabel.client import MONAILabelClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from server_fixtures import running_server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def timed(fn, repeats: int = 3) -> tuple[float, object]:
    """Median wall seconds of `repeats` calls, and the last result."""
    seconds, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def wait_until(predicate, timeout_s: float) -> float:
    start = time.perf_counter()
    while not predicate():
        if time.perf_counter() - start > timeout_s:
            raise TimeoutError("timed out")
        time.sleep(0.5)
    return time.perf_counter() - start


def copy_pool(source: Path, count: int | None, into: Path) -> Path:
    """A datastore with the first `count` images of `source` (all if None) and their final labels."""
    images = sorted(source.glob("*.nii.gz"))[:count]
    (into / "labels" / "final").mkdir(parents=True)
    for image in images:
        shutil.copy(image, into / image.name)
        label = source / "labels" / "final" / image.name
        if label.exists():
            shutil.copy(label, into / "labels" / "final" / image.name)
    return into


def scored_count(url: str, version: str) -> int:
    objects = MONAILabelClient(url).datastore()["objects"]
    return sum(1 for o in objects.values() if o["image"]["info"].get("ichal", {}).get("model_version") == version)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=Path, default=REPO / "sample_data")
    parser.add_argument("--scoring-sizes", type=int, nargs="+", default=[6, 12, 18])
    parser.add_argument("--iterations", type=int, default=20, help="training steps per member (latency only)")
    args = parser.parse_args()
    # Scoring is timed on request, not started by the server on its own after start-up and training.
    os.environ["MONAI_LABEL_AUTO_UPDATE_SCORING"] = "false"
    conf = {"ensemble_size": "4", "train_iterations": str(args.iterations), "train_batch_size": "8"}
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pool = copy_pool(args.pool, None, tmp / "pool")
        with running_server(pool, conf, tmp / "server.log") as url:
            client = MONAILabelClient(url, client_id="bench", tmpdir=str(tmp))
            rows.append(("GET /info/", timed(client.info)[0]))
            rows.append(("POST /activelearning/cold_start", timed(lambda: client.next_sample("cold_start", {}))[0]))
            start = time.perf_counter()
            client.train_start("hemorrhage", {})
            wait_until(lambda: client.info()["ichal"]["model"] is not None, 3600)
            rows.append((f"POST /train/hemorrhage ({args.iterations} steps x 4 members, until the model serves)", time.perf_counter() - start))
            version = client.info()["ichal"]["model"]["version"]
            unlabeled = len(client.datastore()["objects"]) - client.info()["datastore"]["completed"]
            start = time.perf_counter()
            requests.post(f"{url}/scoring/committee", timeout=30)
            wait_until(lambda: scored_count(url, version) >= unlabeled, 3600)
            rows.append((f"POST /scoring/committee ({unlabeled} stacks, until stored)", time.perf_counter() - start))
            for strategy in ("cost_sensitive", "uncertainty", "random", "acft"):
                rows.append((f"POST /activelearning/{strategy}", timed(lambda: client.next_sample(strategy, {"budget_minutes": 60}))[0]))
            image_id = client.next_sample("cost_sensitive", {"budget_minutes": 60})["id"]
            seconds, (label_file, _) = timed(lambda: client.infer("hemorrhage", image_id, {}))
            rows.append(("POST /infer/hemorrhage", seconds))
            rows.append(("POST /infer/hemorrhage_uncertainty", timed(lambda: client.infer("hemorrhage_uncertainty", image_id, {}))[0]))
            rows.append(("PUT /datastore/label (final)", timed(lambda: client.save_label(image_id, label_file, tag="final"), 1)[0]))
        print("\n| endpoint | seconds (median of 3; one-off jobs once) |\n|---|---|")
        for name, seconds in rows:
            print(f"| {name} | {seconds:.3f} |")

        print("\n| unlabeled stacks scored | seconds | seconds per stack |\n|---|---|---|")
        for size in args.scoring_sizes:
            pool = copy_pool(args.pool, size, tmp / f"pool{size}")
            model = tmp / "pool" / ".ichal" / "models" / "ensemble.pt"
            (pool / ".ichal" / "models").mkdir(parents=True)
            shutil.copy(model, pool / ".ichal" / "models" / "ensemble.pt")
            with running_server(pool, conf, tmp / f"server{size}.log") as url:
                client = MONAILabelClient(url)
                version = client.info()["ichal"]["model"]["version"]
                unlabeled = size - client.info()["datastore"]["completed"]
                start = time.perf_counter()
                requests.post(f"{url}/scoring/committee", timeout=30)
                wait_until(lambda: scored_count(url, version) >= unlabeled, 3600)
                elapsed = time.perf_counter() - start
            print(f"| {unlabeled} | {elapsed:.1f} | {elapsed / max(unlabeled, 1):.2f} |")


if __name__ == "__main__":
    main()
