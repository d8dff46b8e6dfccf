"""`make gpu-check`: the one GPU check, ready to run on any machine with CUDA (under 8 minutes on one H100/H200).

    .venv/bin/python bench/gpu_check.py              # = make gpu-check (LORAFORGE_TORCH=cuda make setup first)
    .venv/bin/python bench/gpu_check.py --size 1b    # force a model size (tiny, 1b, 7b)
    .venv/bin/python bench/gpu_check.py --smoke      # the same code on CPU, in this process: tiny model, 2 steps

Without CUDA it says so and exits 0: GPU figures are then not measured. With CUDA, in order, within --budget
seconds (each part has its own timeout and is recorded as "timeout" when it runs out):

1. the gpu-marked tests (`pytest -m gpu tests/gpu`): QLoRA on CUDA through the train/eval/merge stages;
2. three variants on one Llama built from a config with random weights, created directly on the GPU in the
   target dtype (memory and speed depend on shapes, not on weights; nothing is downloaded): QLoRA (4-bit NF4,
   double quantization, bf16 compute, bitsandbytes), LoRA on a bf16 base, LoRA on an fp32 base (fp32 matmuls at
   torch's default precision, no TF32). The model is the largest of 7b (Llama-2-7B's shape, 6.7B) and 1b
   (Llama-3.2-1B's, 1.2B) whose bf16 LoRA run fits in 90% of the free GPU memory by a rough estimate; a variant
   that does not fit is recorded as "oom". Each variant runs in a fresh child process (its own CUDA caching
   allocator): LoRA r=16, alpha 32 on all linear layers (peft's all-linear: not the output head), AdamW on the
   adapters, batch 4 x 512 random tokens, no activation checkpointing, 3 warm-up steps then 8 timed steps;
3. with 2 or more GPUs, the project's train stage with `train.processes=N` against `train.processes=1` (a
   random-weight SmolLM2-360M shape on the demo data, N micro-batches per step in both: the same global batch).

Figures per variant: peak GPU memory (torch.cuda.max_memory_allocated over the training steps: weights,
activations, gradients and optimizer states; the build's transients are excluded), tokens/s over the timed
steps, and MFU against the device's dense bf16 peak (a table by device name: H100/H200 SXM 989 TFLOP/s,
A100 312, L40S 362, RTX 4090 165, A10G 125, L4 121; a bf16 GEMM probe measured in the same run when the name
is not in the table, and always reported beside it). Two MFU figures:
  mfu     = tokens/s x (4 N + 6 N_trainable) / peak: the work LoRA does (forward 2N, input gradients 2N through
            the frozen weights, whose weight gradients are skipped; forward, input and weight gradients of the
            adapters), N = the matmul parameters (attention, MLP and output head; not the embedding lookup);
  mfu_6n  = tokens/s x 6 N / peak: the full fine-tuning convention most reports use, for comparison.
Attention-score FLOPs (QK^T, AV) are left out of both. Prints one JSON (and writes it to --json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# LlamaConfig shapes built with random weights: (hidden, intermediate, layers, heads, kv heads, vocab, tied)
SIZES: dict[str, tuple[int, int, int, int, int, int, bool]] = {
    "tiny": (64, 128, 2, 4, 2, 512, True),
    "1b": (2048, 8192, 16, 32, 8, 128256, True),  # Llama-3.2-1B
    "7b": (4096, 11008, 32, 32, 32, 32000, False),  # Llama-2-7B
}
VARIANTS = ("qlora-nf4-bf16", "lora-bf16", "lora-fp32")
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a substring of torch.cuda.get_device_name(); the
# longest matching name wins ("H100 PCIe" before "H100", "A100" before "A10").
PEAK_BF16_TFLOPS = {
    "H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0,
    "A10G": 125.0, "A10": 125.0, "L4": 121.0,
}  # fmt: skip
NO_CUDA = (
    "gpu-check: no CUDA device here (torch {torch}, CUDA build: {cuda}): GPU figures are not measured. "
    "On a machine with an NVIDIA GPU: LORAFORGE_TORCH=cuda make setup && make gpu-check."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, help="model size (default: the largest that fits)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, 2 steps: exercises the code")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for the whole check (default 450)")
    parser.add_argument("--json", type=Path, help="also write the JSON here (default with CUDA: bench/results/)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--train-stage", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    if args.train_stage:
        print(json.dumps(_train_stage(json.loads(args.train_stage))))
        return 0

    import torch

    if not args.smoke and not torch.cuda.is_available():
        print(NO_CUDA.format(torch=torch.__version__, cuda=torch.version.cuda or "none (a CPU build)"))
        return 0
    report = _check(args, deadline=time.monotonic() + args.budget)
    text = json.dumps(report, indent=2)
    print(text)
    target = args.json or (None if args.smoke else ROOT / "bench" / "results" / "gpu_check.json")
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text + "\n")
    return 0


def _check(args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    """The tests, the three variants, the multi-GPU train stage: one report."""
    import torch

    started = time.monotonic()
    device = "cpu" if args.smoke else "cuda"
    run = {"batch": 2, "seq": 32, "warmup": 1, "steps": 1} if args.smoke else {"batch": 4, "seq": 512, "warmup": 3,
                                                                                 "steps": 8}  # fmt: skip
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
                              "cuda": torch.version.cuda, "smoke": args.smoke}  # fmt: skip
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        report["device"] = torch.cuda.get_device_name()
        report["gpus"] = torch.cuda.device_count()
        report["memory_gb"] = {"free": round(free / 2**30, 1), "total": round(total / 2**30, 1)}
        report["gpu_tests"] = _gpu_tests(min(150.0, deadline - time.monotonic()))
    else:
        free = 0
        report["device"], report["gpus"] = "cpu", 0
        report["gpu_tests"] = {"status": "skipped", "reason": "smoke run on CPU"}
    peak = _peak_flops(device)
    report["peak_bf16_tflops"] = {k: (round(v / 1e12, 3) if v else None) for k, v in peak.items() if k != "used"}
    report["mfu_against"] = peak["used"]
    size = args.size or ("tiny" if args.smoke else _pick_size(free, run["batch"] * run["seq"]))
    report["model"] = {"size": size, **_shape(size), "params_matmul": _matmul_params(size)}
    report["run"] = {**run, "lora": "r=16 alpha=32 all-linear", "optimizer": "AdamW (adapters)"}
    variants = {}
    for variant in VARIANTS:
        job = {"variant": variant, "size": size, "device": device, **run}
        if args.smoke:  # in this process: quick, and a tiny model's figures on CPU mean nothing anyway
            result = _child(job)
        else:
            result = _run_child(["--child", json.dumps(job)], min(120.0, deadline - time.monotonic()))
        if result.get("status") == "ok":
            result.update(_mfu(result, size, peak[peak["used"]]))
        variants[variant] = result
    report["variants"] = variants
    report["multi_gpu"] = _multi_gpu(report["gpus"], deadline)
    report["wall_s"] = round(time.monotonic() - started, 1)
    return report


def _gpu_tests(timeout: float) -> dict[str, Any]:
    """`pytest -m gpu tests/gpu`: its summary line and exit code."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "gpu")]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "timeout_s": round(timeout)}
    lines = done.stdout.strip().splitlines()
    return {"status": "passed" if done.returncode == 0 else "failed", "exit": done.returncode,
            "summary": lines[-1] if lines else done.stderr.strip()[-500:]}  # fmt: skip


