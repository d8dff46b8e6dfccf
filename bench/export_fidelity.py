"""Export: size, perplexity ratio, KL, top-1 and decode tokens/s of each GGUF type vs the HF model (issue 7, item 3).

    .venv/bin/python bench/export_fidelity.py                              # the demo config's store (./artifacts)
    .venv/bin/python bench/export_fidelity.py --types f16,q8_0 --repeats 1 # a quick look
    .venv/bin/python bench/export_fidelity.py CONFIG key=value ...

The stages up to merge are the pipeline's own (cache hits after `make demo` with the same config); the quantize
stage then writes every requested type and measures, in llama-cpp-python against the merged HF model in fp32,
mean KL, top-1 agreement and the perplexity ratio on validation rows and the answers' first eval metric on test
rows (the stage's own checks, with `quantize.imatrix`, default off here: plain quantization of every type).

Decode speed, in this process: the merged HF model (fp32, torch, greedy `generate`) as the baseline, then each
GGUF in llama-cpp-python (greedy), both on the same chat prompt for `--new-tokens` tokens with the end-of-text
token suppressed so every run decodes the same count, on `--threads` threads (1 by default: the robust setting
on a shared machine). Medians of `--repeats`; ratios against the HF model. Writes bench/results/export_fidelity.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ALL_TYPES = "f16,bf16,q8_0,q6_k,q5_k_m,q4_k_m,q4_0"
PROMPT = "My invoice shows a charge I do not recognise and I want a refund for it."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("items", nargs="*", metavar="CONFIG|key=value", help="config and overrides (default: demo)")
    parser.add_argument("--types", default=ALL_TYPES, help=f"GGUF types (default {ALL_TYPES})")
    parser.add_argument("--imatrix", default="off", choices=("off", "on", "auto"), help="quantize.imatrix")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per speed run")
    parser.add_argument("--threads", type=int, default=1, help="threads for torch and llama.cpp in the speed runs")
    parser.add_argument("--repeats", type=int, default=3, help="speed runs per model (medians reported)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "export_fidelity.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from loraforge.tasks.artifacts import ArtifactStore
    from loraforge.tasks.config import DEMO_CONFIG, load_config
    from loraforge.tasks.data import prepare_data
    from loraforge.tasks.merge import merge_adapter
    from loraforge.tasks.models import provision_base
    from loraforge.tasks.quantize import quantize_gguf
    from loraforge.tasks.train import train_adapter

    items = args.items if args.items and args.items[0].endswith((".yaml", ".yml")) else [str(DEMO_CONFIG), *args.items]
    types = args.types.split(",")
    config = load_config(
        items[0], [*items[1:], f"quantize.types=[{','.join(types)}]", f"quantize.imatrix={args.imatrix}"]
    )
    store = ArtifactStore(config.store)
    started = time.perf_counter()
    base = provision_base(config.base_model, store)
    data = prepare_data(config.data, base, store)
    train = train_adapter(config.train, base, data, store)
    merge = merge_adapter(config.merge, base, data, train, store)
    print(f"[bench] base..merge ready in {time.perf_counter() - started:.0f} s (merge {merge.key})", flush=True)
    quantize = quantize_gguf(config.quantize, config.name, config.eval, base, data, train, merge, store)
    print(f"[bench] quantize {quantize.key} ({'cache hit' if quantize.cached else 'computed'})", flush=True)

    model_dir = merge.path / "model"
    hf_size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**20
    prompt_ids = _prompt_ids(model_dir, data)
    hf_speed = _hf_decode(model_dir, prompt_ids, args.new_tokens, args.threads, args.repeats)
    print(f"[bench] HF fp32 (torch): {hf_speed:.1f} tok/s", flush=True)
    rows: list[dict[str, Any]] = [{
        "model": f"HF merged ({merge.manifest['config']['dtype']} on disk, fp32 in torch)", "type": "hf",
        "size_mb": round(hf_size, 1), "size_vs_hf": 1.0, "mean_kl": 0.0, "top1_agreement": 1.0, "ppl_ratio": 1.0,
        "probe": None, "decode_tok_s": round(hf_speed, 1), "decode_vs_hf": 1.0, "passed": True,
    }]  # fmt: skip
    figures = quantize.manifest["gguf"]
    headline = next(iter(next(iter(figures.values()))["probe_drop"]), "")  # the first answer metric of eval.metrics
    for qtype in types:
        info = figures[qtype]
        speed = _gguf_decode(quantize.path / info["file"], prompt_ids, args.new_tokens, args.threads, args.repeats)
        print(f"[bench] {qtype}: {speed:.1f} tok/s", flush=True)
        rows.append({
            "model": info["file"], "type": qtype, "size_mb": info["size_mb"],
            "size_vs_hf": round(info["size_mb"] / hf_size, 3), "mean_kl": info["mean_kl"],
            "top1_agreement": info["top1_agreement"], "ppl_ratio": info["ppl_ratio"],
            "probe": info["probe"].get(headline),
            "decode_tok_s": round(speed, 1), "decode_vs_hf": round(speed / hf_speed, 2), "passed": info["passed"],
            "fallback_tensors": info.get("fallback_tensors"), "imatrix": info.get("imatrix"),
        })  # fmt: skip
    rows[0]["probe"] = next(iter(figures.values()))["hf_probe"].get(headline)
    _print(rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "config": items, "merge": merge.key, "quantize": quantize.key, "threads": args.threads,
        "new_tokens": args.new_tokens, "repeats": args.repeats, "imatrix": args.imatrix, "rows": rows,
        "fidelity_rows": config.quantize.fidelity_rows, "probe_rows": config.quantize.probe_rows,
        "host": {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M")},
    }, indent=2))  # fmt: skip
    print(f"wrote {args.json}")
    return 0


def _prompt_ids(model_dir: Path, data: Any) -> list[int]:
    """The demo's chat prompt as training rendered it (the data artifact's template), as token ids."""
    from loraforge.tasks.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    tokenizer.chat_template = data.file("chat_template.jinja").read_text()
    messages = [{"role": "user", "content": PROMPT}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def _hf_decode(model_dir: Path, prompt_ids: list[int], new_tokens: int, threads: int, repeats: int) -> float:
    import torch

    from loraforge.tasks.models import load_causal_lm

    torch.set_num_threads(threads)
    model = load_causal_lm(model_dir, "float32")
    model.eval()
    ids = torch.tensor([prompt_ids])
    eos = model.generation_config.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    speeds = []
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first run warms up
            started = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, suppress_tokens=eos_ids or None,
                                 pad_token_id=eos_ids[0] if eos_ids else None)  # fmt: skip
            seconds = time.perf_counter() - started
            speeds.append((out.shape[1] - ids.shape[1]) / seconds)
    del model
    return statistics.median(speeds[1:])


def _gguf_decode(path: Path, prompt_ids: list[int], new_tokens: int, threads: int, repeats: int) -> float:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=len(prompt_ids) + new_tokens + 8, n_threads=threads, verbose=False, seed=0)
    speeds = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        out = llm.create_completion(prompt_ids, max_tokens=new_tokens, temperature=0.0, top_k=1,
                                    logit_bias={llm.token_eos(): -1e4})  # fmt: skip
        seconds = time.perf_counter() - started
        speeds.append(out["usage"]["completion_tokens"] / seconds)
        llm.reset()
    del llm
    return statistics.median(speeds[1:])


def _print(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'type':7s} {'size MB':>8s} {'x size':>7s} {'mean KL':>8s} {'top-1':>6s} {'ppl ratio':>9s} {'probe':>6s} "
          f"{'tok/s':>7s} {'x HF':>6s} passed")  # fmt: skip
    for r in rows:
        acc = f"{r['probe']:.3f}" if r["probe"] is not None else "-"
        print(f"{r['type']:7s} {r['size_mb']:8.1f} {r['size_vs_hf']:7.3f} {r['mean_kl']:8.4f} "
              f"{r['top1_agreement']:6.3f} {r['ppl_ratio']:9.4f} {acc:>6s} {r['decode_tok_s']:7.1f} "
              f"{r['decode_vs_hf']:6.2f} {r['passed']}")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
