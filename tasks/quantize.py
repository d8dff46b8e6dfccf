"""Quantize stage: convert the merged model to GGUF with llama.cpp's own converter, re-quantize, and check that
every file still behaves like the merged model it came from.

Checks per GGUF file, run in llama-cpp-python on the file itself:
- template parity: the chat template and BOS/EOS carried in the GGUF turn conversations into exactly the token
  ids training used (the data artifact's template); a mismatch fails the stage, since every type shares it;
- fidelity against the merged HF model on validation probe rows: mean KL(HF || GGUF) of the next-token
  distributions, top-1 agreement and the perplexity ratio, all over every position;
- the task: greedy answers to test rows, scored with the eval stage's own answer metrics for this run (the answer
  metrics among `eval.metrics`: accuracy, macro_f1, exact_match, rouge_l, entity_f1, from tasks/metrics) and
  compared with the merged HF model's answers to the same rows; each metric's drop has its limit
  (`quantize.max_probe_drop`).
A type past its limits (`quantize.max_*`/`min_*`, per type) is marked failed with the reason and is not
published; `on_failure: fail` stops the stage instead. Measuring (`measure_gguf`) returns figures and the pure
`verdict(figures, limits)` judges them: the figures a manifest records can be re-judged with other limits.

Importance matrix: for the low-bit types (IMATRIX_TYPES) llama.cpp's `llama-imatrix` measures, on the
fine-tuning data itself (the data artifact's train split, as the token text training saw), how strongly each weight
column is activated, and `llama-quantize --imatrix` spends the bits where they matter. It does not always help (on
the 135M demo model it raised q4_k_m's KL, docs/demo.md), so `quantize.imatrix: auto` quantizes each such type both
ways, checks both and keeps the file with the lower mean KL, recording both; `on` always uses it, `off` never.
llama-cpp-python cannot pass an imatrix to llama_model_quantize (it is a C++ map), so both tools are built by
`make setup` from the same llama.cpp sdist. Whether each file used it is recorded per type, with the imatrix's
sha256 and the text it was computed on.

Each merged GGUF gets an Ollama Modelfile beside it (`NAME-Q4_K_M.Modelfile`: FROM, TEMPLATE, one PARAMETER stop
per stop token or named-template stop string, the eval's sampling settings as PARAMETERs, SYSTEM from
data.system_prompt); see tasks/modelfile.py. A chat template that cannot be
translated for Ollama stops the stage with the reason (or set `quantize.modelfile: false`).

The converter (convert_hf_to_gguf.py with its gguf-py) comes from the sdist of the pinned llama-cpp-python, so
the converter and the runtime are the same llama.cpp version; `make setup` extracts it into the cache.

Cost (docs/bench.md, section 7): the converter runs (merged model, adapter, the base the adapter is checked on)
are single-threaded processes and run side by side, each forked from a process that has imported torch,
transformers and gguf-py once (tasks/converter.py: ~4 s of CPU less per run after the first); each check
keeps the prompt prefix a fidelity row or probe shares with the one before in llama.cpp's context and evaluates
only the rest; the importance matrix is computed once per (merged model, text, chunks) on a machine and taken
from its cache after that.
Run alone: `loraforge stage quantize CONFIG [key=value ...]`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from loraforge.tasks.artifacts import Artifact, ArtifactStore, Draft
from loraforge.tasks.batching import read_split
from loraforge.tasks.data import DataSpec, read_data, stop_token_ids
from loraforge.tasks.errors import StageError
from loraforge.tasks.evaluate import ANSWER_METRICS
from loraforge.tasks.modelfile import Sampling, Translation, modelfile, translate_chat_template
from loraforge.tasks.process import logger_level

if TYPE_CHECKING:
    from loraforge.tasks.evaluate import EvalConfig
    from loraforge.tasks.train import OnStep

RUNTIME_ONLY = {"tool_timeout_s", "tool_threads"}  # do not change the result: not part of the key
KEYED_DIRS = ("metrics",)  # the probe scores with the metric modules run by path: part of the key's code version
ProbeMetric = Literal["accuracy", "macro_f1", "exact_match", "rouge_l", "entity_f1"]  # = ANSWER_METRICS (a test)
QuantType = Literal["f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "lora_f16"]
DEFAULT_TYPES: tuple[QuantType, ...] = ("f16", "q8_0", "q4_k_m")
CONVERTER_TYPES = ("f16", "bf16")  # written directly by convert_hf_to_gguf.py
BASE_GGUF_NAME = "loraforge-base"  # general.name of the base GGUF the adapter types are checked on (not published)
LORA_TYPES = {"lora_f16": "f16"}  # the adapter alone, by convert_lora_to_gguf.py: applied at load time in llama.cpp
LLAMA_FTYPES = {  # the rest: llama_model_quantize from the f16 file, as llama-quantize does
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}
# Types whose quantization takes an importance matrix and gains from it (q8_0 and the float types ignore one).
IMATRIX_TYPES = ("q6_k", "q5_k_m", "q4_k_m", "q4_0")


# Default limits per type. Measured on the demo (SmolLM2-135M fine-tuned, 8 validation rows, all positions;
# docs/demo.md): f16 KL 0.0000 / top-1 1.000 / ppl ratio 1.0005; q8_0 0.0067 / 0.934 / 1.025; q4_k_m 0.078 /
# 0.857 / 0.969 (the ratio on 8 rows is noisy by a few %). Limits leave headroom above those; override one type
# with e.g. `quantize.max_mean_kl.q4_k_m=0.2`. Larger models quantize with less loss: tighten for them.
DEFAULT_MAX_MEAN_KL: dict[QuantType, float] = {
    "f16": 0.002, "bf16": 0.01, "q8_0": 0.02, "q6_k": 0.04, "q5_k_m": 0.06, "q4_k_m": 0.15, "q4_0": 0.25,
    "lora_f16": 0.01,
}  # fmt: skip
DEFAULT_MIN_TOP1: dict[QuantType, float] = {
    "f16": 0.99, "bf16": 0.95, "q8_0": 0.90, "q6_k": 0.88, "q5_k_m": 0.86, "q4_k_m": 0.80, "q4_0": 0.75,
    "lora_f16": 0.95,
}  # fmt: skip
DEFAULT_MAX_PPL_RATIO: dict[QuantType, float] = {
    "f16": 1.01, "bf16": 1.03, "q8_0": 1.05, "q6_k": 1.07, "q5_k_m": 1.10, "q4_k_m": 1.15, "q4_0": 1.25,
    "lora_f16": 1.03,
}  # fmt: skip
# Largest drop (merged HF minus GGUF) of each answer metric on the probe rows, any type: a few rows' shares.
DEFAULT_MAX_PROBE_DROP: dict[ProbeMetric, float] = {
    "accuracy": 0.1, "macro_f1": 0.1, "exact_match": 0.1, "rouge_l": 0.1, "entity_f1": 0.1,
}  # fmt: skip


@dataclass(frozen=True)
class GgufLimits:
    """The limits one GGUF type is judged by (`verdict`); `QuantizeConfig.limits(qtype)` gives them."""

    max_mean_kl: float
    min_top1_agreement: float
    max_ppl_ratio: float
    max_probe_drop: Mapping[str, float]  # per answer metric


class QuantizeConfig(BaseModel):
    """Which GGUF files to produce and how to check them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    types: list[QuantType] = Field(
        default_factory=lambda: list(DEFAULT_TYPES), min_length=1, description="GGUF types to produce."
    )
    probe_rows: int = Field(
        16, ge=1, description="Test rows answered by each GGUF file and the merged model (the eval's answer metrics)."
    )
    max_new_tokens: int = Field(16, ge=1, description="Most tokens generated per probe answer.")
    n_threads: int = Field(
        1,
        ge=1,
        description="llama.cpp threads for the checks' generation (1 is robust on busy machines); their prompt "
        "batches (the fidelity rows, each probe's prompt) run on every core this process may use, or on "
        "OMP_NUM_THREADS when that is set (side-by-side checks on 1 thread each measured no faster on 2 cores: "
        "docs/bench.md).",
    )
    tool_timeout_s: float = Field(
        3600,
        gt=0,
        description="Seconds one converter or llama.cpp tool run may take before it is killed and the stage stops "
        "(a hung tool never holds a run forever; raise it for large models). Not part of the key.",
    )
    tool_threads: int = Field(
        0,
        ge=0,
        description="Threads for llama-imatrix and llama-quantize; 0 = every core this process may use "
        "(OMP_NUM_THREADS when set). Their files are the same bytes at any count (checked), so not part of the key.",
    )
    fidelity_rows: int = Field(
        8,
        ge=1,
        description="Validation rows on which each GGUF's logits are compared (on a demo adapter, 8 rows gave every "
        "type's KL within 3% of 64 rows'; a figure within its sampling error of a limit can still pass on 8 rows and "
        "fail on 64: docs/bench.md, bench/quantize_levers.py).",
    )
    max_mean_kl: dict[QuantType, float] = Field(
        default_factory=lambda: dict(DEFAULT_MAX_MEAN_KL),
        description="Per type: largest mean KL(merged HF || GGUF) of next-token distributions (nats/token). "
        "Types not given keep their defaults.",
    )
    min_top1_agreement: dict[QuantType, float] = Field(
        default_factory=lambda: dict(DEFAULT_MIN_TOP1),
        description="Per type: least share of positions where the GGUF's argmax equals the merged model's.",
    )
    max_ppl_ratio: dict[QuantType, float] = Field(
        default_factory=lambda: dict(DEFAULT_MAX_PPL_RATIO),
        description="Per type: largest perplexity(GGUF) / perplexity(merged HF) on the validation probe rows.",
    )
    max_probe_drop: dict[ProbeMetric, float] = Field(
        default_factory=lambda: dict(DEFAULT_MAX_PROBE_DROP),
        description="Per answer metric: largest drop (merged HF model minus GGUF) on the probe rows, any type. The "
        "probe scores with the answer metrics in eval.metrics (accuracy, macro_f1, exact_match, rouge_l, "
        "entity_f1: the headline figure of each); metrics not given keep their defaults (0.1). Replaces "
        "max_accuracy_drop.",
    )
    imatrix: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Importance matrix from the training data (train split) for the types that take one "
        f"({', '.join(IMATRIX_TYPES)}): auto = quantize each both ways, check both, keep the one with the lower mean "
        "KL against the merged model (both recorded); on = always use it; off = plain quantization for every type.",
    )
    imatrix_ctx: int = Field(512, ge=32, le=8192, description="Tokens per chunk of training text fed to llama-imatrix.")
    imatrix_chunks: int = Field(
        4,
        ge=1,
        description="Most chunks of imatrix_ctx tokens used (the train split needs at least 2 chunks). Time grows "
        "with each chunk (about 2 s per chunk of a 135M model on 2 cores); on the demo, q4_k_m's KL did not improve "
        "from 2 to 64 chunks (bench/quantize_levers.py). Raise it for a model where the matrix pays off "
        "(imatrix=auto measures that).",
    )
    modelfile: bool = Field(
        True,
        description="Write an Ollama Modelfile beside each merged GGUF (a chat template that cannot be "
        "translated to Ollama's Go template stops the stage; false skips Modelfiles).",
    )
    on_failure: Literal["drop", "fail"] = Field(
        "drop",
        description="A type past its limits: 'drop' keeps it out of publishing (reason recorded), 'fail' stops.",
    )

    @field_validator("imatrix", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        # YAML 1.1 (PyYAML) reads a bare on/off as a boolean: `imatrix: off` means the string "off".
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("max_mean_kl", "min_top1_agreement", "max_ppl_ratio", "max_probe_drop", mode="before")
    @classmethod
    def _over_defaults(cls, value: Any, info: ValidationInfo) -> Any:
        table: dict[str, Mapping[Any, float]] = {
            "max_mean_kl": DEFAULT_MAX_MEAN_KL, "min_top1_agreement": DEFAULT_MIN_TOP1,
            "max_ppl_ratio": DEFAULT_MAX_PPL_RATIO, "max_probe_drop": DEFAULT_MAX_PROBE_DROP,
        }  # fmt: skip
        defaults = table[info.field_name or ""]
        return {**defaults, **value} if isinstance(value, dict) else value

    @field_validator("max_probe_drop")
    @classmethod
    def _drops_are_shares(cls, value: dict[str, float]) -> dict[str, float]:
        wrong = [f"{m}={v}" for m, v in value.items() if not 0 <= v <= 1]
        if wrong:
            raise ValueError(f"drops are shares between 0 and 1, given {', '.join(wrong)}")
        return value

    def limits(self, qtype: str) -> GgufLimits:
        """The limits a GGUF file of type `qtype` is judged by."""
        qt = cast(QuantType, qtype)
        return GgufLimits(self.max_mean_kl[qt], self.min_top1_agreement[qt], self.max_ppl_ratio[qt],
                          {str(m): v for m, v in self.max_probe_drop.items()})  # fmt: skip


class GgufFiles(NamedTuple):
    """What the quantize artifact tells the other stages (read it with `read_quantize`)."""

    gguf: dict[str, dict[str, Any]]  # type -> file, size, figures, passed/reason, Modelfile
    llama_cpp_version: str | None
    imatrix: dict[str, Any] | None  # the importance matrix, when one was made

    def passed(self) -> list[str]:
        """The types whose file passed its checks (the publishable ones), in recorded order."""
        return [q for q, g in self.gguf.items() if g.get("passed", True)]


def read_quantize(quantize: Artifact) -> GgufFiles:
    """The quantize artifact's GGUF files and their checks."""
    m = quantize.manifest
    return GgufFiles(dict(m.get("gguf") or {}), m.get("llama_cpp_version"), m.get("imatrix"))


def quantize_gguf(
    config: QuantizeConfig,
    name: str,
    eval_config: EvalConfig,
    base: Artifact,
    data: Artifact,
    train: Artifact,
    merge: Artifact,
    store: ArtifactStore,
    *,
    on_step: OnStep | None = None,
) -> Artifact:
    """Write `<name>-<TYPE>.gguf` for each type and check each with llama-cpp-python; skipped when cached.

    Args:
        config: the quantize section of the pipeline config.
        name: model name used in file names and GGUF metadata (GGUF naming convention: NAME-Q4_K_M.gguf,
            NAME-F16-LoRA.gguf).
        eval_config: the eval section: its sampling settings (temperature, top_p, seed, max_new_tokens) go into
            the Modelfiles, so Ollama answers as the eval measured; the answer metrics among its metrics score the
            probe (perplexity is the fidelity check's ppl_ratio here). Both are part of the key.
        base: the base-model artifact as provisioned on this machine (the adapter GGUF types convert against it).
        data: the data artifact (probe rows from the test split).
        train: the train artifact (the adapter GGUF types convert its adapter).
        merge: the merge artifact (the HF folder to convert), made from `base` and `train`.
        store: where artifacts live.
        on_step: called after each piece of work (converting: every converter run, merged model, adapter and
            base, side by side; the importance matrix, quantizing, the merged model's reference, each type's
            check) with {"step": n, "work": what} and their count.

    Returns:
        The quantize artifact with the GGUF files and per-type checks in the manifest metrics.

    Raises:
        StageError: `base` or `train` are not the artifacts `merge` was made from.
    """
    from loraforge.tasks.merge import read_merge

    made_from = read_merge(merge).made_from
    wrong = [f"{a.stage} {a.key} (the merge artifact {merge.key} was made from {made_from[a.stage]})"
             for a in (base, train) if made_from[a.stage] != a.key]  # fmt: skip
    if wrong:
        raise StageError(f"quantize: given {' and '.join(wrong)}; pass the artifacts the merge was made from.")
    inputs = {"data": data, "merge": merge}  # base and train are the merge's inputs: its key covers them
    sampling = Sampling(eval_config.temperature, eval_config.top_p, eval_config.seed, eval_config.max_new_tokens)
    metrics = probe_metrics(eval_config.metrics)
    key, code = store.stage_key("quantize", __file__, _settings(config, name, sampling, metrics), inputs)
    with store.claim("quantize", key) as hit:
        if hit is not None:
            return hit
        with logger_level("llama-cpp-python", logging.ERROR):  # its load chatter, for this stage only
            return _build_gguf(config, name, sampling, metrics, base, data, train, merge, store, key, code, on_step)


def probe_metrics(eval_metrics: Sequence[str]) -> list[str]:
    """The answer metrics among the eval stage's metrics, in ANSWER_METRICS order: what the GGUF probe scores."""
    return [m for m in ANSWER_METRICS if m in eval_metrics]


@dataclass(frozen=True)
class _Job:
    """What every step of one quantize build shares: the settings, where the files go, llama.cpp's tools."""

    config: QuantizeConfig
    name: str  # the model name in GGUF metadata
    slug: str  # the model name as file names use it
    folder: Path  # the draft folder: every file is written here
    converter: Path  # llama.cpp's convert_*_to_gguf.py scripts (`_converter_dir`)
    model_dir: Path  # the merged HF model
    tools: Path | None  # llama-imatrix and llama-quantize, when an importance matrix is used

    def gguf(self, qtype: str) -> Path:
        """Where the GGUF of a merged type goes (GGUF naming: NAME-Q4_K_M.gguf)."""
        return self.folder / f"{self.slug}-{qtype.upper()}.gguf"


@dataclass
class _GgufFile:
    """One GGUF type of the artifact through the build: made, measured, judged, recorded in the manifest."""

    qtype: str
    path: Path
    fallback_tensors: str = "0"  # llama.cpp's 'N of M' tensors that needed a fallback type
    imatrix: bool = False  # the kept file was quantized with the importance matrix
    candidate: Path | None = None  # imatrix=auto: the imatrix-quantized file, measured beside the plain one
    check: dict[str, Any] = field(default_factory=dict)  # measured figures and their verdict (passed, reason)
    modelfile: str | None = None  # the Ollama Modelfile beside it (merged types)


@dataclass
class HFReference:
    """The merged HF model's side of every check (`_hf_reference`): what each GGUF file is measured against."""

    tokenizer: Any  # with the chat template and special tokens training used (the data artifact's), stop ids
    probes: list[dict[str, Any]]  # test rows answered greedily (the answer metrics; template parity)
    metrics: list[str]  # the answer metrics the probe scores (`probe_metrics`)
    fidelity_rows: list[dict[str, Any]]  # validation rows whose next-token distributions are compared
    logprobs: list[Path]  # the HF model's log-probs on each fidelity row, one file per row
    scores: dict[str, float]  # the HF model's figures on the probe rows (every figure of each metric)
    n_ctx: int  # llama.cpp's context: the longest training row and an answer


def _build_gguf(
    config: QuantizeConfig,
    name: str,
    sampling: Sampling,
    metrics: list[str],
    base: Artifact,
    data: Artifact,
    train: Artifact,
    merge: Artifact,
    store: ArtifactStore,
    key: str,
    code: str,
    on_step: OnStep | None,
) -> Artifact:
    """Make, measure and judge the GGUF files of the quantize artifact `key` (its lock is held): convert and
    quantize, take the merged HF model's side of the checks, measure each file, judge its figures against the
    limits, write the Modelfiles and the manifest."""
    import llama_cpp

    inputs = {"data": data, "merge": merge}
    started = time.time()
    converter = _converter_dir(llama_cpp.__version__)
    model_dir = merge.file("model")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"
    probes = read_split(data.file("test.jsonl"))[: config.probe_rows]
    fidelity_rows = read_split(data.file("validation.jsonl"))[: config.fidelity_rows]
    translation = _ollama_translation(data) if config.modelfile else None  # before any work: fail fast
    imatrix_types = [t for t in config.types if t in IMATRIX_TYPES] if config.imatrix != "off" else []
    tools = _tools_dir(llama_cpp.__version__) if imatrix_types else None
    settings = _settings(config, name, sampling, metrics)
    done = _work_done(on_step, 3 + (tools is not None) + len(config.types))
    with store.create("quantize", key, settings, inputs, code, started=started) as draft:
        job = _Job(config, name, slug, draft.path, converter, model_dir, tools)
        ggufs, adapters, base_gguf = _convert_all(job, base, train)
        done("convert")
        imatrix: Path | None = None
        if tools is not None:
            imatrix = draft.path / f"{slug}-imatrix.gguf"
            draft.extra["imatrix"] = _imatrix(tools, job.gguf("f16"), merge, data, imatrix, config)
            done("imatrix")
        _quantize_types(job, ggufs, imatrix)
        ggufs.update(adapters)  # checked and recorded after the merged model's types
        done("quantize")
        logprobs = draft.path / ".hf-logprobs"  # not part of the artifact: removed after the checks
        reference = _hf_reference(model_dir, data, fidelity_rows, probes, metrics, config, logprobs)
        done("reference")
        for gguf in ggufs.values():
            _measure_and_judge(gguf, base_gguf, reference, config)
            done(f"check {gguf.qtype}")
        if base_gguf is not None:
            base_gguf.unlink()
        shutil.rmtree(logprobs)
        if "imatrix" in draft.extra:
            draft.extra["imatrix"]["used_for"] = [q for q in config.types if q in ggufs and ggufs[q].imatrix]
        if translation is not None:
            _write_modelfiles(ggufs, translation, reference.tokenizer, read_data(data), sampling)
        _stop_on_failure(ggufs, config)
        _record(draft, ggufs, reference, llama_cpp.__version__)
    return store.get("quantize", key, fresh=True)


def _work_done(on_step: OnStep | None, total: int) -> Callable[[str], None]:
    """`done(work)`: tells `on_step` (when given) that one more of the stage's `total` pieces of work is done."""
    finished = 0

    def done(work: str) -> None:
        nonlocal finished
        finished += 1
        if on_step is not None:
            on_step({"step": finished, "work": work}, total)

    return done


def _convert_all(
    job: _Job, base: Artifact, train: Artifact
) -> tuple[dict[str, _GgufFile], dict[str, _GgufFile], Path | None]:
    """Every converter run of the build, side by side (each is a single-threaded Python process: on the demo, 17.7
    s one after another, docs/bench.md): the types llama.cpp's converter writes from the merged model (f16,
    bf16; f16 also when llama_model_quantize needs it), the adapter-only types (GGUF naming:
    <name>-<encoding>-LoRA), and the f16 GGUF of the base those are checked on, which is not part of the artifact
    (converted once per base and template on a machine: `_base_gguf_cache`).

    Returns:
        (the merged model's files, the adapter files, that base GGUF or None without adapter types).
    """
    types = job.config.types
    needs_f16 = "f16" in types or any(t in LLAMA_FTYPES for t in types)
    merged = {q: _GgufFile(q, job.gguf(q)) for q in CONVERTER_TYPES if q in types or (q == "f16" and needs_f16)}
    adapters: dict[str, _GgufFile] = {q: _GgufFile(q, job.folder / f"{job.slug}-{LORA_TYPES[q].upper()}-LoRA.gguf")
                for q in types if q in LORA_TYPES}  # fmt: skip
    runs = [_conversion(job.converter, job.model_dir, g.path, q, job.name) for q, g in merged.items()]
    runs += [_adapter_conversion(job, base, train, g.path, q) for q, g in adapters.items()]
    base_gguf = job.folder / ".base-F16.gguf" if adapters else None
    to_keep = None  # where a base GGUF converted here is kept for later runs
    trained_base = job.folder / ".base-hf"  # the base's files (linked), its tokenizer files the merged model's
    if base_gguf is not None:
        cached = _base_gguf_cache(base, job.model_dir)
        if _kept(cached, base_gguf, link=True) is not None:
            print(f"[quantize] the base's f16 GGUF (for the adapter checks): converted before ({cached}.gguf, "
                  "sha256 checked)")  # fmt: skip
        else:
            to_keep = cached
            _link_trained_base(job, base, trained_base)
            runs.append(_conversion(job.converter, trained_base, base_gguf, "f16", BASE_GGUF_NAME))
    _side_by_side(runs, job.converter, job.config.tool_timeout_s)
    if to_keep is not None and base_gguf is not None:
        shutil.rmtree(trained_base)
        _keep(to_keep, base_gguf, {}, link=True)
    return merged, adapters, base_gguf


def _base_gguf_cache(base: Artifact, model_dir: Path) -> Path:
    """Where the base's f16 GGUF with the tokenizer files of the merged model in `model_dir` (what the adapter types
    are checked on) is kept on this machine: named by the base's key (its content), those files' bytes and the
    llama.cpp version, so a rerun, a sweep or another pipeline of the same base and template converts it once. Its
    GGUF name is BASE_GGUF_NAME whatever the pipeline's (it is never published)."""
    import hashlib

    import llama_cpp

    from loraforge.tasks.artifacts import sha256_file
    from loraforge.tasks.models import cache_dir

    tokenizer = {p.name: sha256_file(p) for p in _tokenizer_files(model_dir)}
    identity = [base.key, tokenizer, BASE_GGUF_NAME, "f16", llama_cpp.__version__]
    return cache_dir() / "base-gguf" / hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]


