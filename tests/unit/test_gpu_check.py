"""bench/gpu_check.py (`make gpu-check`) without a GPU: the smoke run on CPU goes through the same code (build,
4-bit quantization, LoRA, timed steps, one JSON), no CUDA says so and exits 0, and the choices it makes on a GPU
(model size, peak FLOP/s, MFU, the multi-GPU part) are checked on their own."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from bench_script import load_bench_script


@pytest.fixture(scope="module")
def gpu_check() -> Any:
    return load_bench_script("gpu_check")


def test_smoke_run_prints_one_json_with_every_variant(gpu_check: Any, tmp_path: Path, capsys: Any) -> None:
    assert gpu_check.main(["--smoke", "--json", str(tmp_path / "check.json")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((tmp_path / "check.json").read_text())
    assert report["device"] == "cpu" and report["model"]["size"] == "tiny"
    assert set(report["variants"]) == {"qlora-nf4-bf16", "lora-bf16", "lora-fp32"}
    for name, result in report["variants"].items():
        assert result["status"] == "ok", (name, result)
        assert result["tokens_per_s"] > 0 and result["peak_mb"] > 0 and result["mfu"] > 0, result
        # r=16 on all 7 linears of 2 layers (hidden 64, k/v 32, MLP 128): 16 x (in + out) each
        assert result["trainable_params"] == 2 * 16 * (2 * 128 + 2 * 96 + 3 * 192), result
    assert report["variants"]["qlora-nf4-bf16"]["quantized_layers"] == 2 * 7  # every decoder linear, 2 layers
    assert report["variants"]["lora-bf16"]["quantized_layers"] == 0
    assert report["multi_gpu"]["status"] == "skipped"


def test_without_cuda_it_says_so_and_exits_0(gpu_check: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    out = capsys.readouterr().out
    assert "no CUDA device here" in out and "GPU figures are not measured" in out
    assert "LORAFORGE_TORCH=cuda make setup" in out


def test_size_is_the_largest_that_fits(gpu_check: Any) -> None:
    tokens = 4 * 512
    assert gpu_check._pick_size(141 * 2**30, tokens) == "7b"  # H200
    assert gpu_check._pick_size(79 * 2**30, tokens) == "7b"  # H100 80 GB
    assert gpu_check._pick_size(22 * 2**30, tokens) == "1b"  # L4 / RTX 4090: 7b bf16 does not fit
    assert gpu_check._pick_size(2 * 2**30, tokens) == "1b"  # nothing fits: the smallest, recorded as oom
    assert 6.4e9 < gpu_check._matmul_params("7b") < 6.8e9  # Llama-2-7B without its input embedding
    assert 1.2e9 < gpu_check._matmul_params("1b") < 1.3e9  # Llama-3.2-1B (tied: the head counts once)


def test_peak_table_takes_the_longest_matching_name(gpu_check: Any) -> None:
    names = ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "NVIDIA A10G",
             "NVIDIA L4", "NVIDIA GeForce RTX 4090", "Tesla T4")  # fmt: skip
    peaks = [gpu_check._table_peak(name) for name in names]
    assert peaks == [989e12, 756e12, 989e12, 312e12, 125e12, 121e12, 165e12, None]  # T4: the GEMM probe's


def test_mfu_counts_lora_work_and_the_6n_convention(gpu_check: Any) -> None:
    n = gpu_check._matmul_params("7b")
    figures = gpu_check._mfu({"tokens_per_s": 1000.0, "trainable_params": 40_000_000}, "7b", 989e12)
    assert figures["mfu"] == round(1000 * (4 * n + 6 * 40_000_000) / 989e12, 4)
    assert figures["mfu_6n"] == round(1000 * 6 * n / 989e12, 4)


def test_multi_gpu_part_runs_n_processes_against_one_on_the_same_global_batch(
    gpu_check: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert gpu_check._multi_gpu(1, time.monotonic() + 60)["status"] == "skipped"
    jobs: list[dict] = []
    monkeypatch.setattr(gpu_check, "_run_child", lambda args, timeout: jobs.append(json.loads(args[1])) or {})
    result = gpu_check._multi_gpu(4, time.monotonic() + 60)
    assert result["status"] == "ok" and list(result["runs"]) == ["processes=4", "processes=1"]
    assert [(j["processes"], j["grad_accum"]) for j in jobs] == [(4, 4), (1, 4)]
