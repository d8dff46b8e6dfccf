"""Quantize levers (issue 20, item 2): where the quantize stage's time goes and what each saving costs in fidelity.

    .venv/bin/python bench/quantize_levers.py                                  # after `make demo` (~12 min on 2 cores)
    .venv/bin/python bench/quantize_levers.py --stage-runs none --chunks 2,8   # the chunk sweep only, a quick look
    .venv/bin/python bench/quantize_levers.py CONFIG key=value ...

The stages up to merge are the pipeline's own (cache hits after `make demo` with the same config).

1. The stage, side by side in one run, each in a store of its own holding copies of base..merge, with this
   machine's importance-matrix cache emptied first (it is a cache: the next run fills it again):
   `before` = the earlier defaults (imatrix_chunks=64, llama.cpp's tools on 1 thread): the baseline;
   `now` = today's defaults (8 chunks, the tools on every core);
   `relimit` = today's defaults with one limit changed (a new key: a rerun that takes the matrix from the cache).
   Each one's wall time beside the train stage's (its manifest's duration_s): the target is quantize <= 0.5 x train.
2. Importance-matrix chunks: llama-imatrix's time on 1 thread and on every core, and q4_k_m's mean KL and top-1
   against the merged model over every validation row, for each chunk count, beside the plain q4_k_m.
3. Fidelity rows: each file's KL, top-1, perplexity ratio and verdict (the stage's `verdict`, logit limits) over
   the first 4, 8, 16, 32 and all validation rows: how few rows keep the verdict and the imatrix choice.

The figures come from the stage's own code (`quantize_gguf`, `_logit_figures`, `verdict`). Writes
bench/results/quantize_levers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STAGE_RUNS = {
    "before": ["quantize.imatrix_chunks=64", "quantize.tool_threads=1"],
    "now": [],
    "relimit": ["quantize.max_mean_kl.q4_k_m=0.31"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("items", nargs="*", metavar="CONFIG|key=value", help="config and overrides (default: demo)")
    parser.add_argument("--stage-runs", default=",".join(STAGE_RUNS), help="of before,now,relimit; 'none' skips 1")
    parser.add_argument("--chunks", default="2,4,8,16,32,64", help="importance-matrix chunk counts for 2")
    parser.add_argument("--rows", default="4,8,16,32", help="fidelity row counts for 3 (all rows are added)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "quantize_levers.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from loraforge.tasks.artifacts import ArtifactStore
    from loraforge.tasks.config import DEMO_CONFIG, load_config
    from loraforge.tasks.data import prepare_data
    from loraforge.tasks.merge import merge_adapter
    from loraforge.tasks.models import provision_base
    from loraforge.tasks.train import train_adapter

    items = args.items if args.items and args.items[0].endswith((".yaml", ".yml")) else [str(DEMO_CONFIG), *args.items]
    config = load_config(items[0], items[1:])
    store = ArtifactStore(config.store)
    base = provision_base(config.base_model, store)
    data = prepare_data(config.data, base, store)
    train = train_adapter(config.train, base, data, store)
    merge = merge_adapter(config.merge, base, data, train, store)
    print(f"[bench] base..merge ready (merge {merge.key}, train took {train.manifest['duration_s']} s)", flush=True)
    ups = {"base": base, "data": data, "train": train, "merge": merge}
    runs = [r for r in args.stage_runs.split(",") if r in STAGE_RUNS]
    results: dict[str, Any] = {"config": items, "merge": merge.key, "train_s": train.manifest["duration_s"]}
    with tempfile.TemporaryDirectory(prefix="quantize-levers-") as scratch:
        results["stage"] = _stage_runs(items, runs, ups, Path(scratch))
        work = Path(scratch) / "files"
        work.mkdir()
        chunks, files = _chunk_sweep(config, merge, data, work, [int(c) for c in args.chunks.split(",")])
        results["imatrix_chunks"] = chunks
        results["fidelity_rows"] = _row_counts(config, merge, data, work, files, [int(r) for r in args.rows.split(",")])
    results["host"] = {"cpus": len(os.sched_getaffinity(0)), "load_avg": os.getloadavg(),
                       "date": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")
    return 0


def _stage_runs(items: list[str], runs: list[str], ups: dict[str, Any], scratch: Path) -> list[dict[str, Any]]:
    """Part 1: the quantize stage under each setting, each in a store of its own (copies of base..merge)."""
    from loraforge.tasks.artifacts import ArtifactStore
    from loraforge.tasks.config import load_config
    from loraforge.tasks.models import cache_dir
    from loraforge.tasks.quantize import quantize_gguf

    shutil.rmtree(cache_dir() / "imatrix", ignore_errors=True)
    rows = []
    for index, run in enumerate(runs):
        root = scratch / f"store-{index}"
        for artifact in ups.values():
            shutil.copytree(artifact.path, root / artifact.stage / artifact.key)
        store = ArtifactStore(root)
        got = {stage: store.get(stage, artifact.key) for stage, artifact in ups.items()}
        config = load_config(items[0], [*items[1:], *STAGE_RUNS[run]])
        started = time.perf_counter()
        pieces: dict[str, float] = {}  # seconds of each piece of the stage's work, in order (its on_step)

        def piece_done(step: dict[str, Any], total: int, pieces: dict = pieces, started: float = started) -> None:
            pieces[step["work"]] = round(time.perf_counter() - started - sum(pieces.values()), 1)

        quantize = quantize_gguf(config.quantize, config.name, config.eval, got["base"], got["data"], got["train"],
                                 got["merge"], store, on_step=piece_done)  # fmt: skip
        seconds = time.perf_counter() - started
        verdicts = {q: g["passed"] for q, g in quantize.manifest["gguf"].items()}
        kept = {q: g["imatrix"] for q, g in quantize.manifest["gguf"].items() if "imatrix_vs_plain" in g}
        chunks = (quantize.manifest.get("imatrix") or {}).get("chunks")
        rows.append({"run": run, "overrides": STAGE_RUNS[run], "seconds": round(seconds, 1),
                     "vs_train": round(seconds / ups["train"].manifest["duration_s"], 3), "passed": verdicts,
                     "imatrix_kept": kept, "imatrix_chunks": chunks, "pieces_s": pieces})  # fmt: skip
        print(f"[bench] stage {run}: {seconds:.1f} s ({rows[-1]['vs_train']} x train), passed {verdicts}; {pieces}",
              flush=True)  # fmt: skip
        shutil.rmtree(root)
    return rows


def _chunk_sweep(
    config: Any, merge: Any, data: Any, work: Path, counts: list[int]
) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Part 2: llama-imatrix per chunk count (1 thread, every core), q4_k_m with each matrix, measured on all rows."""
    import llama_cpp

    from loraforge.tasks.quantize import _convert, _converter_dir, _quantize, _tools_dir

    tools = _tools_dir(llama_cpp.__version__)
    f16 = work / "bench-F16.gguf"
    _convert(_converter_dir(llama_cpp.__version__), merge.file("model"), f16, "f16", "bench", 3600)
    files = {"f16": f16, "q4_k_m plain": work / "bench-Q4_K_M.gguf"}
    _quantize(f16, files["q4_k_m plain"], "q4_k_m")
    text = work / ".imatrix-train.txt"
    text.write_text(_train_text(merge, data))
    reference = _reference(merge, data, work, None)
    rows = [{"chunks": 0, **_logits(files["q4_k_m plain"], reference)}]
    cores = len(os.sched_getaffinity(0))
    for count in counts:
        row: dict[str, Any] = {"chunks": count}
        for threads in sorted({1, cores}):
            out = work / f"im-{count}-{threads}.gguf"
            started = time.perf_counter()
            subprocess.run([str(tools / "llama-imatrix"), "-m", f16.name, "-f", text.name, "-o", out.name,
                            "--parse-special", "--no-ppl", "-c", str(config.quantize.imatrix_ctx), "-b",
                            str(config.quantize.imatrix_ctx), "--chunks", str(count), "-t", str(threads)],
                           cwd=work, check=True, capture_output=True)  # fmt: skip
            row[f"imatrix_s_{threads}_threads"] = round(time.perf_counter() - started, 2)
        target = files[f"q4_k_m imatrix {count}"] = work / f"bench-Q4_K_M-im{count}.gguf"
        subprocess.run([str(tools / "llama-quantize"), "--imatrix", out.name, f16.name, target.name, "Q4_K_M",
                        str(cores)], cwd=work, check=True, capture_output=True)  # fmt: skip
        row.update(_logits(target, reference))
        rows.append(row)
        print(f"[bench] imatrix {count} chunks: {row}", flush=True)
    return rows, files


