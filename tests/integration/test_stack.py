"""The local stack (`make stack` = infra/stack/up.sh) brought up for real in a temporary folder on free ports:
Prefect healthy and keeping its state in PostgreSQL, the Hub server up, the deployments deployed, a stage flow
run through the stack's worker, then `make stack-down` (infra/stack/down.sh) stopping every part."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from loraforge.tasks.config import DEMO_CONFIG, load_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def stack() -> Iterator[dict[str, str]]:
    # Not under pytest's 0700 temp folders: as root, PostgreSQL runs as `postgres`, which must reach its folder.
    folder = Path(tempfile.mkdtemp(prefix="loraforge-stack-"))
    folder.chmod(0o755)
    ports = {"STACK_PG_PORT": free_port(), "STACK_PREFECT_PORT": free_port(), "STACK_HUB_PORT": free_port(),
             "STACK_S3_PORT": free_port()}  # fmt: skip
    env = {**os.environ, "STACK_DIR": str(folder / "stack"), "PYTHON": sys.executable,
           "LORAFORGE_NIGHTLY": "off",  # no real nightly pipeline on the stack's worker if the test runs at 02:00 UTC
           **{k: str(v) for k, v in ports.items()}}  # fmt: skip
    env.pop("PREFECT_API_URL", None)
    up = subprocess.run(["bash", "infra/stack/up.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        stack_env = dict(
            line.removeprefix("export ").split("=", 1) for line in (folder / "stack" / "env").read_text().splitlines()
        )
        yield {**env, **stack_env}
    finally:
        # A 5 s grace: the worker that ran the flow otherwise sits in its exit for the whole default 30 s.
        down = subprocess.run(["bash", "infra/stack/down.sh"], cwd=ROOT, env={**env, "STACK_STOP_GRACE_S": "5"},
                              capture_output=True, text=True)  # fmt: skip
        assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
        assert not any(listening(p) for p in ports.values()), "a stack service still listens after stack-down"
        shutil.rmtree(folder, ignore_errors=True)


def test_stack_runs_prefect_on_postgres_with_a_worker(stack: dict[str, str], tiny_model: Path) -> None:
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api = stack["PREFECT_API_URL"]
    assert urllib.request.urlopen(f"{api}/health", timeout=10).read() == b"true"
    whoami = urllib.request.Request(
        f"{stack['HF_ENDPOINT']}/api/whoami-v2", headers={"Authorization": f"Bearer {stack['HF_TOKEN']}"}
    )
    assert json.loads(urllib.request.urlopen(whoami, timeout=10).read())["auth"]["accessToken"]["role"] == "write"

    config = load_config(DEMO_CONFIG, [f"base_model={tiny_model}", f"store={stack['LORAFORGE_STORE']}"])
    with temporary_settings({PREFECT_API_URL: api}):
        run = run_deployment("loraforge-base/base", parameters={"config": config.model_dump(mode="json")},
                             timeout=600, poll_interval=1)  # fmt: skip
    assert run.state is not None and run.state.is_completed(), run.state
    # The worker left the run's result and its artifact in the stack's S3 server: read both from a fresh local copy.
    assert stack["LORAFORGE_STORE"] == "s3://loraforge/artifacts"
    s3 = {k: v for k, v in stack.items() if k.startswith(("AWS_", "LORAFORGE_STORE"))}
    reader = ("from tasks.artifacts import ArtifactStore; "
              f"store = ArtifactStore({stack['LORAFORGE_STORE']!r}); "
              f"key = store.read_record('stage-runs/{run.id}.json')['key']; "
              "print(store.get('base', key).manifest['stage'])")  # fmt: skip
    env = {**os.environ, **s3, "LORAFORGE_STORE_CACHE": str(Path(stack["STACK_DIR"]) / "test-reader")}
    read = subprocess.run([sys.executable, "-c", reader], cwd=ROOT, env=env, capture_output=True, text=True)
    assert read.returncode == 0 and read.stdout.strip() == "base", read.stdout + read.stderr
    assert any((Path(stack["STACK_DIR"]) / "s3" / "loraforge" / "artifacts" / "base").iterdir())

    # The server's state is in PostgreSQL: the run is a row of its flow_run table there.
    password = (Path(stack["STACK_DIR"]) / "pg-password").read_text().strip()
    query = f"select f.name, r.state_name from flow_run r join flow f on f.id = r.flow_id where r.id = '{run.id}'"
    cmd = [
        "psql",
        "-h",
        "127.0.0.1",
        "-p",
        stack["STACK_PG_PORT"],
        "-U",
        "prefect",
        "-d",
        "prefect",
        "-tA",
        "-c",
        query,
    ]
    psql = subprocess.run(cmd, env={**stack, "PGPASSWORD": password}, capture_output=True, text=True)
    assert psql.returncode == 0, psql.stderr
    assert psql.stdout.strip() == "loraforge-base|Completed"
