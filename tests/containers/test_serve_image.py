"""The `loraforge-serve` image (containers/serve.Containerfile, built by `containers/build.sh serve`): it serves a
base model over the OpenAI-compatible API with either backend, answers on /health and a chat completion, and
`podman stop` (SIGTERM) ends it with exit code 0 and no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from images import built_tag

ROOT = Path(__file__).resolve().parents[2]
PODMAN = [str(ROOT / "containers" / "podman.sh")]
pytestmark = pytest.mark.containers


def test_serve_image_answers_and_stops_cleanly(tmp_path: Path) -> None:
    from hub import free_port
    from tiny import build_tiny_model

    build = subprocess.run(["bash", str(ROOT / "containers" / "build.sh"), "serve"], cwd=ROOT, capture_output=True,
                           text=True)  # fmt: skip
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    tag, _ = built_tag(build.stdout)
    model = build_tiny_model(tmp_path / "tiny-llama")
    for options in ([], ["--gguf", "f16"]):
        port = free_port()
        name = f"loraforge-serve-test-{port}"
        # A host folder is read as the host user (--user), as containers/README.md says for mounted folders.
        cmd = [*PODMAN, "run", "-d", "--name", name, "--network", "host", "--user", f"{os.getuid()}:{os.getgid()}",
               "-v", f"{model}:/models/tiny:ro", "-e", "OMP_NUM_THREADS=1", f"localhost/loraforge-serve:{tag}",
               "--base", "/models/tiny", "--port", str(port), *options]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 300
            while True:
                try:
                    health = json.loads(urllib.request.urlopen(f"{url}/health", timeout=2).read())
                    break
                except OSError:
                    logs = subprocess.run([*PODMAN, "logs", name], capture_output=True, text=True)
                    assert time.monotonic() < deadline, f"the server did not start: {logs.stdout}{logs.stderr}"
                    time.sleep(1)
            assert health["status"] == "ok" and health["adapters"] == [] and health["base"] == "/models/tiny"
            body = {"model": "base", "messages": [{"role": "user", "content": "Where is my parcel?"}], "max_tokens": 4}
            request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})  # fmt: skip
            reply = json.loads(urllib.request.urlopen(request, timeout=120).read())
            assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] <= 4, reply
            subprocess.run([*PODMAN, "stop", "-t", "30", name], check=True, capture_output=True)
            code = subprocess.run([*PODMAN, "inspect", "--format", "{{.State.ExitCode}}", name], capture_output=True,
                                  text=True, check=True)  # fmt: skip
            logs = subprocess.run([*PODMAN, "logs", name], capture_output=True, text=True)
            assert code.stdout.strip() == "0", logs.stdout + logs.stderr
            assert "Traceback" not in logs.stdout + logs.stderr
        finally:
            subprocess.run([*PODMAN, "rm", "-f", name], capture_output=True)
