"""bench/gpu_check.py's child process (each variant runs in one on a GPU, so its CUDA peak is its own): the
tiny model's QLoRA variant on CPU through `--child`, its JSON read back by the parent."""

from __future__ import annotations

import json

import pytest
from bench_script import load_bench_script

pytestmark = pytest.mark.integration


def test_a_variant_in_its_own_process() -> None:
    gpu_check = load_bench_script("gpu_check")
    job = {"variant": "qlora-nf4-bf16", "size": "tiny", "device": "cpu", "batch": 2, "seq": 32, "warmup": 1, "steps": 1}
    result = gpu_check._run_child(["--child", json.dumps(job)], timeout=180)
    assert result["status"] == "ok" and result["quantized_layers"] == 14 and result["tokens_per_s"] > 0, result
    assert gpu_check._run_child(["--child", "{}"], timeout=180)["status"] == "failed"  # a crash is a result too
