"""The app started as the README starts it (`streamlit run Home.py` with the project's config), on a free port, and the
Chromium flags that work here.

Shared by the browser tests (tests/conftest.py) and the load test (bench/load_test.py), which also needs the server's
process to read its memory.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 60  # torch, transformers and diffusers are imported at start: about 10 s on a busy 2-core machine
# Debian's Chromium as root on these machines; without the background-networking flags it floods the closed network.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@dataclass(frozen=True)
class AppServer:
    url: str
    process: subprocess.Popen
    log_path: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def app_server(log_path: Path, script: str = "Home.py", **environ: str) -> Iterator[AppServer]:
    """Start the app (or another `script` of the project) with `environ` added to this process's environment; stop it
    when the block ends.

    Output goes to `log_path`. Raises RuntimeError when the health endpoint does not answer within START_TIMEOUT_S.
    """
    port = free_port()
    env = {**os.environ, **environ}
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", script, "--server.port", str(port), "--server.address", "127.0.0.1"],
            cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    raise RuntimeError(f"streamlit did not start; see {log_path}") from None
                time.sleep(0.2)  # polling a health endpoint, not synchronising on a guess
        try:
            yield AppServer(url, process, log_path)
        finally:
            process.terminate()
            process.wait(timeout=20)


@contextmanager
def running_app(log_path: Path, script: str = "Home.py", **environ: str) -> Iterator[str]:
    """The app's URL, for callers that need only that (the browser tests)."""
    with app_server(log_path, script, **environ) as server:
        yield server.url
