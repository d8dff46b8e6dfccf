"""Shared fixtures: a tiny locally built model, an isolated artifact store, the local Hub server."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _session_dir(name: str) -> str:
    """A folder for this test process under one scratch root, which is removed when the process exits."""
    if not _SCRATCH:
        _SCRATCH.append(tempfile.mkdtemp(prefix="loraforge-tests-"))
        atexit.register(_remove_scratch, _SCRATCH[0], os.getpid())
    path = os.path.join(_SCRATCH[0], name)
    os.makedirs(path, exist_ok=True)
    return path


def _remove_scratch(path: str, owner: int) -> None:
    if os.getpid() == owner:  # not in a forked child that exits through Python
        shutil.rmtree(path, ignore_errors=True)


_SCRATCH: list[str] = []
# Prefect's temporary server keeps its database under PREFECT_HOME: one fresh home per test session (pytest-xdist's
# workers inherit the controller's).
if "PREFECT_HOME" not in os.environ:
    os.environ["PREFECT_HOME"] = _session_dir("prefect")
    from hub import seed_prefect_home

    seed_prefect_home(Path(os.environ["PREFECT_HOME"]))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
# Downloads from the test Hub server go to a per-session cache, never the user's ~/.cache/huggingface.
if "HF_HUB_CACHE" not in os.environ:
    os.environ["HF_HUB_CACHE"] = _session_dir("hf-cache")
# The token `hf auth login` saved is a Hub token too (tasks/hubclient.py): tests never see the user's own.
os.environ["HF_TOKEN_PATH"] = os.path.join(_session_dir("hf-login"), "token")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# `make test` runs two pytest-xdist workers side by side: each one's torch and OpenMP (and the processes it starts)
# get one thread, since two processes with two threads each on two cores slow each other down up to 8x.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


UNIT_TIMEOUT_S, CONTAINERS_TIMEOUT_S = 300, 1800  # per test (pytest-timeout); integration: pyproject.toml's 900 s


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`make test`'s two pytest-xdist workers get whole work units: every test that reads the session's first
    pipeline run (one run, not one per worker), every test that drives podman (images, containers, the stack:
        one build at a time), the tests of a module with module-scoped fixtures together (its servers and runs set
    up once), and every other test on its own.

    pytest-xdist's own `--dist loadgroup` cannot do it with this pytest: it appends the group to `item._nodeid`,
    which pytest 9 no longer reads (measured: the groups were split, the first run made twice), so the unit is
    derived here from the test's path and its module's source."""
    if config.getvalue("dist") != "loadgroup":  # the Makefile's; another --dist keeps pytest-xdist's own
        return None
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _work_unit(nodeid)

    return WorkUnits(config, log)


@functools.cache
def _work_unit(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    if path.startswith("tests/containers/") or path == "tests/integration/test_stack.py":
        return "podman"
    source = (ROOT / path).read_text()
    if "first_run" in source:
        return "first_run"
    return path if 'scope="module"' in source else nodeid  # the rest one by one: the long ones start early


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each test gets its tier's time limit unless it sets its own; tests marked gpu run only when CUDA is present."""
    for item in items:
        if item.get_closest_marker("timeout") is not None or "integration" in item.keywords:
            continue
        limit = CONTAINERS_TIMEOUT_S if "containers" in item.keywords else UNIT_TIMEOUT_S
        item.add_marker(pytest.mark.timeout(limit))

    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with SmolLM2's tokenizer and chat template, built locally (seconds)."""
    from tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    from loraforge.tasks.artifacts import ArtifactStore

    return ArtifactStore(tmp_path / "store")
