"""Data sources and options beyond local chat files: plain text, Hub dataset repos (served by the project's
Hub-compatible server), named chat templates for tokenizers without one, the length report and its PNG."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from loraforge.tasks.artifacts import ArtifactStore
from loraforge.tasks.batching import read_split
from loraforge.tasks.config import DEMO_CONFIG, load_config
from loraforge.tasks.data import CHAT_TEMPLATES, DataConfig, prepare_data
from loraforge.tasks.errors import ConfigError, DataError
from loraforge.tasks.models import provision_base

TOKEN = "hf_data_test_token_42"


def _rows(n: int = 20) -> list[dict[str, str]]:
    return [{"prompt": f"ticket {i}: my order {i} is late", "completion": ["shipping", "billing"][i % 2]}
            for i in range(n)]  # fmt: skip


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_plain_text_rows_learn_every_token(tmp_path: Path, tiny_model: Path, store: ArtifactStore) -> None:
    docs = [{"body": f"Our house style, rule {i}: write short sentences. " * (1 + i % 3)} for i in range(20)]
    config = DataConfig(train_file=_write_jsonl(tmp_path / "docs.jsonl", docs), format="text", text_field="body")
    data = prepare_data(config, provision_base(str(tiny_model), store), store)
    rows = read_split(data.file("train.jsonl"))
    assert "messages" not in rows[0] and rows[0]["text"].startswith("Our house style")
    assert all(r["labels"] == r["input_ids"] for r in rows)  # no prompt to mask
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(tiny_model).eos_token_id
    assert all(r["input_ids"][-1] == eos for r in rows)
    assert data.manifest["format"] == "text"


def test_plain_text_bad_rows_and_generation_metrics_are_refused(tmp_path: Path, tiny_model: Path) -> None:
    bad = _write_jsonl(tmp_path / "docs.jsonl", [{"text": "fine"}, {"text": ""}, {"body": "x"}])
    with pytest.raises(DataError) as error:
        store = ArtifactStore(tmp_path / "s")
        prepare_data(DataConfig(train_file=bad, format="text"), provision_base(str(tiny_model), store), store)
    message = str(error.value)
    assert f"{bad}:2: field 'text' must be a non-empty string (given: ''; fields found: text)" in message
    assert f"{bad}:3: field 'text' must be a non-empty string (given: None; fields found: body)" in message
    with pytest.raises(ConfigError) as config_error:
        load_config(DEMO_CONFIG, ["data.format=text", "eval.metrics=[accuracy, perplexity]", "eval.gate=[loss < 9]"])
    assert "eval.metrics: data.format=text has no prompts to answer, so ['accuracy'] cannot be measured" in str(
        config_error.value
    )
    ok = load_config(DEMO_CONFIG, ["data.format=text", "eval.metrics=[perplexity]", "eval.gate=[perplexity < 9]"])
    assert ok.eval.metrics == ["perplexity"]


def _without_template(tiny_model: Path, target: Path) -> Path:
    shutil.copytree(tiny_model, target)
    (target / "chat_template.jinja").unlink(missing_ok=True)
    settings = json.loads((target / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (target / "tokenizer_config.json").write_text(json.dumps(settings))
    return target


def test_a_tokenizer_without_template_needs_a_named_one(tmp_path: Path, tiny_model: Path) -> None:
    bare = _without_template(tiny_model, tmp_path / "bare-model")
    store = ArtifactStore(tmp_path / "store")
    base = provision_base(str(bare), store)
    train = _write_jsonl(tmp_path / "rows.jsonl", _rows())
    config = DataConfig(train_file=train, format="prompt_completion")
    with pytest.raises(DataError) as error:
        prepare_data(config, base, store)
    assert "has no chat template; set data.chat_template to one of chatml, zephyr, alpaca, gemma" in str(error.value)
    data = prepare_data(config.model_copy(update={"chat_template": "zephyr"}), base, store)
    assert data.file("chat_template.jinja").read_text() == CHAT_TEMPLATES["zephyr"]
    assert data.manifest["chat_template"] == "zephyr"
    row = read_split(data.file("train.jsonl"))[0]
    from transformers import AutoTokenizer

    text = AutoTokenizer.from_pretrained(bare).decode(row["input_ids"])
    assert text.startswith("<|user|>\nticket") and text.endswith("<|im_end|>\n")  # eos_token closes the turn
    with pytest.raises(ValueError, match="unknown chat template 'llama9'; use auto or one of: chatml, zephyr, alpaca"):
        DataConfig(train_file=train, chat_template="llama9")
    # SmolLM2's tokenizer has ChatML's tokens but not Gemma's: the stage stops and says which templates fit.
    with pytest.raises(
        DataError,
        match=r"data.chat_template=gemma needs the special tokens <start_of_turn>, "
        r"<end_of_turn>, which the tokenizer .* data.chat_template=chatml or zephyr or alpaca or auto",
    ):
        prepare_data(config.model_copy(update={"chat_template": "gemma"}), base, store)
    assert data.manifest["stop_strings"] == []  # zephyr's answers end with EOS


def test_report_has_a_length_histogram_and_a_png(tmp_path: Path, tiny_model: Path, store: ArtifactStore) -> None:
    rows = _rows()
    train = _write_jsonl(tmp_path / "train.jsonl", rows[:16] + [rows[0], {"prompt": "long " * 300, "completion": "x"}])
    validation = _write_jsonl(tmp_path / "validation.jsonl", rows[16:18])
    test = _write_jsonl(tmp_path / "test.jsonl", rows[18:] + [{**rows[3], "completion": "other"}])  # a leaked prompt
    config = DataConfig(train_file=train, validation_file=validation, test_file=test, format="prompt_completion",
                        max_length=64, leakage="warn")  # fmt: skip
    data = prepare_data(config, provision_base(str(tiny_model), store), store)
    report = json.loads(data.file("report.json").read_text())
    splits = report["splits"]
    assert splits["train"]["dropped_overlength"] == 1 and splits["train"]["duplicates"] == 1
    assert splits["train"]["rows"] == 17  # the duplicate is reported, not removed; the long row is dropped
    assert report["leakage"] == {"val_in_train": 0, "test_in_train": 1, "val_rows_in_train": 0,
                                 "test_rows_in_train": 0}  # fmt: skip
    assert report["leaked_examples"] == {"validation": [], "test": ["ticket 3: my order 3 is late"]}
    assert data.metrics["leaked_prompts"] == 1
    for stats in splits.values():
        histogram = stats["length_histogram"]
        assert histogram["bin_width"] == 4 and len(histogram["counts"]) == 16
        assert sum(histogram["counts"]) == stats["rows"]
    png = data.file("report.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


@pytest.fixture(scope="module")
def hub_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A dataset repo on the project's Hub server: train/test JSONL under data/, tagged v1; yields (url, repo)."""
    from hub import hub_server
    from huggingface_hub import HfApi

    folder = tmp_path_factory.mktemp("dataset")
    rows = _rows(30)
    _write_jsonl(folder / "data" / "train-00000-of-00001.jsonl", rows[:24])
    _write_jsonl(folder / "data" / "test-00000-of-00001.jsonl", rows[24:])
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tickets\n")
    with hub_server(tmp_path_factory.mktemp("hub") / "repos", TOKEN) as url:
        api = HfApi(endpoint=url, token=TOKEN)
        api.create_repo("acme/tickets", repo_type="dataset")
        api.upload_folder(repo_id="acme/tickets", repo_type="dataset", folder_path=folder)
        api.create_tag("acme/tickets", tag="v1", repo_type="dataset")
        yield url, "acme/tickets"


