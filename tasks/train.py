"""Train stage: fit a LoRA or QLoRA adapter on the data artifact with a lean, seeded PyTorch loop.

LoRA variants (peft): rank, alpha, dropout, target modules by name or preset (attention, attention+mlp,
all-linear; checked against the model's real linear layers), DoRA, rsLoRA, init, bias, modules_to_save and
LoRA+ (a larger learning rate for the B matrices). QLoRA: the base is loaded through bitsandbytes in 4-bit
(NF4/FP4, optional double quantization, a compute dtype) or 8-bit; if that cannot run here the stage stops,
it never trains in full precision instead.

An optimizer step sees batch_size x grad_accum rows, run as grad_accum micro-batches of batch_size rows; its
loss is the mean over all the step's labelled tokens, so its gradient is that of one batch of all those rows
(activation memory is that of one micro-batch). The loop pads each micro-batch only to its longest row, and
with group_by_length sorts rows by length before cutting them into micro-batches: within each step by default
(every step still a random sample of rows, only less padding), or within windows of several steps. Loss is
computed only where labels are set (the completion, unless data.train_on_prompt), and the output head runs
only on the positions that predict a labelled token (tasks.batching.labelled_token_losses).

Checkpoints (`train.save_every`) go to `<store>/.checkpoints/train-<key>/step-N/`, each written to a temporary
folder and renamed into place; they hold the trainable weights, optimizer, scheduler and RNG states, the
position in the data order and the history. A re-run of the same config resumes from the last complete one
and produces the same adapter bytes as an uninterrupted run. Resuming unpickles no code: weights are
safetensors, the loop state JSON, and optimizer/scheduler/RNG states load with `torch.load(weights_only=True)`.
With `eval_every`, validation loss is measured during training; `early_stopping_patience` stops when it stops
improving, and the best weights are kept.
Precision (`train.precision`): the base weights are loaded in fp32, bf16 or fp16 and the forward runs under
torch.autocast in that dtype (fp16 with a gradient scaler); the LoRA/DoRA parameters and their optimizer
states stay fp32. Several processes (`train.processes`, `train.nnodes`): the stage runs under torchrun, every
rank the same code below (tasks/distributed.py), each taking its share of every step's micro-batches.
Run alone: `loraforge stage train CONFIG [key=value ...]`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import re
import resource
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from loraforge.tasks.artifacts import Artifact, ArtifactStore, commit_folder
from loraforge.tasks.batching import (
    collate,
    collate_packed,
    collate_shared_prefix,
    labelled_token_losses,
    loss_total,
    pack_rows,
    read_split,
    shared_prefix_length,
)
from loraforge.tasks.data import read_data
from loraforge.tasks.distributed import (
    SINGLE,
    Ranks,
    all_sum,
    any_rank,
    assign,
    broadcast,
    full,
    gather,
    load_optimizer_state,
    no_sync,
    optimizer_state,
    sharded,
    wrap,
)
from loraforge.tasks.errors import StageError
from loraforge.tasks.models import cuda_bf16, import_peft, read_base, resolve_precision
from loraforge.tasks.process import logger_level, torch_threads

OnStep = Callable[[dict[str, Any], int], None]  # after each optimizer step: its figures, the steps in all
RUNTIME_ONLY = {
    "save_every",
    "keep_checkpoints",
    "resume",
    "rdzv_endpoint",
}  # do not change the result: not part of the key
Preset = Literal["attention", "attention+mlp", "all-linear"]
ATTENTION_PARENTS = ("attn", "attention")
MLP_PARENTS = ("mlp", "ffn", "feed_forward")


class TrainConfig(BaseModel):
    """LoRA and optimisation settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(32, gt=0, description="LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Preset = Field(
        "attention+mlp",
        description="Linear layers that get adapters: a list of names (checked against the model's own) or a "
        "preset: attention, attention+mlp, all-linear (every linear layer but the output head).",
    )
    use_dora: bool = Field(False, description="DoRA: learn a magnitude vector besides the low-rank direction.")
    use_rslora: bool = Field(False, description="rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r.")
    init: Literal["default", "gaussian"] = Field(
        "default", description="Adapter init: default (A Kaiming-uniform, B zero) or gaussian (A ~ N(0, 1/r))."
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases are trained too.")
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained fully and saved with the adapter (e.g. lm_head)."
    )
    loraplus_lr_ratio: float | None = Field(
        None, gt=0, description="LoRA+: learning rate of the B matrices = learning_rate x this ratio (e.g. 16)."
    )
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="QLoRA: load the frozen base through bitsandbytes in 4-bit or 8-bit."
    )
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (quantization=4bit).")
    double_quant: bool = Field(True, description="4-bit: also quantize the quantization constants.")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype the 4-bit layers compute in; auto: the training precision's (bf16 -> bfloat16)."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="dtype of the frozen base weights and of the autocast forward (LoRA weights and optimizer "
        "states stay fp32; fp16 adds a gradient scaler). auto: bf16 on a CUDA device that supports it, fp16 on "
        "one that does not, fp32 on CPU (where bf16 measured 23x slower; docs/bench.md). A 7B base: 28 GB in fp32, "
        "14 GB in bf16.",
    )
    processes: int = Field(
        1,
        ge=1,
        description="Training processes per machine (torchrun; one per GPU): each takes grad_accum / "
        "(processes x nnodes) micro-batches of every step, so the global batch is unchanged.",
    )
    nnodes: int = Field(1, ge=1, description="Machines training together (each runs the same command).")
    fsdp: bool = Field(
        False,
        description="With several processes: shard the base weights over them (FSDP2, per decoder layer) instead "
        "of a whole copy in each (DDP); for a base that does not fit one GPU.",
    )
    rdzv_endpoint: str | None = Field(
        None, description="host:port of the rendezvous when nnodes > 1 (torchrun's c10d backend on one machine)."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (less memory).")
    save_every: int | None = Field(None, ge=1, description="Write a resumable checkpoint every N optimizer steps.")
    keep_checkpoints: int = Field(2, ge=1, description="How many of the latest checkpoints to keep.")
    resume: bool = Field(True, description="Resume from the last checkpoint of the same config when one exists.")
    eval_every: int | None = Field(None, ge=1, description="Measure validation loss every N optimizer steps.")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many validation measurements without improvement (needs eval_every)."
    )
    early_stopping_min_delta: float = Field(
        0.0, ge=0, description="A validation loss must drop by more than this to count as an improvement."
    )
    keep_best: bool = Field(True, description="With eval_every: save the weights of the best validation loss.")

    @model_validator(mode="after")
    def _early_stopping_needs_evals(self) -> TrainConfig:
        if self.early_stopping_patience and not self.eval_every:
            raise ValueError("early_stopping_patience needs eval_every (how often validation loss is measured)")
        return self

    @model_validator(mode="after")
    def _processes_share_the_step(self) -> TrainConfig:
        world = self.processes * self.nnodes
        if self.grad_accum % world:
            raise ValueError(
                f"grad_accum={self.grad_accum} micro-batches per step cannot be shared by {world} training processes "
                f"(processes x nnodes); set grad_accum to a multiple of {world} "
                "and batch_size so that batch_size x grad_accum stays your global batch"
            )
        if self.fsdp and world == 1:
            raise ValueError("fsdp shards the model over several training processes: set processes (or nnodes) > 1")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("nnodes > 1 needs rdzv_endpoint (host:port that every machine can reach)")
        return self

    learning_rate: float = Field(1e-3, gt=0, le=1, description="Peak learning rate (AdamW).")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps with linear warmup.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training split (ignored if max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: int = Field(
        4, ge=1, description="Rows per micro-batch (one forward and backward); activation memory grows with it."
    )
    grad_accum: int = Field(
        2,
        ge=1,
        description="Micro-batches per optimizer step: a step sees batch_size x grad_accum rows and its loss is the "
        "mean over all their labelled tokens (the gradient of one batch of that many rows, in less memory).",
    )
    group_by_length: bool = Field(
        True, description="Sort rows by length before cutting micro-batches (less padding); see length_group_steps."
    )
    length_group_steps: int = Field(
        1,
        ge=1,
        description="group_by_length's window in optimizer steps. 1: only a step's own rows are sorted into its "
        "micro-batches, so every step is still a random sample (the gradient of random batches, less padding; "
        "needs grad_accum > 1 to matter). More: steps of similar lengths, less padding still, but each step's "
        "gradient is less representative (demo data, 16 steps of 8 rows, window 16: final loss 12% worse).",
    )
    packing: bool = Field(
        False,
        description="Pack several rows into each sequence of data.max_length tokens (first-fit decreasing): no "
        "padding; attention is block-diagonal and positions restart per row, so rows never see each other.",
    )
    share_prompt_prefix: bool = Field(
        True,
        description="Compute the leading tokens a micro-batch's rows share (a system prompt, a fixed instruction) "
        "once per micro-batch instead of once per row: the rows run as one sequence in which each row attends to "
        "the shared prefix and to itself (the same losses and gradient, up to float summation order; with LoRA "
        "dropout the rows also share the prefix's dropout mask). Used for a micro-batch only where the estimated "
        "compute (tokens, plus attention pairs over the one sequence) is lower than padding the rows and no row is "
        "longer than a sliding attention window; not with packing. Under sdpa or eager attention (others pad the "
        "rows as before). false: every row computes its own prefix (the trajectory before 2026-12-06).",
    )
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"] = Field(
        "adamw",
        description="AdamW in fp32 (torch), or bitsandbytes' 8-bit states (adamw_8bit, CPU and CUDA) or paged "
        "states (paged_*, CUDA only: on CPU the stage stops rather than quietly running unpaged).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where to train: cuda when available (auto), or force cpu / cuda (an error if absent)."
    )
    seed: int = Field(42, description="Seed for adapter init, dropout and data order.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice).")
    log_every: int = Field(5, ge=1, description="Record metrics every N optimizer steps.")


