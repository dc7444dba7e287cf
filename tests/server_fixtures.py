"""Start the real MONAI Label server (`monailabel start_server`) on 127.0.0.1 and a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import requests

from ichal.phantom import write_pool

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "apps" / "hemorrhage"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(studies: str | Path, conf: dict[str, str], port: int, host: str = "127.0.0.1") -> list[str]:
    command = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR),
               "--studies", str(studies), "--host", host, "--port", str(port)]
    for key, value in conf.items():
        command += ["--conf", key, str(value)]
    return command


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "MONAI_LABEL_TRACKING_ENABLED": "false", "OMP_NUM_THREADS": "1", **(extra or {})}


def start_server(studies: str | Path, conf: dict[str, str], log_path: Path, timeout_s: float = 180.0,
                 env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """Start a server for `studies` in a process group of its own and wait until it answers /info/;
    return the process and its base URL. Its log goes to `log_path`; `env` adds environment variables.
    The caller stops it (`stop_group`)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(server_command(studies, conf, port), stdout=log, stderr=subprocess.STDOUT,
                                   env=server_env(env), start_new_session=True)
    try:
        deadline = time.time() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}; log:\n{log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                    return process, url
            except requests.ConnectionError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"server did not answer /info/ within {timeout_s} s; log:\n{log_path.read_text()[-3000:]}")
            time.sleep(1.0)
    except BaseException:
        stop_group(process)
        raise


@contextmanager
def running_server(studies: str | Path, conf: dict[str, str], log_path: Path, timeout_s: float = 180.0,
                   env: dict[str, str] | None = None) -> Iterator[str]:
    """Yield the base URL of a server for `studies` (see `start_server`); stop it afterwards."""
    process, url = start_server(studies, conf, log_path, timeout_s, env)
    try:
        yield url
    finally:
        stop_group(process)


def generated_pool_fixture(count: int, seed: int, labeled_count: int, size: int = 64):
    """A module-scoped fixture: a pool folder of `count` generated stacks, the first `labeled_count` labeled."""

    @pytest.fixture(scope="module")
    def pool(tmp_path_factory) -> Path:
        root = tmp_path_factory.mktemp("pool")
        write_pool(root, count=count, size=size, seed=seed, labeled_count=labeled_count, progress=False)
        return root

    return pool


def server_fixture(conf: dict[str, str]):
    """A module-scoped fixture: the base URL of a server with `conf` on the module's `pool` fixture."""

    @pytest.fixture(scope="module")
    def server(pool, tmp_path_factory):
        log = tmp_path_factory.mktemp("log") / "server.log"
        with running_server(pool, conf, log) as url:
            yield url

    return server


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL it after 20 s; a group already gone is fine."""
    try:
        os.killpg(process.pid, 15)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.5):
    """The first truthy value of `predicate()`, polled every `poll_s`; AssertionError naming `what` after `timeout_s`."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