def _quantize_types(job: _Job, ggufs: dict[str, _GgufFile], imatrix: Path | None) -> None:
    """The llama_model_quantize types, from the f16 file: with the importance matrix (imatrix=on), plain, or both
    (auto: the imatrix file is a candidate, measured beside the plain one). Then the f16 file goes if it was only
    their source."""
    config, f16 = job.config, job.gguf("f16")
    for qtype in [t for t in config.types if t in LLAMA_FTYPES]:
        gguf = ggufs[qtype] = _GgufFile(qtype, job.gguf(qtype))
        if job.tools is not None and imatrix is not None and qtype in IMATRIX_TYPES:
            target = gguf.path if config.imatrix == "on" else job.folder / f".{job.slug}-{qtype.upper()}-imatrix.gguf"
            gguf.fallback_tensors = _quantize_with_imatrix(job.tools, f16, target, qtype, imatrix, config)
            print(f"[quantize] {qtype} from f16 with the importance matrix ({gguf.fallback_tensors} fallback tensors)")
            if config.imatrix == "on":
                gguf.imatrix = True
                continue
            gguf.candidate = target
        gguf.fallback_tensors = _quantize(f16, gguf.path, qtype)  # auto: the plain file's count is recorded
        print(f"[quantize] {qtype} from f16, plain ({gguf.fallback_tensors} tensors needed a fallback type)")
    if "f16" in ggufs and "f16" not in config.types:  # only an intermediate for llama_model_quantize
        ggufs.pop("f16").path.unlink()


