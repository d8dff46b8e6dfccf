"""Model card metadata taken from the inputs: the Hub dataset ids of the training data and the base model's license."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from loraforge.tasks.artifacts import Artifact
from loraforge.tasks.publish import base_license, hub_datasets


def _artifact(**manifest: Any) -> Any:
    """A data or base artifact with the fields those stages always write, and `manifest`'s."""
    always = {"special_tokens": {}, "base_model": "base", "fingerprint": "f" * 64, "model_path": "/nonexistent"}
    if "config" in manifest:
        manifest["config"] = {"max_length": 512, **manifest["config"]}
    return Artifact("any", "key", Path("."), {**always, **manifest})


def test_hub_dataset_ids_come_from_a_datasets_folder_saved_from_the_hub(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "tickets"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "a", "label": "b"}])}).save_to_disk(folder)
    assert hub_datasets(_artifact(config={"train_file": f"{folder}#train"})) == []  # built locally: no Hub id
    # What `load_dataset("acme/tickets")` records: the Hub files it read, as hf://datasets/ID@REVISION/PATH.
    info_file = folder / "train" / "dataset_info.json"
    info = json.loads(info_file.read_text())
    info["download_checksums"] = {
        "hf://datasets/acme/tickets@0123456789abcdef0123456789abcdef01234567/data/train-00000.parquet": {
            "num_bytes": 10, "checksum": None},
        "https://huggingface.co/datasets/acme/extra-tickets/resolve/main/test.jsonl": {"num_bytes": 5},
    }  # fmt: skip
    info_file.write_text(json.dumps(info))
    data = _artifact(config={"train_file": f"{folder}#train", "validation_file": None, "test_file": str(folder)})
    assert hub_datasets(data) == ["acme/tickets", "acme/extra-tickets"]
    assert hub_datasets(_artifact(config={"train_file": str(tmp_path / "rows.jsonl")})) == []
    hub = {"train_file": "hub:acme/tickets@v1#train", "validation_file": "hub:acme/tickets#validation",
           "test_file": "hub:acme/held-out"}  # fmt: skip
    assert hub_datasets(_artifact(config=hub)) == ["acme/tickets", "acme/held-out"]  # data.* = hub:ORG/NAME


