"""Plan a fine-tuning run before running it: adapter parameters, adapter file size and peak memory.

`loraforge plan CONFIG [key=value ...]` reads the same config as `loraforge run`. Nothing is trained and no
weights are read: the model is built on the meta device (shapes only) from the base model's config.json, the
train stage's LoRA config is applied to it with peft itself, so the counts are peft's own
(`get_nb_trainable_parameters`), and the adapter file size is computed from the exact safetensors layout of
`get_peft_model_state_dict`.

Peak memory is estimated for five ways of training the same model at the same batch and sequence length:
LoRA (the configured targets and rank on the fp32 base), LoRA on a bf16/fp16 base (`train.precision`: the base
weights in 2 bytes; LoRA weights, their states and gradients stay fp32; activations are counted as fp32, an upper
bound: autocast keeps the matmul outputs in 16 bits but the residual stream and norms in fp32), QLoRA 4-bit,
QLoRA 8-bit and full fine-tuning.
Two figures per mode:

* **CPU: the process's peak RSS** (what `resource.getrusage().ru_maxrss` reports and the train stage records
  as `peak_rss_mb`), the sum of

  - `PROCESS_OVERHEAD_MB`: python + torch + transformers + peft + the tokenizer, measured (see below);
  - weights: parameters x bytes of their dtype. fp32 = 4 B. 4-bit (bitsandbytes NF4/FP4): 0.5 B per weight
    of a quantized linear layer + its block constants (blocks of 64: one fp32 absmax = 4/64 B per weight; with
    double quantization an int8 absmax + an fp32 constant per 256 blocks = 1/64 + 4/16384 B per weight).
    8-bit (LLM.int8): 1 B per weight + one fp32 scale per output row. Everything not quantized (embeddings,
    norms, the output head) stays fp32. The fp32 safetensors file is memory-mapped, so its pages count in RSS
    once touched; a quantized load reads the whole file, but the loader then copies the tensors that still
    point into it (tasks.models.release_weight_files) and the mapping closes: no file pages stay resident;
  - AdamW state: 8 B (exp_avg, exp_avg_sq) per trainable parameter; gradients, 4 B per trainable parameter,
    count only if larger than the activations: the loop zeroes them with set_to_none, so none exist when
    backward starts (the peak), and backward creates them while it frees the activations;
  - activations kept for backward, fp32, per token (T = batch x seq tokens) and layer, for a Llama-style
    decoder (hidden h, intermediate i, heads n, layers L): see `activation_floats_per_token_layer`; without
    gradient checkpointing all L layers are kept; with it only each layer's input (h) plus one layer
    recomputed in backward;
  - logits: the loss keeps log-softmax over the vocabulary V, and backward holds its gradient and the
    logits' gradient at the same time: `LOGIT_COPIES` x K x V x 4 B, K the positions the output head runs on.
    The train stage runs the head only on positions that predict a labelled token (the completion, unless
    data.train_on_prompt): K = batch x the batch's union of such positions, at most batch x seq_len, which is
    what is assumed without the data; `--from-data` replays the train stage's batches and takes the largest
    union. Full fine-tuning is planned as a plain loop with the head on every position (K = T);
  - `ALLOCATOR_FACTOR`: glibc's allocator keeps freed blocks and fragments, so RSS runs above the live bytes
    of the activation terms; the factor is measured (the ratio of RSS growth to the counted bytes).

* **CUDA: bytes allocated by torch** (`torch.cuda.max_memory_allocated`), the same terms without the process
  overhead and the allocator factor, with weights in the same dtypes; add the CUDA context (~0.5 GB per
  process, not counted by torch) for `nvidia-smi`. Not checked against a GPU run yet (no GPU in the session
  that wrote this).

The constants below were measured on this project's machine (torch 2.13 CPU, transformers 5.23, peft 0.21,
bitsandbytes 0.50) with `bench/plan_accuracy.py`; docs/plan.md has the table of estimate vs measured.
Sequence packing (data/train packing) fills every row to the maximum length: plan with that length.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loraforge.tasks.config import PipelineConfig

MB = 1024 * 1024
# Peak RSS of a fresh process after importing torch, transformers, peft and the loraforge stages and loading
# the tokenizer (SmolLM2's): 467 MB measured (`python -c "import ...; load_tokenizer(...)"`, ru_maxrss).
PROCESS_OVERHEAD_MB = 467
# At the start of backward: the log-softmax output kept by the loss, its gradient and the logits' gradient.
LOGIT_COPIES = 3
# RSS growth / counted activation+logit bytes: 1.30 (SmolLM2 LoRA q,v) and 1.44 (all-linear), batch 8 x 74,
# train stage in its own process (bench/plan_accuracy.py); glibc keeps freed blocks and fragments.
ALLOCATOR_FACTOR = 1.37
# Copies of one micro-batch's logits each check holds at its peak (tasks/merge.py, tasks/quantize.py,
# tasks/batching.py): eval's loss pass keeps the logits and cross_entropy's log-softmax; the merge check the
# model's logits, the adapter model's read back and two log-softmax temporaries (tests/unit/test_merge_memory.py
# measures 4); a GGUF check llama.cpp's scores copied out, their log-softmax, the merged model's read back and the
# three temporaries of the KL.
EVAL_LOGIT_COPIES = 2
MERGE_LOGIT_COPIES = 4
GGUF_ROW_COPIES = 6
MODES = ("lora", "lora-bf16", "qlora-4bit", "qlora-8bit", "full")
STAGES = ("train", "eval", "merge", "quantize")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SAFETENSORS_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


@dataclass(frozen=True)
class Architecture:
    """The shape of a decoder-only transformer, read from its config.json."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool


