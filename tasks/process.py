"""Process-wide settings a stage or the CLI changes, in one place, each restored when its block ends.

A stage that sets torch's thread count or quiets a library's logger would otherwise change the process for
whatever runs next in it (the next stage of an in-process pipeline, a test, a notebook); the CLI's environment
defaults and warning filters would outlive `main()` when it is called in-process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `threads` for the block (None: left as it is), then restored."""
    if not threads:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def logger_level(name: str, level: int) -> Iterator[None]:
    """The logger `name` at `level` for the block (a library's chatter hidden), then at its own level again."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


@contextlib.contextmanager
def cli_process(defaults: dict[str, str], hide: tuple[type[Warning], ...]) -> Iterator[None]:
    """The CLI's process settings for the block: environment `defaults` (where unset) and the warning categories
    in `hide` ignored; afterwards the environment and the warning filters are what they were."""
    added = [name for name in defaults if name not in os.environ]
    os.environ.update({name: defaults[name] for name in added})
    try:
        with warnings.catch_warnings():
            for category in hide:
                warnings.filterwarnings("ignore", category=category)
            yield
    finally:
        for name in added:
            os.environ.pop(name, None)
