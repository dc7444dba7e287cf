"""Load benchmark: N simulated annotators at once against the real server, through `MONAILabelClient`
(what 3D Slicer's MONAI Label extension uses).

Each annotator is a thread with a client of its own (`client_id` annotator name). Per round it asks
`next_sample(strategy, {"budget_minutes": B})`, thinks `--think-seconds`, and saves the stack's
ground-truth mask (`phantom_truth/<id>.nii.gz`) as its final label. It stops after `--rounds` rounds
or when it is served nothing (pool exhausted). `random` and `cold_start` need no model, so nothing
is trained. One annotator alone (`--baseline-rounds`) runs first on a fresh copy of the pool and a
server of its own as the baseline; then the N annotators on another fresh copy and server. Each phase
begins once the committee-scoring task the server starts on its own at start-up has ended (the ones
MONAI Label queues after each next-sample still run during the phase, as they would in use).

Figures, per phase (alone, load):
- per endpoint (next_sample = POST /activelearning/<strategy>, save_label = PUT /datastore/label):
  n, p50, p95 and max latency in ms, counts of 4xx and 5xx answers (the messages of failures are listed);
- double assignments: stacks served to two different clients while the first had not saved them yet
  (check-outs are meant to prevent it); stacks saved by two clients; saved stacks served again;
- lost saves: acknowledged (200) saves whose label is missing from <pool>/labels/final after the server
  stopped, or whose voxels differ from the mask sent;
- time records (`StateDB.label_times()`): each serve followed by an acknowledged save of the same client
  must leave exactly one record; duplicated, missing, and records without an acknowledged save;
and the ratio of p95 latency under load to alone, per endpoint. No timing is asserted.

Usage:
    python benchmarks/annotators.py [--annotators 8] [--rounds 50] [--stacks 220] [--size 64]
        [--strategy random|cold_start] [--budget-minutes 60] [--think-seconds 0.05] [--baseline-rounds 10]
        [--pool DIR] [--out out/annotators]

`--pool DIR` reuses the stacks in DIR, or generates them there when DIR has none (without it a pool is
generated in <out>/served/source-pool). The pool itself is never served: each phase serves a copy,
<out>/served/<phase>/pool, kept until the next run for inspection.
Writes <out>/annotators.json and annotators.md (the figures), requests.json (every request) and each
server's log (<out>/server-<phase>.log).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException, MONAILabelUtils
from tqdm import tqdm

from ichal.io import read_nifti
from ichal.phantom import write_pool
from ichal.phantom.writers import FINAL_LABELS_DIR, TRUTH_DIR
from ichal.state import StateDB

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from server_fixtures import running_server  # noqa: E402

NEXT_SAMPLE = "next_sample"
SAVE_LABEL = "save_label"
ENDPOINTS = (NEXT_SAMPLE, SAVE_LABEL)
# As in the integration tests: a small committee and coarse model grid (no model is trained here).
SERVER_CONF = {"ensemble_size": "2", "model_spacing_mm": "3.6"}
POOL_SEED = 16
MESSAGE_CHARS = 400
SETTLE_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Request:
    """One client call: which annotator, which endpoint, which stack, when (perf_counter s), and the answer.

    `status` is the HTTP status, 0 when no HTTP answer came (connection error); `image` is the stack
    served (next_sample; None when nothing was served) or saved (save_label)."""

    client: str
    endpoint: str
    image: str | None
    started: float
    ended: float
    status: int
    message: str

    @property
    def latency_ms(self) -> float:
        return (self.ended - self.started) * 1000.0

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass(frozen=True)
class Phase:
    """What one phase did: its annotators' requests, wall time, the wait for the server's start-up scoring
    task before the annotators began, and where its served pool copy lies."""

    name: str
    annotators: int
    rounds: int
    requests: list[Request]
    elapsed_s: float
    settle_s: float
    pool: Path


def http_status(error: MONAILabelClientException) -> int:
    """The HTTP status of a failed client call (its `status_code`, else the "Status: NNN" in its text)."""
    if isinstance(error.status_code, int):
        return error.status_code
    return int(str(error.msg).split("Status: ")[1].split(";")[0])


def timed_call(client: str, endpoint: str, image: str | None, call: Callable[[], Any]) -> tuple[Request, Any]:
    """Run `call`, timing it; the request record and the call's result (None when it failed)."""
    started = time.perf_counter()
    try:
        result, status, message = call(), 200, ""
    except MONAILabelClientException as error:
        result, status, message = None, http_status(error), str(error.msg)
    except (OSError, http.client.HTTPException) as error:
        result, status, message = None, 0, f"{type(error).__name__}: {error}"
    return Request(client, endpoint, image, started, time.perf_counter(), status, message[:MESSAGE_CHARS]), result


