"""The CPU and CUDA pin sets (constraints.txt, constraints-cuda.txt) agree on everything but torch's build and
the CUDA libraries it pulls, so that neither install fights the other's torch (`make constraints` writes both)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("constraints_cuda", ROOT / "infra" / "constraints_cuda.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pins(text: str) -> dict[str, str]:
    return {re.split(r"===?", line)[0]: line for line in text.splitlines() if line.strip() and not line.startswith("#")}


def test_cuda_set_is_the_cpu_set_with_pypi_cuda_torch() -> None:
    cpu_text = (ROOT / "constraints.txt").read_text()
    cuda_text = (ROOT / "constraints-cuda.txt").read_text()
    cpu, cuda = _pins(cpu_text), _pins(cuda_text)
    assert cpu["torch"] == "torch==2.13.0+cpu"
    assert cuda["torch"] == "torch===2.13.0"  # === : a local 2.13.0+cpu wheel never satisfies it
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+===?[^=\s]+", line) for line in cuda.values()), "not exact pins"
    assert {n: line for n, line in cuda.items() if n in cpu and n != "torch"} == {
        n: line for n, line in cpu.items() if n != "torch"
    }
    extra = set(cuda) - set(cpu)
    assert {"nvidia-cudnn-cu13", "nvidia-cublas", "nvidia-nccl-cu13", "triton"} <= extra, sorted(extra)
    # The file is what the generator writes from constraints.txt and those resolved versions (make constraints).
    resolved = {n: re.split(r"===?", line)[1] for n, line in cuda.items() if n in extra or n == "torch"}
    assert _generator().cuda_constraints(cpu_text, resolved) == cuda_text


def test_generator_refuses_a_torch_of_another_version() -> None:
    with pytest.raises(ValueError, match="pip resolved torch 2.14.1, the CPU set pins 2.13.0"):
        _generator().cuda_constraints("torch==2.13.0+cpu\n", {"torch": "2.14.1"})
    with pytest.raises(ValueError, match="pins no torch"):
        _generator().torch_version("numpy==2.4.6\n")


def test_setup_and_images_take_the_cuda_set_for_cuda() -> None:
    bootstrap = (ROOT / "infra" / "bootstrap.sh").read_text()
    assert "cuda) CONSTRAINTS=constraints-cuda.txt" in bootstrap
    release = (ROOT / ".github" / "workflows" / "release.yml").read_text()
    assert "LORAFORGE_TORCH: cuda" in release
    images = (ROOT / ".github" / "workflows" / "images.yml").read_text()
    assert "containers/build.sh train-cuda" in images and "loraforge-train:$IMAGE_TAG-cuda" in images
