"""Each stage's typed reader of what it publishes to the others (stages never read each other's manifests by
string): what each returns from a manifest as the stage writes it."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraforge.tasks.artifacts import Artifact
from loraforge.tasks.data import read_data
from loraforge.tasks.errors import GateFailed
from loraforge.tasks.evaluate import check_gate, read_gate
from loraforge.tasks.merge import read_merge
from loraforge.tasks.models import read_base
from loraforge.tasks.publish import read_publish
from loraforge.tasks.quantize import read_quantize
from loraforge.tasks.train import read_train


def _artifact(stage: str, manifest: dict, tmp_path: Path) -> Artifact:
    return Artifact(stage, f"{stage}-key", tmp_path, {"stage": stage, **manifest})


def test_base_names_the_hub_id_before_the_configured_spec(tmp_path: Path) -> None:
    manifest = {"model_path": "/m/tiny", "base_model": "/m/tiny", "hub_id": None, "fingerprint": "f0",
                "architecture": "LlamaForCausalLM", "source": {"license": "apache-2.0"}}  # fmt: skip
    ref = read_base(_artifact("base", manifest, tmp_path))
    assert (ref.model_path, ref.public_name, ref.license, ref.fingerprint) == (Path("/m/tiny"), "/m/tiny",
                                                                               "apache-2.0", "f0")  # fmt: skip
    hub = read_base(_artifact("base", {**manifest, "hub_id": "org/tiny", "source": None}, tmp_path))
    assert hub.public_name == "org/tiny" and hub.license is None


def test_train_resolves_what_it_decided_at_run_time(tmp_path: Path) -> None:
    files = {"adapter/adapter_model.safetensors": {"sha256": "ab12"}}
    declared = {"config": {"compute_dtype": "auto", "use_dora": True, "r": 8}, "files": files}
    adapter = read_train(_artifact("train", declared, tmp_path))
    assert adapter.settings["compute_dtype"] == "float32" and adapter.settings["precision"] == "fp32"
    assert adapter.use_dora and adapter.adapter_sha256 == "ab12" and adapter.settings["r"] == 8
    resolved = read_train(_artifact("train", {**declared, "precision": "bf16", "compute_dtype": "bfloat16"},
                                    tmp_path))  # fmt: skip
    assert (resolved.settings["precision"], resolved.settings["compute_dtype"]) == ("bf16", "bfloat16")
    assert read_train(_artifact("train", {"config": {"compute_dtype": "float16"}}, tmp_path)).settings[
        "compute_dtype"] == "float16"  # fmt: skip


def test_gate_lists_every_failed_check_with_its_value(tmp_path: Path) -> None:
    checks = [{"check": "accuracy >= 0.9", "value": 0.5, "passed": False},
              {"check": "macro_f1 >= 0.1", "value": 0.4, "passed": True},
              {"check": "leaked_prompts <= 0", "value": 3, "passed": False}]  # fmt: skip
    eval_ = _artifact("eval", {"gate": {"passed": False, "checks": checks}}, tmp_path)
    gate = read_gate(eval_)
    assert not gate.passed and gate.failures() == "accuracy >= 0.9 (got 0.5); leaked_prompts <= 0 (got 3)"
    assert gate.summary() == "accuracy >= 0.9 [0.5], macro_f1 >= 0.1 [0.4], leaked_prompts <= 0 [3]"
    with pytest.raises(GateFailed, match=r"eval gate failed: accuracy >= 0.9 \(got 0.5\); leaked_prompts"):
        check_gate(eval_)


def test_data_merge_quantize_and_publish_readers(tmp_path: Path) -> None:
    tokens = {"eos": {"id": 2, "text": "</s>"}}
    data = read_data(_artifact("data", {"config": {"max_length": 256, "system_prompt": None}, "special_tokens": tokens,
                                        "data_sha256": "d1"}, tmp_path))  # fmt: skip
    assert (data.max_length, data.system_prompt, data.special_tokens, data.data_sha256) == (256, None, tokens, "d1")
    inputs = {s: {"stage": s, "key": f"{s}-k"} for s in ("base", "data", "train")}
    merged = read_merge(_artifact("merge", {"config": {"dtype": "bfloat16"}, "inputs": inputs}, tmp_path))
    assert merged.dtype == "bfloat16" and merged.made_from == {"base": "base-k", "data": "data-k", "train": "train-k"}
    gguf = {"f16": {"passed": True}, "q4_k_m": {"passed": False, "reason": "KL"}, "q8_0": {}}
    files = read_quantize(_artifact("quantize", {"gguf": gguf, "llama_cpp_version": "0.3.36"}, tmp_path))
    assert files.passed() == ["f16", "q8_0"] and files.imatrix is None
    published = read_publish(_artifact("publish", {"mode": "push", "repo_id": "org/x", "tag": "v1"}, tmp_path))
    assert published._asdict() == {"mode": "push", "repo_id": "org/x", "endpoint": None, "tag": "v1", "commit": None}