def train_adapter(
    config: TrainConfig,
    base: Artifact,
    data: Artifact,
    store: ArtifactStore,
    *,
    on_step: OnStep | None = None,
) -> Artifact:
    """Train a LoRA adapter; skipped when the same artifact exists.

    Args:
        config: the train section of the pipeline config.
        base: the base-model artifact.
        data: the data artifact (train and validation splits).
        store: where artifacts live.
        on_step: called in the training process after each optimizer step with that step's figures (one
            process only; with several, the ranks run in torchrun's processes).

    Returns:
        The train artifact: `adapter/` (peft safetensors + adapter_config.json) and `history.jsonl`.
    """
    import torch

    device = _resolve_device(config, torch.cuda.is_available())
    precision = resolve_precision(config.precision, device, cuda_bf16())
    # Device and precision are part of the key: their kernels give different bytes for the same config.
    settings = {**config.model_dump(exclude=RUNTIME_ONLY), "device": device, "precision": precision}
    key, code = store.stage_key("train", __file__, settings, {"base": base, "data": data})
    run = TrainRun(config, base, data, store, key, code, device, precision, time.time())
    if config.nnodes > 1:  # every machine runs this for one job: none may wait on another's lock of the key
        found = store.find("train", key)
        if found is not None:
            return found
        _launch_ranks(run)
        return _written(run)
    with store.claim("train", key) as hit:
        if hit is not None:
            return hit
        run = dataclasses.replace(run, started=time.time())  # after the wait for another build of the key
        if config.processes == 1:
            _build_adapter(run, SINGLE, on_step)
        else:
            _launch_ranks(run)
        return _written(run)


@dataclass(frozen=True)
class TrainRun:
    """One build of a train artifact: what every training process needs to know."""

    config: TrainConfig
    base: Artifact
    data: Artifact
    store: ArtifactStore
    key: str
    code: str
    device: str
    precision: str  # fp32, bf16 or fp16 (resolved)
    started: float  # time.time() after the cache miss


def _written(run: TrainRun) -> Artifact:
    found = run.store.find("train", run.key)
    if found is None:
        raise StageError(
            f"train: the training processes finished but artifact train/{run.key} is not in {run.store.where}; with "
            "train.nnodes > 1 the machine running rank 0 writes it: give every machine the same store."
        )
    return dataclasses.replace(found, cached=False)