def _measure_and_judge(gguf: _GgufFile, base_gguf: Path | None, reference: HFReference, config: QuantizeConfig) -> None:
    """Measure one type's file against the merged model and judge the figures; with imatrix=auto, measure and
    judge the imatrix candidate too and keep the file closer to the merged model (`_choose_imatrix`)."""
    limits = config.limits(gguf.qtype)
    model_file, lora_file = (base_gguf, gguf.path) if gguf.qtype in LORA_TYPES and base_gguf else (gguf.path, None)
    gguf.check = _judged(measure_gguf(model_file, lora_file, reference, config), limits)
    if gguf.candidate is not None:
        candidate = _judged(measure_gguf(gguf.candidate, None, reference, config), limits)
        gguf.check, gguf.imatrix = _choose_imatrix(gguf.check, candidate)
        if gguf.imatrix:
            gguf.candidate.replace(gguf.path)
        else:
            gguf.candidate.unlink()
    c = gguf.check
    print(
        f"[quantize] {gguf.qtype}: {c['size_mb']} MB, KL {c['mean_kl']:.4f}, top-1 {c['top1_agreement']:.3f}, "
        f"ppl ratio {c['ppl_ratio']:.4f}, {probe_summary(c)}: {'pass' if c['passed'] else 'FAIL: ' + c['reason']}"
    )