def _peak_flops(device: str) -> dict[str, Any]:
    """The bf16 peak from the table (by device name) and from a GEMM probe; `used` names the one MFU divides by."""
    import torch

    table = _table_peak(torch.cuda.get_device_name()) if device == "cuda" else None
    size = 8192 if device == "cuda" else 256
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    best = float("inf")
    for i in range(13):
        _sync(device)
        started = time.perf_counter()
        a @ b
        _sync(device)
        if i >= 3:
            best = min(best, time.perf_counter() - started)
    del a, b
    if device == "cuda":
        torch.cuda.empty_cache()  # the variants run in child processes: leave them the memory
    return {"table": table, "probe": 2 * size**3 / best, "used": "table" if table else "probe"}


def _table_peak(device_name: str) -> float | None:
    """The dense bf16 FLOP/s of the table entry with the longest name found in the device's name, if any."""
    matches = sorted((k for k in PEAK_BF16_TFLOPS if k in device_name), key=len, reverse=True)
    return PEAK_BF16_TFLOPS[matches[0]] * 1e12 if matches else None


def _shape(size: str) -> dict[str, Any]:
    hidden, intermediate, layers, heads, kv_heads, vocab, tied = SIZES[size]
    return {"hidden": hidden, "intermediate": intermediate, "layers": layers, "heads": heads, "kv_heads": kv_heads,
            "vocab": vocab, "tied_embeddings": tied}  # fmt: skip


