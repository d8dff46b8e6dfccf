"""How a stage's Prefect run ends: `TimedOut` when it ran past `orchestration.stage_timeout_s`.

Used by the per-stage flows of the deployments (flows/stages.py).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, ParamSpec, TypeVar

if TYPE_CHECKING:
    from tasks.config import PipelineConfig

P = ParamSpec("P")
R = TypeVar("R")


class StageTimeout(TimeoutError):
    """A stage ran past `orchestration.stage_timeout_s`. A TimeoutError: Prefect ends the flow run `TimedOut`."""


@contextlib.contextmanager
def stage_deadline(seconds: float | None) -> Iterator[None]:
    """Run the block for at most `seconds` (None: no limit), then raise StageTimeout inside it.

    In the main thread (a worker runs each flow run as a process of its own) the limit is a SIGALRM timer, which
    also interrupts a blocking call (a socket read, a sleep); in another thread the exception is raised at the
    thread's next Python instruction.

    Raises:
        StageTimeout: the block ran past the limit.
    """
    if seconds is None:
        yield
        return
    from prefect.utilities.timeout import timeout

    try:
        with timeout(seconds, timeout_exc_type=StageTimeout):
            yield
    except StageTimeout:
        raise StageTimeout(
            f"the stage ran past orchestration.stage_timeout_s={seconds:g} s and was stopped; raise the limit for "
            "a long stage (or set it to null for none)"
        ) from None


def within_stage_timeout(fn: Callable[P, R]) -> Callable[P, R]:
    """A stage flow's function, run under `stage_deadline` of its `config` argument's stage_timeout_s.

    A flow's timeout_seconds is fixed when it is decorated; the limit here comes from the config each run is given,
    and the flow run itself ends `TimedOut` (Failed) when it passes it, whoever waits for it (or nobody).
    """
    # Annotations evaluated in fn's module: Prefect validates parameters against the signature, resolving names in
    # the namespace of the function it is given (this module's, for the wrapper).
    signature = inspect.signature(fn, eval_str=True)

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        config: PipelineConfig = signature.bind(*args, **kwargs).arguments["config"]
        with stage_deadline(config.orchestration.stage_timeout_s):
            return fn(*args, **kwargs)

    run.__signature__ = signature  # type: ignore[attr-defined]
    return run