def probe_summary(figures: Mapping[str, Any]) -> str:
    """The probe's headline figures of one GGUF against the merged model, e.g. 'probe rouge_l 0.412 (HF 0.450)';
    a record written before the probe used the eval's metrics shows its exact-match accuracy."""
    if "probe" not in figures:
        return f"probe accuracy {figures.get('accuracy', math.nan):.3f} (HF {figures.get('hf_accuracy', math.nan):.3f})"
    hf = figures.get("hf_probe") or {}
    shown = [f"{m} {figures['probe'].get(m, math.nan):.3f} (HF {hf[m]:.3f})" for m in ANSWER_METRICS if m in hf]
    return "probe " + (", ".join(shown) if shown else "not scored (no answer metric in eval.metrics)")


def _write_modelfiles(
    ggufs: dict[str, _GgufFile], translation: Translation, tokenizer: Any, spec: DataSpec, sampling: Sampling
) -> None:
    """An Ollama Modelfile beside each merged GGUF (not the adapter types: they are applied to a base GGUF); it
    stops at the HF stop tokens (EOS, the generation config's) and the named template's stop strings."""
    stops = [tokenizer.convert_ids_to_tokens(i)
             for i in sorted(set(tokenizer.stop_token_ids) | {tokenizer.eos_token_id})]  # fmt: skip
    stops += [text for text in spec.stop_strings if text not in stops]
    for gguf in ggufs.values():
        if gguf.qtype not in LORA_TYPES:
            target = gguf.path.with_suffix(".Modelfile")
            fitted = translation.for_gguf(_adds_bos(gguf.path))
            target.write_text(modelfile(gguf.path.name, fitted, stops, spec.system_prompt, sampling))
            gguf.modelfile = target.name


