"""The GPU train image (`containers/build.sh train-cuda`): built here, no GPU needed to build or inspect it.

Checks what the loraforge-gpu pool's train deployment runs (`loraforge-train:<tag>-cuda`, infra/prefect.yaml):
torch is PyPI's CUDA build of the pinned version, bitsandbytes carries the CUDA library that torch's CUDA version
loads, and every package in the image is at its constraints-cuda.txt pin. Running it on a GPU is
`make gpu-check`'s business (bench/gpu_check.py).

The first build downloads about 3 GB of CUDA wheels (containers/README.md has the time and size); later runs
find the image up to date by its context hash (~10 s).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from images import built_tag

pytestmark = pytest.mark.containers

ROOT = Path(__file__).resolve().parents[2]
PODMAN = [str(ROOT / "containers" / "podman.sh")]
# Printed by python inside the image: torch's build, whether it sees a GPU, bitsandbytes' CUDA library for
# torch's CUDA version, and every installed distribution's version.
PROBE = """
import importlib.metadata as md, json, pathlib, torch, bitsandbytes
cuda = torch.version.cuda or ""
lib = pathlib.Path(bitsandbytes.__file__).parent / f"libbitsandbytes_cuda{cuda.replace('.', '')}.so"
print(json.dumps({"torch": torch.__version__, "cuda": cuda, "gpu": torch.cuda.is_available(),
                  "bnb_cuda_lib": lib.is_file(), "dists": {d.metadata["Name"]: d.version for d in md.distributions()}}))
"""
NOT_PINNED = {
    "loraforge",  # the project itself
    "pip",  # the venv's own (Debian's python3-venv)
    # redis needs it only on Python < 3.11.3: the images run Debian bookworm's 3.11.2, while the venv that
    # `make constraints` freezes runs a later 3.11, so no set pins it (the CPU images install it unpinned too).
    "async-timeout",
}


def _pins(path: Path) -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = re.split(r"===?", line, maxsplit=1)
            pins[canonicalize_name(name)] = version.strip()
    return pins


@pytest.fixture(scope="module")
def cuda_image() -> str:
    """Build (or find up to date) the CUDA train image; returns its name."""
    result = subprocess.run(["bash", str(ROOT / "containers" / "build.sh"), "train-cuda"], cwd=ROOT,
                            capture_output=True, text=True, env=os.environ)  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return f"localhost/loraforge-train:{built_tag(result.stdout)[0]}-cuda"


def test_cuda_train_image_has_pypi_cuda_torch_and_the_pinned_versions(cuda_image: str) -> None:
    from packaging.utils import canonicalize_name

    out = subprocess.run([*PODMAN, "run", "--rm", "--network=none", cuda_image, "python", "-c", PROBE],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    pins = _pins(ROOT / "constraints-cuda.txt")

    # PyPI's CUDA build: the distribution is 2.13.0 (no +cpu), and torch reports its CUDA in its own version.
    assert re.fullmatch(r"1[23]\.\d+", found["cuda"]), found["cuda"]
    assert found["torch"] == f"2.13.0+cu{found['cuda'].replace('.', '')}", found["torch"]
    assert found["dists"]["torch"] == pins["torch"] == "2.13.0"
    assert found["gpu"] is False  # no GPU here; the image still loads torch's CUDA build
    assert found["bnb_cuda_lib"], f"bitsandbytes has no library for CUDA {found['cuda']}"
    installed = {canonicalize_name(name): version for name, version in found["dists"].items()}
    for library in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors"):
        assert installed[library] == pins[library], (library, installed[library], pins[library])
    assert any(name.startswith("nvidia-cudnn") for name in installed), sorted(installed)
    off_pin = {n: (v, pins.get(n)) for n, v in installed.items() if n not in NOT_PINNED and pins.get(n) != v}
    assert off_pin == {}, f"installed (version, pin) not at constraints-cuda.txt's pin: {off_pin}"
