"""The model card (README.md of a published bundle), pinned byte for byte for one set of inputs per branch of the
template: gate passed or failed, GGUF types withheld, with and without an importance matrix (auto or on), licence
from the base's record or unknown, Hub datasets or none, merged model and Modelfiles or not, the LoRA GGUF alone.

The expected cards are tests/unit/model_cards/*.md; after an intended change of the card, rewrite them with
`python tests/unit/test_model_card.py` and read the diff.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CARDS = Path(__file__).with_name("model_cards")


def _gguf(qtype: str, passed: bool = True, **extra: Any) -> dict[str, Any]:
    stem = "NAME-F16-LoRA" if qtype == "lora_f16" else f"NAME-{qtype.upper()}"
    entry: dict[str, Any] = {
        "file": f"{stem}.gguf", "size_mb": 98.7, "mean_kl": 0.01234, "top1_agreement": 0.9375, "ppl_ratio": 1.0123,
        "probe": {"accuracy": 0.75}, "hf_probe": {"accuracy": 0.75}, "probe_drop": {"accuracy": 0.0}, "passed": passed,
        "reason": "" if passed else "mean_kl 0.3 (limit <= 0.15)", "fallback_tensors": "0", "imatrix": False,
    }  # fmt: skip
    return {**entry, **extra}


IMATRIX = {"file": "NAME-imatrix.gguf", "sha256": "d" * 64, "chunks": 3, "ctx": 128, "types": ["q4_k_m"]}

CASES: dict[str, dict[str, Any]] = {
    # Everything published: merged model, three GGUF types with Modelfiles and the LoRA GGUF, imatrix auto.
    "all_published": {
        "publish": {"include_gguf": ["f16", "q4_k_m", "lora_f16"], "include_merged": True,
                    "repo_id": "acme/ticket-router-lora"},
        "gguf": {"f16": _gguf("f16", modelfile="NAME-F16.Modelfile"),
                 "q4_k_m": _gguf("q4_k_m", imatrix=True, modelfile="NAME-Q4_K_M.Modelfile",
                                 probe={"accuracy": 0.6875, "macro_f1": 0.6},
                                 hf_probe={"accuracy": 0.75, "macro_f1": 0.7},
                                 probe_drop={"accuracy": 0.0625, "macro_f1": 0.1}),
                 "lora_f16": _gguf("lora_f16")},
        "imatrix": IMATRIX, "imatrix_mode": "auto", "gate": True, "license": "apache-2.0",
        "datasets": ["acme/tickets", "acme/more-tickets"], "system_prompt": "You route tickets.",
        "metrics": {"accuracy": 0.75, "base_accuracy": 0.25, "macro_f1": 0.7, "base_macro_f1": 0.2,
                    "perplexity": 3.5, "base_perplexity": 9.25},
    },
    # The gate failed (publish refuses it; the card still renders), q4_k_m withheld, q8_0 without a Modelfile,
    # imatrix on, nothing says the licence, no Hub dataset.
    "withheld": {
        "publish": {"include_gguf": ["q4_k_m", "q8_0"], "repo_id": "acme/withheld"},
        "gguf": {"q8_0": _gguf("q8_0"), "q4_k_m": _gguf("q4_k_m", passed=False, imatrix=True)},
        "imatrix": IMATRIX, "imatrix_mode": "on", "gate": False, "license": None, "datasets": [],
        "system_prompt": None, "metrics": {"accuracy": 0.5, "exact_match": 0.5},
    },
    # Only the adapter as a GGUF LoRA published (the merged type failed): no llama-cpp-python snippet, no Ollama.
    "lora_only": {
        "publish": {"include_gguf": ["lora_f16", "q4_0"]},
        "gguf": {"q4_0": _gguf("q4_0", passed=False, modelfile="NAME-Q4_0.Modelfile"),
                 "lora_f16": _gguf("lora_f16", probe={"rouge_l": 0.4123}, hf_probe={"rouge_l": 0.45})},
        "imatrix": None, "imatrix_mode": "off", "gate": True, "license": "mit", "datasets": ["acme/tickets"],
        "system_prompt": None, "metrics": {"accuracy": 1.0, "base_accuracy": 0.0, "rouge_l": 0.5},
    },
    # No GGUF published and none made; an old GGUF record without the fidelity figures renders them as nan, and
    # its exact-match probe accuracy (recorded before the probe used the eval's metrics) as it was.
    "no_gguf": {
        "publish": {"include_gguf": []},
        "gguf": {"q8_0": {"file": "NAME-Q8_0.gguf", "size_mb": 140.0, "accuracy": 0.5}},
        "imatrix": None, "imatrix_mode": "off", "gate": True, "license": None, "datasets": [], "system_prompt": None,
        "metrics": {"accuracy": 0.5},
    },
    # Empty tables: no card metric in the eval figures, no GGUF made, no data file named.
    "bare": {
        "publish": {"include_gguf": []}, "gguf": {}, "imatrix": None, "imatrix_mode": "off", "gate": True,
        "license": None, "datasets": [], "system_prompt": None, "metrics": {"loss": 1.0}, "data_files": False,
    },
}  # fmt: skip


def _render(case: dict[str, Any]) -> str:
    from loraforge.tasks.publish import PublishConfig, _lineage, _model_card

    gate = {"passed": case["gate"], "checks": [{"check": "accuracy >= 0.5"}, {"check": "accuracy >= base + 0.1"}]}
    source = {"license": case["license"]} if case["license"] else {}
    manifests = {
        "base": {"base_model": "bundled:smollm2-135m-instruct", "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
                 "fingerprint": "f" * 64, "architecture": "LlamaForCausalLM", "source": source,
                 "model_path": "/nonexistent/base", "config": {}},
        "data": {"data_sha256": {"train_file": "a" * 64}, "template_sha256": "b" * 64, "metrics": {"train_rows": 8},
                 "config": {"train_file": "/data/train.jsonl" if case.get("data_files", True) else None,
                            "validation_file": "/data/val.jsonl" if case.get("data_files", True) else None,
                            "test_file": None, "system_prompt": case["system_prompt"], "max_length": 512},
                 "special_tokens": {"eos": {"id": 2, "text": "<|im_end|>"}}},
        "train": {"config": {"r": 8}, "metrics": {"val_loss": 1.5},
                  "files": {"adapter/adapter_model.safetensors": {"sha256": "c" * 64}}},
        "eval": {"metrics": case["metrics"], "gate": gate, "config": {}},
        "merge": {"merge_policy": "fp32 merge, cast to bfloat16", "metrics": {"max_abs_dlogit": 1e-5},
                  "config": {"dtype": "bfloat16"},
                  "inputs": {s: {"stage": s, "key": f"{s}-key"} for s in ("base", "data", "train")}},
        "quantize": {"llama_cpp_version": "0.3.36", "gguf": case["gguf"], "imatrix": case["imatrix"],
                     "config": {"imatrix": case["imatrix_mode"]}},
    }  # fmt: skip
    inputs = {
        stage: SimpleNamespace(key=f"{stage}-key", manifest={**m, "code_version": f"{stage}-code", "versions": {}},
                               metrics=m.get("metrics", {}), config=m.get("config", {}))
        for stage, m in manifests.items()
    }  # fmt: skip
    config = PublishConfig(**case["publish"])
    lineage = {**_lineage("demo", inputs, "loraforge-0123456789ab"), "datasets": case["datasets"], "files": {}}
    return _model_card(config, lineage, inputs["base"], inputs["eval"], inputs["quantize"])  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_model_card_is_what_it_was(name: str) -> None:
    expected = (CARDS / f"{name}.md").read_text()
    assert _render(CASES[name]) == expected


if __name__ == "__main__":  # rewrite the expected cards after an intended change
    sys.path.insert(0, str(ROOT))
    CARDS.mkdir(exist_ok=True)
    for name, case in CASES.items():
        (CARDS / f"{name}.md").write_text(_render(case))