def _launch_ranks(run: TrainRun) -> None:
    """Run the stage in train.processes x train.nnodes processes under torchrun; rank 0 writes the artifact."""
    import torch

    from loraforge.tasks import distributed

    config = run.config
    if run.device == "cuda" and config.processes > torch.cuda.device_count():
        raise StageError(
            f"train.processes={config.processes} runs one process per GPU and this machine has "
            f"{torch.cuda.device_count()}; set train.processes={torch.cuda.device_count()} (and grad_accum to a "
            "multiple of it)."
        )
    folder = run.store.root / ".checkpoints" / f"train-{run.key}" / "ranks"
    distributed.write_spec(folder, {
        "config": config.model_dump(mode="json"), "store": run.store.url, "verify": run.store.verify,
        "key": run.key, "code": run.code, "device": run.device, "precision": run.precision, "started": run.started,
        **{name: {"stage": a.stage, "key": a.key, "path": str(a.path), "manifest": a.manifest}
           for name, a in (("base", run.base), ("data", run.data))},
    })  # fmt: skip
    threads = config.threads or max(1, (os.cpu_count() or 1) // config.processes)
    command = distributed.torchrun_command(folder, config.processes, config.nnodes, config.rdzv_endpoint, run.key)
    print(f"[train] {config.processes * config.nnodes} processes ({config.processes} per machine, "
          f"{'nccl' if run.device == 'cuda' else 'gloo'}): {' '.join(command[1:])}")  # fmt: skip
    try:
        distributed.launch(folder, command, threads)
    except StageError as exc:
        if run.store.find("train", run.key) is None:
            raise
        # Rank 0 commits the artifact (manifest last) before the ranks leave; a rank that crashes while exiting
        # after that (seen once: gloo's teardown aborting, exit -6) cannot have changed it.
        print(f"[train] warning: a training process failed after the artifact train/{run.key} was written in full; "
              f"it is kept ({exc})")  # fmt: skip


def run_rank(spec: dict[str, Any]) -> None:
    """One rank of a multi-process train stage (`tasks.distributed.main` calls it inside torchrun)."""
    from loraforge.tasks import distributed

    def artifact(name: str) -> Artifact:
        return Artifact(**{**spec[name], "path": Path(spec[name]["path"])})

    config = TrainConfig(**spec["config"])
    store = ArtifactStore(spec["store"], verify=spec["verify"])
    run = TrainRun(config, artifact("base"), artifact("data"), store, spec["key"], spec["code"], spec["device"],
                   spec["precision"], spec["started"])  # fmt: skip
    _build_adapter(run, distributed.init(run.device), None)


def _build_adapter(run: TrainRun, ranks: Ranks, on_step: OnStep | None) -> None:
    """Train the adapter of the train artifact `run.key`; rank 0 writes it (the key's lock is held)."""
    with torch_threads(run.config.threads):  # this stage's; the process's own count again afterwards
        setup = _setup(run, ranks)
        fit = _fit(run, setup, ranks, on_step)
    adapter = {n: full(p.detach()) for n, p in setup.model.named_parameters() if p.requires_grad}  # FSDP: gathered
    if ranks.leader:
        _save(run, setup, fit, adapter)
        shutil.rmtree(_checkpoints(run), ignore_errors=True)  # the artifact exists: checkpoints are not needed
    all_sum([0.0], ranks)  # no rank ends before the artifact is written (other machines look for it then)


class Setup(NamedTuple):
    """The model and everything the loop needs, ready for step one."""

    model: Any  # the peft model (what is saved)
    forward: Any  # what the loop calls: the model, or its DDP wrapper with several processes
    targets: list[str]
    variant: str
    units: list[dict[str, Any]]
    total_steps: int
    val_rows: list[dict[str, Any]]
    pad_id: int
    optimizer: Any
    scheduler: Any
    mixed: Mixed
    sharing: Sharing | None  # how micro-batches share their prompt prefix (None: train.share_prompt_prefix off)


class Fit(NamedTuple):
    """What the loop produced."""

    history: list[dict[str, Any]]
    state: dict[str, Any]
    val_before: float
    val_after: float
    seconds: float
    peak_rss_mb: int


def _setup(run: TrainRun, ranks: Ranks) -> Setup:
    """Load the base in the training precision, attach the adapters, read the data, build the optimizer."""
    import torch

    from loraforge.tasks.models import load_tokenizer

    config = run.config
    _seed_everything(config.seed)
    model_path = read_base(run.base).model_path
    tokenizer = load_tokenizer(model_path)
    device = f"cuda:{ranks.local_rank}" if run.device == "cuda" and ranks.world > 1 else run.device
    model, targets = trainable_model(config, model_path, device, run.precision)
    if ranks.world > 1:
        torch.manual_seed(config.seed + 7919 * ranks.rank)  # dropout differs per rank; the init did not
    trainable, total = model.get_nb_trainable_parameters()
    variant = "+".join(
        [{"none": "LoRA", "4bit": f"QLoRA {config.quant_type}", "8bit": "QLoRA int8"}[config.quantization]]
        + ["DoRA"] * config.use_dora + ["rsLoRA"] * config.use_rslora + ["LoRA+"] * bool(config.loraplus_lr_ratio)
    )  # fmt: skip
    train_rows = read_split(run.data.file("train.jsonl"))
    max_length = read_data(run.data).max_length
    units, total_steps = training_units(train_rows, config, max_length)
    if ranks.leader:
        print(f"[train] {variant} r={config.r} on {', '.join(targets)}, {run.precision} on {run.device}: "
              f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")  # fmt: skip
        if config.packing:
            print(f"[train] packed {len(train_rows)} rows into {len(units)} sequences of up to "
                  f"{max_length} tokens")  # fmt: skip
    forward = wrap(model, ranks, run.device, config.fsdp)  # DDP or FSDP2 with several processes
    optimizer = _optimizer(_param_groups(model, config), config)  # after sharding: it holds the shards
    return Setup(model, forward, targets, variant, units, total_steps, read_split(run.data.file("validation.jsonl")),
                 tokenizer.pad_token_id, optimizer, _scheduler(optimizer, config, total_steps),
                 mixed_precision(run.precision, run.device),
                 prefix_sharing(model) if config.share_prompt_prefix and not config.packing else None)  # fmt: skip


def _checkpoints(run: TrainRun) -> Path:
    return run.store.root / ".checkpoints" / f"train-{run.key}"


def _fit(run: TrainRun, setup: Setup, ranks: Ranks, on_step: OnStep | None) -> Fit:
    """The training loop: resume if a checkpoint exists, step, log, validate, checkpoint; stop early or on a
    signal (at the end of a step, every rank at the same one)."""
    from tqdm import tqdm

    config, params = run.config, {n: p for n, p in setup.model.named_parameters() if p.requires_grad}
    val_before = _val_loss(setup, config, ranks)
    state: dict[str, Any] = {"step": 0, "tokens": 0, "seconds": 0.0, "history": [], "best": None, "bad_evals": 0}
    last = distributed_path(_last_checkpoint(_checkpoints(run)) if ranks.leader else None, ranks)
    if config.resume and last is not None:
        state = _load_checkpoint(last, params, setup.optimizer, setup.scheduler, setup.mixed.scaler, ranks, setup.model)
        if ranks.leader:
            print(f"[train] resuming from {last.name} ({state['step']} of {setup.total_steps} steps done)")
    history: list[dict[str, Any]] = state["history"]
    setup.forward.train()
    batches = batch_stream(setup.units, config, random.Random(config.seed))
    for _ in range(state["step"] * config.grad_accum):  # the same data order as an uninterrupted run
        next(batches)
    started = time.perf_counter() - state["seconds"]
    progress = tqdm(range(state["step"] + 1, setup.total_steps + 1), desc="train", unit="step", dynamic_ncols=True,
                    initial=state["step"], total=setup.total_steps, disable=not ranks.leader)  # fmt: skip
    with _stop_at_step_end(grace_s=5.0 if ranks.world > 1 else 0.0) as stop_asked:
        for step in progress:
            micro = [collate_micro_batch(next(batches), setup.pad_id, config.packing, setup.sharing)
                     for _ in range(config.grad_accum)]  # fmt: skip
            step_loss, grad_norm = _optimizer_step(setup, micro, run.device, ranks, config.max_grad_norm)
            if not math.isfinite(step_loss):
                raise StageError(
                    f"training diverged at step {step} (loss {step_loss}, grad norm {grad_norm}); "
                    "lower train.learning_rate or raise train.warmup_ratio."
                )
            state["tokens"] += sum(m.real_tokens for m in micro)  # every rank collates the whole step
            state["positions"] = state.get("positions", 0) + sum(m.input_ids.numel() for m in micro)  # computed
            state["padding"] = state.get("padding", 0) + sum(m.padding for m in micro)
            elapsed = time.perf_counter() - started
            progress.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{state['tokens'] / elapsed:.0f}")
            record, stop = _log_and_validate(setup, config, ranks, state, params, step, step_loss, grad_norm, elapsed)
            if record:
                history.append(record)
            state.update(step=step, seconds=elapsed)
            if config.save_every and (step % config.save_every == 0) and step < setup.total_steps and not stop:
                _save_checkpoint(_checkpoints(run), state, params, setup.optimizer, setup.scheduler,
                                 config.keep_checkpoints, setup.mixed.scaler, ranks, setup.model)  # fmt: skip
            if on_step is not None:  # the step is complete (and checkpointed when due)
                on_step(dict(record or {"step": step, "loss": round(step_loss, 5)}), setup.total_steps)
            if any_rank(bool(stop_asked), ranks) and step < setup.total_steps and not stop:  # a safe point
                _save_checkpoint(_checkpoints(run), state, params, setup.optimizer, setup.scheduler,
                                 max(config.keep_checkpoints, 1), setup.mixed.scaler, ranks, setup.model)  # fmt: skip
                raise KeyboardInterrupt(f"train stopped at step {step} of {setup.total_steps}; checkpoint saved")
            if stop:
                if ranks.leader:
                    print(
                        f"[train] early stop at step {step}: no validation improvement in {state['bad_evals']} checks"
                    )
                break
    progress.close()
    seconds = time.perf_counter() - started
    if state.get("best_weights") is not None and state["best"]["step"] != state["step"]:
        assign(params, state["best_weights"])
        if ranks.leader:
            print(f"[train] keeping the best weights: step {state['best']['step']} "
                  f"(val loss {state['best']['val_loss']:.4f})")  # fmt: skip
    val_after = _val_loss(setup, config, ranks)
    if ranks.leader:
        print(f"[train] validation loss {val_before:.4f} -> {val_after:.4f} in {seconds:.0f} s")
    return Fit(history, state, val_before, val_after, seconds, max(gather(_peak_rss_mb(), ranks)))


def distributed_path(path: Path | None, ranks: Ranks) -> Path | None:
    """Rank 0's choice of checkpoint, on every rank."""
    chosen = broadcast(None if path is None else str(path), ranks)
    return None if chosen is None else Path(chosen)


def _log_and_validate(
    setup: Setup, config: TrainConfig, ranks: Ranks, state: dict[str, Any], params: dict[str, Any],
    step: int, step_loss: float, grad_norm: float, elapsed: float,
) -> tuple[dict[str, Any], bool]:  # fmt: skip
    """The step's history record (every log_every steps, at the end, and at evaluations) and whether early
    stopping says stop; validation (eval_every) keeps the best weights."""
    total = setup.total_steps
    evaluate_now = config.eval_every is not None and (step % config.eval_every == 0 or step == total)
    record: dict[str, Any] = {}
    if step % config.log_every == 0 or step == total or evaluate_now:
        record = {
            "step": step, "loss": round(step_loss, 5), "lr": setup.scheduler.get_last_lr()[0],
            "grad_norm": round(grad_norm, 5), "tokens": state["tokens"],
            "tokens_per_s": round(state["tokens"] / elapsed, 1), "rss_mb": _peak_rss_mb(),
            **({"cuda_mb": _cuda_peak_mb()} if next(setup.model.parameters()).is_cuda else {}),
        }  # fmt: skip
    if not evaluate_now:
        return record, False
    val = _val_loss(setup, config, ranks)
    record["val_loss"] = round(val, 5)
    if state["best"] is None or val < state["best"]["val_loss"] - config.early_stopping_min_delta:
        state["best"] = {"step": step, "val_loss": val}
        state["bad_evals"] = 0
        if config.keep_best:
            state["best_weights"] = {n: p.detach().clone() for n, p in params.items()}
        return record, False
    state["bad_evals"] += 1
    return record, bool(config.early_stopping_patience and state["bad_evals"] >= config.early_stopping_patience)


def _val_loss(setup: Setup, config: TrainConfig, ranks: Ranks) -> float:
    """Token-weighted validation loss; with several processes each measures its share of the rows (under FSDP
    every rank runs every row: its forwards gather weights together, so all ranks must run the same number)."""
    whole = sharded(setup.model)
    rows = setup.val_rows if whole else setup.val_rows[ranks.rank :: ranks.world]
    bar = "validate" if ranks.leader else None  # the validation pass shows its progress like the train bar
    with setup.mixed.autocast():
        total, count = loss_total(setup.model, rows, config.batch_size, setup.pad_id, bar)
    summed, labelled = (total, count) if whole else all_sum([total, count], ranks)
    return summed / max(labelled, 1)


def _optimizer_step(
    setup: Setup, micro: list[MicroBatch], device: str, ranks: Ranks, max_grad_norm: float
) -> tuple[float, float]:
    """Gradients of the step's micro-batches (this rank's share), clipping, optimizer and scheduler step.

    Returns the step's loss (over all ranks) and the gradient norm. With fp16 a step whose gradients overflow
    is skipped by the gradient scaler (which then lowers its scale), as in torch's own recipe.
    """
    import torch

    step_loss = accumulate_gradients(setup.forward, micro, device, ranks, setup.mixed)
    scaler = setup.mixed.scaler
    if scaler is not None:
        scaler.unscale_(setup.optimizer)
    grad_norm = float(full(torch.nn.utils.clip_grad_norm_(setup.model.parameters(), max_grad_norm)))
    if not math.isfinite(grad_norm) and scaler is None:
        step_loss = float("nan")
    if scaler is not None:
        scaler.step(setup.optimizer)
        scaler.update()
    else:
        setup.optimizer.step()
    setup.scheduler.step()
    setup.optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm


class TrainedAdapter(NamedTuple):
    """What the train artifact tells the other stages (read it with `read_train`)."""

    # The train section with what it resolved at run time (precision, QLoRA compute dtype): what
    # `load_base_as_trained` needs to rebuild the model the adapter was trained and gated on.
    settings: dict[str, Any]
    adapter_sha256: str | None  # of adapter/adapter_model.safetensors

    @property
    def use_dora(self) -> bool:
        """Whether the adapter is DoRA (magnitude vectors: llama.cpp's LoRA converter cannot take it)."""
        return bool(self.settings.get("use_dora"))


def read_train(train: Artifact) -> TrainedAdapter:
    """The train artifact's resolved settings and adapter hash."""
    m = train.manifest
    settings = dict(m["config"])
    settings["precision"] = m.get("precision") or "fp32"
    declared = settings.get("compute_dtype")
    settings["compute_dtype"] = m.get("compute_dtype") or ("float32" if declared in (None, "auto") else declared)
    sha = m.get("files", {}).get("adapter/adapter_model.safetensors", {}).get("sha256")
    return TrainedAdapter(settings, sha)


def _make_portable(folder: Path, base: Artifact) -> None:
    """Make a saved adapter folder the same bytes on every machine: the base named by its public name (the Hub id,
    else `base_model` as configured), not the folder it was loaded from here, in adapter_config.json and in
    peft's README (patched after saving: peft would otherwise try to reach the Hub to inspect that name), and
    target_modules sorted (peft writes them from a set, in an order that changes with the string hash seed)."""
    ref = read_base(base)
    public = ref.public_name
    adapter_config = folder / "adapter_config.json"
    settings = json.loads(adapter_config.read_text())
    settings["base_model_name_or_path"] = public
    if isinstance(settings.get("target_modules"), list):
        settings["target_modules"] = sorted(settings["target_modules"])
    adapter_config.write_text(json.dumps(settings, indent=2, sort_keys=True))
    readme = folder / "README.md"
    if readme.is_file():
        text = readme.read_text()
        local = {str(ref.model_path), str(ref.model_path.resolve())}
        for path in sorted(local, key=len, reverse=True):
            text = text.replace(path, public)
        readme.write_text(text)


def _save(run: TrainRun, setup: Setup, fit: Fit, adapter: dict[str, Any]) -> None:
    """Write the train artifact: the adapter (portable config, sorted target modules), history, curve, metrics."""
    config, history = run.config, fit.history
    inputs = {"base": run.base, "data": run.data}
    with run.store.create("train", run.key, config, inputs, run.code, started=run.started) as draft:
        setup.model.save_pretrained(draft.path / "adapter", state_dict=adapter, safe_serialization=True)
        draft.extra["target_modules"] = setup.targets
        _make_portable(draft.path / "adapter", run.base)
        with (draft.path / "history.jsonl").open("w") as out:
            out.writelines(json.dumps(h) + "\n" for h in history)
        _plot_curve(history, (fit.val_before, fit.val_after), draft.path / "loss_curve.png",
                    title=f"train {run.key} ({setup.variant}, {run.precision})")  # fmt: skip
        draft.extra.update({
            "device": run.device, "optimizer": config.optimizer, "packed_sequences": len(setup.units),
            "precision": run.precision, "compute_dtype": compute_dtype(config, run.precision),
            "processes": config.processes * config.nnodes,
        })  # fmt: skip
        if run.device == "cuda":
            draft.metrics["cuda_peak_mb"] = _cuda_peak_mb()
        trainable, total = setup.model.get_nb_trainable_parameters()
        state, seconds = fit.state, fit.seconds
        draft.metrics.update({
            "trainable_params": trainable, "total_params": total, "steps": setup.total_steps,
            "train_loss": history[-1]["loss"], "val_loss_before": round(fit.val_before, 5),
            "val_loss": round(fit.val_after, 5), "tokens": state["tokens"],
            "tokens_per_s": round(state["tokens"] / seconds, 1), "train_seconds": round(seconds, 1),
            "peak_rss_mb": fit.peak_rss_mb, "steps_done": state["step"],
            "padding_share": round(state.get("padding", 0) / max(state.get("positions", 0), 1), 4),
            "shared_prefix_share": round(1 - (state.get("positions", 0) - state.get("padding", 0))
                                         / max(state["tokens"], 1), 4),
        })  # fmt: skip
        if state["best"] is not None:
            draft.metrics.update(
                {"best_step": state["best"]["step"], "best_val_loss": round(state["best"]["val_loss"], 5)}
            )


def lora_config(config: TrainConfig, targets: list[str]) -> Any:
    """The peft LoraConfig of these settings on the resolved target modules (`loraforge plan` uses it too)."""
    LoraConfig = import_peft().LoraConfig

    return LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        use_dora=config.use_dora,
        use_rslora=config.use_rslora,
        init_lora_weights=True if config.init == "default" else config.init,
        bias=config.bias,
        modules_to_save=list(config.modules_to_save) or None,
        task_type="CAUSAL_LM",
    )


@contextlib.contextmanager
def _stop_at_step_end(grace_s: float = 0.0) -> Iterator[list[int]]:
    """While training, SIGINT/SIGTERM ask the loop to stop at the end of its step: it saves a checkpoint (a re-run
    resumes from it) and raises KeyboardInterrupt. A second signal interrupts at once, unless it comes within
    `grace_s` of the first (under torchrun a rank gets the terminal's Ctrl-C and torchrun's SIGTERM: one ask).
    Outside the main thread (where Python cannot take signals) the signals keep their handlers."""
    asked: list[int] = []
    first = [0.0]

    def ask(signum: int, frame: Any) -> None:
        if asked and time.monotonic() - first[0] > grace_s:
            raise KeyboardInterrupt(f"signal {signum} again: stopped without a checkpoint")
        if not asked:
            first[0] = time.monotonic()
            print(f"\n[train] signal {signum}: stopping after this step (checkpoint, then exit; again: stop at once)")
        asked.append(signum)

    try:
        previous = {signum: signal.signal(signum, ask) for signum in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        yield asked
        return
    try:
        yield asked
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _last_checkpoint(folder: Path) -> Path | None:
    done = sorted(p for p in folder.glob("step-*") if (p / "meta.json").is_file()) if folder.is_dir() else []
    return done[-1] if done else None


def _save_checkpoint(
    folder: Path, state: dict[str, Any], trainable: dict[str, Any], optimizer: Any, scheduler: Any, keep: int,
    scaler: Any = None, ranks: Ranks = SINGLE, model: Any = None,
) -> None:  # fmt: skip
    """Write step-N atomically (temporary folder, meta.json last, rename); keep the newest `keep`. With several
    processes every rank calls it (their RNG states are gathered, FSDP shards gathered from `model`); rank 0
    writes. `_load_checkpoint` takes the same arguments back."""
    import torch
    from safetensors.torch import save_file

    rng = gather(torch.get_rng_state(), ranks)  # dropout differs per rank: each resumes its own stream
    weights = {n: full(p.detach()).contiguous() for n, p in trainable.items()}  # whole tensors under FSDP too
    best = {n: full(w).contiguous() for n, w in (state.get("best_weights") or {}).items()}
    optimizer_states = optimizer_state(model, optimizer)
    if not ranks.leader:
        return
    final = folder / f"step-{state['step']:07d}"
    tmp = folder / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, tmp / "trainable.safetensors")
    if best:
        save_file(best, tmp / "best.safetensors")
    torch.save({"optimizer": optimizer_states, "scheduler": scheduler.state_dict(),
                "torch_rng": rng[0], "rank_rngs": rng, "scaler": None if scaler is None else scaler.state_dict(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               tmp / "state.pt")  # fmt: skip
    meta = {k: v for k, v in state.items() if k != "best_weights"}
    (tmp / "meta.json").write_text(json.dumps(meta))
    shutil.rmtree(final, ignore_errors=True)
    commit_folder(tmp, final)  # fsynced before the rename: a crash leaves the previous checkpoint or this one
    for old in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(
    folder: Path, trainable: dict[str, Any], optimizer: Any, scheduler: Any, scaler: Any = None,
    ranks: Ranks = SINGLE, model: Any = None,
) -> dict[str, Any]:  # fmt: skip
    """Restore a checkpoint written by `_save_checkpoint` into the live parameters, optimizer and scheduler.

    Checkpoints sit in the shared store, where anyone who can write could plant a file, so nothing in them is
    unpickled as code: weights are safetensors, the loop state is JSON, and `state.pt` (optimizer, scheduler and
    RNG states) is read with `torch.load(weights_only=True)`, which rebuilds only tensors and plain values.
    Covered, each by a save/resume round trip in tests/unit/test_checkpoints.py: torch AdamW (adamw) and
    bitsandbytes AdamW8bit (adamw_8bit) on CPU, PagedAdamW32bit and PagedAdamW8bit (paged_adamw,
    paged_adamw_8bit) on CUDA (gpu-marked, skipped without CUDA), the transformers schedulers (cosine, linear,
    constant with warmup) and the CPU and CUDA RNG states.

    Args:
        folder: a complete `step-N` checkpoint folder.
        trainable: the model's trainable parameters by name (overwritten in place).
        optimizer: the optimizer to restore (same kind and parameter groups as when saved).
        scheduler: the learning-rate scheduler to restore.
        scaler: fp16's gradient scaler to restore (None otherwise).
        ranks: this process among the training processes (each restores its own RNG state).
        model: the model the optimizer steps (needed to shard the optimizer state again under FSDP).

    Returns:
        The loop state from meta.json, with `best_weights` when the checkpoint holds them.

    Raises:
        StageError: `state.pt` holds anything but tensors and plain values (it was not written by this stage, or
            was changed since) or cannot be read; it names the file and how to start over.
    """
    import torch
    from safetensors.torch import load_file

    assign(trainable, load_file(folder / "trainable.safetensors"))
    try:
        saved = torch.load(folder / "state.pt", weights_only=True)
    except Exception as exc:  # UnpicklingError (a refused object), RuntimeError (not a torch file), OSError
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        lines = str(exc).strip().splitlines()
        detail = f"it calls {refused.group(1)}" if refused else f"{type(exc).__name__}: {lines[0] if lines else ''}"
        raise StageError(
            f"train.resume: the checkpoint state {folder / 'state.pt'} cannot be loaded safely "
            f"({detail[:200]}); loraforge only reads tensors and plain values from it, and "
            "this stage never writes anything else, so the file was changed or not written by loraforge. It was "
            f"not executed. Delete {folder.parent} to train from the start (or set train.resume=false), and check "
            "who can write to the store."
        ) from None
    if model is None:
        optimizer.load_state_dict(saved["optimizer"])
    else:
        load_optimizer_state(model, optimizer, saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if scaler is not None and saved.get("scaler") is not None:
        scaler.load_state_dict(saved["scaler"])
    rngs = saved.get("rank_rngs") or [saved["torch_rng"]]
    if len(rngs) != ranks.world:
        raise StageError(
            f"train.resume: the checkpoint {folder} was written by {len(rngs)} training processes and this run has "
            f"{ranks.world}; resume with the same train.processes x train.nnodes, or delete {folder.parent} to "
            "train from the start."
        )
    torch.set_rng_state(rngs[ranks.rank])
    if saved.get("cuda_rng") is not None:
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    state: dict[str, Any] = json.loads((folder / "meta.json").read_text())
    if (folder / "best.safetensors").is_file():
        state["best_weights"] = load_file(folder / "best.safetensors")
    return state


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def resolve_target_modules(model: Any, wanted: list[str] | str) -> list[str]:
    """The linear-layer names that get adapters: a preset resolved on this model, or the given names checked.

    Raises:
        StageError: an unknown name (the valid ones are listed), or a preset that matches nothing here.
    """
    linear = _linear_layers(model)
    names = sorted({path.rsplit(".", 1)[-1] for path in linear})
    if isinstance(wanted, str):
        head = {n for n, m in model.named_modules() if m is model.get_output_embeddings()}
        parents = {"attention": ATTENTION_PARENTS, "attention+mlp": ATTENTION_PARENTS + MLP_PARENTS}.get(wanted)
        chosen = sorted({
            path.rsplit(".", 1)[-1] for path in linear
            if path not in head and (parents is None or any(p in path.lower() for p in parents))
        })  # fmt: skip
        if not chosen:
            raise StageError(f"train.target_modules={wanted!r} matches no linear layer here; name them from: {names}")
        return chosen
    unknown = [name for name in wanted if name not in names]
    if unknown:
        raise StageError(
            f"train.target_modules: {', '.join(map(repr, unknown))} not found in the model's linear layers; "
            f"valid names: {', '.join(names)}"
        )
    return list(wanted)


def check_target_modules(wanted: list[str] | str, folder: Path) -> list[str]:
    """Resolve `train.target_modules` on the model's architecture without its weights (a meta-device model built
    from config.json: no memory, a second or so), so `validate` finds a wrong name before any stage runs.

    Args:
        wanted: the names or preset from the config.
        folder: the base model's folder.

    Returns:
        The linear-layer names that would get adapters.

    Raises:
        StageError: an unknown name (with the valid ones), or a preset that matches nothing.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=False)
    return resolve_target_modules(model, wanted)


def _linear_layers(model: Any) -> list[str]:
    import torch

    kinds: tuple[type, ...] = (torch.nn.Linear,)
    try:
        # Only its layer classes are needed here: on CPUs with avx512_bf16 its import warns that the optional
        # `kernels` package is missing, which `loraforge validate` would print for every config.
        with logger_level("bitsandbytes", logging.ERROR):
            import bitsandbytes as bnb

        kinds += (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except ImportError:
        pass
    return [name for name, module in model.named_modules() if isinstance(module, kinds)]


def _param_groups(model: Any, config: TrainConfig) -> list[dict[str, Any]]:
    """Trainable parameters; with LoRA+ the B matrices (and DoRA magnitudes stay with A) get lr x ratio."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not config.loraplus_lr_ratio:
        return [{"params": [p for _, p in params]}]
    fast = [p for n, p in params if "lora_B" in n]
    slow = [p for n, p in params if "lora_B" not in n]
    return [{"params": slow}, {"params": fast, "lr": config.learning_rate * config.loraplus_lr_ratio}]


def trainable_model(
    config: TrainConfig, model_path: Path, device: str, precision: str = "fp32"
) -> tuple[Any, list[str]]:
    """The base model loaded as configured (in the training precision's dtype, or 4-bit/8-bit through
    bitsandbytes) with LoRA adapters attached and only they (and `modules_to_save`) trainable, kept in fp32
    whatever the base's dtype (so are their optimizer states); also the resolved target module names."""
    import torch

    from loraforge.tasks.models import load_base_as_trained

    peft = import_peft()
    settings = {**config.model_dump(), "precision": precision, "compute_dtype": compute_dtype(config, precision)}
    model: Any = load_base_as_trained(model_path, settings)
    if config.quantization == "none":
        model.to(device)  # bitsandbytes models are placed by their loader
    targets = resolve_target_modules(model, config.target_modules)
    if config.quantization != "none":
        _keep_4bit_weights_trainable(model)
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = peft.get_peft_model(model, lora_config(config, targets))
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model, targets


def _keep_4bit_weights_trainable(model: Any) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference during our validation passes.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit's weights into an inference layout on
    its first forward in eval mode without gradients, and never packs them back: the backward through such a
    layer then returns wrong input gradients (on the tiny test model 14 of 28 adapter gradients changed), so
    after `val_loss_before` QLoRA hardly learned (SmolLM2, 16 steps: val loss 7.0 -> 6.7, where trl's recipe
    reaches 0.58 and this stage, with the fix, 0.56). Training keeps the layout the backward needs; inference
    elsewhere (eval, merge) still gets the fast path. 8-bit layers have no such switch.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def training_units(
    rows: list[dict[str, Any]], config: TrainConfig, max_length: int
) -> tuple[list[dict[str, Any]], int]:
    """What the train stage iterates over (rows, or rows packed into sequences of up to `max_length` tokens)
    and how many optimizer steps it takes (max_steps, else epochs over the units); shared with `loraforge plan`."""
    units = pack_rows(rows, max_length) if config.packing else rows
    steps_per_epoch = math.ceil(len(units) / (config.batch_size * config.grad_accum))
    return units, config.max_steps or max(1, math.ceil(steps_per_epoch * config.epochs))


def batch_stream(rows: list[dict[str, Any]], config: TrainConfig, rng: random.Random) -> Any:
    """Endless iterator of micro-batches of batch_size rows, grad_accum of them per optimizer step: rows shuffled
    each epoch; with group_by_length, the rows of every window of length_group_steps steps sorted by length
    before they are cut into micro-batches (a window of one step keeps each step's rows a random sample; wider
    windows shuffle their micro-batches across the epoch). The train stage's data order; `loraforge plan
    --from-data` replays it to find the largest micro-batch."""
    while True:
        order = list(range(len(rows)))
        rng.shuffle(order)
        if config.group_by_length:
            window = config.batch_size * config.grad_accum * config.length_group_steps
            order = [
                i
                for start in range(0, len(order), window)
                for i in sorted(order[start : start + window], key=lambda i: -len(rows[i]["input_ids"]))
            ]
        batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        if config.group_by_length and config.length_group_steps > 1:
            rng.shuffle(batches)  # keep grouped micro-batches but not in length order
        for batch in batches:
            yield [rows[i] for i in batch]


class MicroBatch(NamedTuple):
    """One forward and backward's worth of rows, collated."""

    input_ids: Any
    labels: Any
    attention_mask: Any
    extra: dict[str, Any]  # further model inputs (position_ids of packed rows or of a shared prefix)
    real_tokens: int  # the rows' tokens (what the step trains on)
    padding: int  # positions computed that are padding


class Sharing(NamedTuple):
    """What decides whether a micro-batch runs its shared prompt prefix once (`collate_micro_batch`)."""

    pair_per_token: float  # an attention (query, key) pair's compute in a token's linear-layer compute
    window: int | None  # the model's sliding attention window, if any: longer rows are padded instead
    masks_4d: bool  # the attention takes a 4-D mask (sdpa; eager through `as_attention_mask`): else padded

    def pays(self, batch: list[dict[str, Any]], prefix: int) -> bool:
        """Whether one sequence with the prefix once costs less than the padded batch (tokens through the
        linear layers plus attention pairs; a custom mask makes attention dense over the whole sequence)."""
        lengths = [len(row["input_ids"]) for row in batch]
        if not self.masks_4d:
            return False
        if self.window and max(lengths) > self.window:  # a 4D mask replaces the model's sliding-window masks
            return False
        shared = prefix + sum(length - prefix for length in lengths)
        padded = len(batch) * max(lengths)
        return shared + shared**2 * self.pair_per_token < padded + padded * max(lengths) * self.pair_per_token


def prefix_sharing(model: Any) -> Sharing:
    """The model's cost ratio of an attention pair to a token (forward FLOPs), its sliding window and whether
    its attention takes the 4-D mask of one shared-prefix sequence (sdpa, and eager with the mask made additive
    by `as_attention_mask`; other kernels, such as flash attention, take no 4-D mask)."""
    import torch

    config = model.config.get_text_config()
    head = model.get_output_embeddings()
    linear = sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head
    )
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    pair = 4 * heads * head_dim * config.num_hidden_layers  # q.k and attention x v, every layer
    return Sharing(pair / max(2 * linear, 1), getattr(config, "sliding_window", None),
                   model.config._attn_implementation in ("sdpa", "eager"))  # fmt: skip


def collate_micro_batch(
    batch: list[dict[str, Any]], pad_id: int, packed: bool, sharing: Sharing | None = None
) -> MicroBatch:
    """Pad rows (or packed sequences, with their block-diagonal mask and restarting positions) into tensors;
    with `sharing`, rows that share a prompt prefix become one sequence with the prefix once where that pays."""
    tokens = sum(len(row["input_ids"]) for row in batch)
    if packed:
        input_ids, labels, mask, positions = collate_packed(batch, pad_id)
        return MicroBatch(input_ids, labels, mask, {"position_ids": positions}, tokens, input_ids.numel() - tokens)
    prefix = shared_prefix_length(batch) if sharing else 0
    if sharing and prefix and sharing.pays(batch, prefix):
        input_ids, labels, mask, positions = collate_shared_prefix(batch, prefix)
        return MicroBatch(input_ids, labels, mask, {"position_ids": positions}, tokens, 0)
    input_ids, labels, mask = collate(batch, pad_id)
    return MicroBatch(input_ids, labels, mask, {}, tokens, input_ids.numel() - tokens)


def accumulate_gradients(
    model: Any, micro_batches: list[MicroBatch], device: str, ranks: Ranks = SINGLE, mixed: Mixed | None = None
) -> float:
    """Forward and backward over one optimizer step's micro-batches (this rank's share); returns the step's loss.

    The loss is the mean over all the step's labelled tokens, not a mean of micro-batch means (which would
    weight a token by how few labelled tokens its micro-batch holds), so the accumulated gradient is that of
    one batch of all the step's rows, while only one micro-batch's activations are alive at a time.

    With several processes every rank collates the whole step and takes every world-th micro-batch; each
    scales its loss by the world size because DDP averages the gradients over ranks when the last micro-batch's
    backward runs (the others skip that all-reduce with `no_sync`), so the result is the one-process gradient.
    The forward runs under autocast in bf16/fp16; fp16 scales the loss (`mixed.scaler`).
    """
    mixed = mixed or mixed_precision("fp32", device)
    labelled = max(sum(int((micro.labels[:, 1:] != -100).sum()) for micro in micro_batches), 1)
    mine = micro_batches[ranks.rank :: ranks.world]
    step_loss = 0.0
    for index, micro in enumerate(mine):
        last = index == len(mine) - 1
        with contextlib.ExitStack() as scope:
            if ranks.world > 1 and not last:
                scope.enter_context(no_sync(model))
            with mixed.autocast():
                losses, _ = labelled_token_losses(
                    model, micro.input_ids.to(device), micro.attention_mask.to(device), micro.labels.to(device),
                    **{name: value.to(device) for name, value in micro.extra.items()},
                )  # fmt: skip
            loss = losses.float().sum() / labelled
            (mixed.scaler.scale(loss * ranks.world) if mixed.scaler else loss * ranks.world).backward()
        step_loss += loss.item()
    return all_sum([step_loss], ranks)[0] if ranks.world > 1 else step_loss


class Mixed(NamedTuple):
    """How the forward runs in a precision: an autocast context factory and fp16's gradient scaler."""

    autocast: Callable[[], contextlib.AbstractContextManager[Any]]
    scaler: Any  # torch.amp.GradScaler for fp16, else None


def mixed_precision(precision: str, device: str) -> Mixed:
    """The autocast (bf16/fp16 on the device; nothing for fp32) and, for fp16, a gradient scaler."""
    import torch

    from loraforge.tasks.models import autocast

    scaler = torch.amp.GradScaler(device.split(":")[0]) if precision == "fp16" else None
    return Mixed(lambda: autocast(precision, device), scaler)


def compute_dtype(config: TrainConfig, precision: str) -> str:
    """The dtype QLoRA's 4-bit layers compute in: train.compute_dtype, or (auto) the training precision's."""
    if config.compute_dtype != "auto":
        return config.compute_dtype
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision]


def _scheduler(optimizer: Any, config: TrainConfig, total_steps: int) -> Any:
    from transformers import get_scheduler

    name = "constant_with_warmup" if config.scheduler == "constant" else config.scheduler
    return get_scheduler(
        name, optimizer, num_warmup_steps=round(config.warmup_ratio * total_steps), num_training_steps=total_steps
    )


def _peak_rss_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def _cuda_peak_mb() -> int:
    import torch

    return int(torch.cuda.max_memory_allocated() // 2**20)


def _resolve_device(config: TrainConfig, cuda_available: bool) -> str:
    """cpu or cuda, checked before anything loads: a request that cannot run here stops the stage."""
    device = ("cuda" if cuda_available else "cpu") if config.device == "auto" else config.device
    if device == "cuda" and not cuda_available:
        raise StageError("train.device=cuda but torch sees no CUDA device here; set train.device=auto or cpu.")
    if config.optimizer.startswith("paged") and device != "cuda":
        raise StageError(
            f"train.optimizer={config.optimizer} pages optimizer states between GPU and CPU memory and needs "
            f"CUDA (training on {device} here); use train.optimizer=adamw_8bit or adamw on CPU."
        )
    return device


def _optimizer(groups: list[dict[str, Any]], config: TrainConfig) -> Any:
    """AdamW from torch, or bitsandbytes' 8-bit / paged AdamW (the same hyper-parameters)."""
    import torch

    settings: dict[str, Any] = {"lr": config.learning_rate, "weight_decay": config.weight_decay}
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, **settings)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise StageError(
            f"train.optimizer={config.optimizer} needs bitsandbytes, which is not installed; "
            "install it (pip install bitsandbytes) or set train.optimizer=adamw."
        ) from None
    kind = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW32bit,
            "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[config.optimizer]  # fmt: skip
    return kind(groups, **settings)


def _plot_curve(history: list[dict[str, Any]], val: tuple[float, float], target: Path, title: str) -> None:
    """loss_curve.png: training loss and validation loss (before training at step 0, during training with
    eval_every, and of the kept weights at the end) by step, learning rate on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    figure, loss_axis = plt.subplots(figsize=(7, 4), dpi=100)
    loss_axis.plot(steps, [h["loss"] for h in history], ".-", label="train loss", color="tab:blue")
    evals = [(0, val[0])] + [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    if evals[-1][0] != steps[-1]:
        evals.append((steps[-1], val[1]))
    loss_axis.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="validation loss", color="tab:orange")
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("loss")
    lr_axis = loss_axis.twinx()
    lr_axis.plot(steps, [h["lr"] for h in history], ".--", color="tab:gray", label="learning rate")
    lr_axis.set_ylabel("learning rate")
    handles = loss_axis.get_legend_handles_labels()[0] + lr_axis.get_legend_handles_labels()[0]
    loss_axis.legend(handles=handles, loc="upper right")
    loss_axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(target, metadata={"Software": None})
    plt.close(figure)
