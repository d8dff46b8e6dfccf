"""Training throughput and memory: our train stage vs the recipe users copy from tutorials (issue 7, item 1).

    .venv/bin/python bench/train_throughput.py --steps 60      # every variant, 3 repeats, a full epoch of the demo
    .venv/bin/python bench/train_throughput.py --variants lora-qv --steps 10 --repeats 1   # a quick look
    .venv/bin/python bench/train_throughput.py --variants lora-all --recipes tutorial,ours,ours@b2 \
        --recipe ours@b2:batch_size=2                          # a train setting of your own against the tutorial

Same model (SmolLM2-135M-Instruct, bundled), same data (the demo tickets, tokenized once by our data stage),
same sequence length, LoRA config, batch size, learning rate, schedule and number of optimizer steps:

- tutorial: trl `SFTTrainer` + peft `LoraConfig` on a conversational prompt/completion dataset (the prompt is
  masked, as in ours), `use_cpu=True`, no saving; trl's defaults otherwise, which include activation (gradient)
  checkpointing: less memory, more compute;
- trl-tuned: the strongest SFTTrainer recipe a careful user writes here: checkpointing off, length-grouped
  sampling (`train_sampling_strategy=group_by_length`), the train stage's micro-batch with accumulation (trl's
  padding_free and bfd packing need flash-attention position_ids, which CPU torch lacks: not applied);
- ours: `tasks.train.train_adapter` with its defaults (each step's rows as micro-batches of 4 sorted by length
  within the step, so each step is a random sample with the gradient of one batch; no checkpointing);
  the prompt prefix a micro-batch's rows share is computed once (`train.share_prompt_prefix`, the default);
  ours-whole: the same with every row computed whole (`train.share_prompt_prefix=false`); ours+gc:
  the same with `train.gradient_checkpointing` (the tutorial's memory setting); ours with `train.packing`
  (batch size in packed sequences = the number that holds `--batch-size` rows on average, so every recipe sees
  about the same rows and tokens per optimizer step, with the same schedule); opt-in: ours+random (no length
  sorting at all) and ours@b8w16 (the defaults before 2026-12-02: one micro-batch of 8 per step, rows sorted
  by length across windows of 16 steps); any other with --recipe NAME:key=value,... (train.* overrides).
  Every recipe takes --batch-size rows per optimizer step: grad_accum = --batch-size / its micro-batch.

Each run is a fresh child process (peak RSS = that process's VmHWM, polled from /proc). Tokens/s counts real
(non-padding) tokens seen by the model's forward in training, divided by the training wall time (model load
and final evaluation excluded). Final loss = mean loss over the validation split's answer tokens, computed
with the same function for every recipe. The machine's matmul peak comes from a GEMM probe in the same run;
model FLOP/s per token = 2N (forward) + 2N (activation gradients) + 2 x trainable (weight gradients), N the
non-embedding parameters, as in the usual 6N rule (model FLOPs: recomputation not counted; and counted for
every row token, so a shared prefix computed once raises the share above what the matmuls run: the "shared"
column is the share of row tokens not computed).
Repeat i runs every recipe with seed 42 + i (adapter init, dropout and data order), so the final loss is a
median over seeds, with its range: over a few steps the data order alone moves it by several percent.
Medians of the repeats; ratios against the tutorial recipe and against trl-tuned.
Writes bench/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS: dict[str, dict[str, Any]] = {
    "lora-qv": {"target_modules": ["q_proj", "v_proj"], "quantization": "none"},
    "lora-all": {"target_modules": "all-linear", "quantization": "none"},
    "qlora-4bit": {"target_modules": "all-linear", "quantization": "4bit"},
    "full": {"target_modules": None, "quantization": "none"},  # the tutorial recipe without peft
}
# Each "ours" recipe = TrainConfig overrides on top of the train stage's defaults. Every recipe sees --batch-size
# rows per optimizer step: grad_accum = that / the recipe's micro-batch (batch_size); packing counts sequences.
RECIPES: dict[str, dict[str, Any]] = {
    "tutorial": {},
    # The strongest SFTTrainer recipe a careful user writes on CPU: activation checkpointing off, length-grouped
    # sampling, our micro-batch and accumulation. trl's padding_free and bfd packing are not applied: both rely on
    # position_ids that only flash-attention kernels honour (not available to CPU torch); with sdpa rows would
    # attend across their neighbours.
    "trl-tuned": {"gradient_checkpointing": False, "train_sampling_strategy": "group_by_length"},
    "ours": {},
    "ours-whole": {"share_prompt_prefix": False},  # every row computes its own prompt prefix (padded batches)
    "ours+gc": {"gradient_checkpointing": True},
    "ours+packing": {"packing": True},
}
EXTRA_RECIPES: dict[str, dict[str, Any]] = {  # opt-in (--recipes); more with --recipe NAME:key=value,...
    "ours+random": {"group_by_length": False},  # random micro-batches, no sorting even within a step
    "ours@b8w16": {"batch_size": 8, "length_group_steps": 16},  # the defaults before 2026-12-02: one micro-batch
    # per step, sorted by length across 16 steps (fast, but each step less representative)
    "ours+bf16": {"precision": "bf16"},  # base weights in bf16, forward under bf16 autocast (ours: fp32 on CPU)
}
PACKING_VARIANTS = ("lora-qv",)  # padding is a property of the data, not of the adapter: packing measured once


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list of: " + ", ".join(VARIANTS))
    parser.add_argument("--recipes", default=",".join(RECIPES),
                        help="comma list of: " + ", ".join([*RECIPES, *EXTRA_RECIPES]))  # fmt: skip
    parser.add_argument("--recipe", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="define a recipe of ours with train.* overrides (YAML values), e.g. "
                             "--recipe 'ours@b4:batch_size=4' --recipes tutorial,ours@b4")  # fmt: skip
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per recipe and variant (medians reported)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per optimizer step, for every recipe")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "train_throughput.json")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(json.loads(args.child[0]))

    recipes = {**RECIPES, **EXTRA_RECIPES, **dict(_parse_recipe(text) for text in args.recipe)}
    unknown = [name for name in args.recipes.split(",") if name not in recipes]
    if unknown:
        parser.error(f"unknown recipe(s) {', '.join(unknown)}; known: {', '.join(recipes)} (or define one: --recipe)")
    scratch = Path(tempfile.mkdtemp(prefix="loraforge-bench-train-"))
    base, data = _prepare(scratch)
    peak = gemm_peak_flops(args.threads)
    print(f"GEMM probe: {peak / 1e9:.1f} GFLOP/s fp32 on {args.threads} threads")
    runs: list[dict[str, Any]] = []
    for variant in args.variants.split(","):
        for recipe in args.recipes.split(","):
            if variant == "full" and recipe != "tutorial":
                continue  # the train stage trains adapters only
            if recipe == "ours+packing" and variant not in PACKING_VARIANTS:
                continue
            for repeat in range(args.repeats):
                job = {"recipe": recipe, "overrides": recipes[recipe], "variant": variant, "steps": args.steps,
                       "batch_size": args.batch_size,
                       "threads": args.threads, "model_path": base["model_path"], "inputs": data,
                       "seed": 42 + repeat,
                       "store": str(scratch / f"store-{variant}-{recipe}-{repeat}")}  # fmt: skip
                result = _spawn(job)
                result["flops_share"] = result["flops_per_token"] * result["tokens_per_s"] / peak
                runs.append(result)
                print(f"  {variant:11s} {recipe:13s} run {repeat + 1}: {result['tokens_per_s']:7.1f} tok/s, "
                      f"{result['peak_rss_mb']:6d} MB, val loss {result['val_loss']:.4f}", flush=True)  # fmt: skip
    table = _summarize(runs)
    _print(table, peak)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"gemm_peak_flops": peak, "steps": args.steps, "repeats": args.repeats,
                                     "batch_size": args.batch_size, "threads": args.threads, "summary": table,
                                     "runs": runs}, indent=2))  # fmt: skip
    print(f"wrote {args.json}")
    return 0


def _parse_recipe(text: str) -> tuple[str, dict[str, Any]]:
    """'NAME:key=value,key=value' -> (NAME, {key: YAML value}); the keys are checked by TrainConfig."""
    import yaml

    name, _, body = text.partition(":")
    if not name.startswith("ours") or not body:
        raise SystemExit(f"--recipe {text!r}: expected ours<suffix>:key=value[,...], e.g. ours@b4:batch_size=4")
    pairs = [item.partition("=") for item in body.split(",")]
    return name, {key.strip().removeprefix("train."): yaml.safe_load(value) for key, _, value in pairs}


def _prepare(scratch: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The bundled base and the demo data artifact (tokenized with the chat template, prompts masked)."""
    from loraforge.tasks.artifacts import ArtifactStore
    from loraforge.tasks.config import DEMO_CONFIG, load_config
    from loraforge.tasks.data import prepare_data
    from loraforge.tasks.models import provision_base

    config = load_config(DEMO_CONFIG)
    store = ArtifactStore(scratch / "inputs")
    base = provision_base(config.base_model, store)
    data = prepare_data(config.data, base, store)
    return base.manifest, {"store": str(store.root), "base": base.key, "data": data.key}