def _row_counts(
    config: Any, merge: Any, data: Any, work: Path, files: dict[str, Path], counts: list[int]
) -> list[dict[str, Any]]:
    """Part 3: f16, q8_0 and q4_k_m (plain, and with the default chunk count's matrix): each file's figures and
    logit verdict over the first N validation rows."""
    from loraforge.tasks.quantize import _quantize

    default = f"q4_k_m imatrix {config.quantize.imatrix_chunks}"
    files = {"f16": files["f16"], "q8_0": work / "bench-Q8_0.gguf", "q4_k_m plain": files["q4_k_m plain"],
             **{name: path for name, path in files.items() if name == default}}  # fmt: skip
    _quantize(files["f16"], files["q8_0"], "q8_0")
    everything = len(_validation(data))
    out = []
    for rows in [*[c for c in counts if c < everything], everything]:
        reference = _reference(merge, data, work, rows)
        for name, path in files.items():
            figures = _logits(path, reference)
            limits = config.quantize.limits(name.split()[0])
            failed = _logit_verdict(figures, limits)
            out.append({"rows": rows, "file": name, **figures, "passed": not failed, "reasons": failed})
        print(f"[bench] {rows} rows: " + ", ".join(f"{r['file']} KL {r['mean_kl']}" for r in out[-len(files) :]))
    return out


