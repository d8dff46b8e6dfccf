"""Quantize stage: convert the merged model to GGUF with llama.cpp's own converter, re-quantize, and check that
every file loads in llama-cpp-python and still answers the task.

The converter (convert_hf_to_gguf.py with its gguf-py) comes from the sdist of the pinned llama-cpp-python, so
the converter and the runtime are the same llama.cpp version; `make setup` extracts it into the cache.
Run alone: `loraforge stage quantize CONFIG [key=value ...]`.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.artifacts import Artifact, ArtifactStore
from tasks.batching import read_split
from tasks.errors import StageError

QuantType = Literal["f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"]
DEFAULT_TYPES: tuple[QuantType, ...] = ("f16", "q8_0", "q4_k_m")
CONVERTER_TYPES = ("f16", "bf16")  # written directly by convert_hf_to_gguf.py
LLAMA_FTYPES = {  # the rest: llama_model_quantize from the f16 file, as llama-quantize does
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}


class QuantizeConfig(BaseModel):
    """Which GGUF files to produce and how to check them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    types: list[QuantType] = Field(
        default_factory=lambda: list(DEFAULT_TYPES), min_length=1, description="GGUF types to produce."
    )
    probe_rows: int = Field(16, ge=1, description="Test rows answered by each GGUF file (task accuracy).")
    max_new_tokens: int = Field(16, ge=1, description="Most tokens generated per probe answer.")
    n_threads: int = Field(1, ge=1, description="llama.cpp threads for the checks (1 is robust on busy machines).")


def quantize_gguf(config: QuantizeConfig, name: str, data: Artifact, merge: Artifact, store: ArtifactStore) -> Artifact:
    """Write `<name>-<TYPE>.gguf` for each type and check each with llama-cpp-python; skipped when cached.

    Args:
        config: the quantize section of the pipeline config.
        name: model name used in file names and GGUF metadata (Hub GGUF naming: NAME-Q4_K_M.gguf).
        data: the data artifact (probe rows from the test split).
        merge: the merge artifact (the HF folder to convert).
        store: where artifacts live.

    Returns:
        The quantize artifact with the GGUF files and per-type checks in the manifest metrics.
    """
    inputs = {"data": data, "merge": merge}
    key, code = store.stage_key("quantize", __file__, {**config.model_dump(), "name": name}, inputs)
    if (hit := store.find("quantize", key)) is not None:
        return hit

    import llama_cpp

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    converter = _converter_dir(llama_cpp.__version__)
    model_dir = merge.file("model")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"
    probes = read_split(data.file("test.jsonl"))[: config.probe_rows]
    with store.create("quantize", key, {**config.model_dump(), "name": name}, inputs, code) as draft:
        files: dict[str, Path] = {}
        needs_f16 = "f16" in config.types or any(t in LLAMA_FTYPES for t in config.types)
        for qtype in [t for t in CONVERTER_TYPES if t in config.types or (t == "f16" and needs_f16)]:
            files[qtype] = draft.path / f"{slug}-{qtype.upper()}.gguf"
            _convert(converter, model_dir, files[qtype], qtype, name)
        fallbacks: dict[str, str] = {}
        for qtype in [t for t in config.types if t in LLAMA_FTYPES]:
            files[qtype] = draft.path / f"{slug}-{qtype.upper()}.gguf"
            fallbacks[qtype] = _quantize(files["f16"], files[qtype], qtype)
            print(f"[quantize] {qtype} from f16 ({fallbacks[qtype]} tensors needed a fallback type)")
        if "f16" in files and "f16" not in config.types:  # only an intermediate for llama_model_quantize
            files.pop("f16").unlink()
        n_ctx = data.manifest["config"]["max_length"] + config.max_new_tokens
        checks = {qtype: _check(path, probes, config, n_ctx) for qtype, path in files.items()}
        for qtype, check in checks.items():
            print(
                f"[quantize] {qtype}: {check['size_mb']} MB, probe accuracy {check['accuracy']:.3f}, "
                f"sample answer {check['sample_answer']!r}"
            )
        draft.metrics.update({f"{q}_{k}": v for q, c in checks.items() for k, v in c.items() if k != "sample_answer"})
        draft.extra["gguf"] = {
            q: {"file": p.name, **checks[q], "fallback_tensors": fallbacks.get(q, "0")} for q, p in files.items()
        }
        draft.extra["llama_cpp_version"] = llama_cpp.__version__
    return store.get("quantize", key, fresh=True)


def _quantize(source: Path, target: Path, qtype: str) -> str:
    """Re-quantize with llama.cpp; returns its 'N of M' count of tensors that needed a fallback type.

    llama.cpp logs one line per tensor while quantizing, at a level llama-cpp-python always prints; the lines
    are captured here instead and only the summary is kept (rows not divisible by 256 fall back from k-quants).
    """
    import ctypes

    import llama_cpp
    import llama_cpp._logger

    captured: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        captured.append(text.decode("utf-8", errors="replace"))

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_FTYPES[qtype])
    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    finally:
        llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, ctypes.c_void_p(0))
    if status != 0:
        tail = "".join(captured[-5:]).strip()
        raise StageError(f"llama_model_quantize to {qtype} failed with status {status}: {tail}")
    found = re.search(r"(\d+ of \d+) tensor\(s\) required fallback", "".join(captured))
    return found.group(1) if found else "0"


def _converter_dir(version: str) -> Path:
    from tasks.models import cache_dir

    folder = cache_dir() / f"llama.cpp-{version}"
    if not (folder / "convert_hf_to_gguf.py").is_file():
        raise StageError(
            f"the GGUF converter for llama-cpp-python {version} is missing ({folder}); run `make setup`, "
            "which extracts it from the same llama-cpp-python sdist."
        )
    return folder


def _convert(converter: Path, model_dir: Path, out: Path, qtype: str, name: str) -> None:
    print(f"[quantize] converting to {qtype} GGUF")
    env = {**os.environ, "PYTHONPATH": str(converter / "gguf-py") + os.pathsep + str(converter), "NO_LOCAL_GGUF": ""}
    cmd = [sys.executable, str(converter / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", str(out),
           "--outtype", qtype, "--model-name", name]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0 or not out.is_file():
        tail = "\n".join(result.stderr.strip().splitlines()[-8:])
        raise StageError(f"convert_hf_to_gguf.py failed for {model_dir} ({qtype}):\n{tail}")


def _check(path: Path, probes: list[dict[str, Any]], config: QuantizeConfig, n_ctx: int) -> dict[str, Any]:
    """Load a GGUF in llama-cpp-python and answer probe rows greedily with the GGUF's own chat template."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=config.n_threads, verbose=False, seed=0)
    hits, answers = 0, []
    for row in probes:
        reply = llm.create_chat_completion(
            messages=row["messages"][:-1], max_tokens=config.max_new_tokens, temperature=0.0, top_k=1
        )
        answer = (reply["choices"][0]["message"]["content"] or "").strip()  # type: ignore[index]
        answers.append(answer)
        hits += answer.lower() == row["messages"][-1]["content"].strip().lower()
    del llm
    return {
        "size_mb": round(path.stat().st_size / 2**20, 1),
        "accuracy": round(hits / max(len(probes), 1), 4),
        "sample_answer": answers[0] if answers else "",
    }