def run_annotator(url: str, name: str, tmpdir: Path, truth_dir: Path, args: argparse.Namespace, rounds: int,
                  progress: Callable[[], None]) -> list[Request]:
    """One annotator's loop: next sample, think, save the truth mask as final; until `rounds` or served nothing."""
    tmpdir.mkdir(parents=True, exist_ok=True)
    # A temp folder of its own keeps the server's clean-up (same machine) off the client's files.
    client = MONAILabelClient(url, client_id=name, tmpdir=str(tmpdir))
    requests: list[Request] = []
    for _ in range(rounds):
        request, answer = timed_call(name, NEXT_SAMPLE, None,
                                     lambda: client.next_sample(args.strategy, {"budget_minutes": args.budget_minutes}))
        served = answer.get("id") if answer else None
        requests.append(replace(request, image=served))
        if request.ok and served is None:
            break
        if served is not None:
            time.sleep(args.think_seconds)
            label = str(truth_dir / f"{served}.nii.gz")
            requests.append(timed_call(name, SAVE_LABEL, served, lambda: client.save_label(served, label, tag="final"))[0])
        progress()
    return requests


def wait_for_idle_scoring(url: str, timeout_s: float = SETTLE_TIMEOUT_S) -> float:
    """Seconds waited until no scoring task runs (the server starts one on its own; annotators arrive after)."""
    started = time.perf_counter()
    while MONAILabelUtils.http_method("GET", url, "/scoring/?check_if_running=true")[0] == 200:
        if time.perf_counter() - started > timeout_s:
            raise TimeoutError(f"a scoring task still runs after {timeout_s:.0f} s")
        time.sleep(0.5)
    return time.perf_counter() - started


def run_phase(name: str, source_pool: Path, annotators: int, rounds: int, args: argparse.Namespace, work: Path) -> Phase:
    """Serve a fresh copy of `source_pool` and run `annotators` concurrent annotators against it."""
    pool = work / name / "pool"
    shutil.copytree(source_pool, pool, ignore=shutil.ignore_patterns(TRUTH_DIR))
    server_tmp = work / name / "server-tmp"
    server_tmp.mkdir()
    conf = {**SERVER_CONF, "budget_minutes": str(args.budget_minutes)}
    truth_dir = source_pool / TRUTH_DIR
    log = args.out / f"server-{name}.log"
    log.unlink(missing_ok=True)  # the fixture appends
    with running_server(pool, conf, log, env={"TMPDIR": str(server_tmp)}) as url:
        settle_s = wait_for_idle_scoring(url)
        with tqdm(total=annotators * rounds, desc=f"{name} ({annotators} annotators)", unit="round") as bar:
            lock = threading.Lock()

            def progress() -> None:
                with lock:
                    bar.update(1)

            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=annotators) as executor:
                futures = [executor.submit(run_annotator, url, f"{name}-{i}", work / name / f"client-{i}", truth_dir,
                                           args, rounds, progress) for i in range(annotators)]
                requests = [request for future in futures for request in future.result()]
            elapsed = time.perf_counter() - started
    return Phase(name, annotators, rounds, requests, elapsed, settle_s, pool)


