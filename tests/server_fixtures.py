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

import requests

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "apps" / "hemorrhage"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(studies: str | Path, conf: dict[str, str], log_path: Path, timeout_s: float = 180.0) -> Iterator[str]:
    """Yield the base URL of a server for `studies`; stop it afterwards. Its log goes to `log_path`."""
    port = free_port()
    command = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR),
               "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port)]
    for key, value in conf.items():
        command += ["--conf", key, str(value)]
    env = {**os.environ, "MONAI_LABEL_TRACKING_ENABLED": "false", "OMP_NUM_THREADS": "1"}
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.time() + timeout_s
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"server exited with {process.returncode}; log:\n{log_path.read_text()[-3000:]}")
                try:
                    if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                if time.time() > deadline:
                    raise RuntimeError(f"server did not answer /info/ within {timeout_s} s; log:\n{log_path.read_text()[-3000:]}")
                time.sleep(1.0)
            yield url
        finally:
            os.killpg(process.pid, 15)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()
