"""Train stage: fit a LoRA or QLoRA adapter on the data artifact with a lean, seeded PyTorch loop.

LoRA variants (peft): rank, alpha, dropout, target modules by name or preset (attention, attention+mlp,
all-linear; checked against the model's real linear layers), DoRA, rsLoRA, init, bias, modules_to_save and
LoRA+ (a larger learning rate for the B matrices). QLoRA: the base is loaded through bitsandbytes in 4-bit
(NF4/FP4, optional double quantization, a compute dtype) or 8-bit; if that cannot run here the stage stops,
it never trains in full precision instead.

The loop pads each batch only to its longest row and groups rows of similar length, so little compute goes to
padding; loss is computed only where labels are set (the completion, unless data.train_on_prompt).
Run alone: `loraforge stage train CONFIG [key=value ...]`.
"""

from __future__ import annotations

import json
import math
import random
import resource
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.artifacts import Artifact, ArtifactStore
from tasks.batching import collate, mean_loss, read_split
from tasks.errors import StageError

LENGTH_GROUP_BATCHES = 16  # rows are sorted by length inside windows of this many batches
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
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the 4-bit layers compute in (bfloat16 on recent GPUs, float32 on CPU)."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (less memory).")
    learning_rate: float = Field(1e-3, gt=0, le=1, description="Peak learning rate (AdamW).")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps with linear warmup.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training split (ignored if max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Rows per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    group_by_length: bool = Field(True, description="Batch rows of similar length together (less padding).")
    seed: int = Field(42, description="Seed for adapter init, dropout and data order.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice).")
    log_every: int = Field(5, ge=1, description="Record metrics every N optimizer steps.")


def train_adapter(config: TrainConfig, base: Artifact, data: Artifact, store: ArtifactStore) -> Artifact:
    """Train a LoRA adapter; skipped when the same artifact exists.

    Args:
        config: the train section of the pipeline config.
        base: the base-model artifact.
        data: the data artifact (train and validation splits).
        store: where artifacts live.

    Returns:
        The train artifact: `adapter/` (peft safetensors + adapter_config.json) and `history.jsonl`.
    """
    inputs = {"base": base, "data": data}
    key, code = store.stage_key("train", __file__, config, inputs)
    if (hit := store.find("train", key)) is not None:
        return hit

    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm

    from tasks.models import load_base_as_trained, load_tokenizer

    if config.threads:
        torch.set_num_threads(config.threads)
    _seed_everything(config.seed)
    model_path = Path(base.manifest["model_path"])
    tokenizer = load_tokenizer(model_path)
    model: Any = load_base_as_trained(model_path, config.model_dump())
    targets = resolve_target_modules(model, config.target_modules)
    if config.quantization != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(
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
    model = get_peft_model(model, lora)
    trainable, total = model.get_nb_trainable_parameters()
    variant = "+".join(
        [{"none": "LoRA", "4bit": f"QLoRA {config.quant_type}", "8bit": "QLoRA int8"}[config.quantization]]
        + ["DoRA"] * config.use_dora + ["rsLoRA"] * config.use_rslora + ["LoRA+"] * bool(config.loraplus_lr_ratio)
    )  # fmt: skip
    print(
        f"[train] {variant} r={config.r} on {', '.join(targets)}: "
        f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)"
    )

    train_rows = read_split(data.file("train.jsonl"))
    val_rows = read_split(data.file("validation.jsonl"))
    steps_per_epoch = math.ceil(len(train_rows) / (config.batch_size * config.grad_accum))
    total_steps = config.max_steps or max(1, math.ceil(steps_per_epoch * config.epochs))
    optimizer = torch.optim.AdamW(
        _param_groups(model, config), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = _scheduler(optimizer, config, total_steps)
    pad_id = tokenizer.pad_token_id

    val_loss_before = mean_loss(model, val_rows, config.batch_size, pad_id)
    history: list[dict[str, Any]] = []
    model.train()
    generator = random.Random(config.seed)
    batches = _batches(train_rows, config, generator)
    tokens_seen = 0
    started = time.perf_counter()
    progress = tqdm(range(1, total_steps + 1), desc="train", unit="step", dynamic_ncols=True)
    for step in progress:
        step_loss = 0.0
        for _ in range(config.grad_accum):
            batch = next(batches)
            input_ids, labels, mask = collate(batch, pad_id)
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss / config.grad_accum
            loss.backward()
            step_loss += loss.item()
            tokens_seen += int(mask.sum())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm))
        if not math.isfinite(step_loss) or not math.isfinite(grad_norm):
            raise StageError(
                f"training diverged at step {step} (loss {step_loss}, grad norm {grad_norm}); "
                "lower train.learning_rate or raise train.warmup_ratio."
            )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        progress.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens_seen / elapsed:.0f}")
        if step % config.log_every == 0 or step == total_steps:
            history.append({
                "step": step, "loss": round(step_loss, 5), "lr": scheduler.get_last_lr()[0],
                "grad_norm": round(grad_norm, 5), "tokens": tokens_seen,
                "tokens_per_s": round(tokens_seen / elapsed, 1), "rss_mb": _peak_rss_mb(),
            })  # fmt: skip
    progress.close()
    train_seconds = time.perf_counter() - started
    val_loss_after = mean_loss(model, val_rows, config.batch_size, pad_id)
    print(f"[train] validation loss {val_loss_before:.4f} -> {val_loss_after:.4f} in {train_seconds:.0f} s")

    with store.create("train", key, config, inputs, code) as draft:
        model.save_pretrained(draft.path / "adapter", safe_serialization=True)
        draft.extra["target_modules"] = targets
        # Record the base by its public name, not this machine's path, so the adapter folder is portable
        # (patched after saving: peft would otherwise try to reach the Hub to inspect that name).
        adapter_config = draft.path / "adapter" / "adapter_config.json"
        settings = json.loads(adapter_config.read_text())
        settings["base_model_name_or_path"] = base.manifest.get("hub_id") or base.manifest["base_model"]
        adapter_config.write_text(json.dumps(settings, indent=2, sort_keys=True))
        with (draft.path / "history.jsonl").open("w") as out:
            out.writelines(json.dumps(h) + "\n" for h in history)
        draft.metrics.update({
            "trainable_params": trainable, "total_params": total, "steps": total_steps,
            "train_loss": history[-1]["loss"], "val_loss_before": round(val_loss_before, 5),
            "val_loss": round(val_loss_after, 5), "tokens": tokens_seen,
            "tokens_per_s": round(tokens_seen / train_seconds, 1), "train_seconds": round(train_seconds, 1),
            "peak_rss_mb": _peak_rss_mb(),
        })  # fmt: skip
    return store.get("train", key, fresh=True)


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


def _linear_layers(model: Any) -> list[str]:
    import torch

    kinds: tuple[type, ...] = (torch.nn.Linear,)
    try:
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


def _batches(rows: list[dict[str, Any]], config: TrainConfig, rng: random.Random) -> Any:
    """Endless iterator of batches: shuffled each epoch, length-grouped within windows if configured."""
    while True:
        order = list(range(len(rows)))
        rng.shuffle(order)
        if config.group_by_length:
            window = config.batch_size * LENGTH_GROUP_BATCHES
            order = [
                i
                for start in range(0, len(order), window)
                for i in sorted(order[start : start + window], key=lambda i: -len(rows[i]["input_ids"]))
            ]
        batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        if config.group_by_length:
            rng.shuffle(batches)  # keep grouped batches but not in length order
        for batch in batches:
            yield [rows[i] for i in batch]


def _scheduler(optimizer: Any, config: TrainConfig, total_steps: int) -> Any:
    from transformers import get_scheduler

    name = "constant_with_warmup" if config.scheduler == "constant" else config.scheduler
    return get_scheduler(
        name, optimizer, num_warmup_steps=round(config.warmup_ratio * total_steps), num_training_steps=total_steps
    )


def _peak_rss_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