def _adds_bos(path: Path) -> bool:
    """Whether llama.cpp (and so Ollama) puts BOS before a prompt it tokenizes with this GGUF's vocabulary."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return bool(llama_cpp.llama_vocab_get_add_bos(llm._model.vocab))
    finally:
        llm.close()


def _stop_on_failure(ggufs: dict[str, _GgufFile], config: QuantizeConfig) -> None:
    """quantize.on_failure=fail: a type past its limits stops the stage (drop: it is only not published)."""
    failed = {q: g.check["reason"] for q, g in ggufs.items() if not g.check["passed"]}
    if failed and config.on_failure == "fail":
        raise StageError(
            "GGUF fidelity check failed (quantize.on_failure=fail):\n  - "
            + "\n  - ".join(f"{q}: {r}" for q, r in failed.items())
        )


def _record(draft: Draft, ggufs: dict[str, _GgufFile], reference: HFReference, llama_cpp_version: str) -> None:
    """The manifest's GGUF part: per type its file, figures, verdict and how it was made; the numeric figures
    also as flat metrics."""
    numeric = ("size_mb", "mean_kl", "top1_agreement", "ppl_ratio")
    draft.metrics.update({f"{q}_{k}": g.check[k] for q, g in ggufs.items() for k in numeric})
    draft.metrics.update({f"{q}_{k}": v for q, g in ggufs.items() for k, v in g.check["probe"].items()})
    draft.metrics.update({f"{q}_{m}_drop": v for q, g in ggufs.items() for m, v in g.check["probe_drop"].items()})
    draft.metrics.update({f"hf_{k}": v for k, v in reference.scores.items()})
    draft.extra["gguf"] = {
        q: {"file": g.path.name, **g.check, "fallback_tensors": g.fallback_tensors, "imatrix": g.imatrix,
            **({"modelfile": g.modelfile} if g.modelfile else {})}
        for q, g in ggufs.items()
    }  # fmt: skip
    draft.extra["llama_cpp_version"] = llama_cpp_version


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


def _choose_imatrix(plain: dict[str, Any], with_imatrix: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """quantize.imatrix=auto: the check of the file to keep, and whether it is the imatrix one. The imatrix file is
    kept when its mean KL against the merged model is lower (KL is the measure the fidelity limits lean on); both
    sets of figures are recorded either way."""
    figures = ("mean_kl", "top1_agreement", "ppl_ratio", "probe", "passed")
    compared = {"imatrix": {k: with_imatrix[k] for k in figures}, "plain": {k: plain[k] for k in figures}}
    chosen = with_imatrix["mean_kl"] < plain["mean_kl"]
    print(f"[quantize] imatrix vs plain: mean KL {with_imatrix['mean_kl']:.4f} vs {plain['mean_kl']:.4f}: keeping "
          f"the {'imatrix' if chosen else 'plain'} file")  # fmt: skip
    return {**(with_imatrix if chosen else plain), "imatrix_vs_plain": compared}, chosen


def _ollama_translation(data: Artifact) -> Translation:
    """The training chat template (the data artifact's) as an Ollama Go template, checked on probe conversations."""
    special = read_data(data).special_tokens
    return translate_chat_template(
        data.file("chat_template.jinja").read_text(),
        bos_token=(special.get("bos") or {}).get("text") or "",
        eos_token=(special.get("eos") or {}).get("text") or "",
    )


def _tools_dir(version: str) -> Path:
    from loraforge.tasks.models import cache_dir

    folder = cache_dir() / f"llama.cpp-{version}-tools"
    missing = [t for t in ("llama-imatrix", "llama-quantize") if not os.access(folder / t, os.X_OK)]
    if missing:
        raise StageError(
            f"quantize.imatrix is 'auto' but {', '.join(missing)} (llama.cpp {version}) is missing in {folder}; "
            "run `make setup`, which builds them from the same llama-cpp-python sdist, or set quantize.imatrix=off."
        )
    return folder


def _imatrix(
    tools: Path, f16: Path, merge: Artifact, data: Artifact, out: Path, config: QuantizeConfig
) -> dict[str, Any]:
    """llama.cpp's importance matrix of the f16 GGUF (converted from the merge artifact `merge`) over the train
    split, as the text training saw (the rows' token ids decoded with their special tokens, which llama-imatrix
    parses back as special tokens). Computed once per (merged model, text, chunks, llama.cpp) on this machine:
    a rerun with other types or limits takes it from the cache (`_kept`).

    Returns:
        What the manifest and lineage record: the text's sha256, its tokens, the chunks used, the imatrix sha256.
    """
    import hashlib

    import llama_cpp
    from tqdm import tqdm

    from loraforge.tasks.artifacts import sha256_file
    from loraforge.tasks.models import cache_dir, load_tokenizer

    rows = read_split(data.file("train.jsonl"))
    tokens = sum(len(r["input_ids"]) for r in rows)
    if tokens < 2 * config.imatrix_ctx:
        raise StageError(
            f"quantize.imatrix: the train split has {tokens} tokens, llama-imatrix needs at least 2 x "
            f"quantize.imatrix_ctx={config.imatrix_ctx}; lower quantize.imatrix_ctx or set quantize.imatrix=off."
        )
    tokenizer = load_tokenizer(merge.file("model"))
    text = "".join(str(tokenizer.decode(r["input_ids"], skip_special_tokens=False)) for r in rows)
    text_sha256 = hashlib.sha256(text.encode()).hexdigest()
    chunks = min(config.imatrix_chunks, tokens // config.imatrix_ctx)
    identity = [merge.key, f16.name, text_sha256, config.imatrix_ctx, chunks, llama_cpp.__version__]
    cached = cache_dir() / "imatrix" / hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]
    record = _kept(cached, out, file=out.name)
    types = [t for t in config.types if t in IMATRIX_TYPES]
    if record is not None:
        print(f"[quantize] importance matrix over {record['chunks']} chunks of the train split: computed before for "
              f"this merged model and text ({cached}.gguf, sha256 checked)")  # fmt: skip
        return {**record, "types": types}
    source = out.with_name(".imatrix-train.txt")  # not part of the artifact: its sha256 is recorded
    source.write_text(text)
    print(f"[quantize] importance matrix over {chunks} chunks of {config.imatrix_ctx} tokens of the train split")
    # File names relative to the draft folder: the tools write them into the GGUF metadata (imatrix.datasets, and
    # llama-quantize's quantize.imatrix.*), and a temporary path there would make every run's bytes differ.
    # With its perplexity on (the logits are computed either way) llama-imatrix prints "[N]ppl," after each chunk:
    # the progress bar follows that; the matrix is the same bytes as with --no-ppl.
    cmd = [str(tools / "llama-imatrix"), "-m", f16.name, "-f", source.name, "-o", out.name, "--parse-special",
           "-c", str(config.imatrix_ctx), "-b", str(config.imatrix_ctx), "--chunks", str(chunks),
           "-t", str(_tool_threads(config))]  # fmt: skip
    bar = tqdm(total=chunks, desc="imatrix", unit="chunk", dynamic_ncols=True, leave=False)
    seen = ""

    def progress(text: str) -> None:
        nonlocal seen
        seen = (seen + text)[-64:]  # a chunk's "[N]" may arrive split
        done = [int(n) for n in re.findall(r"\[(\d+)\][^,\[\s]*,", seen)]
        if done and max(done) > bar.n:
            bar.update(max(done) - bar.n)

    # f16, source and out share the draft folder
    try:
        output = _run_tool(cmd, out, "llama-imatrix failed", config.tool_timeout_s, on_output=progress)
    finally:
        bar.close()
    source.unlink()
    found = re.search(r"computing over (\d+) chunks", output)
    used = int(found.group(1)) if found else chunks
    record = {
        "file": out.name,
        "sha256": sha256_file(out),
        "source": "train split of the data artifact (token text as trained)",
        "text_sha256": text_sha256,
        "train_rows": len(rows),
        "chunks": used,
        "ctx": config.imatrix_ctx,
        "tokens_used": used * config.imatrix_ctx,
    }
    _keep(cached, out, record)
    return {**record, "types": types}


def _kept(cached: Path, out: Path, link: bool = False, **expected: Any) -> dict[str, Any] | None:
    """A file kept in the cache (`cached`.gguf, its record `cached`.json) put at `out`, copied or, with `link`,
    hard-linked (for a file only read, then unlinked); returns its record. None when there is none, its bytes no
    longer match the sha256 recorded beside it or the record differs from `expected` (it is then made again)."""
    from loraforge.tasks.artifacts import sha256_file

    gguf = cached.with_suffix(".gguf")
    try:
        record: dict[str, Any] = json.loads(cached.with_suffix(".json").read_text())
        if sha256_file(gguf) != record["sha256"] or any(record.get(k) != v for k, v in expected.items()):
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    _put(gguf, out, link)
    return record


def _keep(cached: Path, made: Path, record: dict[str, Any], link: bool = False) -> None:
    """Keep a file the stage made for reruns on this machine: the file, then its record with its sha256 (each
    written whole by a rename; the record names the file's sha256, so a half-copied or edited file is never
    taken)."""
    from loraforge.tasks.artifacts import sha256_file

    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(f".{cached.name}.{os.getpid()}.partial")
    _put(made, partial, link)
    os.replace(partial, cached.with_suffix(".gguf"))
    partial.write_text(json.dumps({**record, "sha256": sha256_file(made)}))
    os.replace(partial, cached.with_suffix(".json"))


def _put(source: Path, target: Path, link: bool) -> None:
    """`source`'s bytes at `target`: a copy, or with `link` a hard link where both are on one file system."""
    if link:
        try:
            os.link(source, target)
            return
        except OSError:  # another file system
            pass
    shutil.copyfile(source, target)


def _tool_threads(config: QuantizeConfig) -> int:
    """quantize.tool_threads, 0 meaning every core this process may use."""
    return config.tool_threads or _cores()


def _cores() -> int:
    """The threads a whole-machine piece of work takes: OMP_NUM_THREADS when set (as torch takes it: the usual way
    to give a process fewer cores, e.g. two test workers on two cores), else every core this process may use."""
    return int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))


