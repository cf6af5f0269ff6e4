"""Start and stop MLflow's REST scoring server for a model URI (loopback by default)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _stop(server: subprocess.Popen) -> None:
    """Stop the server and its workers (they share its process group)."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, None)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def mlflow_server(model_uri: str, *, host: str = "127.0.0.1", port: int | None = None,
                  tracking_uri: str | None = None, workers: int = 1,
                  timeout: float = 120.0) -> Iterator[str]:
    """Run ``mlflow models serve -m MODEL_URI --env-manager local`` until the block ends.

    Yields the base URL once ``/ping`` answers; the server is stopped on exit, also on error.
    """
    import requests

    port = port or free_port(host)
    env = dict(os.environ)
    # MLflow starts uvicorn by name: put this interpreter's bin directory first on PATH, as an
    # activated virtual environment would.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if tracking_uri is not None:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    log = tempfile.TemporaryFile()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
         "--env-manager", "local", "-h", host, "-p", str(port), "-w", str(workers)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{base}/ping", timeout=2).status_code == 200:
                    break
            if server.poll() is not None:
                log.seek(0)
                raise RuntimeError("the MLflow server exited:\n"
                                   + log.read().decode(errors="replace")[-3000:])
            if time.monotonic() > deadline:
                raise TimeoutError(f"the MLflow server did not answer /ping in {timeout} s")
            time.sleep(0.5)
        yield base
    finally:
        _stop(server)
        log.close()
