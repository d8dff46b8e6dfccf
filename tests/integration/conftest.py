"""Integration tests share one Prefect test harness (a temporary API server for the whole session), one local
Hub server and one first pipeline run on the tiny model."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pipeline_fixtures import TOKEN, _config, _run


@pytest.fixture(scope="session", autouse=True)
def prefect_harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


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