@dataclass
class MemoryEstimate:
    """Peak memory of one way of training: the terms (MB) and their totals."""

    mode: str
    components_mb: dict[str, float]
    peak_rss_mb: float
    cuda_mb: float
    trainable_params: int


@dataclass
class StageMemory:
    """Peak memory of one stage's process (CPU peak RSS): the terms (MB), their total, and the scratch disk it
    fills meanwhile (MB; files that stand in for logits it would otherwise hold in memory)."""

    stage: str
    components_mb: dict[str, float]
    peak_rss_mb: float
    scratch_disk_mb: float = 0.0


@dataclass
class Plan:
    """What `loraforge plan` prints and returns."""

    base_model: str
    architecture: Architecture
    total_params: int
    target_modules: list[str]
    params_per_module: dict[str, int]
    trainable_params: int
    peft_total_params: int
    adapter_file_bytes: int
    batch_size: int
    seq_len: int
    seq_len_source: str
    gradient_checkpointing: bool
    logit_positions: int = 0  # per row: positions the output head runs on in the train stage (0: all seq_len)
    memory: dict[str, MemoryEstimate] = field(default_factory=dict)
    configured_mode: str = "lora"
    stages: dict[str, StageMemory] = field(default_factory=dict)  # peak of each stage, train = configured mode

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every figure."""
        return asdict(self)


def plan_training(
    config: PipelineConfig,
    seq_len: int | None = None,
    seq_len_source: str | None = None,
    logit_positions: int | None = None,
) -> Plan:
    """Count the adapter and estimate peak memory for the configured model, LoRA config, batch and length.

    Args:
        config: the pipeline config (base_model, data.max_length, train.*).
        seq_len: tokens per row to plan for; default data.max_length (the longest a batch can be).
        seq_len_source: where seq_len came from, for the printout.
        logit_positions: positions per row the output head runs on in the train stage (`data_logit_positions`);
            default every position (seq_len), the bound.

    Returns:
        The plan: per-module parameter counts, the adapter file size and a MemoryEstimate per mode.

    Raises:
        StageError: the base model cannot be resolved, a target module is not in the model, or the model is not
            a decoder this memory model covers.
    """
    from loraforge.tasks.models import resolve_base_model

    train = config.train
    folder = resolve_base_model(config.base_model)
    arch = read_architecture(folder)
    meta = _build_meta(folder, config)
    trainable, peft_total = meta.model.get_nb_trainable_parameters()
    per_module = _params_per_module(meta.model, meta.targets, list(train.modules_to_save))
    if sum(per_module.values()) != trainable:  # every trainable tensor must land in one group
        raise AssertionError(f"plan: grouped {per_module} but peft counts {trainable} trainable parameters")
    plan = Plan(
        base_model=config.base_model,
        architecture=arch,
        total_params=meta.base_params,
        target_modules=meta.targets,
        params_per_module=per_module,
        trainable_params=trainable,
        peft_total_params=peft_total,
        adapter_file_bytes=adapter_file_bytes(meta.model),
        batch_size=train.batch_size,
        seq_len=seq_len or config.data.max_length,
        seq_len_source=seq_len_source or ("given" if seq_len else "data.max_length"),
        gradient_checkpointing=train.gradient_checkpointing,
        logit_positions=min(logit_positions or seq_len or config.data.max_length, seq_len or config.data.max_length),
        configured_mode=_configured_mode(train.quantization, train.precision),
    )
    for mode in MODES:
        plan.memory[mode] = estimate_memory(plan, mode, meta, config)
    plan.stages = estimate_stages(plan, config)
    return plan


def _configured_mode(quantization: str, precision: str) -> str:
    if quantization != "none":
        return {"4bit": "qlora-4bit", "8bit": "qlora-8bit"}[quantization]
    return "lora-bf16" if precision in ("bf16", "fp16") else "lora"  # auto: fp32 on CPU, bf16 on a recent GPU


@dataclass
class _Meta:
    """The base model built on the meta device with the LoRA config applied, and what was read before."""

    model: Any
    targets: list[str]
    base_params: int
    linear: list[tuple[str, int, int]]  # (name, in_features, out_features) of every linear layer but the head
    embedding_params: int


def _build_meta(folder: Path, config: PipelineConfig) -> _Meta:
    """Build the model with no weights (meta device) and wrap it with peft exactly as the train stage does."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from loraforge.tasks.errors import StageError
    from loraforge.tasks.models import import_peft
    from loraforge.tasks.train import lora_config, resolve_target_modules

    get_peft_model = import_peft().get_peft_model

    train = config.train
    with init_empty_weights():
        model: Any = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    model.tie_weights()  # a tied head shares the embedding matrix, as it does once weights are loaded
    head = model.get_output_embeddings()
    base_params = sum(p.numel() for p in model.parameters())
    linear = [
        (name, m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not head
    ]
    embedding_params = model.get_input_embeddings().weight.numel()
    targets = resolve_target_modules(model, train.target_modules)
    lora = lora_config(train, targets)  # the train stage's own (the integration test checks counts vs a real run)
    try:
        peft_model = get_peft_model(model, lora)
    except (ValueError, KeyError) as exc:
        raise StageError(f"train: peft cannot apply this LoRA config to {folder.name}: {exc}") from None
    return _Meta(peft_model, targets, base_params, linear, embedding_params)


def read_architecture(folder: Path) -> Architecture:
    """The decoder's shape from config.json (a `text_config` section when the model nests one).

    Raises:
        StageError: a field the memory model needs is missing (not a Llama-style decoder).
    """
    from loraforge.tasks.errors import StageError

    raw = json.loads((folder / "config.json").read_text())
    cfg = raw.get("text_config") or raw
    needed = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in needed if not isinstance(cfg.get(k), int)]
    if missing:
        raise StageError(
            f"plan: {folder / 'config.json'} has no {', '.join(missing)}; the memory model covers Llama-style "
            f"decoders (Llama, Mistral, Qwen2, SmolLM), not model_type {cfg.get('model_type')!r}."
        )
    heads = cfg["num_attention_heads"]
    return Architecture(
        model_type=str(cfg.get("model_type")),
        layers=cfg["num_hidden_layers"],
        hidden=cfg["hidden_size"],
        intermediate=cfg["intermediate_size"],
        heads=heads,
        kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        vocab=cfg["vocab_size"],
        tied_embeddings=bool(raw.get("tie_word_embeddings", cfg.get("tie_word_embeddings", True))),
    )


