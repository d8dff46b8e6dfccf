"""Base-model provisioning: local folders, Hub ids (through the project's Hub server), clear errors."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from loraforge.tasks.artifacts import ArtifactStore
from loraforge.tasks.errors import StageError
from loraforge.tasks.models import fingerprint_model, load_causal_lm, load_tokenizer, provision_base, resolve_base_model


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


class _RunsCode:
    """Unpickles into a call of open(marker, 'w'): harmless, but proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def _copy(tiny_model: Path, target: Path) -> Path:
    import shutil

    return Path(shutil.copytree(tiny_model, target))


def test_pickle_only_weights_are_refused_with_the_conversion(tiny_model: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    folder = _copy(tiny_model, tmp_path / "pickled")
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({**weights, "planted": _RunsCode(marker)}, folder / "pytorch_model.bin")

    with pytest.raises(StageError) as error:
        resolve_base_model(str(folder))
    message = str(error.value)
    assert message.startswith(f"base_model: {folder} holds its weights only as pickle (pytorch_model.bin)")
    assert "save_pretrained(NEW_FOLDER, safe_serialization=True)" in message
    with pytest.raises(StageError, match=r"^model folder: .* holds its weights only as pickle \(pytorch_model.bin\)"):
        load_causal_lm(folder)
    assert not marker.exists()


def test_safetensors_are_loaded_even_beside_a_pickle(tiny_model: Path, tmp_path: Path) -> None:
    import torch

    folder = _copy(tiny_model, tmp_path / "both")
    marker = tmp_path / "code-ran"
    torch.save({"planted": _RunsCode(marker)}, folder / "pytorch_model.bin")
    assert resolve_base_model(str(folder)) == folder.resolve()
    assert load_causal_lm(folder).config.model_type == "llama"
    assert not marker.exists()


def test_a_config_that_needs_remote_code_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_model, tmp_path / "custom")
    marker = tmp_path / "code-ran"
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil_llama", architectures=["EvilForCausalLM"],
                  auto_map={"AutoConfig": "modeling_evil.EvilConfig",
                            "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")

    with pytest.raises(StageError) as error:
        resolve_base_model(str(folder))
    message = str(error.value)
    assert f"base_model: {folder / 'config.json'}: model_type 'evil_llama' is not an architecture" in message
    assert (
        "auto_map: AutoConfig -> modeling_evil.EvilConfig, AutoModelForCausalLM -> modeling_evil.EvilForCausalLM"
        in message
    )
    assert "trust_remote_code stays off" in message
    with pytest.raises(StageError, match="model_type 'evil_llama' is not an architecture transformers knows"):
        load_causal_lm(folder)
    assert not marker.exists()


def test_a_tokenizer_that_needs_remote_code_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_model, tmp_path / "custom-tokenizer")
    marker = tmp_path / "code-ran"
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer",
                                                                                  None]})  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    (folder / "tokenization_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(StageError, match=r"the tokenizer in .* needs Python code shipped with it"):
        load_tokenizer(folder)
    assert not marker.exists()


def test_no_code_enables_remote_code() -> None:
    root = Path(__file__).resolve().parents[2]
    sources = [p for folder in ("tasks", "flows", "bench", "infra") for p in (root / folder).rglob("*.py")]
    enabling = [str(p) for p in sources if re.search(r"trust_remote_code\s*=\s*(?!False)", p.read_text())]
    assert enabling == []


def test_peft_is_imported_without_bitsandbytes_which_stays_importable_for_qlora() -> None:
    """import_peft leaves bitsandbytes (1.3 s of torch.compile imports) out of a process that does not quantize, and a
    QLoRA run in the same process still gets it: every availability check says yes and peft's 4-bit layers load."""
    import subprocess
    import sys

    code = """
import sys
from loraforge.tasks.models import import_peft
import_peft()
assert "peft" in sys.modules and "bitsandbytes" not in sys.modules, "bitsandbytes was imported with peft"
import_peft()  # again: peft is there, nothing is hidden a second time
import peft.import_utils as peft_imports
from transformers.utils import is_bitsandbytes_available
assert peft_imports.is_bnb_available() and peft_imports.is_bnb_4bit_available() and is_bitsandbytes_available()
from peft.tuners.lora.bnb import Linear4bit
import bitsandbytes
assert Linear4bit is not None and bitsandbytes.nn.Linear4bit is not None
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
