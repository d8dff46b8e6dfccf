"""The train stage's levers on this CPU (issue 20, item 1), each measured in one run against the stage as it is:

- **kv-cache**: the forward as transformers runs it by default, building a key/value cache nobody reads (the
  stage before it passed `use_cache=False`), against the stage's forward;
- **compile**: the stage's forward with every decoder layer `torch.compile`d (inductor, dynamic shapes), its
  compile time apart;
- **AdamW**: torch's for-loop AdamW (what the stage gets: torch picks it for CPU tensors) against its foreach and
  fused implementations, from the same weights, gradients and state.

    .venv/bin/python bench/train_levers.py                   # ~6 min on 2 cores (the bundled base, the demo data)
    .venv/bin/python bench/train_levers.py --variants lora-qv --steps 2 --no-compile

For each adapter variant (LoRA q,v and all-linear, r=16 and the demo's other settings): the train stage's own
model (`trainable_model`), parameter groups (`_param_groups`) and gradient accumulation (`accumulate_gradients`:
micro-batches of batch_size rows, the head on labelled positions only) over the demo's train split as the data
stage writes it. A step = one optimizer step's rows (batch_size x grad_accum), sorted by length within the step
as the stage does. The forward configurations run interleaved, step by step, on the same rows (so drift of the
host hits each alike); the figure is the median step time. A lever's share = the step time it saves over the
stage's step (forward+backward+optimizer; for use_cache=False, over the step before it); negative = slower. The
losses of every configuration are compared (they must agree: a lever that changes the numbers is not a speed
lever). Writes bench/results/train_levers.json.
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

VARIANTS = {"lora-qv": ["q_proj", "v_proj"], "lora-all": "all-linear"}
OPTIMIZERS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list of: " + ", ".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=8, help="timed steps per forward configuration")
    parser.add_argument("--opt-repeats", type=int, default=30, help="optimizer steps timed per implementation")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile configuration")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "train_levers.json")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="loraforge-bench-") as scratch:
        base, rows = _inputs(Path(scratch))
        results = [_measure(variant, base, rows, args) for variant in variants]
    report = {"command": "bench/train_levers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "threads": args.threads,
              "results": results}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    _print(results)
    print(f"wrote {args.json}")
    return 0


def _inputs(scratch: Path) -> tuple[Path, list[dict[str, Any]]]:
    """The bundled base's folder and the demo's train split as the data stage writes it."""
    from loraforge.tasks.artifacts import ArtifactStore
    from loraforge.tasks.batching import read_split
    from loraforge.tasks.config import DEMO_CONFIG, load_config
    from loraforge.tasks.data import prepare_data
    from loraforge.tasks.models import provision_base, read_base

    config = load_config(DEMO_CONFIG)
    store = ArtifactStore(scratch / "inputs")
    base = provision_base(config.base_model, store)
    data = prepare_data(config.data, base, store)
    return read_base(base).model_path, read_split(data.file("train.jsonl"))


class _WithCache:
    """The model called as transformers does by default: building a key/value cache during training."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, **inputs: Any) -> Any:
        return self.model(**{**inputs, "use_cache": True})


