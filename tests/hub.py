"""Start and stop the project's Hub-compatible server (infra/hub/server.py) on a free loopback port."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def hub_server(root: Path, token: str) -> Iterator[str]:
    """Run the server as a real subprocess; yields its URL; terminates it afterwards."""
    port = free_port()
    log = (root.parent / f"hub-{port}.log").open("w")
    cmd = [sys.executable, str(ROOT / "infra" / "hub" / "server.py"), "--root", str(root), "--host", "127.0.0.1",
           "--port", str(port), "--token", token]  # fmt: skip
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/whoami-v2", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # it answers (401 without a token): it is up
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"hub server did not start; see {log.name}") from None
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()
