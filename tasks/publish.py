"""Publish stage: assemble the adapter (and optionally merged weights and GGUF files) with a model card and
lineage, then push it to a Hugging Face Hub repo, or, with no token, write the exact bundle it would push.

The token comes only from the environment (HF_TOKEN); it never enters configs, manifests, cards or logs.
Run alone: `loraforge stage publish CONFIG [key=value ...]`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.artifacts import Artifact, ArtifactStore, hash_files
from tasks.errors import StageError
from tasks.hubclient import hub_endpoint, hub_token, scrub


class PublishConfig(BaseModel):
    """Where and what to publish."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    repo_id: str = Field(
        "loraforge/ticket-router-lora", pattern=r"^[\w.-]+/[\w.-]+$", description="Hub repo id (owner/name)."
    )
    endpoint: str | None = Field(
        None, description="Hub URL; default: the HF_ENDPOINT environment variable, else https://huggingface.co."
    )
    push: Literal["auto", "always", "never"] = Field(
        "auto",
        description="auto: push when HF_TOKEN is set, else only write the bundle; always: fail without a token; "
        "never: write the bundle only.",
    )
    private: bool = Field(False, description="Create the repo as private.")
    include_merged: bool = Field(False, description="Also upload the merged model under merged/.")
    include_gguf: list[str] = Field(
        default_factory=lambda: ["q4_k_m"], description="GGUF types (from the quantize stage) to upload under gguf/."
    )
    tag: str | None = Field(None, description="Tag for the pushed revision; default: loraforge-<eval key prefix>.")


def publish_model(
    config: PublishConfig,
    pipeline_name: str,
    base: Artifact,
    data: Artifact,
    train: Artifact,
    eval_: Artifact,
    merge: Artifact,
    quantize: Artifact,
    store: ArtifactStore,
) -> Artifact:
    """Build the bundle and push it (or explain that it only wrote it); skipped when cached.

    Returns:
        The publish artifact: `bundle/` (exactly what is or would be pushed) and, after a push, the commit and
        tag in the manifest.
    """
    token = hub_token()
    mode = "push" if config.push == "always" or (config.push == "auto" and token) else "bundle"
    if mode == "push" and not token:
        raise StageError("publish.push is 'always' but HF_TOKEN is not set; export HF_TOKEN or set publish.push=auto.")
    endpoint = hub_endpoint(config.endpoint)
    inputs = {"base": base, "data": data, "train": train, "eval": eval_, "merge": merge, "quantize": quantize}
    settings = {**config.model_dump(), "endpoint": endpoint, "mode": mode, "name": pipeline_name}
    key, code = store.stage_key("publish", __file__, settings, inputs)
    if (hit := store.find("publish", key)) is not None:
        return hit

    missing = [t for t in config.include_gguf if t not in quantize.manifest.get("gguf", {})]
    if missing:
        raise StageError(
            f"publish.include_gguf asks for {', '.join(missing)} but the quantize stage produced "
            f"{', '.join(quantize.manifest.get('gguf', {}))}; add them to quantize.types."
        )
    gguf = quantize.manifest.get("gguf", {})
    withheld = {q: gguf[q]["reason"] for q in config.include_gguf if not gguf[q].get("passed", True)}
    for qtype, reason in withheld.items():
        print(f"[publish] not publishing {qtype} GGUF: it failed its fidelity check ({reason})")
    tag = config.tag or f"loraforge-{eval_.key[:12]}"
    with store.create("publish", key, settings, inputs, code) as draft:
        bundle = draft.path / "bundle"
        shutil.copytree(train.file("adapter"), bundle)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            source = merge.file("model") / name
            if source.is_file():
                shutil.copy2(source, bundle / name)
        if config.include_merged:
            shutil.copytree(merge.file("model"), bundle / "merged")
        for qtype in [q for q in config.include_gguf if q not in withheld]:
            (bundle / "gguf").mkdir(exist_ok=True)
            shutil.copy2(quantize.file(quantize.manifest["gguf"][qtype]["file"]), bundle / "gguf")
        lineage = _lineage(pipeline_name, inputs, tag)
        # Every published file's sha256, so `loraforge pull` can verify what it downloads against the lineage.
        lineage["files"] = {name: info["sha256"] for name, info in hash_files(bundle).items()}
        (bundle / "loraforge").mkdir()
        (bundle / "loraforge" / "lineage.json").write_text(json.dumps(lineage, indent=2, sort_keys=True))
        (bundle / "README.md").write_text(_model_card(config, lineage, base, eval_, quantize))
        draft.extra.update({"repo_id": config.repo_id, "endpoint": endpoint, "mode": mode, "tag": tag,
                            "withheld_gguf": withheld})  # fmt: skip
        if mode == "push":
            draft.extra["commit"] = _push(bundle, config, endpoint, token or "", tag)
            print(f"[publish] pushed {config.repo_id}@{tag} to {endpoint} (commit {draft.extra['commit'][:12]})")
        else:
            print(
                f"[publish] HF_TOKEN not set: wrote the bundle that would be pushed to {endpoint}/{config.repo_id} "
                f"(tag {tag}) at {store.path('publish', key) / 'bundle'}"
            )
    return store.get("publish", key, fresh=True)