def gemm_peak_flops(threads: int, size: int = 1024, repeats: int = 20) -> float:
    """fp32 matmul FLOP/s of this machine: the best of several timed 1024^3 GEMMs."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def _spawn(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job in a fresh child; its result JSON plus the child's own peak RSS (VmHWM, polled: not
    ru_maxrss, which Linux carries over from this parent at exec)."""
    from loraforge.tasks.plan import run_measuring_peak_rss

    out = Path(job["store"] + ".json")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    code, peak_mb, output = run_measuring_peak_rss(
        [sys.executable, __file__, "--child", json.dumps({**job, "out": str(out)})], env=env
    )
    if code != 0:
        raise SystemExit(f"{job['recipe']} {job['variant']} failed (exit {code}):\n{output[-3000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    result["peak_rss_mb"] = int(peak_mb)
    return result


def _child(job: dict[str, Any]) -> int:
    import torch

    torch.set_num_threads(job["threads"])
    result = _train_ours(job) if job["recipe"].startswith("ours") else _train_trl(job)
    Path(job["out"]).write_text(json.dumps({**{k: job[k] for k in ("recipe", "variant", "steps")}, **result}))
    return 0


def _train_ours(job: dict[str, Any]) -> dict[str, Any]:
    from loraforge.tasks.artifacts import ArtifactStore
    from loraforge.tasks.batching import pack_rows, read_split
    from loraforge.tasks.train import TrainConfig, train_adapter

    variant = VARIANTS[job["variant"]]
    inputs = ArtifactStore(job["inputs"]["store"])
    base, data = inputs.get("base", job["inputs"]["base"]), inputs.get("data", job["inputs"]["data"])
    overrides = dict(job["overrides"])
    step_rows = job["batch_size"]
    if overrides.get("packing"):  # as many packed sequences per step as hold step_rows rows on average
        rows = read_split(data.file("train.jsonl"))
        packed = pack_rows(rows, int(data.manifest["config"]["max_length"]))
        overrides.update(batch_size=max(1, round(step_rows * len(packed) / len(rows))), grad_accum=1)
    else:  # the recipe's micro-batch (or the stage's default), as many of them as make step_rows rows
        micro = overrides.get("batch_size", TrainConfig.model_fields["batch_size"].default)
        if step_rows % micro:
            raise SystemExit(f"{job['recipe']}: --batch-size {step_rows} is not a multiple of batch_size {micro}")
        overrides.update(batch_size=micro, grad_accum=step_rows // micro)
    config = TrainConfig(**{"target_modules": variant["target_modules"], "quantization": variant["quantization"],
                            "max_steps": job["steps"], "threads": job["threads"], "log_every": job["steps"],
                            "seed": job["seed"], **overrides})  # fmt: skip
    train = train_adapter(config, base, data, ArtifactStore(job["store"]))
    m = train.metrics
    return {"tokens_per_s": m["tokens_per_s"], "tokens": m["tokens"], "train_seconds": m["train_seconds"],
            "val_loss": m["val_loss"], "trainable_params": m["trainable_params"],
            "flops_per_token": _flops_per_token(m["total_params"], m["trainable_params"], base),
            "padding_share": m["padding_share"], "shared_prefix_share": m["shared_prefix_share"]}  # fmt: skip


def _train_trl(job: dict[str, Any]) -> dict[str, Any]:
    """The recipe from the trl/peft docs: SFTTrainer(model, args=SFTConfig(...), train_dataset, peft_config), one
    micro-batch of --batch-size rows per step; trl-tuned: SFTConfig overrides (RECIPES) and the train stage's
    micro-batch with accumulation to the same rows per step."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from loraforge.tasks.artifacts import ArtifactStore
    from loraforge.tasks.batching import mean_loss, read_split

    inputs = ArtifactStore(job["inputs"]["store"])
    base, data = inputs.get("base", job["inputs"]["base"]), inputs.get("data", job["inputs"]["data"])
    data_dir = data.path
    variant = VARIANTS[job["variant"]]
    tokenizer = AutoTokenizer.from_pretrained(job["model_path"])
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    quantized = variant["quantization"] == "4bit"
    model = AutoModelForCausalLM.from_pretrained(
        job["model_path"], dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True,
                                               bnb_4bit_compute_dtype=torch.float32) if quantized else None,
    )  # fmt: skip
    train_rows = read_split(data_dir / "train.jsonl")
    dataset = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in train_rows])
    peft_config = None
    if variant["target_modules"] is not None:
        targets = variant["target_modules"]
        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=targets,
                                 task_type="CAUSAL_LM")  # fmt: skip
    data_manifest = data.manifest
    micro = job["batch_size"]
    if job["recipe"] != "tutorial":
        from loraforge.tasks.train import TrainConfig

        micro = TrainConfig.model_fields["batch_size"].default
    settings = SFTConfig(
        output_dir=job["store"], max_length=data_manifest["config"]["max_length"],
        per_device_train_batch_size=micro, gradient_accumulation_steps=job["batch_size"] // micro,
        max_steps=job["steps"], learning_rate=1e-3,
        lr_scheduler_type="cosine", warmup_steps=round(0.05 * job["steps"]), use_cpu=True, bf16=False,
        report_to=[], save_strategy="no",
        logging_steps=job["steps"], seed=job["seed"], dataloader_num_workers=0, **job["overrides"],
    )  # fmt: skip
    trainer = SFTTrainer(model=model, args=settings, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)  # fmt: skip
    seen = {"tokens": 0, "positions": 0}

    def count(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        if trainer.model.training and kwargs.get("attention_mask") is not None:
            seen["tokens"] += int(kwargs["attention_mask"].sum())
            seen["positions"] += kwargs["attention_mask"].numel()

    trainer.model.register_forward_pre_hook(count, with_kwargs=True)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    val_rows = read_split(data_dir / "validation.jsonl")
    val_loss = mean_loss(trainer.model, val_rows, job["batch_size"], tokenizer.pad_token_id)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    # bitsandbytes packs two 4-bit weights per byte: count weights, not bytes (as peft's own count does)
    total = sum(p.numel() * (2 if getattr(p, "quant_state", None) is not None else 1) for p in model.parameters())
    return {"tokens_per_s": round(seen["tokens"] / seconds, 1), "tokens": seen["tokens"],
            "train_seconds": round(seconds, 1), "val_loss": round(val_loss, 5), "trainable_params": trainable,
            "flops_per_token": _flops_per_token(total, trainable, base),
            "padding_share": round(1 - seen["tokens"] / max(seen["positions"], 1), 4)}  # fmt: skip


def _flops_per_token(total: int, trainable: int, base: Any) -> float:
    """2N forward + 2N activation gradients + 2 x trainable weight gradients; N without the embedding
    (a lookup, not a matmul; the tied output head is counted once as a matmul)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base.manifest["model_path"])
    n = total - config.vocab_size * config.hidden_size * (0 if config.tie_word_embeddings else 1)
    return 4 * n + 2 * trainable


def _summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table = []
    for variant in dict.fromkeys(r["variant"] for r in runs):
        baseline = [r for r in runs if r["variant"] == variant and r["recipe"] == "tutorial"]
        base_tps = statistics.median(r["tokens_per_s"] for r in baseline) if baseline else None
        base_rss = statistics.median(r["peak_rss_mb"] for r in baseline) if baseline else None
        base_loss = statistics.median(r["val_loss"] for r in baseline) if baseline else None
        tuned = [r["tokens_per_s"] for r in runs if r["variant"] == variant and r["recipe"] == "trl-tuned"]
        tuned_tps = statistics.median(tuned) if tuned else None
        for recipe in dict.fromkeys(r["recipe"] for r in runs if r["variant"] == variant):
            mine = [r for r in runs if r["variant"] == variant and r["recipe"] == recipe]
            tps = statistics.median(r["tokens_per_s"] for r in mine)
            rss = statistics.median(r["peak_rss_mb"] for r in mine)
            losses = [r["val_loss"] for r in mine]
            table.append({
                "variant": variant, "recipe": recipe, "runs": len(mine), "tokens_per_s": round(tps, 1),
                "speedup_vs_tutorial": round(tps / base_tps, 2) if base_tps else None,
                "speedup_vs_trl_tuned": round(tps / tuned_tps, 2) if tuned_tps else None,
                "peak_rss_mb": int(rss), "rss_vs_tutorial": round(rss / base_rss, 2) if base_rss else None,
                "val_loss": round(statistics.median(losses), 4),
                "val_loss_range": [round(min(losses), 4), round(max(losses), 4)],
                "loss_vs_tutorial": round(statistics.median(losses) / base_loss, 3) if base_loss else None,
                "flops_share": round(statistics.median(r["flops_share"] for r in mine), 4),
                "padding_share": round(statistics.median(r["padding_share"] for r in mine), 4),
                "shared_prefix_share": round(statistics.median(r.get("shared_prefix_share", 0) for r in mine), 4),
                "trainable_params": mine[0]["trainable_params"],
            })  # fmt: skip
    return table


def _print(table: list[dict[str, Any]], peak: float) -> None:
    print(f"\nmedians; GEMM peak {peak / 1e9:.1f} GFLOP/s")
    print(f"{'variant':11s} {'recipe':13s} {'tok/s':>8s} {'x tutorial':>10s} {'x tuned':>7s} {'peak RSS MB':>11s} "
          f"{'x RSS':>6s} {'val loss':>9s} {'x loss':>6s} {'loss range':>15s} {'% peak':>7s} "
          f"{'padding':>7s} {'shared':>6s}")  # fmt: skip
    for row in table:
        speed = f"{row['speedup_vs_tutorial']:.2f}" if row["speedup_vs_tutorial"] else "-"
        tuned = f"{row['speedup_vs_trl_tuned']:.2f}" if row.get("speedup_vs_trl_tuned") else "-"
        rss = f"{row['rss_vs_tutorial']:.2f}" if row["rss_vs_tutorial"] else "-"
        share = 100 * row["flops_share"]
        loss = f"{row['loss_vs_tutorial']:.3f}" if row["loss_vs_tutorial"] else "-"
        low, high = row["val_loss_range"]
        print(f"{row['variant']:11s} {row['recipe']:13s} {row['tokens_per_s']:8.1f} {speed:>10s} {tuned:>7s} "
              f"{row['peak_rss_mb']:11d} {rss:>6s} {row['val_loss']:9.4f} {loss:>6s} {f'{low:.4f}-{high:.4f}':>15s} "
              f"{share:6.2f}% {100 * row['padding_share']:6.1f}% {100 * row['shared_prefix_share']:5.1f}%")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
