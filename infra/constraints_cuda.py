"""Writes constraints-cuda.txt, the CUDA pin set, from constraints.txt, the CPU one (`make constraints` runs it).

    .venv/bin/python infra/constraints_cuda.py            # after constraints.txt was regenerated

The two sets are the same pins but for torch: constraints.txt has the CPU build (`torch==2.13.0+cpu`, what
`make setup` installs by default), constraints-cuda.txt has PyPI's Linux build of the same version (CUDA 13.0)
and every CUDA library it pulls (nvidia-*, cuda-*, triton), pinned too so that a CUDA install is as repeatable
as a CPU one. Neither file mentions the other's torch, so neither install fights the other (LORAFORGE_TORCH=cuda
make setup, the release job, containers/build.sh train-cuda use the CUDA set).

torch is pinned with `===` (PEP 440 arbitrary equality): `torch==2.13.0` is also satisfied by a local
"2.13.0+cpu" wheel found through pip's find-links, `===` only by the build named "2.13.0".

What torch pulls is resolved by pip itself (`pip install --dry-run --report`, metadata only, nothing is
installed) for Linux x86_64 and CPython 3.11 (the images' and the venv's Python), the CPU set as constraints.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYTHON_VERSION = "3.11"
# manylinux tags of x86_64 glibc 2.17 .. 2.36 (bookworm's): pip's --platform takes each tag literally.
PLATFORMS = [*(f"manylinux_2_{minor}_x86_64" for minor in range(36, 16, -1)), "manylinux2014_x86_64", "linux_x86_64"]
HEADER = """\
# Exact pins for the CUDA flavour: constraints.txt with PyPI's torch (the CUDA 13.0 build) instead of the CPU
# wheel, and the CUDA libraries it pulls on Linux x86_64. Used by LORAFORGE_TORCH=cuda make setup (release.yml)
# and the GPU train image (containers/build.sh train-cuda). Regenerate: make constraints (infra/constraints_cuda.py)
"""
CUDA_BLOCK = "# torch's CUDA build (=== so that a local 2.13.0+cpu wheel never satisfies it) and what it pulls\n"


def torch_version(cpu_constraints: str) -> str:
    """The torch version of the CPU set without its local label (`2.13.0+cpu` -> `2.13.0`)."""
    for line in cpu_constraints.splitlines():
        name, _, version = line.partition("==")
        if canonicalize_name(name.strip()) == "torch":
            return version.strip().split("+")[0]
    raise ValueError("constraints.txt pins no torch: run `make constraints` after `make setup`")


def cuda_constraints(cpu_constraints: str, resolved: dict[str, str]) -> str:
    """constraints-cuda.txt's text: the CPU pins but torch, then torch's CUDA build and its CUDA dependencies.

    Args:
        cpu_constraints: constraints.txt's text.
        resolved: name -> version of everything a CUDA torch install resolved to (torch included).

    Returns:
        The file's text. Packages of `resolved` that the CPU set pins keep the CPU set's version.
    """
    shared, pinned = [], set()
    for line in cpu_constraints.splitlines():
        name = line.partition("==")[0].strip()
        if not name or name.startswith("#"):
            continue
        if canonicalize_name(name) == "torch":
            continue
        shared.append(line)
        pinned.add(canonicalize_name(name))
    version = torch_version(cpu_constraints)
    if resolved.get("torch", version).split("+")[0] != version:
        raise ValueError(f"pip resolved torch {resolved['torch']}, the CPU set pins {version}")
    extra = sorted(
        (name, v) for name, v in resolved.items() if canonicalize_name(name) not in pinned and name != "torch"
    )
    lines = [*shared, CUDA_BLOCK.rstrip("\n"), f"torch==={version}", *(f"{name}=={v}" for name, v in extra)]
    return HEADER + "\n".join(lines) + "\n"


def resolve_cuda_torch(version: str, cpu_constraints: Path) -> dict[str, str]:
    """What `pip install torch===VERSION` installs on Linux x86_64 / CPython 3.11 under the CPU set's other pins."""
    with tempfile.TemporaryDirectory() as tmp:
        others = Path(tmp) / "constraints-no-torch.txt"
        others.write_text(
            "\n".join(
                line
                for line in cpu_constraints.read_text().splitlines()
                if canonicalize_name(line.partition("==")[0].strip() or "-") != "torch"
            )
        )
        report = Path(tmp) / "report.json"
        platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
               "--target", str(Path(tmp) / "target"), "--report", str(report), "--only-binary", ":all:",
               "--implementation", "cp", "--python-version", PYTHON_VERSION, *platforms,
               "-c", str(others), f"torch==={version}"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"pip could not resolve torch==={version} (CUDA) for Linux x86_64:\n{done.stderr[-3000:]}")
        install = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"]: item["metadata"]["version"] for item in install}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", type=Path, default=ROOT / "constraints.txt")
    parser.add_argument("--out", type=Path, default=ROOT / "constraints-cuda.txt")
    args = parser.parse_args(argv)
    text = args.cpu.read_text()
    resolved = resolve_cuda_torch(torch_version(text), args.cpu)
    args.out.write_text(cuda_constraints(text, resolved))
    print(f"wrote {args.out} ({len(resolved)} packages in torch's CUDA closure)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
