"""The target-module presets resolve to the right linear layers on every architecture of the matrix
(tests/tiny.py), from config.json alone (a meta-device model, as `loraforge validate` resolves them)."""

from __future__ import annotations

from pathlib import Path

import pytest

# architecture -> (attention layers, MLP layers) as the architecture names them; the output head never counts
EXPECTED = {
    "llama": (["k_proj", "o_proj", "q_proj", "v_proj"], ["down_proj", "gate_proj", "up_proj"]),
    "qwen2": (["k_proj", "o_proj", "q_proj", "v_proj"], ["down_proj", "gate_proj", "up_proj"]),
    "qwen3": (["k_proj", "o_proj", "q_proj", "v_proj"], ["down_proj", "gate_proj", "up_proj"]),
    "gemma3": (["k_proj", "o_proj", "q_proj", "v_proj"], ["down_proj", "gate_proj", "up_proj"]),
    "mistral": (["k_proj", "o_proj", "q_proj", "v_proj"], ["down_proj", "gate_proj", "up_proj"]),
    "phi3": (["o_proj", "qkv_proj"], ["down_proj", "gate_up_proj"]),  # fused projections
}


def _config_only(arch: str, folder: Path) -> Path:
    import transformers
    from tiny import _SHARED, ARCHITECTURES

    config_class, model_class, _, settings = ARCHITECTURES[arch]
    settings = {k: v for k, v in settings.items() if k != "dtype"}
    config = getattr(transformers, config_class)(vocab_size=512, pad_token_id=0, **{**_SHARED, **settings})
    config.architectures = [model_class]
    config.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_presets_resolve_on_each_architecture(arch: str, tmp_path: Path) -> None:
    from loraforge.tasks.train import check_target_modules

    folder = _config_only(arch, tmp_path)
    attention, mlp = EXPECTED[arch]
    assert check_target_modules("attention", folder) == attention
    assert check_target_modules("attention+mlp", folder) == sorted(attention + mlp)
    assert check_target_modules("all-linear", folder) == sorted(attention + mlp)  # lm_head is never adapted
    assert check_target_modules(attention[:1], folder) == attention[:1]  # names are checked, then kept as given


def test_the_merged_model_keeps_what_the_base_tokenizer_declares(tmp_path: Path) -> None:
    """transformers re-saves a tokenizer under the class that loaded it and without a SentencePiece file; the
    merge puts back the base's `tokenizer_class` (llama.cpp's Phi-3 converter reads it: Phi-4's GPT-2 BPE) and its
    `tokenizer.model` (Llama 2, Mistral v0.x and Phi-3-mini's, which the converter reads)."""
    import json

    from loraforge.tasks.merge import keep_tokenizer_files

    base, merged = tmp_path / "base", tmp_path / "merged"
    base.mkdir(), merged.mkdir()
    (base / "tokenizer.model").write_bytes(b"\x0a\x03spm")
    (base / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer", "a": 1}))
    (merged / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend", "b": 2}))
    keep_tokenizer_files(base, merged)
    assert json.loads((merged / "tokenizer_config.json").read_text()) == {"tokenizer_class": "GPT2Tokenizer", "b": 2}
    assert (merged / "tokenizer.model").read_bytes() == b"\x0a\x03spm"
    (base / "tokenizer_config.json").write_text(json.dumps({"a": 1}))  # a base that declares no class: kept as saved
    (merged / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend"}))
    keep_tokenizer_files(base, merged)
    assert json.loads((merged / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"
