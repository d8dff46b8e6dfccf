"""Stage start-up: the CPU seconds a fresh process spends importing what a stage that loads an adapter imports.

    .venv/bin/python bench/stage_startup.py              # 5 fresh processes per row, interleaved
    .venv/bin/python bench/stage_startup.py --repeats 9

Every stage that trains, evaluates, merges or serves, each training rank and each stage container, is a fresh
Python process that imports torch, transformers and peft before its first step. Rows (each a fresh process,
CPU = user + system of that process, its wall time beside it):

- torch + transformers: `import torch, transformers` and the model classes (the floor every row pays);
- + peft (plain `import peft`): the baseline, which imports bitsandbytes with it;
- + peft (`import_peft()`, what the stages use): bitsandbytes hidden during peft's import only;
- + bitsandbytes: the plain row's cost made visible (what a QLoRA run still pays when it quantizes).

Medians over `--repeats`, the rows interleaved so drift hits them alike. Writes bench/results/stage_startup.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOOR = "import torch, transformers\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
ROWS = {
    "torch + transformers": FLOOR,
    "+ peft (plain import)": FLOOR + "import peft\n",
    "+ peft (import_peft)": FLOOR + "from loraforge.tasks.models import import_peft\nimport_peft()\n",
    "+ peft (import_peft) + bitsandbytes": FLOOR
    + "from loraforge.tasks.models import import_peft\nimport_peft()\nimport bitsandbytes\n",
}


def _run(code: str) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of a fresh interpreter running `code`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per row")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "stage_startup.json")
    args = parser.parse_args(argv)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in ROWS}
    _run(FLOOR)  # warm the page cache first
    for _ in range(args.repeats):
        for name, code in ROWS.items():
            samples[name].append(_run(code))
    rows = {
        name: {"cpu_s": round(statistics.median(c for c, _ in runs), 2),
               "wall_s": round(statistics.median(w for _, w in runs), 2)}
        for name, runs in samples.items()
    }  # fmt: skip
    print(f"{'row':40} {'CPU s':>7} {'wall s':>7}   (medians of {args.repeats} fresh processes)")
    for name, figures in rows.items():
        print(f"{name:40} {figures['cpu_s']:7.2f} {figures['wall_s']:7.2f}")
    saved = rows["+ peft (plain import)"]["cpu_s"] - rows["+ peft (import_peft)"]["cpu_s"]
    print(f"import_peft saves {saved:.2f} s of CPU per process against the plain import")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"repeats": args.repeats, "rows": rows, "saved_cpu_s": round(saved, 2)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