def _matmul_params(size: str) -> int:
    """Parameters that take part in a matmul per token: attention and MLP projections and the output head."""
    hidden, intermediate, layers, heads, kv_heads, vocab, _ = SIZES[size]
    kv = hidden // heads * kv_heads
    per_layer = hidden * hidden * 2 + hidden * kv * 2 + 3 * hidden * intermediate
    return layers * per_layer + vocab * hidden


def _estimate_bytes(size: str, variant: str, tokens: int) -> float:
    """A rough peak for a variant: weights plus ~(12 h + 4 i) activations per token and layer, plus the logits."""
    hidden, intermediate, layers, _, _, vocab, tied = SIZES[size]
    weight_bytes = {"qlora-nf4-bf16": 0.56, "lora-bf16": 2.0, "lora-fp32": 4.0}[variant]
    act_bytes = 4.0 if variant == "lora-fp32" else 2.0
    embeddings = vocab * hidden * (1 if tied else 2)
    weights = (_matmul_params(size) - vocab * hidden) * weight_bytes + embeddings * max(act_bytes, 2.0)
    activations = layers * tokens * (12 * hidden + 4 * intermediate) * act_bytes
    return weights + activations + 3 * tokens * vocab * 4


def _pick_size(free_bytes: int, tokens: int) -> str:
    """The largest size whose bf16 LoRA run fits in 90% of the free GPU memory (by _estimate_bytes)."""
    for size in ("7b", "1b"):
        if _estimate_bytes(size, "lora-bf16", tokens) <= 0.9 * free_bytes:
            return size
    return "1b"


def _mfu(result: dict[str, Any], size: str, peak: float) -> dict[str, float]:
    n = _matmul_params(size)
    rate = result["tokens_per_s"]
    return {"mfu": round(rate * (4 * n + 6 * result["trainable_params"]) / peak, 4),
            "mfu_6n": round(rate * 6 * n / peak, 4)}  # fmt: skip


