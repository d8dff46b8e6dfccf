"""Process-wide settings (tasks/process.py) hold for their block only: a stage or `main()` run in-process leaves
the thread count, logger levels, environment and warning filters as it found them."""

from __future__ import annotations

import logging
import os
import warnings

import pytest

from loraforge.tasks.process import cli_process, logger_level, torch_threads


def test_torch_threads_are_restored_even_after_an_error() -> None:
    import torch

    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    with pytest.raises(RuntimeError), torch_threads(wanted):
        assert torch.get_num_threads() == wanted
        raise RuntimeError("the stage failed")
    assert torch.get_num_threads() == before
    with torch_threads(None):  # not set by the config: left alone
        assert torch.get_num_threads() == before


def test_a_logger_gets_its_own_level_back() -> None:
    logger = logging.getLogger("loraforge-test-chatter")
    logger.setLevel(logging.DEBUG)
    with logger_level("loraforge-test-chatter", logging.ERROR):
        assert logger.level == logging.ERROR
    assert logger.level == logging.DEBUG


def test_the_cli_settings_are_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAFORGE_TEST_UNSET", raising=False)
    monkeypatch.setenv("LORAFORGE_TEST_SET", "mine")
    filters = list(warnings.filters)
    with cli_process({"LORAFORGE_TEST_UNSET": "x", "LORAFORGE_TEST_SET": "theirs"}, hide=(FutureWarning,)):
        assert os.environ["LORAFORGE_TEST_UNSET"] == "x" and os.environ["LORAFORGE_TEST_SET"] == "mine"
        with warnings.catch_warnings(record=True) as seen:
            warnings.warn("renamed", FutureWarning, stacklevel=1)
        assert not seen or all(not issubclass(w.category, FutureWarning) for w in seen)
    assert "LORAFORGE_TEST_UNSET" not in os.environ and os.environ["LORAFORGE_TEST_SET"] == "mine"
    assert warnings.filters == filters


def test_main_in_process_leaves_the_process_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    from loraforge.flows.cli import PROCESS_DEFAULTS, main

    for name in PROCESS_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    filters = list(warnings.filters)
    assert main(["validate"]) == 0
    assert not any(name in os.environ for name in PROCESS_DEFAULTS) and warnings.filters == filters
