"""Several training processes for one adapter: launching them through torchrun and what each rank needs.

The train stage with `train.processes > 1` (or `train.nnodes > 1`) does not train in the calling process: it
writes what the ranks need into a run folder and starts torchrun (`torch.distributed.run`, run by `python -m
tasks.distributed --launch RUN_FOLDER ...` so that a failure is recorded, not printed as a traceback), which
starts `python -m tasks.distributed RUN_FOLDER` once per rank. Every rank runs the same stage code
(`tasks.train.run_rank`): the same seeded data order, its share of each optimizer step's micro-batches, gradients
all-reduced through DDP (NCCL on CUDA, gloo on CPU), and rank 0 writes the checkpoints and the artifact.

A rank that fails ends the stage with what it said: it writes its error (a StageError's message, or the
exception's type and first line, its traceback in a file beside it) into the run folder before it exits; torchrun
stops the other ranks and records the first failure (rank, exit status or signal), and the calling process raises
a StageError that names that rank. SIGINT/SIGTERM to the calling process reach the ranks, which agree to stop at
the end of the same step, save a checkpoint and exit; the calling process then raises KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraforge.tasks.errors import StageError

INTERRUPTED = 130  # a rank's exit status after it saved a checkpoint on SIGINT/SIGTERM


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def leader(self) -> bool:
        """Rank 0: the one that writes checkpoints and the artifact and prints progress."""
        return self.rank == 0


SINGLE = Ranks()


def torchrun_command(run_folder: Path, processes: int, nnodes: int, rdzv_endpoint: str | None, job: str) -> list[str]:
    """The torchrun command line that starts this stage's ranks on this machine.

    One machine: `--standalone` (torchrun picks a free port). Several: the c10d rendezvous at `rdzv_endpoint`,
    with the artifact key as its id, so the same command on every machine joins the same job.
    """
    command = [
        sys.executable,
        "-m",
        "loraforge.tasks.distributed",
        "--launch",
        str(run_folder),
        f"--nproc-per-node={processes}",
    ]
    if nnodes > 1:
        command += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={job}"]
    else:
        command += ["--standalone", "--nnodes=1"]
    return [*command, "-m", "loraforge.tasks.distributed", str(run_folder)]


def launcher_main(run_folder: Path, torchrun_args: list[str]) -> int:
    """torchrun itself (`torch.distributed.run`), in this process: when a rank fails, its first failure (rank,
    exit status or signal) goes to `failure.json` in the run folder instead of torchrun's traceback."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(torchrun_args))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        record = {"rank": rank, "exitcode": failure.exitcode, "signal": failure.signal_name()}
        run_folder.mkdir(parents=True, exist_ok=True)  # rank 0 removed it with the checkpoints if it wrote the artifact
        (run_folder / "failure.json").write_text(json.dumps(record))
        return 1
    except SignalException:  # SIGTERM/SIGINT: torchrun has passed it on to the ranks and waited for them
        return INTERRUPTED
    return 0