def _run_child(args: list[str], timeout: float) -> dict[str, Any]:
    """This script in a fresh process; its last stdout line is its JSON. OOM and timeouts are results too."""
    if timeout < 5:
        return {"status": "skipped", "reason": "the check's time budget ran out"}
    try:
        done = subprocess.run([sys.executable, __file__, *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "timeout_s": round(timeout)}
    if done.returncode != 0:
        oom = "OutOfMemoryError" in done.stderr or "CUDA out of memory" in done.stderr
        return {"status": "oom" if oom else "failed", "exit": done.returncode, "error": done.stderr.strip()[-800:]}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _child(job: dict[str, Any]) -> dict[str, Any]:
    """One variant: build, adapt, train warm-up + timed steps; its figures (or status "oom")."""
    import torch

    try:
        model = _build(job["size"], job["variant"], job["device"])
        return {"status": "ok", **_train_steps(model, job)}
    except torch.cuda.OutOfMemoryError as error:
        return {"status": "oom", "error": str(error).splitlines()[0]}


def _build(size: str, variant: str, device: str) -> Any:
    """A random-weight Llama of the size, created on the device in the variant's dtype, with LoRA adapters."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, intermediate, layers, heads, kv_heads, vocab, tied = SIZES[size]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, tie_word_embeddings=tied)  # fmt: skip
    dtype = torch.float32 if variant == "lora-fp32" else torch.bfloat16
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.requires_grad_(False)
    if variant.startswith("qlora"):
        _quantize_4bit(model, device)
        # Marked as transformers' bitsandbytes loader marks a model: peft then wraps with its 4-bit LoRA layers.
        model.is_loaded_in_4bit = True  # type: ignore[assignment]
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def _quantize_4bit(model: Any, device: str) -> None:
    """Every linear layer of the decoder as bitsandbytes Linear4bit (NF4, double quantization, bf16 compute),
    quantized from the weights in place, one layer at a time; embeddings, norms and output head stay bf16."""
    import bitsandbytes as bnb
    import torch

    for module in model.model.layers.modules():
        for name, child in list(module.named_children()):
            if not isinstance(child, torch.nn.Linear):
                continue
            quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                          device="meta")  # fmt: skip
            quantized.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                                 quant_type="nf4")  # fmt: skip
            setattr(module, name, quantized.to(device))
            del child
    if device == "cuda":
        torch.cuda.empty_cache()


def _train_steps(model: Any, job: dict[str, Any]) -> dict[str, Any]:
    import torch

    device = job["device"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (job["batch"], job["seq"]), device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses = []
    for step in range(job["warmup"] + job["steps"]):
        if step == job["warmup"]:
            _sync(device)
            started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    _sync(device)
    seconds = time.perf_counter() - started
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:  # CPU smoke: the child's peak RSS (ru_maxrss is KiB on Linux)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tokens_per_s": round(job["steps"] * job["batch"] * job["seq"] / seconds, 1),
            "peak_mb": round(peak_mb), "peak_is": "cuda max_memory_allocated" if device == "cuda" else "process RSS",
            "step_s": round(seconds / job["steps"], 4), "trainable_params": sum(p.numel() for p in trainable),
            "loss_first_last": [round(losses[0], 3), round(losses[-1], 3)],
            "quantized_layers": _quantized_layers(model)}  # fmt: skip


def _quantized_layers(model: Any) -> int:
    """bitsandbytes Linear4bit layers whose weight is quantized (peft's wrappers share it: not counted)."""
    return sum(
        type(m).__module__.startswith("bitsandbytes") and bool(getattr(m.weight, "bnb_quantized", False))
        for m in model.modules()
    )


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _multi_gpu(gpus: int, deadline: float) -> dict[str, Any]:
    """With 2+ GPUs: the train stage with train.processes=N, then =1, on the same model and data."""
    if gpus < 2:
        return {"status": "skipped", "reason": f"{gpus} GPU(s): train.processes=N needs 2 or more"}
    runs = {}
    with tempfile.TemporaryDirectory(prefix="loraforge-gpu-check-") as scratch:  # the runs' stores, removed after
        for processes in (gpus, 1):  # the same global batch: gpus micro-batches per step in both runs
            job = {"processes": processes, "grad_accum": gpus,
                   "models": str(Path(tempfile.gettempdir()) / "loraforge-bench-models"),
                   "store": str(Path(scratch) / f"store-p{processes}")}  # fmt: skip
            runs[f"processes={processes}"] = _run_child(["--train-stage", json.dumps(job)],
                                                        min(120.0, deadline - time.monotonic()))  # fmt: skip
    return {"status": "ok", "runs": runs}


def _train_stage(job: dict[str, Any]) -> dict[str, Any]:
    """The project's train stage on a random-weight SmolLM2-360M shape (bench/gpu_qlora.py builds it) and the
    demo data, with train.processes from the job."""
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_qlora import _build as build_preset

    from loraforge.tasks.artifacts import ArtifactStore
    from loraforge.tasks.config import DEMO_CONFIG, load_config
    from loraforge.tasks.data import prepare_data
    from loraforge.tasks.models import provision_base
    from loraforge.tasks.train import train_adapter

    model = build_preset("smollm2-360m", Path(job["models"]))
    overrides = [f"base_model={model}", f"store={job['store']}", f"train.processes={job['processes']}",
                 f"train.grad_accum={job['grad_accum']}", "train.max_steps=16", "train.log_every=16",
                 "train.device=cuda"]  # fmt: skip
    config = load_config(DEMO_CONFIG, overrides)
    store = ArtifactStore(config.store)
    base = provision_base(config.base_model, store)
    data = prepare_data(config.data, base, store)
    metrics = train_adapter(config.train, base, data, store).metrics
    keep = ("tokens_per_s", "cuda_peak_mb", "train_seconds", "val_loss", "val_loss_before")
    return {"status": "ok", **{k: metrics[k] for k in keep if k in metrics}}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
