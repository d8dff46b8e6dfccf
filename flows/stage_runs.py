"""How a stage's Prefect run ends: `Cached` when the store already had its artifact, `TimedOut` when it ran past
`orchestration.stage_timeout_s`.

Used by the pipeline's in-process stage tasks (flows/pipeline.py) and the per-stage flows of the deployments
(flows/stages.py). Caching stays the artifact store's: the `Cached` state only shows in the Prefect UI what the
store decided, so a re-run that recomputed nothing reads as such.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from prefect.client.schemas.objects import State
from prefect.states import Completed

from loraforge.tasks.artifacts import Artifact

if TYPE_CHECKING:
    from loraforge.tasks.config import PipelineConfig

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


class StageTimeout(TimeoutError):
    """A stage ran past `orchestration.stage_timeout_s`. A TimeoutError: Prefect ends the flow run `TimedOut`."""


def cached_state(artifact: Artifact, value: T) -> T | State[T]:
    """What a stage's task or flow returns to Prefect for `artifact`.

    Args:
        artifact: the stage's artifact, as the stage function returned it.
        value: what the run's caller is to get (the artifact itself, or a stage flow's result).

    Returns:
        A Completed state named `Cached` holding `value` when the artifact was a cache hit (Prefect takes a
        returned state as the run's final state), else `value` itself (Prefect makes that `Completed`). A flow's
        caller gets the value either way; a task's caller gets the state: `unwrap` it.
    """
    if not artifact.cached:
        return value
    return Completed(name="Cached", data=value, message=f"{artifact.stage} {artifact.key} was already in the store")


def unwrap(value: T | State[T]) -> T:
    """The value a stage task returned, out of the `Cached` state it may be wrapped in (`cached_state`)."""
    return value.result() if isinstance(value, State) else value


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


def step_reporter(stage: str) -> Callable[[dict[str, Any], int], None]:
    """A stage's `on_step`: its progress as a Prefect progress artifact and its logged figures as log lines of the
    current task or flow run (the Prefect UI, while it runs). Outside a run it does nothing."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.logging import get_run_logger

    if TaskRunContext.get() is None and FlowRunContext.get() is None:
        return lambda figures, total: None
    logger = get_run_logger()
    artifact: dict[str, Any] = {}

    def report(figures: dict[str, Any], total: int) -> None:
        progress = 100 * figures["step"] / total
        if "id" not in artifact:
            artifact["id"] = create_progress_artifact(progress=progress, key=f"{stage}-progress",
                                                      description=f"{stage} stage: % of steps")  # fmt: skip
        else:
            update_progress_artifact(artifact_id=artifact["id"], progress=progress)
        if set(figures) - {"step", "loss"}:  # a logged step (every train.log_every): all its figures
            logger.info("%s step %s/%s %s", stage, figures["step"], total,
                        " ".join(f"{k}={v}" for k, v in figures.items() if k != "step"))  # fmt: skip

    return report
