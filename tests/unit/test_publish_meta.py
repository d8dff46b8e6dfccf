"""Model card metadata taken from the inputs: the Hub dataset ids of the training data and the base model's license."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tasks.publish import base_license, hub_datasets


def _artifact(**manifest: Any) -> Any:
    return SimpleNamespace(manifest=manifest)


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