def _quantize_with_imatrix(
    tools: Path, source: Path, target: Path, qtype: str, imatrix: Path, config: QuantizeConfig
) -> str:
    """`llama-quantize --imatrix`; returns its 'N of M' count of tensors that needed a fallback type."""
    cmd = [str(tools / "llama-quantize"), "--imatrix", imatrix.name, source.name, target.name, qtype.upper(),
           str(_tool_threads(config))]  # fmt: skip  # relative names (all in the draft folder): see _imatrix
    output = _run_tool(cmd, target, f"llama-quantize --imatrix to {qtype} failed", config.tool_timeout_s)
    loaded = re.search(r"loaded (\d+) importance matrix entries", output)
    if not loaded or int(loaded.group(1)) == 0:
        raise StageError(f"llama-quantize did not load the importance matrix {imatrix.name}:\n{output[-600:]}")
    found = re.search(r"(\d+ of \d+) tensor\(s\) required fallback", output)
    return found.group(1) if found else "0"


def _settings(config: QuantizeConfig, name: str, sampling: Sampling, metrics: list[str]) -> dict[str, Any]:
    """What the quantize key hashes: the config without runtime-only settings, the model name, the probe's
    metrics and (when Modelfiles are written) the eval's sampling settings they carry."""
    written = {"sampling": dataclasses.asdict(sampling)} if config.modelfile else {}
    return {**config.model_dump(exclude=RUNTIME_ONLY), "name": name, "probe_metrics": metrics, **written}


def _run_tool(
    cmd: list[str],
    out: Path,
    failure: str,
    timeout: float,
    env: dict[str, str] | None = None,
    on_output: Callable[[str], object] | None = None,
    group: _ToolGroup | None = None,
) -> str:
    """Run a tool (llama.cpp's, or the converter) in `out`'s folder; returns its log (stdout and stderr, as
    written), or raises with the log's tail. `on_output` sees the log as it comes (progress). A tool still running
    after `timeout` seconds, or when this process is interrupted, is killed and the stage stops."""
    import codecs
    import io

    start = group.popen if group is not None else subprocess.Popen
    process = start(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=out.parent, env=env)
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        process.kill()

    timer = threading.Timer(timeout, expire)
    timer.start()
    decoder, pieces = codecs.getincrementaldecoder("utf-8")(errors="replace"), []
    stream = cast(io.BufferedReader, process.stdout)
    try:
        for raw in iter(lambda: stream.read1(4096), b""):
            pieces.append(decoder.decode(raw))
            if on_output is not None:
                on_output(pieces[-1])
        returncode = process.wait()
    finally:
        timer.cancel()
        if process.poll() is None:  # interrupted here: the tool must not outlive the stage
            process.kill()
            process.wait()
    output = "".join(pieces) + decoder.decode(b"", final=True)
    return _tool_result(cmd, out, failure, timeout, expired.is_set(), returncode, output)


def _tool_result(
    cmd: list[str], out: Path, failure: str, timeout: float, expired: bool, returncode: int, output: str
) -> str:
    """A finished tool run's log (`output`), or the StageError that says why it failed: past its timeout, a
    non-zero exit or no `out` written (with the log's tail)."""
    if expired:
        raise StageError(
            f"{failure}: {Path(cmd[1] if cmd[0] == sys.executable else cmd[0]).name} did not finish within "
            f"quantize.tool_timeout_s={timeout:g} s and was stopped; raise quantize.tool_timeout_s for a large model."
        )
    if returncode != 0 or not out.is_file():
        tail = "\n".join(output.strip().splitlines()[-8:])
        raise StageError(f"{failure} (exit {returncode}):\n{tail}")
    return output


def _adapter_conversion(job: _Job, base: Artifact, train: Artifact, out: Path, qtype: str) -> _ToolRun:
    """The converter run that writes the adapter as a GGUF LoRA (llama.cpp applies it at load time), against
    `base` as provisioned on this machine (its model_path is a folder here)."""
    from loraforge.tasks.models import read_base
    from loraforge.tasks.train import read_train

    if read_train(train).use_dora:
        raise StageError(
            f"quantize.types has {qtype}, but llama.cpp's LoRA GGUF cannot hold DoRA magnitudes; drop {qtype} "
            "(the merged GGUF types carry DoRA fine) or train with train.use_dora=false."
        )
    print(f"[quantize] converting the adapter to a {LORA_TYPES[qtype]} GGUF LoRA")
    cmd = [sys.executable, str(job.converter / "convert_lora_to_gguf.py"), "--base", str(read_base(base).model_path),
           "--outfile", str(out), "--outtype", LORA_TYPES[qtype], str(train.file("adapter"))]  # fmt: skip
    return _ToolRun(cmd, out, f"convert_lora_to_gguf.py failed for {train.file('adapter')}")


def _link_trained_base(job: _Job, base: Artifact, folder: Path) -> None:
    """`folder`: the base model's files (linked) with the merged model's tokenizer files, so the base GGUF the
    adapter types are checked on prompts as training did (the trained chat template, stop tokens), as a user
    applying the adapter with the trained template would."""
    from loraforge.tasks.models import read_base

    folder.mkdir()
    sources = {path.name: path for path in read_base(base).model_path.iterdir() if path.is_file()}
    sources.update({p.name: p for p in _tokenizer_files(job.model_dir)})
    for name, source in sources.items():
        (folder / name).symlink_to(source.resolve())


def _tokenizer_files(folder: Path) -> list[Path]:
    """The files of `folder` that make up its tokenizer, chat template and stop tokens (not its weights or
    config), sorted by name."""
    prefixes = ("tokenizer", "special_tokens_map", "added_tokens", "chat_template")
    files = [p for p in folder.iterdir() if p.is_file()]
    return sorted(p for p in files if p.name.startswith(prefixes) or p.name == "generation_config.json")


class _ToolRun(NamedTuple):
    """One run of a converter: its command, the file it writes, what a failure says."""

    cmd: list[str]
    out: Path
    failure: str


def _side_by_side(runs: list[_ToolRun], converter: Path, timeout: float) -> None:
    """Run the converter runs at once, each in a thread of its own waiting on its process (`_run_warm`: a child of
    the warm converter server, tasks/converter.py); the first failure, or an interrupt, stops every one
    (`_ToolGroup`) and is raised."""
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    env = {**os.environ, "PYTHONPATH": str(converter / "gguf-py") + os.pathsep + str(converter), "NO_LOCAL_GGUF": ""}
    group = _ToolGroup()
    with ThreadPoolExecutor(len(runs), thread_name_prefix="converter") as pool:
        futures = [pool.submit(_run_warm, run, timeout, env, group) for run in runs]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f.exception() for f in futures if f.done() and f.exception()), None)
            if failed is not None:
                raise failed
        except BaseException:
            group.stop()  # the other runs' threads then end: the pool's exit waits for them
            raise


