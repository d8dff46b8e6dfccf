"""The whole pipeline on a tiny locally built model, under Prefect, with a real push to the project's
Hub-compatible server on loopback and a download back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_fixtures import REPO, TOKEN, _config, _ran, _run, task_run_states

from loraforge.flows.cli import main
from loraforge.tasks.config import DEMO_CONFIG
from loraforge.tasks.errors import GateFailed

pytestmark = pytest.mark.integration


def test_every_stage_runs_and_publishes(first_run: dict, hub: str, tmp_path: Path) -> None:
    from huggingface_hub import HfApi, hf_hub_download

    assert _ran(first_run) == {"base", "data", "train", "eval", "merge", "quantize", "publish"}
    assert first_run["gate"]["passed"]
    assert first_run["eval"]["loss_delta"] < 0
    assert set(first_run["gguf"]) == {"f16", "q8_0", "q4_k_m", "lora_f16"}
    publish = first_run["publish"]
    assert publish["mode"] == "push" and publish["endpoint"] == hub and len(publish["commit"]) == 40

    api = HfApi(endpoint=hub, token=TOKEN)
    assert publish["tag"] in {t.name for t in api.list_repo_refs(REPO).tags}
    files = set(api.list_repo_files(REPO, revision=publish["tag"]))
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "loraforge/lineage.json"} <= files
    assert {"gguf/tiny-router-Q4_K_M.gguf", "gguf/tiny-router-F16-LoRA.gguf"} <= files

    train = Path(first_run["stages"]["train"]["path"])
    manifest = json.loads((train / "manifest.json").read_text())
    # duration_s is the stage's work (training included), not only the writing of its folder
    assert manifest["duration_s"] >= manifest["metrics"]["train_seconds"]
    for name, stage in first_run["stages"].items():
        took = json.loads((Path(stage["path"]) / "manifest.json").read_text())["duration_s"]
        assert took <= stage["seconds"] + 0.1, (name, took, stage["seconds"])
    downloaded = hf_hub_download(REPO, "adapter_model.safetensors", revision=publish["tag"], endpoint=hub,
                                 token=TOKEN, cache_dir=tmp_path)  # fmt: skip
    from loraforge.tasks.artifacts import sha256_file

    assert sha256_file(Path(downloaded)) == manifest["files"]["adapter/adapter_model.safetensors"]["sha256"]
    card = Path(hf_hub_download(REPO, "README.md", revision=publish["tag"], endpoint=hub, token=TOKEN,
                                cache_dir=tmp_path)).read_text()  # fmt: skip
    assert "library_name: peft" in card and "base_model:" in card
    assert manifest["files"]["adapter/adapter_model.safetensors"]["sha256"] in card
    assert TOKEN not in card


def test_downloaded_adapter_loads_with_plain_peft(first_run: dict, hub: str, tiny_model: Path, tmp_path: Path) -> None:
    import torch
    from huggingface_hub import snapshot_download
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = snapshot_download(REPO, revision=first_run["publish"]["tag"], endpoint=hub, token=TOKEN,
                               cache_dir=tmp_path, allow_patterns=["adapter_*"])  # fmt: skip
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), folder)
    merged_dir = Path(first_run["stages"]["merge"]["path"]) / "model"
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert (model(ids).logits.argmax(-1) == merged(ids).logits.argmax(-1)).all()


def test_gguf_files_load_and_answer(first_run: dict) -> None:
    from llama_cpp import Llama

    from loraforge.tasks.batching import read_split

    # The first test row, as the quantize stage probed each file with it (its own chat template, greedy).
    [probe] = read_split(Path(first_run["stages"]["data"]["path"]) / "test.jsonl")[:1]
    max_new_tokens = first_run["config"]["quantize"]["max_new_tokens"]
    for qtype, info in first_run["gguf"].items():
        if qtype == "lora_f16":  # an adapter, not a model: the stage checked it on an f16 GGUF of the base
            assert info["passed"] and info["file"] == "tiny-router-F16-LoRA.gguf"
            continue
        path = Path(first_run["stages"]["quantize"]["path"]) / info["file"]
        llm = Llama(model_path=str(path), n_ctx=512, n_threads=1, verbose=False)
        out = llm.create_chat_completion(probe["messages"][:-1], max_tokens=max_new_tokens, temperature=0, top_k=1)
        answer = out["choices"][0]["message"]["content"]  # type: ignore[index]
        assert answer is not None and answer.strip() == info["sample_answer"], (qtype, answer, info["sample_answer"])
        assert info["size_mb"] == round(path.stat().st_size / 2**20, 1)


def test_second_run_is_all_cache_hits(first_run: dict, tiny_model: Path, workdir: Path, hub: str) -> None:
    again = _run(_config(tiny_model, workdir, hub))
    assert _ran(again) == set()
    assert {s: i["key"] for s, i in again["stages"].items()} == {s: i["key"] for s, i in first_run["stages"].items()}
    # What the Prefect UI shows: each stage's task run ends Cached on the re-run, Completed when it computed.
    assert task_run_states(first_run["flow_run_id"]) == dict.fromkeys(first_run["stages"], "Completed")
    assert task_run_states(again["flow_run_id"]) == dict.fromkeys(first_run["stages"], "Cached")


def test_changing_one_stage_reruns_it_and_its_dependents_only(
    first_run: dict, tiny_model: Path, workdir: Path, hub: str
) -> None:
    changed = _run(_config(tiny_model, workdir, hub, "merge.dtype=bfloat16"))
    assert _ran(changed) == {"merge", "quantize", "publish"}


def test_failed_gate_publishes_nothing(first_run: dict, tiny_model: Path, workdir: Path, hub: str) -> None:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub, token=TOKEN)
    commits_before = len(api.list_repo_commits(REPO))
    config = _config(tiny_model, workdir, hub, "eval.gate=[accuracy >= 0.99]", "publish.repo_id=loraforge/never")
    with pytest.raises(GateFailed, match=r"eval gate failed: accuracy >= 0.99 \(got [0-9.]+\)"):
        _run(config)
    assert len(api.list_repo_commits(REPO)) == commits_before
    assert not api.repo_exists("loraforge/never")


def test_cli_reports_bad_config_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    # In-process: the config is refused before anything is imported or logged (main() turns errors into codes).
    assert main(["run", str(DEMO_CONFIG), "train.rr=1", "data.max_length=2"]) == 1
    out, err = capsys.readouterr()
    assert "2 problems" in err and "did you mean 'r'?" in err
    assert "Traceback" not in err + out


# These CLI tests are about what the command prints, so they run it as a process (its logging set up as for a
# user), on the session's Prefect server: without PREFECT_API_URL each would start a temporary one (8-21 s).
def test_cli_reports_bad_data_without_traceback(tmp_path: Path, tiny_model: Path, prefect_api: str) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    result = subprocess.run(
        [sys.executable, "-m", "loraforge.flows.cli", "stage", "data", str(DEMO_CONFIG), f"base_model={tiny_model}",
         f"data.train_file={bad}", "data.validation_file=null", "data.test_file=null", f"store={tmp_path / 's'}"],
        capture_output=True, text=True,
        env={**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_API_URL": prefect_api},
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"{bad}:1: the last message must have role 'assistant'" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_token_never_written_to_the_store(first_run: dict, workdir: Path) -> None:
    leaks = [p for p in (workdir / "store").rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert leaks == []


def test_show_prints_run_and_lineage(first_run: dict, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = str(workdir / "store")
    assert main(["show", first_run["run_id"], "--store", store, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stages"]["train"]["key"] == first_run["stages"]["train"]["key"]
    assert main(["show", first_run["run_id"], "--store", store]) == 0  # readable by default: as a run ends
    table = capsys.readouterr().out
    assert f"loraforge run {first_run['run_id']}" in table and first_run["stages"]["train"]["key"] in table
    assert "gate: PASSED" in table and f"run record {store}/runs/{first_run['run_id']}.json" in table
    publish_key = first_run["stages"]["publish"]["key"]
    assert main(["show", f"publish/{publish_key}", "--store", store]) == 0
    lineage = capsys.readouterr().out
    for stage in ("publish", "quantize", "merge", "eval", "train", "data", "base"):
        assert f"{stage}/{first_run['stages'][stage]['key']}" in lineage


def test_cli_stage_needs_its_inputs(tmp_path: Path, tiny_model: Path, prefect_api: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "loraforge.flows.cli", "stage", "train", str(DEMO_CONFIG), f"base_model={tiny_model}",
         f"store={tmp_path / 's'}"],
        capture_output=True, text=True,
        env={**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_API_URL": prefect_api},
    )  # fmt: skip
    assert result.returncode == 1
    assert "no data artifact with key" in result.stderr and "run the data stage" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