def test_hub_dataset_by_tag_and_split(
    hub_dataset: tuple[str, str], tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, repo = hub_dataset
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    store = ArtifactStore(tmp_path / "store")
    config = DataConfig(train_file=f"hub:{repo}@v1", test_file=f"hub:{repo}@v1#test", format="prompt_completion")
    data = prepare_data(config, provision_base(str(tiny_model), store), store)
    assert sum(1 for _ in data.file("test.jsonl").open()) == 6
    assert data.manifest["hub_datasets"] == [repo]
    source = data.manifest["sources"]["train_file"]
    assert source["repo_id"] == repo and source["revision"] == "v1" and len(source["commit"]) == 40
    assert TOKEN not in (data.path / "manifest.json").read_text()
    again = prepare_data(config, provision_base(str(tiny_model), store), store)
    assert again.cached and again.key == data.key

    with pytest.raises(DataError) as error:
        prepare_data(config.model_copy(update={"validation_file": f"hub:{repo}@v1#validation"}),
                     provision_base(str(tiny_model), store), store)  # fmt: skip
    assert f"hub:{repo}@v1#validation: no 'validation' files in dataset {repo}@" in str(error.value)
    assert "data/test-00000-of-00001.jsonl, data/train-00000-of-00001.jsonl" in str(error.value)

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: the Hub is unreachable
    with pytest.raises(DataError) as unreachable:
        prepare_data(config.model_copy(update={"train_file": "hub:acme/other@v1"}),
                     provision_base(str(tiny_model), store), store)  # fmt: skip
    assert "hub:acme/other@v1: cannot get dataset acme/other@v1 from http://127.0.0.1:9" in str(unreachable.value)
    assert TOKEN not in str(unreachable.value)
    cached = prepare_data(config, provision_base(str(tiny_model), store), store)  # from the local Hub cache
    assert cached.key == data.key