def _run_warm(run: _ToolRun, timeout: float, env: dict[str, str], group: _ToolGroup) -> str:
    """A converter run (`python SCRIPT ARGS`) in a child of the warm converter server, in `run.out`'s folder;
    returns its log, or raises with the log's tail. Killed after `timeout` seconds or when `group` stops."""
    import tempfile

    from loraforge.tasks import converter

    handle, log = tempfile.mkstemp(prefix="loraforge-converter-", suffix=".log")
    os.close(handle)
    try:
        process = group.add(run.cmd, lambda: converter.start(run.cmd[1:], run.out.parent, env, Path(log)))
        try:
            returncode = process.wait(timeout)
            if returncode is None:  # past the timeout: killed, and said so below
                process.kill()
                process.wait()
        except BaseException:  # interrupted here: the run must not outlive the stage
            process.kill()
            raise
        output = Path(log).read_text(errors="replace")
    finally:
        os.unlink(log)
    return _tool_result(run.cmd, run.out, run.failure, timeout, returncode is None, returncode or 0, output)


class _Killable(Protocol):
    def kill(self) -> None: ...


_Started = TypeVar("_Started", bound=_Killable)


class _ToolGroup:
    """Tool processes started side by side: `stop` kills every one started and refuses any still to start."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: list[_Killable] = []
        self._stopped = False

    def popen(self, cmd: list[str], **options: Any) -> subprocess.Popen[bytes]:
        return self.add(cmd, lambda: subprocess.Popen(cmd, **options))

    def add(self, cmd: list[str], launch: Callable[[], _Started]) -> _Started:
        with self._lock:
            if self._stopped:
                raise StageError(f"{Path(cmd[1]).name} not started: a tool run beside it failed")
            process = launch()
            self._running.append(process)
            return process

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            for process in self._running:
                process.kill()


def _converter_dir(version: str) -> Path:
    from loraforge.tasks.models import cache_dir

    folder = cache_dir() / f"llama.cpp-{version}"
    if not (folder / "convert_hf_to_gguf.py").is_file():
        raise StageError(
            f"the GGUF converter for llama-cpp-python {version} is missing ({folder}); run `make setup`, "
            "which extracts it from the same llama-cpp-python sdist."
        )
    return folder


def _convert(converter: Path, model_dir: Path, out: Path, qtype: str, name: str, timeout: float) -> None:
    """The HF model folder `model_dir` as a GGUF of type `qtype` (llama.cpp's convert_hf_to_gguf.py)."""
    _side_by_side([_conversion(converter, model_dir, out, qtype, name)], converter, timeout)


def _conversion(converter: Path, model_dir: Path, out: Path, qtype: str, name: str) -> _ToolRun:
    """The converter run that writes the HF model folder `model_dir` as a GGUF of type `qtype`."""
    print(f"[quantize] converting {'the base' if name.endswith('-base') else 'the merged model'} to {qtype} GGUF")
    cmd = [sys.executable, str(converter / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", str(out),
           "--outtype", qtype, "--model-name", name]  # fmt: skip
    return _ToolRun(cmd, out, f"convert_hf_to_gguf.py failed for {model_dir} ({qtype})")


def _hf_reference(
    model_dir: Path,
    data: Artifact,
    fidelity_rows: list[dict[str, Any]],
    probes: list[dict[str, Any]],
    metrics: list[str],
    config: QuantizeConfig,
    logprobs: Path,
) -> HFReference:
    """The merged HF model's side of every check: its log-probs on the fidelity rows (one file per row in the
    folder `logprobs`, read back one row at a time by each check: a row's are tokens x vocabulary x 4 B), its
    greedy answers to the probe rows, and the tokenizer with the chat template training used (from the data
    artifact)."""
    import torch

    from loraforge.tasks.batching import generate_answers
    from loraforge.tasks.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model_dir)  # then made to prompt exactly as training did (the data artifact)
    tokenizer.chat_template = data.file("chat_template.jinja").read_text()
    for name, token in read_data(data).special_tokens.items():
        setattr(tokenizer, f"{name}_token", token["text"])
    generation = model_dir / "generation_config.json"  # HF generation stops at these; llama.cpp must too
    eos_ids = json.loads(generation.read_text()).get("eos_token_id") if generation.is_file() else None
    tokenizer.stop_token_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
    tokenizer.stop_token_ids += stop_token_ids(tokenizer, read_data(data).stop_strings)  # the named template's
    model = load_causal_lm(model_dir, "float32")
    model.eval()
    logprobs.mkdir()
    files = []
    with torch.no_grad():
        for index, row in enumerate(fidelity_rows):
            logits = model(input_ids=torch.tensor([row["input_ids"]]), use_cache=False).logits[0].float()
            files.append(logprobs / f"{index}.pt")
            torch.save(torch.log_softmax(logits, dim=-1), files[-1])
            del logits
    answers = generate_answers(model, tokenizer, [r["messages"][:-1] for r in probes], config.max_new_tokens, 8)
    del model
    n_ctx = read_data(data).max_length + config.max_new_tokens
    scores = _probe_scores(metrics, answers, probes)
    return HFReference(tokenizer, probes, metrics, fidelity_rows, files, scores, n_ctx)


def _probe_scores(metrics: list[str], answers: list[str], rows: list[dict[str, Any]]) -> dict[str, float]:
    """Every figure of the answer metrics on the probe rows, as the eval stage scores answers (`score_answers`)."""
    from loraforge.tasks.evaluate import score_answers

    references = [r["messages"][-1]["content"] for r in rows]
    scores, _ = score_answers(metrics, [a.strip() for a in answers], references)
    return {k: round(v, 4) for k, v in scores.items()}


def measure_gguf(path: Path, lora: Path | None, reference: HFReference, config: QuantizeConfig) -> dict[str, Any]:
    """Load a GGUF in llama-cpp-python and measure it against the merged HF model: template parity, the logits on
    the fidelity rows, and greedy answers to the probe rows with the prompt as the GGUF's own template renders it.
    Judging the figures is `verdict`'s.

    Args:
        path: the GGUF file; for an adapter type, the base GGUF the adapter is applied to.
        lora: the adapter GGUF of an adapter type, else None.
        reference: the merged HF model's side (`_hf_reference`).
        config: llama.cpp threads and the answer length.

    Returns:
        The figures: size_mb, mean_kl, top1_agreement, ppl_ratio, fidelity_positions, probe (every figure of
        the answer metrics on the GGUF's answers), hf_probe (the same for the merged model), probe_drop (per
        metric, merged minus GGUF), sample_answer, template_parity.

    Raises:
        StageError: the GGUF does not prompt the model the way training did (every type shares the template, so
            this stops the stage rather than failing one type), or llama.cpp's logits are not finite.
    """
    from llama_cpp import Llama
    from tqdm import tqdm

    llm = Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=reference.n_ctx,
                n_threads=config.n_threads, n_threads_batch=_cores(), verbose=False, seed=0,
                logits_all=True)  # fmt: skip
    path = lora or path  # the file measured
    conversations = [row["messages"][:-1] for row in reference.probes]
    problems, prompts = _template_parity(llm, reference.tokenizer, conversations)
    if problems:
        raise StageError(
            f"{path.name}: the GGUF does not prompt the model the way training did:\n  - " + "\n  - ".join(problems)
        )
    bar = tqdm(total=len(reference.fidelity_rows) + len(prompts), desc=f"check {path.name}", unit="row",
               dynamic_ncols=True, leave=False)  # fmt: skip  # the fidelity rows, then the probe answers
    closeness = _logit_figures(llm, reference, path.name, bar.update)
    answers = []
    for prompt in prompts:  # no reset: llama-cpp-python evaluates only what a prompt does not share with the last
        reply = llm.create_completion(prompt, max_tokens=config.max_new_tokens, temperature=0.0, top_k=1)
        answers.append(reply["choices"][0]["text"].strip())  # type: ignore[index]
        bar.update()
    bar.close()
    del llm
    return {
        "size_mb": round(path.stat().st_size / 2**20, 1),
        **closeness,
        **probe_figures(_probe_scores(reference.metrics, answers, reference.probes), reference.scores),
        "sample_answer": answers[0] if answers else "",
        "template_parity": f"{len(prompts)} prompts identical",
    }