def _is_lora_param(name: str) -> bool:
    return any(part in name for part in (".lora_A.", ".lora_B.", ".lora_magnitude_vector.", ".lora_embedding_"))


def _params_per_module(model: Any, targets: list[str], modules_to_save: list[str]) -> dict[str, int]:
    """Trainable parameters grouped by target module name (q_proj, ...), modules_to_save and biases."""
    counts: dict[str, int] = {name: 0 for name in targets}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = next((t for t in targets if f".{t}.lora_" in name), None)
        if group is None:
            group = next((f"{m} (modules_to_save)" for m in modules_to_save if f".{m}.modules_to_save." in name), None)
        if group is None:
            group = "bias" if name.endswith("bias") else name
        counts[group] = counts.get(group, 0) + param.numel()
    return counts


def adapter_file_bytes(model: Any) -> int:
    """Size of the adapter_model.safetensors that `model.save_pretrained` writes for this peft model."""
    from loraforge.tasks.models import import_peft

    get_peft_model_state_dict = import_peft().get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return safetensors_bytes({name: (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for name, t in state.items()})


def safetensors_bytes(tensors: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> int:
    """Exact size of a safetensors file: 8-byte header length, JSON header padded to 8 bytes, raw data.

    Tensors are laid out by dtype (wider first) then name, as the safetensors library writes them; the
    header is compact JSON with `__metadata__` (peft writes {"format": "pt"}).
    """
    header: dict[str, Any] = {"__metadata__": metadata if metadata is not None else {"format": "pt"}}
    offset = 0
    for name in sorted(tensors, key=lambda n: (-DTYPE_BYTES[tensors[n][0]], n)):
        dtype, shape = tensors[name]
        size = math.prod(shape) * DTYPE_BYTES[dtype]
        header[name] = {
            "dtype": SAFETENSORS_DTYPE[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + text + (-text) % 8 + offset


def activation_floats_per_token_layer(
    arch: Architecture, lora_inputs: float, lora_modules: float, r: int, dropout: float, device: str = "cpu"
) -> float:
    """fp32 values autograd keeps per token in one decoder layer until backward (Llama-style block).

    Counted from what each op saves (torch 2.13, transformers' sdpa path, flash attention):

    - residual stream after attention and after the MLP: 2h;
    - two RMSNorms, each keeps x * rsqrt(var) and its output (the projections' input): 4h;
    - attention: q and k after RoPE, v (k and v repeated to all heads when a padding mask is given, which
      makes sdpa repeat them: h each), the attention output and its transposed copy (o_proj's input): 5h,
      plus one log-sum-exp value per head: n (flash attention keeps no seq x seq matrix);
    - SwiGLU MLP: gate, up, silu(gate) and their product (down_proj's input): 4i;
    - LoRA, per adapted layer: dropout keeps its output (the layer's input size) and its mask; on CPU torch's
      unfused dropout multiplies by a float noise tensor (4 B per value), on CUDA the fused kernel keeps a
      1-byte mask: 2 x in_features (CPU) or 1.25 x in_features (CUDA) when dropout > 0, nothing when it
      is 0; plus the rank-r output of A: r.

    Args:
        arch: the model's shape.
        lora_inputs: summed in_features of the adapted layers in one layer (0 for full fine-tuning).
        lora_modules: how many layers are adapted per decoder layer.
        r: LoRA rank.
        dropout: LoRA dropout (0 means no dropout copy).
        device: "cpu" or "cuda" (the dropout mask differs).
    """
    h, i = arch.hidden, arch.intermediate
    base = 2 * h + 4 * h + 5 * h + arch.heads + 4 * i
    per_input = (2.0 if device == "cpu" else 1.25) if dropout > 0 else 0.0
    return base + per_input * lora_inputs + lora_modules * r


def estimate_memory(plan: Plan, mode: str, meta: _Meta, config: PipelineConfig) -> MemoryEstimate:
    """Peak RSS (CPU) and torch-allocated bytes (CUDA) for one mode; the formulas are in the module docstring."""
    arch, train = plan.architecture, config.train
    tokens = plan.batch_size * plan.seq_len
    fp32 = 4
    linear_params = sum(i * o for _, i, o in meta.linear)
    other_params = plan.total_params - linear_params  # embeddings (and a tied head), norms, biases
    adapter = {n for n in meta.targets}
    adapted = [(i, o) for name, i, o in meta.linear if name.rsplit(".", 1)[-1] in adapter]
    if mode == "full":
        trainable = plan.total_params
        lora_inputs = lora_modules = 0.0
    else:
        trainable = plan.trainable_params
        lora_inputs = sum(i for i, _ in adapted) / arch.layers
        lora_modules = len(adapted) / arch.layers

    if mode == "qlora-4bit":
        constants = (1 / 64 + 4 / (64 * 256)) if train.double_quant else 4 / 64
        weights = linear_params * (0.5 + constants) + other_params * fp32
    elif mode == "qlora-8bit":
        weights = linear_params * 1 + sum(o for _, _, o in meta.linear) * fp32 + other_params * fp32
    elif mode == "lora-bf16":  # train.precision=bf16 or fp16: every base weight in 2 bytes
        weights = plan.total_params * 2
    else:
        weights = plan.total_params * fp32
    # LoRA matrices and modules_to_save copies live beside the base weights; in full FT the weights are trained.
    adapter_weights = 0 if mode == "full" else trainable * fp32
    grads = trainable * fp32
    adamw = trainable * 2 * fp32  # exp_avg and exp_avg_sq, allocated at the first optimizer step

    def activation_bytes(device: str) -> float:
        per_layer = activation_floats_per_token_layer(arch, lora_inputs, lora_modules, train.r, train.dropout, device)
        # with gradient checkpointing only each layer's input is kept; backward recomputes one layer at a time
        checkpointed = arch.layers * arch.hidden + per_layer
        layer_floats = checkpointed if plan.gradient_checkpointing else arch.layers * per_layer
        return tokens * (layer_floats + 3 * arch.hidden) * fp32  # + the embedding output and the final norm

    activations = activation_bytes("cpu")
    head_positions = tokens if mode == "full" else plan.batch_size * (plan.logit_positions or plan.seq_len)
    logits = LOGIT_COPIES * head_positions * arch.vocab * fp32

    components = {
        "process_overhead": float(PROCESS_OVERHEAD_MB),
        "weights": weights / MB,
        "adapter_weights": adapter_weights / MB,
        "adamw_states": adamw / MB,
        "grads": grads / MB,
        "activations": activations / MB,
        "logits": logits / MB,
    }
    steady = components["weights"] + components["adapter_weights"] + components["adamw_states"]
    # Gradients do not add to the activations: the loop zeroes them with set_to_none, so none exist when backward
    # starts (the peak), and backward creates them while it frees the activations (the allocator reuses the
    # space). Measured on full fine-tuning, where the gradients are large (docs/plan.md).
    in_backward = max(ALLOCATOR_FACTOR * (components["activations"] + components["logits"]), components["grads"])
    peak_rss = components["process_overhead"] + steady + in_backward
    cuda = steady + max((activation_bytes("cuda") + logits) / MB, components["grads"])
    return MemoryEstimate(
        mode=mode,
        components_mb={k: round(v, 1) for k, v in components.items()},
        peak_rss_mb=round(peak_rss, 1),
        cuda_mb=round(cuda, 1),
        trainable_params=trainable,
    )


def estimate_stages(plan: Plan, config: PipelineConfig) -> dict[str, StageMemory]:
    """Peak RSS of each stage's process: train (the configured mode, `estimate_memory`), eval, merge and the
    quantize stage's checks. The checks hold the weights and a few copies of one micro-batch's logits, never the
    logits of all their rows (those wait on disk: `scratch_disk_mb`). Rows are planned at `plan.seq_len`
    tokens (the probe rows are padded to the longest of them, at most data.max_length).

    - eval: weights as trained (the 4/8-bit base for QLoRA) + adapter, and the loss pass over eval.batch_size
      rows: EVAL_LOGIT_COPIES x batch x head positions x V x 4 B (the head runs on labelled positions only, as in
      training). Generation keeps the last position's logits only.
    - merge: fp32 weights (+ the quantized model as trained, loaded beside them for a QLoRA adapter) + adapter,
      and MERGE_LOGIT_COPIES x merge.probe_batch_size x seq x V x 4 B; the adapter model's logits of all
      merge.probe_rows wait on disk.
    - quantize (the checks in this process; the converter and llama.cpp's tools run in their own): the larger of
      the merged model in fp32 scoring one fidelity row (logits and log-softmax: 2 x seq x V x 4 B), and a GGUF
      (the f16 file, the largest checked) with llama-cpp-python's score buffers (logits_all: n_ctx x V x 4 B, and
      llama.cpp's own as large) and one fidelity row's comparison (GGUF_ROW_COPIES x seq x V x 4 B). The merged
      model's log-probs of all quantize.fidelity_rows wait on disk.
    """
    arch, fp32 = plan.architecture, 4
    row = plan.seq_len * arch.vocab * fp32 / MB  # one row's logits
    heads = plan.logit_positions or plan.seq_len
    trained = plan.memory[plan.configured_mode].components_mb
    full = plan.memory["lora"].components_mb  # fp32 weights
    overhead = {"process_overhead": float(PROCESS_OVERHEAD_MB)}
    adapter = {"adapter_weights": trained["adapter_weights"]}
    n_ctx = config.data.max_length + config.quantize.max_new_tokens
    parts = {
        "eval": {**overhead, "weights": trained["weights"], **adapter,
                 "logits": EVAL_LOGIT_COPIES * config.eval.batch_size * heads * arch.vocab * fp32 / MB},
        "merge": {**overhead, "weights": full["weights"], **adapter,
                  "as_trained_weights": trained["weights"] if plan.configured_mode != "lora" else 0.0,
                  "logits": MERGE_LOGIT_COPIES * min(config.merge.probe_batch_size, config.merge.probe_rows) * row},
    }  # fmt: skip
    scoring = {"weights": full["weights"], "logits": 2 * row}  # the merged HF model on one fidelity row
    checking = {"gguf_weights": full["weights"] / 2, "llama_cpp_scores": 2 * n_ctx * arch.vocab * fp32 / MB,
                "logits": GGUF_ROW_COPIES * row}  # fmt: skip  # a GGUF file checked on one fidelity row
    parts["quantize"] = {**overhead, **(scoring if sum(scoring.values()) > sum(checking.values()) else checking)}
    disk = {"merge": config.merge.probe_rows * row, "quantize": config.quantize.fidelity_rows * row}
    stages = {"train": StageMemory("train", trained, plan.memory[plan.configured_mode].peak_rss_mb)}
    for stage, terms in parts.items():
        stages[stage] = StageMemory(stage, {k: round(v, 1) for k, v in terms.items()}, round(sum(terms.values()), 1),
                                    round(disk.get(stage, 0.0), 1))  # fmt: skip
    return stages


def run_measuring_peak_rss(
    command: list[str], env: dict[str, str] | None = None, echo: Callable[[str], Any] | None = None
) -> tuple[int, float, str]:
    """Run a command in a fresh child process; return its exit code, its own peak RSS (MB) and its output.

    The peak is the child's VmHWM (/proc/PID/status), polled every 50 ms while it runs: the high-water mark
    of the child's own address space, which starts empty at exec. Not ru_maxrss: Linux carries the spawning
    process's RSS high-water into the child's ru_maxrss at exec (fork and vfork alike), so a child started
    from a 1.4 GB parent reports at least 1.4 GB however little it uses itself (seen in a sweep whose parent
    had evaluated a model). Where /proc is missing, wait4's ru_maxrss of that one child is the fallback.

    Args:
        command: the argv to run.
        env: its environment (default: this one's).
        echo: called with each output line as it arrives (e.g. print), besides collecting it.
    """
    import os
    import subprocess
    import threading

    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    peak_kib = [0]
    done = threading.Event()

    def poll() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        while not done.is_set():
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak_kib[0] = max(peak_kib[0], int(line.split()[1]))
            except (OSError, ValueError):
                pass
            done.wait(0.05)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if echo is not None:
            echo(line.rstrip("\n"))
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    watcher.join()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; tell Popen so it does not wait again
    return proc.returncode, (peak_kib[0] or usage.ru_maxrss) / 1024, "".join(lines)


def format_plan(plan: Plan) -> str:
    """The plan as the text `loraforge plan` prints."""
    arch = plan.architecture
    lines = [
        f"base model {plan.base_model}: {arch.model_type}, {arch.layers} layers, hidden {arch.hidden}, "
        f"intermediate {arch.intermediate}, {arch.heads} heads ({arch.kv_heads} kv), vocab {arch.vocab}; "
        f"{plan.total_params:,} parameters",
        "",
        "adapter parameters (peft get_nb_trainable_parameters):",
    ]
    width = max(len(name) for name in plan.params_per_module) + 2
    for name, count in plan.params_per_module.items():
        lines.append(f"  {name:<{width}}{count:>14,}")
    share = 100 * plan.trainable_params / plan.peft_total_params
    lines += [
        f"  {'total':<{width}}{plan.trainable_params:>14,}  ({share:.2f}% of {plan.peft_total_params:,})",
        f"adapter file: adapter_model.safetensors {plan.adapter_file_bytes:,} bytes "
        f"({plan.adapter_file_bytes / MB:.2f} MiB)",
        "",
        f"peak memory for batch {plan.batch_size} x {plan.seq_len} tokens ({plan.seq_len_source})"
        f"{', gradient checkpointing' if plan.gradient_checkpointing else ''}; output head on "
        f"{plan.logit_positions} positions per row (adapters; full fine-tuning: all {plan.seq_len}):",
        f"  {'mode':<12}{'trainable':>14}{'CPU peak RSS':>14}{'CUDA alloc':>12}   terms (MiB)",
    ]
    for mode, est in plan.memory.items():
        mark = " *" if mode == plan.configured_mode else ""
        terms = ", ".join(f"{k} {v:.0f}" for k, v in est.components_mb.items() if v)
        lines.append(
            f"  {mode + mark:<12}{est.trainable_params:>14,}{est.peak_rss_mb / 1024:>10.2f} GiB"
            f"{est.cuda_mb / 1024:>8.2f} GiB   {terms}"
        )
    lines.append("  * the configured mode. CPU: process peak RSS; CUDA: torch-allocated bytes (+~0.5 GB context).")
    lines += [
        "",
        f"peak memory per stage (CPU peak RSS; train in the configured mode; checks at {plan.seq_len} tokens a row,"
        " one micro-batch of logits at a time):",
        f"  {'stage':<12}{'CPU peak RSS':>14}{'scratch disk':>14}   terms (MiB)",
    ]
    for stage, mem in plan.stages.items():
        terms = ", ".join(f"{k} {v:.0f}" for k, v in mem.components_mb.items() if v) if stage != "train" else "above"
        disk = f"{mem.scratch_disk_mb / 1024:>10.2f} GiB" if mem.scratch_disk_mb else f"{'-':>14}"
        lines.append(f"  {stage:<12}{mem.peak_rss_mb / 1024:>10.2f} GiB{disk}   {terms}")
    if plan.gradient_checkpointing:
        lines.append(
            "  with gradient checkpointing the CPU figure reads low (SmolLM2-135M all-linear: 20% under the measured"
            " peak at micro-batch 4, 39% at 8, docs/plan.md): take it as a lower bound."
        )
    return "\n".join(lines)


def data_seq_len(config: PipelineConfig) -> tuple[int, str]:
    """The longest train row of the config's data artifact (the widest batch the train stage will pad to).

    Runs the base and data stages (cache hits when the pipeline ran before with this data config).
    """
    from loraforge.tasks.artifacts import ArtifactStore
    from loraforge.tasks.batching import read_split
    from loraforge.tasks.data import prepare_data
    from loraforge.tasks.models import provision_base

    store = ArtifactStore(config.store, config.store_verify)
    data = prepare_data(config.data, provision_base(config.base_model, store), store)
    longest = max(len(row["input_ids"]) for row in read_split(data.file("train.jsonl")))
    return longest, f"the longest train row of data/{data.key}"


def data_logit_positions(config: PipelineConfig) -> int:
    """The most positions per row that the train stage runs the output head on, over its batches.

    Replays the train stage's own batch order (seeded, length-grouped or packed) over the configured number of
    steps and, per batch, counts the positions whose next token is labelled in some row of the batch (the
    union: rows are right-padded, so their answers sit at different positions). Runs the base and data stages
    (cache hits when the pipeline ran before with this data config).
    """
    import random

    from loraforge.tasks.artifacts import ArtifactStore
    from loraforge.tasks.batching import read_split
    from loraforge.tasks.data import prepare_data, read_data
    from loraforge.tasks.models import provision_base
    from loraforge.tasks.train import batch_stream, training_units

    train = config.train
    store = ArtifactStore(config.store, config.store_verify)
    data = prepare_data(config.data, provision_base(config.base_model, store), store)
    rows = read_split(data.file("train.jsonl"))
    units, steps = training_units(rows, train, read_data(data).max_length)
    batches = batch_stream(units, train, random.Random(train.seed))
    most = 0
    for _ in range(min(steps * train.grad_accum, 100_000)):
        positions: set[int] = set()
        for row in next(batches):
            positions.update(t for t, label in enumerate(row["labels"][1:]) if label != -100)
        most = max(most, len(positions))
    return most