def test_license_comes_from_the_base_model(tmp_path: Path) -> None:
    assert base_license(_artifact(source={"license": "apache-2.0"}, model_path=str(tmp_path))) == "apache-2.0"
    assert base_license(_artifact(model_path=str(tmp_path))) == "other"  # nothing says: 'other', never a guess
    (tmp_path / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# a model\n")
    assert base_license(_artifact(model_path=str(tmp_path))) == "mit"


def _inputs(run: int) -> dict[str, Any]:
    """Six input artifacts with fixed keys; `run` changes only what differs between two runs of the same keys."""
    timing = {"created_at": f"2026-12-0{run}T10:00:00+00:00", "duration_s": 10.0 * run}
    train_metrics = {"val_loss": 1.5, "steps": 4, "train_seconds": 3.0 * run, "tokens_per_s": 100.0 * run,
                     "peak_rss_mb": 900 + run}  # fmt: skip
    manifests = {
        "base": {"base_model": "bundled:smollm2-135m-instruct", "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
                 "fingerprint": "f" * 64, "architecture": "LlamaForCausalLM", "source": {"license": "apache-2.0"},
                 "model_path": "/nonexistent/base"},
        "data": {"data_sha256": {"train_file": "a" * 64}, "template_sha256": "b" * 64, "metrics": {"train_rows": 8},
                 "config": {"train_file": "/data/train.jsonl", "validation_file": None, "test_file": None,
                            "max_length": 512}, "special_tokens": {}},
        "train": {"config": {"r": 8}, "metrics": train_metrics,
                  "files": {"adapter/adapter_model.safetensors": {"sha256": "c" * 64}}},
        "eval": {"metrics": {"accuracy": 0.75}, "gate": {"passed": True, "checks": [{"check": "accuracy >= 0.5"}]},
                 "config": {}},
        "merge": {"merge_policy": "fp32 merge", "metrics": {"max_abs_dlogit": 1e-5}, "config": {"dtype": "float32"},
                  "inputs": {}},
        "quantize": {"llama_cpp_version": "0.3.36", "gguf": {}, "imatrix": None, "config": {}},
    }  # fmt: skip
    # Library versions: those in the keys are the same for the same keys; the others depend on where it ran.
    versions = {"torch": "2.9", "llama-cpp-python": "0.3.36", "prefect": f"3.{run}", "huggingface-hub": f"1.{run}"}
    return {
        stage: SimpleNamespace(key=f"{stage}-key", manifest={**m, **timing, "code_version": f"{stage}-code",
                                                             "versions": versions}, metrics=m.get("metrics", {}),
                         config=m.get("config", {}))
        for stage, m in manifests.items()
    }  # fmt: skip


def test_what_a_tag_holds_depends_only_on_the_keys_not_on_run_timings() -> None:
    from loraforge.tasks.publish import PublishConfig, _lineage, _model_card

    config = PublishConfig(include_gguf=[])
    bundles = []
    for run in (1, 2):  # the same keys, built twice: other durations, dates, throughput and memory peaks
        inputs = _inputs(run)
        lineage = {**_lineage("demo", inputs, "loraforge-0123"), "datasets": [], "files": {}}
        card = _model_card(config, lineage, inputs["base"], inputs["eval"], inputs["quantize"])
        bundles.append((json.dumps(lineage, indent=2, sort_keys=True), card))
    assert bundles[0] == bundles[1]
    lineage_text, card = bundles[0]
    for figure in ("duration_s", "created_at", "tokens_per_s", "train_seconds", "peak_rss_mb"):
        assert figure not in lineage_text and figure not in card
    assert '"val_loss": 1.5' in lineage_text  # what the keys determine stays
    assert json.loads(lineage_text)["versions"] == {"torch": "2.9", "llama-cpp-python": "0.3.36"}


def test_a_push_is_retried_while_the_hub_is_unreachable(monkeypatch: Any, tmp_path: Path) -> None:
    import huggingface_hub

    from loraforge.tasks import publish
    from loraforge.tasks.errors import StageError

    calls: list[str] = []

    class FlakyApi:
        def __init__(self, **kwargs: Any) -> None:
            pass

        def create_repo(self, *args: Any, **kwargs: Any) -> None:
            calls.append("create_repo")
            if calls.count("create_repo") < 3:
                raise ConnectionError("connection refused")

        def list_repo_refs(self, *args: Any) -> Any:
            return SimpleNamespace(tags=[])

        def upload_folder(self, **kwargs: Any) -> Any:
            calls.append("upload_folder")
            if calls.count("upload_folder") < 2:
                raise TimeoutError("read timed out")
            return SimpleNamespace(oid="1" * 40)

        def create_tag(self, *args: Any, **kwargs: Any) -> None:
            calls.append("create_tag")

    monkeypatch.setattr(huggingface_hub, "HfApi", FlakyApi)
    monkeypatch.setattr("loraforge.tasks.hubclient.RETRY_DELAYS", (0.0, 0.0, 0.0))
    config = publish.PublishConfig()
    assert publish._push(tmp_path, config, "https://hub.example", "tok", "v1") == "1" * 40
    assert calls == ["create_repo"] * 3 + ["upload_folder"] * 2 + ["create_tag"]

    class DownApi(FlakyApi):
        def create_repo(self, *args: Any, **kwargs: Any) -> None:
            raise ConnectionError("connection refused")

    monkeypatch.setattr(huggingface_hub, "HfApi", DownApi)
    with pytest.raises(StageError, match=r"cannot reach https://hub.example after 4 tries"):
        publish._push(tmp_path, config, "https://hub.example", "tok", "v1")