def endpoint_figures(requests: list[Request]) -> dict[str, dict[str, Any]]:
    """Per endpoint: n, p50/p95/max latency in ms (every request, failed ones included), 4xx and 5xx counts."""
    figures = {}
    for endpoint in ENDPOINTS:
        mine = [r for r in requests if r.endpoint == endpoint]
        latencies = np.array([r.latency_ms for r in mine])
        figures[endpoint] = {
            "n": len(mine),
            "p50_ms": float(np.percentile(latencies, 50)) if len(mine) else None,
            "p95_ms": float(np.percentile(latencies, 95)) if len(mine) else None,
            "max_ms": float(latencies.max()) if len(mine) else None,
            "4xx": sum(1 for r in mine if 400 <= r.status < 500),
            "5xx": sum(1 for r in mine if r.status >= 500),
            "no_answer": sum(1 for r in mine if r.status == 0),
        }
    return figures


def served(requests: list[Request]) -> list[Request]:
    return [r for r in requests if r.endpoint == NEXT_SAMPLE and r.ok and r.image is not None]


def acknowledged_saves(requests: list[Request]) -> list[Request]:
    return [r for r in requests if r.endpoint == SAVE_LABEL and r.ok]


def assignment_figures(requests: list[Request]) -> dict[str, list[str]]:
    """Stacks served to two clients while the first had not saved them, stacks saved by two clients, and
    stacks served again after an acknowledged save."""
    serves: dict[str, list[Request]] = defaultdict(list)
    for request in sorted(served(requests), key=lambda r: r.ended):
        serves[request.image].append(request)
    saves: dict[str, list[Request]] = defaultdict(list)
    for request in acknowledged_saves(requests):
        saves[request.image].append(request)

    def saved_before(image: str, client: str, after: float, moment: float) -> bool:
        """Whether `client` had an acknowledged save of `image` (begun after `after`) by `moment`."""
        return any(s.client == client and s.started > after and s.ended <= moment for s in saves[image])

    double = {image for image, image_serves in serves.items()
              for i, first in enumerate(image_serves) for later in image_serves[i + 1:]
              if later.client != first.client and not saved_before(image, first.client, first.ended, later.started)}
    saved_by_two = {image for image, image_saves in saves.items() if len({s.client for s in image_saves}) > 1}
    served_again = {image for image, image_serves in serves.items()
                    if any(s.ended <= later.started for s in saves[image] for later in image_serves)}
    return {"double_assignments": sorted(double), "saved_by_two_clients": sorted(saved_by_two),
            "served_again_after_save": sorted(served_again)}


def lost_saves(requests: list[Request], pool: Path, truth_dir: Path) -> list[str]:
    """Stacks with an acknowledged save whose stored final label is missing or differs from the mask sent."""
    lost = []
    for image in sorted({r.image for r in acknowledged_saves(requests)}):
        stored = pool / FINAL_LABELS_DIR / f"{image}.nii.gz"
        sent = read_nifti(truth_dir / f"{image}.nii.gz").array
        if not stored.is_file() or not np.array_equal(read_nifti(stored).array, sent):
            lost.append(image)
    return lost


def expected_time_records(requests: list[Request]) -> Counter[tuple[str, str]]:
    """(image, client) -> number of serves to that client followed by an acknowledged save of it before the
    client was served that stack again: each such session must leave exactly one time record."""
    sessions: set[tuple[str, str, float]] = set()
    serves = sorted(served(requests), key=lambda r: r.ended)
    for save in acknowledged_saves(requests):
        before = [s for s in serves if s.image == save.image and s.client == save.client and s.ended <= save.started]
        if before:
            sessions.add((save.image, save.client, before[-1].ended))
    return Counter((image, client) for image, client, _ in sessions)


