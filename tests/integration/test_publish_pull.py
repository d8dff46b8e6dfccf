"""Publish and pull against the project's Hub-compatible server on loopback: publishing the same artifacts again
makes no new commit, the card carries the Hub metadata and the lineage field by field, and `pull` downloads by
tag, verifies every file against the lineage, answers prompts, switches between adapters on one base, and
refuses a tampered repo."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from pipeline_fixtures import REPO, TOKEN, _config, _run

from loraforge.tasks.artifacts import ArtifactStore
from loraforge.tasks.errors import StageError

pytestmark = pytest.mark.integration
PROMPT = "My card was charged twice for the same order."


def test_publishing_the_same_artifacts_again_makes_no_new_commit(
    first_run: dict, tiny_model: Path, workdir: Path, hub: str, tmp_path: Path
) -> None:
    from huggingface_hub import HfApi

    from loraforge.tasks.publish import publish_model

    api = HfApi(endpoint=hub, token=TOKEN)
    repo = "loraforge/tiny-republish"
    record = _run(_config(tiny_model, workdir, hub, f"publish.repo_id={repo}"))
    commits = [c.commit_id for c in api.list_repo_commits(repo)]
    # A fresh store with the same upstream artifacts: the publish stage runs again and pushes the same bundle.
    for stage in ("base", "data", "train", "eval", "merge", "quantize"):
        source = Path(record["stages"][stage]["path"])
        shutil.copytree(source, tmp_path / "store" / stage / source.name)
    store = ArtifactStore(tmp_path / "store")
    a = {s: store.get(s, record["stages"][s]["key"]) for s in ("base", "data", "train", "eval", "merge", "quantize")}
    config = _config(tiny_model, workdir, hub, f"publish.repo_id={repo}")
    again = publish_model(config.publish, config.name, False, a["base"], a["data"], a["train"], a["eval"], a["merge"],
                          a["quantize"], store)  # fmt: skip
    assert not again.cached
    assert [c.commit_id for c in api.list_repo_commits(repo)] == commits
    assert again.manifest["commit"] == commits[0] == record["publish"]["commit"]


def test_model_card_fields(first_run: dict, hub: str, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard, hf_hub_download

    tag = first_run["publish"]["tag"]
    card = Path(hf_hub_download(REPO, "README.md", revision=tag, endpoint=hub, token=TOKEN, cache_dir=tmp_path))
    lineage_file = hf_hub_download(REPO, "loraforge/lineage.json", revision=tag, endpoint=hub, token=TOKEN,
                                   cache_dir=tmp_path)  # fmt: skip
    lineage = json.loads(Path(lineage_file).read_text())
    text = card.read_text()
    meta = yaml.safe_load(text.split("---")[1])
    stages = first_run["stages"]
    manifests = {s: json.loads((Path(stages[s]["path"]) / "manifest.json").read_text()) for s in stages}
    base, data, train, quantize = (manifests[s] for s in ("base", "data", "train", "quantize"))

    # Hub metadata, field by field (the order is the card's).
    assert list(meta) == [
        "base_model", "base_model_relation", "library_name", "pipeline_tag", "license", "tags", "model-index"
    ]  # fmt: skip
    assert meta["base_model"] == base["base_model"] and base.get("hub_id") is None  # the tiny local base
    assert meta["base_model_relation"] == "adapter" and "license_name" not in meta  # no custom license here
    assert meta["library_name"] == "peft"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "other"  # the tiny base is a local folder with no license anywhere
    assert meta["tags"] == ["loraforge", "lora", "peft", "gguf", "ollama"]
    assert "datasets" not in meta and lineage["datasets"] == []  # local jsonl files: no Hub dataset id to link
    [entry] = meta["model-index"]
    assert entry["name"] == REPO.split("/")[1]
    [result] = entry["results"]
    assert result["task"] == {"type": "text-generation", "name": "Text Generation"}
    assert result["dataset"] == {"name": "tiny-router (test split)", "type": "custom", "split": "test"}
    metrics = {m["type"]: m["value"] for m in result["metrics"]}
    assert metrics == {k: first_run["eval"][k] for k in ("accuracy", "macro_f1", "exact_match", "perplexity")}
    assert all(m["name"] == m["type"] for m in result["metrics"])
    parsed = ModelCard(text).data  # the Hub client reads the same metadata back
    assert parsed.base_model == meta["base_model"] and parsed.eval_results and len(parsed.eval_results) == 4

    # Lineage, item by item as the issue lists it.
    assert lineage["artifacts"] == {s: stages[s]["key"] for s in ("base", "data", "train", "eval", "merge", "quantize")}
    assert lineage["data"]["sha256"] == data["data_sha256"]  # dataset content hash
    assert lineage["data"]["files"] == {"train_file": "train.jsonl", "validation_file": "validation.jsonl",
                                        "test_file": "test.jsonl"}  # fmt: skip
    assert lineage["data"]["template_sha256"] == data["template_sha256"] and data["template_sha256"] in text
    assert lineage["config"] == {s: manifests[s]["config"] for s in lineage["artifacts"]}  # every stage's config
    assert lineage["config"]["quantize"]["imatrix"] == "auto"
    adapter_sha = train["files"]["adapter/adapter_model.safetensors"]["sha256"]
    assert lineage["train"]["adapter_sha256"] == adapter_sha and adapter_sha in text
    assert lineage["merge"]["policy"].startswith("fp32 merge onto the original base weights")
    assert lineage["merge"]["policy"] in text and lineage["merge"]["fidelity"] == manifests["merge"]["metrics"]
    assert lineage["merge"]["fidelity"]["cast_mean_kl"] > 0  # merge.dtype=float16 rounds (mean_kl() clamps at 0)
    assert lineage["quantize"]["llama_cpp_version"] == "0.3.36" and "llama.cpp 0.3.36" in text
    for qtype in ("f16", "q8_0", "q4_k_m", "lora_f16"):
        assert {"mean_kl", "top1_agreement", "ppl_ratio", "passed", "imatrix"} <= set(
            lineage["quantize"]["gguf"][qtype]
        )
        assert f"| {qtype} | `{quantize['gguf'][qtype]['file']}` |" in text
    assert lineage["quantize"]["imatrix"] == quantize["imatrix"] and quantize["imatrix"]["sha256"] in text
    assert lineage["eval"]["gate"]["passed"] is True
    assert lineage["gates"] == {"eval": True, "merge": True, "gguf": {q: True for q in quantize["gguf"]}}
    assert lineage["code_versions"] == {s: manifests[s]["code_version"] for s in lineage["artifacts"]}
    assert lineage["versions"]["llama-cpp-python"] == "0.3.36"
    assert lineage["files"]["adapter_model.safetensors"] == adapter_sha
    assert "ollama create tiny-ticket-router -f tiny-ticket-router/gguf/tiny-router-Q4_K_M.Modelfile" in text
    assert TOKEN not in text and TOKEN not in json.dumps(lineage)


def test_pull_by_tag_verifies_and_answers(first_run: dict, hub: str, capsys: pytest.CaptureFixture) -> None:
    from loraforge.flows.cli import main

    tag = first_run["publish"]["tag"]
    assert main(["pull", f"{REPO}@{tag}", "--prompt", PROMPT, "--endpoint", hub, "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert f"== {REPO}@{first_run['publish']['commit'][:12]} (adapter)" in out
    assert f"> {PROMPT}" in out
    assert "files verified against the lineage" in out

    from loraforge.tasks.pull import pull

    [gguf] = pull([f"{REPO}@{tag}"], [PROMPT], gguf="q4_k_m", endpoint=hub, max_new_tokens=4)
    assert "gguf/tiny-router-Q4_K_M.gguf" in gguf.verified and len(gguf.answers) == 1
    with pytest.raises(StageError, match=r"no q6_k GGUF published; the repo has \['gguf/tiny-router-F16-LoRA.gguf', "
                       r"'gguf/tiny-router-Q4_K_M.gguf'\]"):  # fmt: skip
        pull([f"{REPO}@{tag}"], [PROMPT], gguf="q6_k", endpoint=hub)
    with pytest.raises(StageError, match=r"--gguf lora_f16: a GGUF LoRA runs on top of a GGUF of its base model"):
        pull([f"{REPO}@{tag}"], [PROMPT], gguf="lora_f16", endpoint=hub)


def test_switching_adapters_on_one_base(first_run: dict, tiny_model: Path, workdir: Path, hub: str) -> None:
    from loraforge.tasks.pull import pull

    other = "loraforge/tiny-router-seed7"
    # pull applies the PEFT adapter on the HF base: one GGUF type, no importance matrix, for the second adapter
    record = _run(_config(tiny_model, workdir, hub, "train.seed=7", "train.learning_rate=0.01",
                          f"publish.repo_id={other}", "quantize.types=[q8_0]", "quantize.imatrix=off",
                          "publish.include_gguf=[q8_0]"))  # fmt: skip
    tag = first_run["publish"]["tag"]
    prompts = [PROMPT, "The app crashes when I open settings."]
    both = pull([f"{REPO}@{tag}", f"{other}@{record['publish']['tag']}"], prompts, endpoint=hub, max_new_tokens=6)
    alone = [pull([spec], prompts, endpoint=hub, max_new_tokens=6)[0] for spec in (f"{REPO}@{tag}", other)]
    assert [p.answers for p in both] == [p.answers for p in alone]  # switching gives each adapter's own answers


def test_pull_refuses_a_tampered_repo(first_run: dict, hub: str, tmp_path: Path) -> None:
    from huggingface_hub import HfApi, hf_hub_download

    from loraforge.tasks.pull import pull

    repo = "loraforge/tiny-tampered"
    api = HfApi(endpoint=hub, token=TOKEN)
    api.create_repo(repo, exist_ok=True)
    bundle = Path(first_run["stages"]["publish"]["path"]) / "bundle"
    api.upload_folder(repo_id=repo, folder_path=bundle)
    original = hf_hub_download(repo, "adapter_config.json", endpoint=hub, token=TOKEN, cache_dir=tmp_path)
    changed = json.loads(Path(original).read_text())
    changed["lora_alpha"] = 999
    (tmp_path / "adapter_config.json").write_text(json.dumps(changed))
    api.upload_file(path_or_fileobj=tmp_path / "adapter_config.json", path_in_repo="adapter_config.json", repo_id=repo)
    with pytest.raises(StageError) as error:
        pull([repo], [PROMPT], endpoint=hub)
    message = str(error.value)
    assert message.startswith(f"pull {repo} ({repo}@") and "verification failed" in message
    assert "adapter_config.json: sha256 " in message and "differs from the lineage's" in message
    with pytest.raises(StageError, match=r"pull loraforge/absent: cannot download from http://127\.0\.0\.1"):
        pull(["loraforge/absent"], [PROMPT], endpoint=hub)


def test_private_repo_needs_the_token_to_pull(
    first_run: dict, tiny_model: Path, workdir: Path, hub: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loraforge.tasks.pull import pull

    repo = "loraforge/tiny-private"
    record = _run(_config(tiny_model, workdir, hub, f"publish.repo_id={repo}", "publish.private=true"))
    assert record["publish"]["mode"] == "push"
    [pulled] = pull([f"{repo}@{record['publish']['tag']}"], [PROMPT], endpoint=hub, max_new_tokens=2)
    assert pulled.verified and len(pulled.answers) == 1
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(StageError, match=rf"pull {repo}: cannot download .* no token was sent \(a private repo looks"):
        pull([repo], [PROMPT], endpoint=hub)