def _push(bundle: Path, config: PublishConfig, endpoint: str, token: str, tag: str) -> str:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(config.repo_id, private=config.private, exist_ok=True)
        info = api.upload_folder(repo_id=config.repo_id, folder_path=bundle, commit_message=f"loraforge: publish {tag}")
        commit = str(info.oid)
        existing = {t.name for t in api.list_repo_refs(config.repo_id).tags}
        if tag not in existing:
            api.create_tag(config.repo_id, tag=tag, revision=commit)
    except Exception as exc:  # network and HTTP errors of every kind: report, never leak the token
        message = scrub(str(exc), token)
        raise StageError(f"push to {endpoint}/{config.repo_id} failed ({type(exc).__name__}): {message}") from None
    return commit


def _lineage(name: str, inputs: dict[str, Artifact], tag: str) -> dict[str, Any]:
    base, data, train, eval_, merge, quantize = (
        inputs[k] for k in ("base", "data", "train", "eval", "merge", "quantize")
    )
    return {
        "pipeline": name,
        "tag": tag,
        "artifacts": {stage: a.key for stage, a in inputs.items()},
        "base_model": {k: base.manifest.get(k) for k in ("base_model", "hub_id", "fingerprint", "architecture")},
        "data": {"sha256": data.manifest.get("data_sha256"), "template_sha256": data.manifest.get("template_sha256"),
                 "rows": data.metrics},
        "train": {"config": train.manifest["config"], "metrics": train.metrics,
                  "adapter_sha256": train.manifest["files"].get("adapter/adapter_model.safetensors", {}).get("sha256")},
        "eval": {"metrics": eval_.metrics, "gate": eval_.manifest.get("gate")},
        "merge": {"policy": merge.manifest.get("merge_policy"), "fidelity": merge.metrics,
                  "dtype": merge.manifest["config"]["dtype"]},
        "quantize": {"llama_cpp_version": quantize.manifest.get("llama_cpp_version"),
                     "gguf": quantize.manifest.get("gguf")},
        "code_versions": {stage: a.manifest.get("code_version") for stage, a in inputs.items()},
        "versions": train.manifest.get("versions"),
    }  # fmt: skip


def _model_card(
    config: PublishConfig, lineage: dict[str, Any], base: Artifact, eval_: Artifact, quantize: Artifact
) -> str:
    import yaml

    base_id = base.manifest.get("hub_id") or base.manifest["base_model"]
    license_ = (base.manifest.get("source") or {}).get("license", "other")
    metrics = eval_.metrics
    card_meta = {
        "base_model": base_id,
        "library_name": "peft",
        "pipeline_tag": "text-generation",
        "license": license_,
        "tags": ["loraforge", "lora", "peft", "gguf"],
        "model-index": [{
            "name": config.repo_id.split("/")[-1],
            "results": [{
                "task": {"type": "text-generation"},
                "dataset": {"name": lineage["pipeline"], "type": "custom"},
                "metrics": [{"type": m, "value": metrics[m]} for m in ("accuracy", "macro_f1", "exact_match")
                            if m in metrics],
            }],
        }],
    }  # fmt: skip
    rows = "\n".join(
        f"| {m} | {metrics.get('base_' + m, float('nan')):.4f} | {metrics[m]:.4f} |"
        for m in ("accuracy", "macro_f1", "exact_match", "perplexity")
        if m in metrics
    )
    gguf = "\n".join(
        f"| {q} | `{g['file']}` | {g['size_mb']} MB | {g.get('mean_kl', float('nan')):.4f} | "
        f"{g.get('top1_agreement', float('nan')):.3f} | {g.get('ppl_ratio', float('nan')):.4f} | {g['accuracy']:.3f} | "
        f"{'pass' if g.get('passed', True) else 'failed: ' + g['reason']} |"
        for q, g in (quantize.manifest.get("gguf") or {}).items()
    )
    return f"""---
{yaml.safe_dump(card_meta, sort_keys=False).strip()}
---

# {config.repo_id.split("/")[-1]}

A LoRA adapter for [{base_id}](https://huggingface.co/{base_id}) trained by loraforge
(pipeline `{lineage["pipeline"]}`).

## Use

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base_id}")
model = PeftModel.from_pretrained(base, "{config.repo_id}", revision="{lineage["tag"]}")
tokenizer = AutoTokenizer.from_pretrained("{config.repo_id}", revision="{lineage["tag"]}")
```

## Evaluation (test split)

| metric | base | tuned |
|---|---|---|
{rows}

Gate: {"passed" if (lineage["eval"]["gate"] or {}).get("passed") else "failed"}
({", ".join(c["check"] for c in (lineage["eval"]["gate"] or {}).get("checks", []))}).

## GGUF (llama.cpp {lineage["quantize"]["llama_cpp_version"]})

Each file checked against the merged model in llama-cpp-python: mean KL and top-1 agreement of next-token
distributions and the perplexity ratio on validation rows, task accuracy on test rows. Only files that
passed are published (under `gguf/`).

| type | file | size | mean KL | top-1 | ppl ratio | probe accuracy | fidelity |
|---|---|---|---|---|---|---|---|
{gguf}

## Lineage

- data sha256: `{json.dumps(lineage["data"]["sha256"])}`
- chat template sha256: `{lineage["data"]["template_sha256"]}`
- adapter sha256: `{lineage["train"]["adapter_sha256"]}`
- merge: {lineage["merge"]["policy"]}
- artifact keys: `{json.dumps(lineage["artifacts"])}`

Full lineage: `loraforge/lineage.json`.
"""