def launch(run_folder: Path, command: list[str], threads: int) -> None:
    """Run the ranks to completion, echoing their output; turn a failure into a StageError naming the rank.

    Raises:
        StageError: a rank failed (its own message when it left one) or torchrun could not start the ranks.
        KeyboardInterrupt: the run was interrupted and the ranks saved a checkpoint.
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    tail: deque[str] = deque(maxlen=400)
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    asked: list[int] = []

    def forward(signum: int, frame: Any) -> None:  # torchrun passes SIGTERM on to the ranks
        asked.append(signum)
        process.send_signal(signal.SIGTERM)

    try:
        previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals keep their handlers
        previous = {}
    try:
        assert process.stdout is not None
        for line in process.stdout:  # ends when torchrun and the ranks have exited
            sys.stdout.write(line)
            tail.append(line)
        process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if process.returncode == 0 and not asked:
        return
    if asked or _all_interrupted(run_folder):
        raise KeyboardInterrupt("train stopped; the ranks saved a checkpoint (a re-run resumes from it)")
    raise StageError(_failure(run_folder, "".join(tail), process.returncode))


def _all_interrupted(run_folder: Path) -> bool:
    return any(run_folder.glob("interrupted-rank*"))


def _failure(run_folder: Path, output: str, code: int) -> str:
    """What went wrong: the first rank that failed (torchrun's record) with its own message when it left one,
    else the signal or status it died with; the other ranks' errors (a lost peer) are consequences."""
    first = run_folder / "failure.json"
    errors = {int(p.stem.rsplit("rank", 1)[1]): p for p in run_folder.glob("error-rank*.txt")}
    if first.is_file():
        failure = json.loads(first.read_text())
        rank = int(failure["rank"])
        if rank in errors:
            return f"train: rank {rank} failed: {errors[rank].read_text().strip()}"
        return (
            f"train: rank {rank} died ({_exit_meaning(int(failure['exitcode']))}) and torchrun stopped the others; no "
            "artifact was written. Checkpoints already saved are kept (train.save_every): a re-run resumes from the "
            "last one. A rank killed by signal 9 is usually out of memory: lower train.batch_size or train.processes."
        )
    if errors:
        rank = min(errors)
        return f"train: rank {rank} failed: {errors[rank].read_text().strip()}"
    last = [line for line in output.strip().splitlines() if line.strip()][-3:]
    return f"train: the training processes failed (torchrun exit status {code}): " + " | ".join(last)[-600:]


def _exit_meaning(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {-code}, {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def init(device: str) -> Ranks:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU) and say where this rank stands."""
    import torch
    import torch.distributed as dist

    ranks = Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    if device == "cuda":
        torch.cuda.set_device(ranks.local_rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return ranks


def all_sum(values: list[float], ranks: Ranks) -> list[float]:
    """The sum of each value over all ranks (the values themselves with one process)."""
    if ranks.world == 1:
        return values
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return [float(v) for v in tensor.tolist()]


def any_rank(flag: bool, ranks: Ranks) -> bool:
    """True on every rank when it is true on any (ranks agree to stop at the same step)."""
    return flag if ranks.world == 1 else all_sum([float(flag)], ranks)[0] > 0


def gather(value: Any, ranks: Ranks) -> list[Any]:
    """Every rank's value, in rank order (for rank 0 to save per-rank states)."""
    if ranks.world == 1:
        return [value]
    import torch.distributed as dist

    values: list[Any] = [None] * ranks.world
    dist.all_gather_object(values, value)
    return values


def broadcast(value: Any, ranks: Ranks) -> Any:
    """Rank 0's value on every rank."""
    if ranks.world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(model: Any, ranks: Ranks, device: str, fsdp: bool) -> Any:
    """What the loop calls forward on: the model itself with one process; with several, DDP around it (every rank
    holds the whole model, gradients all-reduced) or, with `fsdp`, the model sharded in place with FSDP2
    (`fully_shard` on every decoder layer, then the root: each rank holds 1/world of every weight, gathered per
    layer for its forward and backward, gradients reduce-scattered)."""
    if ranks.world == 1:
        return model
    import torch

    if not fsdp:
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ranks.local_rank] if device == "cuda" else None
        )
    from torch.distributed.fsdp import fully_shard

    layer_kinds = set(getattr(model.get_base_model(), "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in layer_kinds]
    if not layers:
        raise StageError(
            f"train.fsdp: found no decoder layers to shard in {type(model.get_base_model()).__name__} (transformers "
            "lists none in _no_split_modules); set train.fsdp=false (DDP: every process holds the whole model)."
        )
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def sharded(model: Any) -> bool:
    """Whether the model's weights are sharded over the ranks (FSDP2)."""
    return any(hasattr(p, "full_tensor") for p in model.parameters())


@contextlib.contextmanager
def no_sync(forward: Any) -> Iterator[None]:
    """Backward without the gradient all-reduce (DDP) or reduce-scatter (FSDP2): for every micro-batch of a step
    but the last, whose backward then reduces the accumulated gradients once."""
    if hasattr(forward, "no_sync"):
        with forward.no_sync():
            yield
        return
    forward.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        forward.set_requires_gradient_sync(True)


def full(tensor: Any) -> Any:
    """The whole tensor (a collective on every rank for a sharded one)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def assign(params: dict[str, Any], weights: dict[str, Any]) -> None:
    """Copy whole tensors into the parameters, sharding them as each parameter is."""
    import torch

    with torch.no_grad():
        for name, param in params.items():
            value = weights[name]
            if hasattr(param, "full_tensor") and not hasattr(value, "full_tensor"):
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)
            param.copy_(value)


def optimizer_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """The optimizer state as whole tensors (gathered from the shards under FSDP; a collective then)."""
    if model is None or not sharded(model):
        return dict(optimizer.state_dict())
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return dict(get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True)))


def load_optimizer_state(model: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """Restore what `optimizer_state` returned (sharding it again under FSDP)."""
    if not sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def write_spec(run_folder: Path, spec: dict[str, Any]) -> None:
    """What the ranks need to run the stage (config, input artifacts, store, key), as JSON."""
    run_folder.mkdir(parents=True, exist_ok=True)
    for pattern in ("error-rank*", "traceback-rank*", "interrupted-rank*", "failure.json"):
        for old in run_folder.glob(pattern):
            old.unlink()
    (run_folder / "spec.json").write_text(json.dumps(spec, default=str))


def main(run_folder: Path) -> int:
    """A rank's entry point (torchrun runs `python -m tasks.distributed RUN_FOLDER`)."""
    from loraforge.tasks.train import run_rank

    rank = os.environ.get("RANK", "0")
    try:
        run_rank(json.loads((run_folder / "spec.json").read_text()))
    except KeyboardInterrupt:
        (run_folder / f"interrupted-rank{rank}").write_text("checkpoint saved\n")
        return INTERRUPTED
    except StageError as exc:
        (run_folder / f"error-rank{rank}.txt").write_text(str(exc))
        return 1
    except Exception as exc:  # the message reaches the calling process; the traceback goes to a file beside it
        import traceback

        trace = run_folder / f"traceback-rank{rank}.txt"
        trace.write_text(traceback.format_exc())
        lines = str(exc).strip().splitlines()
        detail = f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"
        (run_folder / f"error-rank{rank}.txt").write_text(f"{detail} (traceback: {trace})")
        return 1
    finally:
        _leave()
    return 0


def _leave() -> None:
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: S110 - leaving a broken group: nothing more to do
        pass


if __name__ == "__main__":
    if sys.argv[1] == "--launch":
        sys.exit(launcher_main(Path(sys.argv[2]), sys.argv[3:]))
    sys.exit(main(Path(sys.argv[1])))
