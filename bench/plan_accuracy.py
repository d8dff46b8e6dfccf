"""How close is `loraforge plan` to real runs? Estimate vs measured peak RSS, parameter counts and adapter size.

    .venv/bin/python bench/plan_accuracy.py                       # tiny model + SmolLM2-135M, every mode
    .venv/bin/python bench/plan_accuracy.py --models tiny --json /tmp/plan.json
    .venv/bin/python bench/plan_accuracy.py --models smollm2-b4 --json bench/results/plan_accuracy_b4.json
    .venv/bin/python bench/plan_accuracy.py --modes lora-qv,full --steps 2

For each model and mode it prepares the data artifact (demo tickets) in this process, plans with the longest
train row as the sequence length (the train stage pads each batch to its longest row), then trains in a
fresh child process and takes that child's own peak RSS (`tasks.plan.run_measuring_peak_rss`: VmHWM):

- lora-qv, lora-all (all-linear), lora-all-gc (all-linear with gradient checkpointing), qlora-4bit: the
  real train stage (`train_adapter`), so the artifact's own `peak_rss_mb`, trainable-parameter count and
  adapter file are compared too;
- full: there is no full fine-tuning mode in the train stage, so the child runs a plain PyTorch loop with
  the same loader, batch size, batches (collated from the same data artifact), AdamW and gradient clipping.

Prints one row per run and writes the figures as JSON (default bench/results/plan_accuracy.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

MODES: dict[str, list[str]] = {
    "lora-qv": ["train.target_modules=[q_proj,v_proj]"],
    "lora-all": ["train.target_modules=all-linear"],
    "lora-all-gc": ["train.target_modules=all-linear", "train.gradient_checkpointing=true"],
    "qlora-4bit": ["train.target_modules=all-linear", "train.quantization=4bit"],
    "full": [],
}
PLAN_MODE = {"lora-qv": "lora", "lora-all": "lora", "lora-all-gc": "lora", "qlora-4bit": "qlora-4bit", "full": "full"}
MODELS = {
    # name: (base_model, overrides); micro-batch sizes as in the tests (tiny), one batch of 8 (SmolLM2, as the
    # table in docs/plan.md was first measured) and the demo's defaults (micro-batches of 4, two per step)
    "tiny": (None, ["train.batch_size=4", "data.max_rows=24"]),
    "smollm2": ("bundled:smollm2-135m-instruct", ["train.batch_size=8", "data.max_rows=16"]),
    "smollm2-b4": ("bundled:smollm2-135m-instruct", ["train.batch_size=4", "data.max_rows=16"]),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--models", default="tiny,smollm2", help="comma list of: " + ", ".join(MODELS))
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of: " + ", ".join(MODES))
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run (peak is reached in step 1-2)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "plan_accuracy.json")
    parser.add_argument(
        "--replan", type=Path, metavar="JSON",
        help="no training: recompute the estimates of a earlier run's JSON with the current tasks/plan.py",
    )  # fmt: skip
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.child)
    if args.replan:
        return replan(args.replan, args.json)
    # A fresh store per run: a cached train artifact would skip the training being measured.
    scratch = Path(tempfile.mkdtemp(prefix="loraforge-plan-bench-"))
    results = []
    for model in args.models.split(","):
        for mode in args.modes.split(","):
            results.append(measure(model, mode, scratch / f"{model}-{mode}", args.steps))
            if "error" not in results[-1]:
                _print_row(results[-1])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"runs": results, "host": _host()}, indent=2))
    print(f"\nwrote {args.json}")
    return 1 if any("error" in r for r in results) else 0


def overrides_for(model: str, mode: str, store: Path, steps: int) -> list[str]:
    """The config overrides (on the demo config) for one model and mode."""
    base, extra = MODELS[model]
    if base is None:
        from tiny import build_tiny_model

        base = str(build_tiny_model(store.parent / "tiny-llama"))
    return [f"base_model={base}", f"store={store}", f"train.max_steps={steps}", "train.log_every=1",
            "train.threads=2", *extra, *MODES[mode]]  # fmt: skip


def measure(model: str, mode: str, store: Path, steps: int) -> dict[str, Any]:
    """Plan, then train in a child process; estimate and measurements side by side."""
    from loraforge.tasks.artifacts import ArtifactStore
    from loraforge.tasks.batching import read_split
    from loraforge.tasks.config import DEMO_CONFIG, load_config
    from loraforge.tasks.data import prepare_data
    from loraforge.tasks.models import provision_base
    from loraforge.tasks.plan import data_logit_positions, plan_training, run_measuring_peak_rss

    overrides = overrides_for(model, mode, store, steps)
    config = load_config(DEMO_CONFIG, overrides)
    artifacts = ArtifactStore(config.store)
    data = prepare_data(config.data, provision_base(config.base_model, artifacts), artifacts)
    longest = max(len(r["input_ids"]) for r in read_split(data.file("train.jsonl")))
    plan = plan_training(config, seq_len=longest, seq_len_source="longest train row",
                         logit_positions=data_logit_positions(config))  # fmt: skip
    estimate = plan.memory[PLAN_MODE[mode]]

    started = time.perf_counter()
    kind = "full" if mode == "full" else "train"
    code, peak_mb, output = run_measuring_peak_rss([sys.executable, __file__, "--child", kind, *overrides])
    seconds = time.perf_counter() - started
    if code != 0:
        print(f"{model} {mode}: the child failed (exit {code}):\n{output[-2000:]}", file=sys.stderr)
        return {"model": model, "mode": mode, "error": output[-2000:]}
    child = json.loads(output.strip().splitlines()[-1])
    row: dict[str, Any] = {
        "model": model, "mode": mode, "batch": plan.batch_size, "seq_len": plan.seq_len,
        "logit_positions": plan.logit_positions,
        "estimate_mb": estimate.peak_rss_mb, "measured_mb": round(peak_mb, 1),
        "error_pct": round(100 * (estimate.peak_rss_mb - peak_mb) / peak_mb, 1),
        "estimate_terms_mb": estimate.components_mb, "cuda_estimate_mb": estimate.cuda_mb,
        "trainable_estimate": estimate.trainable_params, "trainable_measured": child.get("trainable_params"),
        "adapter_bytes_estimate": plan.adapter_file_bytes if mode != "full" else None,
        "adapter_bytes_measured": child.get("adapter_bytes"), "stage_peak_rss_mb": child.get("peak_rss_mb"),
        "child_seconds": round(seconds, 1),
    }  # fmt: skip
    return row


def replan(previous: Path, out: Path) -> int:
    """Re-estimate recorded runs (same model, mode, batch and sequence length) with the current constants."""
    from loraforge.tasks.config import DEMO_CONFIG, load_config
    from loraforge.tasks.plan import plan_training

    recorded = json.loads(previous.read_text())
    scratch = Path(tempfile.mkdtemp(prefix="loraforge-plan-replan-"))
    for row in recorded["runs"]:
        if "error" in row:
            continue
        config = load_config(DEMO_CONFIG, overrides_for(row["model"], row["mode"], scratch / "store", 1))
        plan = plan_training(config, seq_len=row["seq_len"], seq_len_source="recorded",
                             logit_positions=row.get("logit_positions"))  # fmt: skip
        estimate = plan.memory[PLAN_MODE[row["mode"]]]
        error = round(100 * (estimate.peak_rss_mb - row["measured_mb"]) / row["measured_mb"], 1)
        row.update(estimate_mb=estimate.peak_rss_mb, estimate_terms_mb=estimate.components_mb,
                   cuda_estimate_mb=estimate.cuda_mb, error_pct=error)  # fmt: skip
        _print_row(row)
    recorded["replanned_from"] = str(previous)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(recorded, indent=2))
    print(f"\nwrote {out}")
    return 0


def _child(argv: list[str]) -> int:
    """In the measured child: run the train stage, or the plain full fine-tuning loop; print a JSON line."""
    kind, overrides = argv[0], argv[1:]
    from loraforge.tasks.artifacts import ArtifactStore
    from loraforge.tasks.config import DEMO_CONFIG, load_config
    from loraforge.tasks.data import prepare_data
    from loraforge.tasks.models import provision_base

    config = load_config(DEMO_CONFIG, overrides)
    store = ArtifactStore(config.store)
    base = provision_base(config.base_model, store)
    data = prepare_data(config.data, base, store)  # a cache hit: the parent prepared it
    if kind == "train":
        from loraforge.tasks.train import train_adapter

        train = train_adapter(config.train, base, data, store)
        size = (train.file("adapter") / "adapter_model.safetensors").stat().st_size
        result = {**train.metrics, "adapter_bytes": size}
    else:
        result = _full_finetune(config, base, data)
    print(json.dumps(result))
    return 0


def _full_finetune(config: Any, base: Any, data: Any) -> dict[str, Any]:
    """Full fine-tuning, plain PyTorch: fp32 base as the train stage loads it, AdamW on every parameter."""
    import resource

    import peft  # noqa: F401  (the train stage imports it: the same process make-up, the same overhead)
    import torch

    from loraforge.tasks.batching import collate, read_split
    from loraforge.tasks.models import load_causal_lm, load_tokenizer

    train = config.train
    if train.threads:
        torch.set_num_threads(train.threads)
    torch.manual_seed(train.seed)
    folder = Path(base.manifest["model_path"])
    pad_id = load_tokenizer(folder).pad_token_id
    model = load_causal_lm(folder)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.learning_rate, weight_decay=train.weight_decay)
    rows = read_split(data.file("train.jsonl"))
    rows.sort(key=lambda r: -len(r["input_ids"]))  # the longest batch first: the peak the train stage also meets
    batches = [rows[i : i + train.batch_size] for i in range(0, len(rows), train.batch_size)]
    for step in range(train.max_steps or 1):
        ids, labels, mask = collate(batches[step % len(batches)], pad_id)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }


def _print_row(row: dict[str, Any]) -> None:
    params = "" if row["trainable_measured"] is None else (
        f"  params {row['trainable_estimate']:,} vs {row['trainable_measured']:,}")  # fmt: skip
    size = "" if not row["adapter_bytes_measured"] else (
        f"  adapter {row['adapter_bytes_estimate']:,} vs {row['adapter_bytes_measured']:,} B")  # fmt: skip
    print(
        f"{row['model']:8} {row['mode']:10} {row['batch']}x{row['seq_len']:<4} estimate {row['estimate_mb']:7.0f} MB"
        f"  measured {row['measured_mb']:7.0f} MB  ({row['error_pct']:+.1f}%)  stage-recorded "
        f"{row['stage_peak_rss_mb']} MB{params}{size}  [{row['child_seconds']:.0f} s]",
        flush=True,
    )


def _host() -> dict[str, Any]:
    import os
    import platform

    import torch
    import transformers

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "load_average": os.getloadavg()}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
