"""Peak memory of the merge stage's fidelity check (used by tests/unit/test_merge_memory.py and docs/bench.md).

`python tests/merge_peak.py ROWS:BATCH [ROWS:BATCH ...]` imports torch, transformers and peft once, then measures
each case in a process forked for it (a fresh copy of the address space, so one case's freed memory cannot hide
the next one's growth): it builds a tiny Llama whose output head dominates (a 256k vocabulary like Gemma 3's,
hidden 16), adds a LoRA adapter with non-zero B, and runs `tasks.merge.measure_fidelity` over ROWS probe rows of
TOKENS tokens, BATCH rows at a time. Prints one JSON line: per case, the check's own peak RSS (MiB) above the
resident set it started from, and the MiB of one row's logits (the unit the test compares in).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

VOCAB = 256_000
TOKENS = 40


def _status(field: str) -> int:
    """A /proc/self/status field in KiB."""
    found = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    assert found, field
    return int(found.group(1))


def measure(rows: int, batch: int) -> float:
    """Peak RSS (MiB) of `measure_fidelity` over `rows` probe rows, `batch` at a time, above where it started."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraforge.tasks.merge import measure_fidelity

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)  # fmt: skip
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(LlamaForCausalLM(config), lora).eval()
    ids = torch.randint(1, VOCAB, (rows, TOKENS)).tolist()
    probes = [{"input_ids": row, "labels": [-100] * (TOKENS // 2) + row[TOKENS // 2 :]} for row in ids]
    with contextlib.suppress(OSError):  # restart the high-water mark here: the check's own peak, not the set-up's
        Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    with tempfile.TemporaryDirectory() as scratch:
        measure_fidelity(model, probes, 0, "float32", batch, Path(scratch))
    return (_status("VmHWM") - before) / 1024


def _child(rows: int, batch: int, out: Any) -> None:
    out.send(measure(rows, batch))


def main(cases: list[tuple[int, int]]) -> dict[str, Any]:
    import peft  # noqa: F401  imported once here, shared by every forked case
    import torch  # noqa: F401
    import transformers  # noqa: F401

    fork = multiprocessing.get_context("fork")
    peaks = {}
    for rows, batch in cases:
        receive, send = fork.Pipe(duplex=False)
        process = fork.Process(target=_child, args=(rows, batch, send))
        process.start()
        peaks[f"{rows}:{batch}"] = receive.recv()
        process.join()
    return {"peak_mb": peaks, "row_logits_mb": TOKENS * VOCAB * 4 / 2**20}


if __name__ == "__main__":
    print(json.dumps(main([tuple(int(n) for n in case.split(":")) for case in sys.argv[1:]])))  # type: ignore[misc]
