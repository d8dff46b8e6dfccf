"""K adapters on one base against K merged models (issue 21, item 3): resident memory, requests/s and p50/p95
latency of `loraforge serve` under a bounded concurrent load on loopback, the `openai` client as load generator.

    .venv/bin/python bench/serve_adapters.py                 # K = 1, 4, 16, four setups; ~20 min on 2 cores
    .venv/bin/python bench/serve_adapters.py --k 1,4 --requests 16

The adapter: the demo pipeline at a short setting (train.max_steps=8, GGUF f16 and the LoRA, no push; its
artifacts in ./artifacts, cached between runs), its publish bundle (with the GGUF LoRA) uploaded K times
(bench/adapter-0..K-1) to the project's Hub server (infra/hub/server.py) on loopback. The adapters therefore
have the same weights: serving cost does not depend on the values, and every row still runs through the adapter
its request names. The setups per K, one after the other:

- **adapters**: one `loraforge serve` process with the K adapters on SmolLM2-135M (torch on 2 threads);
  requests name `a0`..`aK-1` in turn, and requests that arrive together share one batch whatever they name;
- **merged**: K `loraforge serve --base MERGED` processes, one per merged model (the merge artifact's folder),
  as K separate deployments would be; torch on max(1, 2 // K) threads each, so that together they use the same
  2 cores; request i goes to server i mod K;
- **gguf-adapters** and **gguf-merged**: the same with `--gguf f16`: llama.cpp, the base as an f16 GGUF with each
  adapter's published GGUF LoRA applied per request (one request at a time), against K llama.cpp servers of the
  merged model as an f16 GGUF.

Load: `--concurrency` client threads send `--requests` chat completions (the demo's test tickets with their system
prompt, greedy, `--max-tokens`), after one warm-up request per model. Memory = the sum over the setup's server
processes of VmRSS after the load, and of VmHWM (peak). Writes bench/results/serve_adapters.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TOKEN = "hf_bench_token_0123456789"
SHORT = ["train.max_steps=8", "eval.max_rows=16", "eval.gate=[loss_delta < 0]", "quantize.types=[f16, lora_f16]",
         "quantize.imatrix=off", "publish.include_gguf=[lora_f16]", "publish.push=never"]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--k", default="1,4,16", help="adapter counts")
    parser.add_argument("--requests", type=int, default=48, help="timed requests per setup")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--setups", default="adapters,merged,gguf-adapters,gguf-merged", help="which setups")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "serve_adapters.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_XET", "1")  # the project's Hub server speaks plain HTTP uploads
    counts = [int(k) for k in args.k.split(",")]
    bundle, merged, prompts = _inputs()
    rows = []
    with tempfile.TemporaryDirectory(prefix="loraforge-bench-serve-") as scratch:
        hub = _start([sys.executable, str(ROOT / "infra" / "hub" / "server.py"), "--root", f"{scratch}/repos",
                      "--host", "127.0.0.1", "--port", "{port}", "--token", TOKEN], "/api/whoami-v2", 1)  # fmt: skip
        try:
            _publish(hub["url"], bundle, max(counts))
            for k in counts:
                for setup in args.setups.split(","):
                    rows.append(_measure(setup, k, hub["url"], merged, prompts, args))
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            _stop([hub])
    report = {"command": "bench/serve_adapters.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": len(os.sched_getaffinity(0)), "rows": rows}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    _print(rows)
    print(f"wrote {args.json}")
    return 0


def _inputs() -> tuple[Path, Path, list[list[dict[str, str]]]]:
    """The publish bundle and merged model of the short demo run, and the demo's test conversations (prompts)."""
    from loraforge.flows.pipeline import pipeline
    from loraforge.tasks.config import DEMO_CONFIG, load_config

    record = pipeline(load_config(DEMO_CONFIG, SHORT))
    stages = record["stages"]
    test = ROOT / "flows" / "data" / "tickets" / "test.jsonl"
    conversations = [[m for m in json.loads(line)["messages"] if m["role"] != "assistant"]
                     for line in test.read_text().splitlines() if line.strip()]  # fmt: skip
    return Path(stages["publish"]["path"]) / "bundle", Path(stages["merge"]["path"]) / "model", conversations


def _publish(hub: str, bundle: Path, count: int) -> None:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub, token=TOKEN)
    for i in range(count):
        api.create_repo(f"bench/adapter-{i}", exist_ok=True)
        api.upload_folder(repo_id=f"bench/adapter-{i}", folder_path=bundle, ignore_patterns=["merged/*"])


