"""Integration tests share one Prefect server for the whole session (`prefect server start`: the in-process
flows, the pipeline run against a server and the deployments all use it), one local Hub server and one first
pipeline run on the tiny model."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pipeline_fixtures import TOKEN, _config, _run


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The session's Prefect server (its own home and SQLite database); yields its API URL. No deployment is
    made on it (test_deployments.py has a server of its own whose scheduler loops every second; this one keeps
    Prefect's 60 s: a 1 s loop cost 0.7 s of CPU a minute, idle). Tests that read from it filter by flow run or
    start time: every integration test writes to it."""
    from hub import prefect_server

    with prefect_server(tmp_path_factory.mktemp("prefect-server")) as api:
        yield api


@pytest.fixture(scope="session", autouse=True)
def prefect_harness(prefect_api: str) -> Iterator[None]:
    """Every flow run in this process goes to the session's server (what prefect_test_harness does with a
    temporary server of its own: one server per session instead of one more)."""
    from prefect.context import _temporary_global_settings_context, get_settings_context
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Also as the process-global settings, for code in a context copied before this fixture (as the harness does).
    with temporary_settings({PREFECT_API_URL: prefect_api}), _temporary_global_settings_context(get_settings_context()):
        yield
        _drain_to_the_server()


def _drain_to_the_server() -> None:
    """Send the queued logs and events while the server is still up (else: "Error logging to API" at exit), as
    prefect_test_harness does before it stops its server."""
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        try:
            result = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        except RuntimeError:  # the worker never started
            pass
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    run_coro_as_sync(drain())


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from hub import hub_server

    with hub_server(tmp_path_factory.mktemp("hub") / "repos", TOKEN) as url:
        yield url


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="session")
def first_run(tiny_model: Path, workdir: Path, hub: str) -> dict:
    os.environ["HF_TOKEN"] = TOKEN
    return _run(_config(tiny_model, workdir, hub))
