"""Pipeline overhead: the whole pipeline's wall time vs the sum of its stages' compute (issue 7, item 2).

    .venv/bin/python bench/pipeline_overhead.py                          # the demo config, a fresh store
    .venv/bin/python bench/pipeline_overhead.py CONFIG key=value ...      # any config and overrides

Every figure is a fresh `loraforge` process, as a user or a scheduler starts it, all sharing one Prefect home
(its temporary local server starts in each process, as it does for a user without a server):

- floor, python: `python -c "import flows.pipeline"` (interpreter, Prefect, pydantic and our modules);
- floor, Prefect: an empty flow in a fresh process (imports + Prefect's temporary server + one flow run);
- fresh: `loraforge run CONFIG store=<empty folder>`: wall time, and the stages' own seconds from the run
  record (each stage's time inside the flow, its Prefect task included); overhead = wall - stages;
- cached: the same command again (every stage a cache hit), `--repeats` times.

Medians over `--repeats` for the floors and the cached re-run; the fresh run is done once (it is minutes of
training). Writes bench/results/pipeline_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EMPTY_FLOW = "from prefect import flow\n@flow\ndef empty() -> None:\n    pass\nempty()\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("items", nargs="*", metavar="CONFIG|key=value", help="config and overrides (default: demo)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each floor and of the cached re-run")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "pipeline_overhead.json")
    args = parser.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="loraforge-bench-pipeline-"))
    env = {**os.environ, "PREFECT_HOME": str(scratch / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE"}  # fmt: skip
    env.pop("PREFECT_API_URL", None)  # the temporary local server, as without a Prefect server
    env.pop("HF_TOKEN", None)  # publish writes the bundle; nothing is pushed
    python = sys.executable
    loraforge = str(Path(python).with_name("loraforge"))
    store = scratch / "store"
    command = [loraforge, "run", *(args.items or [str(ROOT / "flows" / "configs" / "demo.yaml")]), f"store={store}"]

    print("warm-up: Prefect's database in a new home (not counted)", flush=True)
    _timed([python, "-c", EMPTY_FLOW], env)
    floors = {
        "python + imports": [_timed([python, "-c", "import flows.pipeline"], env) for _ in range(args.repeats)],
        "Prefect empty flow": [_timed([python, "-c", EMPTY_FLOW], env) for _ in range(args.repeats)],
    }
    for name, times in floors.items():
        print(f"{name}: {statistics.median(times):.1f} s (median of {len(times)})", flush=True)

    print(f"fresh run: {' '.join(command)}", flush=True)
    fresh = _pipeline_run(command, env, store)
    print(f"  wall {fresh['wall_s']:.1f} s, stages {fresh['stages_s']:.1f} s", flush=True)
    cached = [_pipeline_run(command, env, store) for _ in range(args.repeats)]
    if any(not all(s["cached"] for s in run["stages"].values()) for run in cached):
        raise SystemExit("a re-run recomputed a stage: the pipeline is not idempotent for this config")

    rows = [{"run": name, "wall_s": round(statistics.median(times), 2), "stages_s": None, "runs": len(times)}
            for name, times in floors.items()]  # fmt: skip
    rows.append({"run": "fresh pipeline", "wall_s": fresh["wall_s"], "stages_s": fresh["stages_s"], "runs": 1})
    rows.append({
        "run": "cached re-run", "wall_s": round(statistics.median(r["wall_s"] for r in cached), 2),
        "stages_s": round(statistics.median(r["stages_s"] for r in cached), 2), "runs": len(cached),
    })  # fmt: skip
    floor = rows[1]["wall_s"]
    for row in rows:
        if row["stages_s"] is not None:
            row["overhead_s"] = round(row["wall_s"] - row["stages_s"], 2)
            row["overhead_share"] = round(row["overhead_s"] / row["wall_s"], 4)
        row["x_empty_flow"] = round(row["wall_s"] / floor, 2)
    _print(rows, fresh)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"command": command[1:], "host": _host(), "rows": rows,
                                     "fresh_stages": fresh["stages"], "floors": floors,
                                     "cached_runs": [r["wall_s"] for r in cached]}, indent=2))  # fmt: skip
    print(f"wrote {args.json}")
    return 0


def _timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(
            f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    return round(seconds, 2)


def _pipeline_run(command: list[str], env: dict[str, str], store: Path) -> dict[str, Any]:
    """One `loraforge run` in a fresh process: its wall time and the run record it wrote."""
    before = set((store / "runs").glob("*.json")) if (store / "runs").is_dir() else set()
    wall = _timed(command, env)
    records = sorted(set((store / "runs").glob("*.json")) - before)
    if len(records) != 1:
        raise SystemExit(f"expected one new run record in {store / 'runs'}, found {len(records)}")
    stages = json.loads(records[0].read_text())["stages"]
    return {"wall_s": wall, "stages_s": round(sum(s["seconds"] for s in stages.values()), 2), "stages": stages}


def _print(rows: list[dict[str, Any]], fresh: dict[str, Any]) -> None:
    print(f"\n{'run':20s} {'wall s':>8s} {'stages s':>9s} {'overhead s':>11s} {'overhead':>9s} {'x empty flow':>13s}")
    for row in rows:
        stages = f"{row['stages_s']:9.1f}" if row["stages_s"] is not None else f"{'-':>9s}"
        over = f"{row['overhead_s']:11.1f} {100 * row['overhead_share']:8.1f}%" if "overhead_s" in row else (
            f"{'-':>11s} {'-':>9s}")  # fmt: skip
        print(f"{row['run']:20s} {row['wall_s']:8.1f} {stages} {over} {row['x_empty_flow']:13.2f}")
    print("\nfresh run, per stage: " + ", ".join(f"{n} {s['seconds']:.1f} s" for n, s in fresh["stages"].items()))


def _host() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M")}


if __name__ == "__main__":
    raise SystemExit(main())