def time_record_figures(requests: list[Request], pool: Path) -> dict[str, int]:
    """Duplicated and missing time records against the expected sessions, and records with no acknowledged
    save behind them; only records of this phase's clients count."""
    clients = {r.client for r in requests}
    records = Counter((r["image"], r["client"]) for r in StateDB.open(pool / ".ichal").label_times() if r["client"] in clients)
    expected = expected_time_records(requests)
    return {
        "expected": sum(expected.values()),
        "recorded": sum(records.values()),
        "duplicated": sum(max(0, records[key] - count) for key, count in expected.items()),
        "missing": sum(max(0, count - records[key]) for key, count in expected.items()),
        "without_acknowledged_save": sum(count for key, count in records.items() if key not in expected),
    }


def error_messages(requests: list[Request]) -> list[dict[str, Any]]:
    """Distinct messages of failed requests (4xx, 5xx, no answer) per endpoint, with how often each came."""
    counts = Counter((r.endpoint, r.status, r.message) for r in requests if not r.ok)
    return [{"endpoint": e, "status": s, "count": n, "message": m} for (e, s, m), n in counts.most_common()]


def phase_figures(phase: Phase, truth_dir: Path) -> dict[str, Any]:
    saves = acknowledged_saves(phase.requests)
    stopped_empty = {r.client for r in phase.requests if r.endpoint == NEXT_SAMPLE and r.ok and r.image is None}
    return {
        "annotators": phase.annotators,
        "rounds_asked": phase.rounds,
        "elapsed_s": phase.elapsed_s,
        "settle_s": phase.settle_s,
        "acknowledged_saves": len(saves),
        "saves_per_minute": len(saves) / phase.elapsed_s * 60.0,
        "annotators_served_nothing": len(stopped_empty),
        "endpoints": endpoint_figures(phase.requests),
        **assignment_figures(phase.requests),
        "lost_saves": lost_saves(phase.requests, phase.pool, truth_dir),
        "time_records": time_record_figures(phase.requests, phase.pool),
        "errors": error_messages(phase.requests),
    }


def p95_ratios(alone: dict[str, Any], load: dict[str, Any]) -> dict[str, float | None]:
    ratios = {}
    for endpoint in ENDPOINTS:
        base, loaded = alone["endpoints"][endpoint]["p95_ms"], load["endpoints"][endpoint]["p95_ms"]
        ratios[endpoint] = loaded / base if base and loaded is not None else None
    return ratios


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def markdown_report(report: dict[str, Any]) -> str:
    """The figures as markdown: a header, latency per endpoint and phase, the p95 ratio, the checks, the failures."""
    settings, phases = report["settings"], report["phases"]
    lines = [
        f"machine: {report['machine']['cpu_count']} CPUs (os.cpu_count()); pool: {settings['stacks']} stacks of "
        f"{'x'.join(map(str, settings['shape']))} voxels; strategy {settings['strategy']}, budget {settings['budget_minutes']:g} min, "
        f"think {settings['think_seconds']:g} s",
        "",
    ]
    for name, figures in phases.items():
        lines.append(f"- {name}: {figures['annotators']} annotator(s) x {figures['rounds_asked']} rounds asked: "
                     f"{figures['acknowledged_saves']} acknowledged saves in {figures['elapsed_s']:.1f} s "
                     f"({figures['saves_per_minute']:.0f}/min), begun {figures['settle_s']:.0f} s after start-up once the "
                     f"server's own scoring task ended; {figures['annotators_served_nothing']} stopped when served nothing")
    lines += ["", "| endpoint | phase | n | p50 ms | p95 ms | max ms | 4xx | 5xx | no answer |", "|---|---|---|---|---|---|---|---|---|"]
    for endpoint in ENDPOINTS:
        for name, figures in phases.items():
            e = figures["endpoints"][endpoint]
            lines.append(f"| {endpoint} | {name} | {e['n']} | {ms(e['p50_ms'])} | {ms(e['p95_ms'])} | {ms(e['max_ms'])} | "
                         f"{e['4xx']} | {e['5xx']} | {e['no_answer']} |")
    ratio_text = ", ".join(f"{endpoint} {'-' if r is None else f'{r:.1f}x'}" for endpoint, r in report["p95_ratio"].items())
    lines += ["", f"p95 under load / alone: {ratio_text}", ""]
    checks = [
        ("double assignments (stacks)", lambda f: len(f["double_assignments"])),
        ("stacks saved by two clients", lambda f: len(f["saved_by_two_clients"])),
        ("saved stacks served again", lambda f: len(f["served_again_after_save"])),
        ("lost saves (stacks)", lambda f: len(f["lost_saves"])),
        ("time records expected / recorded", lambda f: f"{f['time_records']['expected']} / {f['time_records']['recorded']}"),
        ("time records duplicated", lambda f: f["time_records"]["duplicated"]),
        ("time records missing", lambda f: f["time_records"]["missing"]),
        ("time records without an acknowledged save", lambda f: f["time_records"]["without_acknowledged_save"]),
    ]
    lines += ["| check | " + " | ".join(phases) + " |", "|---|" + "---|" * len(phases)]
    lines += [f"| {label} | " + " | ".join(str(value(f)) for f in phases.values()) + " |" for label, value in checks]
    for name, figures in phases.items():
        for error in figures["errors"]:
            lines.append(f"\n{name} {error['endpoint']} status {error['status']} x{error['count']}: {error['message']}")
    return "\n".join(lines) + "\n"