def _start(cmd: list[str], probe: str, threads: int, timeout: float = 300) -> dict[str, Any]:
    """Start one server on a free port ({port} in cmd) and wait until `probe` answers."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_TOKEN": TOKEN, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    log = tempfile.NamedTemporaryFile("w+", prefix="serve-", suffix=".log", delete=False)  # noqa: SIM115
    process = subprocess.Popen([c.replace("{port}", str(port)) for c in cmd], stdout=log, stderr=subprocess.STDOUT,
                               env=env)  # fmt: skip
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url + probe, timeout=2)
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[:4]} did not start: {Path(log.name).read_text()[-2000:]}") from None
            time.sleep(0.5)
    return {"url": url, "process": process, "log": log.name}


def _stop(servers: list[dict[str, Any]]) -> None:
    for server in servers:
        server["process"].terminate()
    for server in servers:
        try:
            server["process"].wait(timeout=30)
        except subprocess.TimeoutExpired:
            server["process"].kill()
        Path(server["log"]).unlink(missing_ok=True)


def _memory_mb(pid: int) -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def _measure(
    setup: str, k: int, hub: str, merged: Path, prompts: list[Any], args: argparse.Namespace
) -> dict[str, Any]:
    serve = [sys.executable, "-m", "loraforge.flows.cli", "serve", "--port", "{port}", "--endpoint", hub]
    if setup.startswith("gguf-"):
        serve += ["--gguf", "f16"]
    started = time.perf_counter()
    if setup.endswith("adapters"):
        cmd = serve + [arg for i in range(k) for arg in ("--adapter", f"a{i}=bench/adapter-{i}")]
        servers = [_start(cmd, "/health", 2)]
        targets = [(servers[0]["url"], f"a{i}") for i in range(k)]
    else:
        servers = []
        for _ in range(k):  # one at a time: K loads at once would measure the start, not the serving
            servers.append(_start(serve + ["--base", str(merged)], "/health", max(1, 2 // k)))
        targets = [(s["url"], "base") for s in servers]
    start_s = time.perf_counter() - started
    try:
        for url, model in targets:
            _ask(url, model, prompts[0], args.max_tokens)
        latencies, tokens, wall = _load(targets, prompts, args)
        memory = [_memory_mb(s["process"].pid) for s in servers]
    finally:
        _stop(servers)
    ordered = sorted(latencies)
    return {"setup": setup, "k": k, "processes": len(servers), "start_s": round(start_s, 1),
            "rss_mb": round(sum(m[0] for m in memory)), "peak_rss_mb": round(sum(m[1] for m in memory)),
            "requests": len(latencies), "requests_per_s": round(len(latencies) / wall, 3),
            "completion_tokens_per_s": round(tokens / wall, 1),
            "p50_s": round(statistics.median(ordered), 3), "p95_s": round(ordered[int(0.95 * (len(ordered) - 1))], 3),
            "concurrency": args.concurrency, "max_tokens": args.max_tokens}  # fmt: skip


def _ask(url: str, model: str, messages: Any, max_tokens: int) -> int:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    return reply.usage.completion_tokens if reply.usage else 0


def _load(
    targets: list[tuple[str, str]], prompts: list[Any], args: argparse.Namespace
) -> tuple[list[float], int, float]:
    """`args.requests` requests from `args.concurrency` threads, request i to target i mod K with prompt i."""
    jobs = list(range(args.requests))
    lock = threading.Lock()
    latencies: list[float] = []
    tokens = [0]

    def worker() -> None:
        while True:
            with lock:
                if not jobs:
                    return
                i = jobs.pop(0)
            url, model = targets[i % len(targets)]
            began = time.perf_counter()
            made = _ask(url, model, prompts[i % len(prompts)], args.max_tokens)
            with lock:
                latencies.append(time.perf_counter() - began)
                tokens[0] += made

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, tokens[0], time.perf_counter() - started


def _print(rows: list[dict[str, Any]]) -> None:
    print(f"{'K':>3} {'setup':<9} {'procs':>5} {'start s':>8} {'RSS MB':>8} {'peak MB':>8} {'req/s':>7} {'tok/s':>7} "
          f"{'p50 s':>7} {'p95 s':>7}")  # fmt: skip
    for r in rows:
        print(f"{r['k']:>3} {r['setup']:<9} {r['processes']:>5} {r['start_s']:>8} {r['rss_mb']:>8} "
              f"{r['peak_rss_mb']:>8} {r['requests_per_s']:>7} {r['completion_tokens_per_s']:>7} {r['p50_s']:>7} "
              f"{r['p95_s']:>7}")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
