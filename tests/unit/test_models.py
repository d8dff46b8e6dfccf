"""Base-model provisioning: local folders, Hub ids (through the project's Hub server), clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.artifacts import ArtifactStore
from tasks.errors import StageError
from tasks.models import fingerprint_model, provision_base, resolve_base_model


def test_local_folder_is_used_in_place(tiny_model: Path, store: ArtifactStore) -> None:
    base = provision_base(str(tiny_model), store)
    assert Path(base.manifest["model_path"]) == tiny_model.resolve()
    assert base.manifest["architecture"] == "LlamaForCausalLM"
    assert base.manifest["fingerprint"] == fingerprint_model(tiny_model)
    assert provision_base(str(tiny_model), store).cached


def test_same_weights_elsewhere_give_the_same_key(tiny_model: Path, store: ArtifactStore, tmp_path: Path) -> None:
    import shutil

    copy = shutil.copytree(tiny_model, tmp_path / "copy")
    assert provision_base(str(copy), store).key == provision_base(str(tiny_model), store).key
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("64", "65", 1))
    assert provision_base(str(copy), store).key != provision_base(str(tiny_model), store).key


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StageError, match=r"is not a Hugging Face model folder \(no config.json"):
        resolve_base_model(str(tmp_path))


def test_unknown_bundled_name_lists_the_known_ones() -> None:
    with pytest.raises(StageError, match="unknown bundled model 'gpt5'; available: bundled:smollm2-135m-instruct"):
        resolve_base_model("bundled:gpt5")


def test_hub_id_downloads_through_the_hub_client(tiny_model: Path, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from hub import hub_server
    from huggingface_hub import HfApi

    with hub_server(tmp_path / "repos", "tok") as url:
        api = HfApi(endpoint=url, token="tok")
        api.create_repo("acme/tiny-llama")
        api.upload_folder(repo_id="acme/tiny-llama", folder_path=tiny_model)
        api.create_tag("acme/tiny-llama", tag="v1")
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setenv("HF_TOKEN", "tok")
        folder = resolve_base_model("acme/tiny-llama@v1")
        assert fingerprint_model(folder) == fingerprint_model(tiny_model)
        with pytest.raises(StageError, match=r"could not download 'acme/missing' from the Hub"):
            resolve_base_model("acme/missing")