def prepared_pool(args: argparse.Namespace, work: Path) -> Path:
    """The pool to copy for each phase: --pool if it has stacks, else one generated there (or in `work`)."""
    pool = args.pool or work / "source-pool"
    if pool.is_dir() and any(pool.glob("*.nii.gz")):
        print(f"reusing the pool in {pool}")
        return pool
    print(f"generating {args.stacks} stacks of {args.size}x{args.size} voxels in-plane into {pool}")
    write_pool(pool, count=args.stacks, size=args.size, seed=POOL_SEED, labeled_count=0, progress=True)
    return pool


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotators", type=int, default=8, help="concurrent annotators under load")
    parser.add_argument("--rounds", type=int, default=50, help="next-sample + save rounds per annotator (at most)")
    parser.add_argument("--baseline-rounds", type=int, default=10, help="rounds of the one annotator alone")
    parser.add_argument("--stacks", type=int, default=220, help="stacks in a generated pool")
    parser.add_argument("--size", type=int, default=64, help="in-plane size of a generated stack in voxels")
    parser.add_argument("--strategy", choices=("random", "cold_start"), default="random")
    parser.add_argument("--budget-minutes", type=float, default=60.0)
    parser.add_argument("--think-seconds", type=float, default=0.05, help="pause between being served and saving")
    parser.add_argument("--pool", type=Path, help="reuse the stacks here, or generate them here")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "annotators")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    work = args.out / "served"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    source = prepared_pool(args, work)
    truth_dir = source / TRUTH_DIR
    alone = run_phase("alone", source, 1, args.baseline_rounds, args, work)
    load = run_phase("load", source, args.annotators, args.rounds, args, work)
    phases = {"alone": phase_figures(alone, truth_dir), "load": phase_figures(load, truth_dir)}
    images = sorted(source.glob("*.nii.gz"))
    shape = read_nifti(images[0]).array.shape
    (args.out / "requests.json").write_text(json.dumps(
        {phase.name: [{**asdict(r), "latency_ms": r.latency_ms} for r in phase.requests] for phase in (alone, load)}, indent=0) + "\n")
    report = {
        "machine": {"cpu_count": os.cpu_count()},
        "settings": {"stacks": len(images), "shape": list(shape), "strategy": args.strategy, "budget_minutes": args.budget_minutes,
                     "think_seconds": args.think_seconds, "pool": str(source)},
        "phases": phases,
        "p95_ratio": p95_ratios(phases["alone"], phases["load"]),
    }
    (args.out / "annotators.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown_report(report)
    (args.out / "annotators.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