def _logit_figures(
    llm: Any, reference: HFReference, name: str, row_done: Callable[[], object] = lambda: None
) -> dict[str, Any]:
    """How the GGUF's next-token distributions follow the merged model's over every position of the fidelity
    rows: mean KL(HF || GGUF), top-1 agreement, perplexity ratio GGUF / HF (`row_done` after each row)."""
    import numpy as np
    import torch

    kl_sum, agree, positions, nll_hf, nll_q, targets = 0.0, 0, 0, 0.0, 0.0, 0
    previous: list[int] = []
    for row, ref_file in zip(reference.fidelity_rows, reference.logprobs, strict=True):
        ref = torch.load(ref_file, weights_only=True)  # one row's log-probs at a time: memory bounded by one row
        ids = row["input_ids"]
        # The leading tokens this row shares with the one before (template header, system prompt) keep their keys,
        # values and logits in llama.cpp's context: only the rest is evaluated (its own prompt cache does the same
        # for the probe answers). Every position's logits are still the ones this row's tokens give.
        llm.n_tokens = min(_common_prefix(previous, ids), len(ids) - 1)
        llm.eval(ids[llm.n_tokens :])
        previous = ids
        scores = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
        if not torch.isfinite(scores).all():
            raise StageError(f"{name}: llama.cpp produced NaN/inf logits; the file is corrupt.")
        logq = torch.log_softmax(scores, dim=-1)
        kl_sum += float((ref.exp() * (ref - logq)).sum())
        agree += int((ref.argmax(-1) == logq.argmax(-1)).sum())
        positions += len(ids)
        nxt = torch.tensor(ids[1:])
        nll_hf -= float(ref[:-1].gather(1, nxt[:, None]).sum())
        nll_q -= float(logq[:-1].gather(1, nxt[:, None]).sum())
        targets += len(ids) - 1
        row_done()
    mean_kl = max(kl_sum, 0.0) / max(positions, 1)  # KL >= 0; float noise can dip below for identical files
    return {
        "mean_kl": float(f"{mean_kl:.4g}"),  # 4 significant digits: tiny values stay > 0
        "top1_agreement": round(agree / max(positions, 1), 4),
        "ppl_ratio": round(math.exp((nll_q - nll_hf) / max(targets, 1)), 5),
        "fidelity_positions": positions,
    }


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def verdict(figures: Mapping[str, Any], limits: GgufLimits) -> list[str]:
    """The verdict on one GGUF's measured figures (`measure_gguf`): one reason per limit they break, none when
    they pass. Pure: a changed limit re-judges the same figures. A limit holds at its boundary; a NaN figure
    breaks its limit (no comparison with NaN is true), and so does a metric the merged model was scored on but
    the GGUF was not.

    Args:
        figures: mean_kl, top1_agreement, ppl_ratio, probe and hf_probe (a quantize manifest's `gguf` entry
            has them); each answer metric in hf_probe is judged by its drop.
        limits: the type's limits (`QuantizeConfig.limits`).
    """
    checks = [
        ("mean_kl", figures["mean_kl"], figures["mean_kl"] <= limits.max_mean_kl, f"<= {limits.max_mean_kl}"),
        ("top1_agreement", figures["top1_agreement"], figures["top1_agreement"] >= limits.min_top1_agreement,
         f">= {limits.min_top1_agreement}"),
        ("ppl_ratio", figures["ppl_ratio"], figures["ppl_ratio"] <= limits.max_ppl_ratio, f"<= {limits.max_ppl_ratio}"),
    ]  # fmt: skip
    for metric, drop in probe_drops(figures["probe"], figures["hf_probe"]).items():
        limit = limits.max_probe_drop.get(metric, DEFAULT_MAX_PROBE_DROP[cast(ProbeMetric, metric)])
        # shares of a few rows: a drop equal to the limit must not fail on float rounding
        checks.append((f"{metric}_drop", round(drop, 4), drop <= limit + 1e-9, f"<= {limit}"))
    return [f"{name} {value} (limit {limit})" for name, value, holds, limit in checks if not holds]


def probe_drops(probe: Mapping[str, float], hf_probe: Mapping[str, float]) -> dict[str, float]:
    """Per answer metric the merged model scored: its headline figure's drop, merged minus GGUF (NaN when the
    GGUF has no such figure)."""
    return {m: hf_probe[m] - probe.get(m, math.nan) for m in ANSWER_METRICS if m in hf_probe}


def probe_figures(probe: dict[str, float], hf_probe: dict[str, float]) -> dict[str, Any]:
    """What a GGUF's figures record of the probe: its scores, the merged model's, and the drops (rounded)."""
    drops = {m: round(d, 4) for m, d in probe_drops(probe, hf_probe).items()}
    return {"probe": probe, "hf_probe": hf_probe, "probe_drop": drops}


def _judged(figures: dict[str, Any], limits: GgufLimits) -> dict[str, Any]:
    """The figures with their verdict as the manifest records it: passed, and the reasons joined when not."""
    reasons = verdict(figures, limits)
    return {**figures, "passed": not reasons, "reason": "; ".join(reasons)}


def _template_parity(
    llm: Any, tokenizer: Any, conversations: list[list[dict[str, str]]]
) -> tuple[list[str], list[list[int]]]:
    """Compare how llama.cpp (the template stored in the GGUF) and the HF tokenizer (what training used) turn
    each conversation into token ids, their BOS/EOS tokens, and whether every HF stop token (EOS and the
    generation config's eos_token_id) ends generation in llama.cpp.

    Returns:
        (problems, the GGUF-side prompt token ids per conversation).
    """
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    problems = []
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return ["the GGUF carries no tokenizer.chat_template (llama.cpp would guess a format)"], []
    eos, bos = llm.token_eos(), llm.token_bos()
    if eos != tokenizer.eos_token_id:
        problems.append(f"EOS differs: GGUF {eos} vs HF {tokenizer.eos_token_id} ({tokenizer.eos_token!r})")
    if tokenizer.bos_token_id is not None and bos != tokenizer.bos_token_id:
        problems.append(f"BOS differs: GGUF {bos} vs HF {tokenizer.bos_token_id} ({tokenizer.bos_token!r})")
    for stop in sorted(set(getattr(tokenizer, "stop_token_ids", [])) | {tokenizer.eos_token_id}):
        if not llama_cpp.llama_vocab_is_eog(llm._model.vocab, stop):
            problems.append(f"stop token {stop} ({tokenizer.convert_ids_to_tokens(stop)!r}) does not end generation "
                            "in llama.cpp: answers would run on past it")  # fmt: skip
    token_text = llm._model.token_get_text  # the special tokens' text, as llama-cpp-python passes them
    formatter = Jinja2ChatFormatter(template=template, eos_token=token_text(eos), bos_token=token_text(bos))
    prompts = []
    for index, messages in enumerate(conversations):
        rendered = formatter(messages=messages)  # type: ignore[arg-type]
        ids = llm.tokenize(rendered.prompt.encode(), add_bos=not rendered.added_special, special=True)
        hf_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        hf_ids = tokenizer(hf_text, add_special_tokens=False)["input_ids"]
        if ids != hf_ids:
            at = next(
                (i for i, (a, b) in enumerate(zip(ids, hf_ids, strict=False)) if a != b), min(len(ids), len(hf_ids))
            )
            gguf_text = llm.detokenize(ids[at : at + 8], special=True).decode(errors="replace")
            problems.append(
                f"conversation {index}: prompt tokens differ from position {at}: GGUF {gguf_text!r} "
                f"vs HF {tokenizer.decode(hf_ids[at : at + 8])!r}"
            )
        prompts.append(ids)
    return problems, prompts
