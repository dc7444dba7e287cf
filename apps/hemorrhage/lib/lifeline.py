"""Training and scoring subprocesses belong to the server: they end when it ends.

MONAI Label starts them with a plain Popen and never reaps them when the server dies: after a kill -9
(or even a SIGTERM) of the server, a training run went on and later replaced a newer model (issue 16,
item 4). The server exports its pid; each subprocess of ours watches its parent and exits as soon as
it is no longer that server (it was re-parented). Polling `getppid` is used rather than
PR_SET_PDEATHSIG because that signal fires when the *thread* that forked exits, and MONAI Label
forks from a pool thread. A subprocess only reaches that watch after its imports (seconds, more on a
busy machine), so a server asked to stop (SIGTERM, Ctrl+C) also kills its subprocesses itself.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

SERVER_PID_ENV = "ICHAL_SERVER_PID"
SUBPROCESS_MODULE = "monailabel.interfaces.utils.app"


def mark_server_process() -> None:
    """Called once in the server process (from its main thread, while uvicorn serves): its subprocesses
    inherit the pid to watch, and a SIGTERM/SIGINT to the server kills them before uvicorn shuts down."""
    os.environ[SERVER_PID_ENV] = str(os.getpid())
    for signum in (signal.SIGTERM, signal.SIGINT):
        uvicorn_handler = signal.getsignal(signum)
        if callable(uvicorn_handler):
            signal.signal(signum, _killing_subprocesses_first(uvicorn_handler))


def _killing_subprocesses_first(handler):
    def handle(signum, frame) -> None:
        kill_task_subprocesses()
        handler(signum, frame)

    return handle


def kill_task_subprocesses() -> int:
    """Kill every task subprocess (with its own children) of this process; how many were killed."""
    killed = 0
    for child in psutil.Process().children(recursive=True):
        if is_app_subprocess(child.pid):
            for process in [*child.children(recursive=True), child]:
                try:
                    process.kill()
                except psutil.NoSuchProcess:
                    continue
            killed += 1
    if killed:
        logger.info(f"server stopping: killed {killed} task subprocess(es)")
    return killed


def is_task_subprocess() -> bool:
    """Whether this process is a training/scoring subprocess of a server (not the server, not outside one)."""
    raw = os.environ.get(SERVER_PID_ENV, "")
    return raw.isdigit() and int(raw) != os.getpid()


def die_with_server(poll_seconds: float = 1.0) -> bool:
    """In a subprocess of the server, start a daemon thread that kills this process once the server is
    gone. Returns False (and does nothing) in the server itself or outside a server."""
    if not is_task_subprocess():
        return False
    server_pid = int(os.environ[SERVER_PID_ENV])
    if os.getppid() != server_pid:
        # Started after the server already died (or by something else): nothing to serve.
        os.kill(os.getpid(), signal.SIGKILL)

    def watch() -> None:
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != server_pid:
                logger.warning("server process is gone: stopping this subprocess")
                # Its own children too: a Ray instance it started (engine ray) leaves agents behind otherwise.
                for child in psutil.Process().children(recursive=True):
                    try:
                        child.kill()
                    except psutil.NoSuchProcess:
                        continue
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="ichal-lifeline", daemon=True).start()
    return True


def is_app_subprocess(pid: int) -> bool:
    """Whether `pid` is a live MONAI Label task subprocess (train/scoring/batch infer) of some server."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return SUBPROCESS_MODULE.encode() in cmdline


def kill_stale_subprocess(pid: object) -> bool:
    """Kill `pid` if it is a leftover task subprocess (e.g. of a server killed with -9); True if killed."""
    if not isinstance(pid, int) or pid == os.getpid() or not is_app_subprocess(pid):
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    logger.warning(f"killed stale task subprocess {pid} left by a previous server")
    return True