def _measure(variant: str, base: Path, rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from loraforge.tasks.config import DEMO_CONFIG, load_config
    from loraforge.tasks.train import accumulate_gradients, collate_micro_batch, trainable_model

    config = load_config(DEMO_CONFIG).train.model_copy(update={"target_modules": VARIANTS[variant]})
    torch.manual_seed(0)
    model, _ = trainable_model(config, base, "cpu")
    model.train()
    pad = int(model.config.pad_token_id or model.config.eos_token_id or 0)
    forwards: dict[str, Any] = {"stage": model, "kv-cache": _WithCache(model)}
    compile_s = None
    if not args.no_compile:
        torch.manual_seed(0)
        compiled, _ = trainable_model(config, base, "cpu")  # the same weights (same seed), compiled in place
        compiled.train()
        for layer in compiled.get_base_model().model.layers:
            layer.compile(dynamic=True)
        forwards["compile"] = compiled
    step_rows = config.batch_size * config.grad_accum
    steps = [sorted(rows[i * step_rows : (i + 1) * step_rows], key=lambda r: -len(r["input_ids"]))
             for i in range(args.steps + 1)]  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in forwards}
    losses: dict[str, list[float]] = {name: [] for name in forwards}
    for index, chunk in enumerate(steps):
        starts = range(0, step_rows, config.batch_size)
        micro = [collate_micro_batch(chunk[i : i + config.batch_size], pad, False) for i in starts]
        for name, forward in forwards.items():
            started = time.perf_counter()
            loss = accumulate_gradients(forward, micro, "cpu")
            elapsed = time.perf_counter() - started
            (forward.model if isinstance(forward, _WithCache) else forward).zero_grad(set_to_none=True)
            if index == 0:  # the first step warms up (and compiles): timed apart
                if name == "compile":
                    compile_s = round(elapsed, 1)
                continue
            times[name].append(elapsed)
            losses[name].append(loss)
    step_s = {name: statistics.median(t) for name, t in times.items()}
    optimizers = _optimizers(model, config)
    loop_s = optimizers["for-loop"]["optimizer_step_ms"] / 1000
    whole = step_s["stage"] + loop_s  # the stage's step: its forward+backward and its (for-loop) AdamW
    before = step_s["kv-cache"] + loop_s  # the stage's step before it turned the cache off
    levers = {"use_cache=False (against the default)": (step_s["kv-cache"] - step_s["stage"]) / before}
    if "compile" in step_s:
        levers["torch.compile of the decoder layers"] = (step_s["stage"] - step_s["compile"]) / whole
    for name in ("foreach", "fused"):
        levers[f"AdamW {name}"] = (loop_s - optimizers[name]["optimizer_step_ms"] / 1000) / whole
    return {"variant": variant, "rows_per_step": step_rows, "steps": args.steps,
            "forward_backward_s": {name: round(s, 3) for name, s in step_s.items()},
            "forward_backward_s_all": {name: [round(s, 3) for s in t] for name, t in times.items()},
            "max_loss_difference_vs_stage": {name: max(abs(a - b) for a, b in zip(got, losses["stage"], strict=True))
                                             for name, got in losses.items() if name != "stage"},
            "compile_s": compile_s, "optimizers": optimizers, "stage_step_s": round(whole, 3),
            "lever_share_of_step": {k: round(v, 4) for k, v in levers.items()}}  # fmt: skip


def _optimizers(model: Any, config: Any) -> dict[str, dict[str, float]]:
    """Each AdamW implementation's step on the same gradients from the same weights and state; its updated weights
    against the for-loop's."""
    import torch

    from loraforge.tasks.train import _param_groups

    groups = _param_groups(model, config)
    params = [p for group in groups for p in group["params"]]
    torch.manual_seed(1)
    weights = [p.detach().clone() for p in params]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    figures: dict[str, dict[str, float]] = {}
    updated: dict[str, list[Any]] = {}
    for name, impl in OPTIMIZERS.items():
        with torch.no_grad():
            for p, w, g in zip(params, weights, grads, strict=True):
                p.copy_(w)
                p.grad = g.clone()
        settings = {"lr": config.learning_rate, "weight_decay": config.weight_decay, **impl}
        optimizer = torch.optim.AdamW([dict(g) for g in groups], **settings)
        optimizer.step()  # the state (exp_avg, exp_avg_sq) allocated outside the timed steps
        updated[name] = [p.detach().clone() for p in params]
        times = []
        for _ in range(30):
            started = time.perf_counter()
            optimizer.step()
            times.append(time.perf_counter() - started)
        figures[name] = {"optimizer_step_ms": round(1000 * statistics.median(times), 3)}
    for name, entry in figures.items():
        entry["max_abs_diff_vs_for_loop"] = max(
            float((a - b).abs().max()) for a, b in zip(updated[name], updated["for-loop"], strict=True)
        )
    model.zero_grad(set_to_none=True)
    return figures


def _print(results: list[dict[str, Any]]) -> None:
    for r in results:
        fb = ", ".join(f"{k} {v:.2f} s" for k, v in r["forward_backward_s"].items())
        opt = ", ".join(f"{k} {v['optimizer_step_ms']:.1f} ms" for k, v in r["optimizers"].items())
        print(f"{r['variant']}: forward+backward per step {fb}; AdamW {opt}; compile {r['compile_s']} s")
        for lever, share in r["lever_share_of_step"].items():
            print(f"  {lever:<40} {share:+.1%} of the stage's step")
        print(f"  loss differences vs the stage: {r['max_loss_difference_vs_stage']}")


if __name__ == "__main__":
    raise SystemExit(main())