def _logit_verdict(figures: dict[str, Any], limits: Any) -> list[str]:
    from loraforge.tasks.quantize import verdict

    return verdict({**figures, "probe": {}, "hf_probe": {}}, limits)


def _validation(data: Any) -> list[dict[str, Any]]:
    from loraforge.tasks.batching import read_split

    return read_split(data.file("validation.jsonl"))


def _train_text(merge: Any, data: Any) -> str:
    from loraforge.tasks.batching import read_split
    from loraforge.tasks.models import load_tokenizer

    tokenizer = load_tokenizer(merge.file("model"))
    rows = read_split(data.file("train.jsonl"))
    return "".join(str(tokenizer.decode(r["input_ids"], skip_special_tokens=False)) for r in rows)


def _reference(merge: Any, data: Any, work: Path, rows: int | None) -> Any:
    """The merged model's log-probs on the first `rows` validation rows (all when None), as the stage keeps them."""
    import torch

    from loraforge.tasks.data import read_data
    from loraforge.tasks.models import load_causal_lm
    from loraforge.tasks.quantize import HFReference

    chosen = _validation(data)[:rows]
    folder = work / f"logprobs-{rows}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    model = load_causal_lm(merge.file("model"), "float32").eval()
    files = []
    with torch.no_grad():
        for index, row in enumerate(chosen):
            files.append(folder / f"{index}.pt")
            torch.save(torch.log_softmax(model(input_ids=torch.tensor([row["input_ids"]])).logits[0].float(), -1),
                       files[-1])  # fmt: skip
    n_ctx = read_data(data).max_length + 16
    return HFReference(None, [], [], chosen, files, {}, n_ctx)


def _logits(path: Path, reference: Any) -> dict[str, Any]:
    from llama_cpp import Llama

    from loraforge.tasks.quantize import _logit_figures

    llm = Llama(model_path=str(path), n_ctx=reference.n_ctx, n_threads=1, verbose=False, seed=0, logits_all=True)
    figures = _logit_figures(llm, reference, path.name)
    del llm
    return figures


if __name__ == "__main__":
    raise SystemExit(main())
