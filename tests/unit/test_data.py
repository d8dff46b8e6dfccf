"""Data stage: validation messages with file and line, prompt masking, splits, caching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraforge.tasks.artifacts import ArtifactStore
from loraforge.tasks.data import IGNORE_INDEX, DataConfig, prepare_data
from loraforge.tasks.errors import DataError
from loraforge.tasks.models import provision_base


def _rows(n: int) -> list[dict]:
    cats = ["billing", "technical", "account", "shipping"]
    return [
        {"messages": [
            {"role": "system", "content": "Answer with the category."},
            {"role": "user", "content": f"ticket number {i} about {cats[i % 4]}"},
            {"role": "assistant", "content": cats[i % 4]},
        ]}
        for i in range(n)
    ]  # fmt: skip


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_every_bad_row_is_reported_with_file_and_line(tmp_path: Path, tiny_model: Path, store: ArtifactStore) -> None:
    good = _rows(3)
    bad = [
        good[0],
        "{not json",
        {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]},
        {"text": "no messages"},
        {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "last is user"}]},
    ]
    path = _write(tmp_path / "train.jsonl", bad)
    base = provision_base(str(tiny_model), store)
    with pytest.raises(DataError) as info:
        prepare_data(DataConfig(train_file=path), base, store)
    message = str(info.value)
    assert "5 invalid rows" in message
    assert f"{path}:2: not valid JSON" in message
    assert f"{path}:3: messages[0].role: unknown role 'robot'; allowed: system, user, assistant" in message
    assert f"{path}:4: messages[0].content must be a non-empty string (given: '')" in message
    assert f"{path}:5: field 'messages' must be a non-empty list" in message and "keys found: text" in message
    assert f"{path}:6: the last message must have role 'assistant'" in message
    assert not list((store.root / "data").glob("*")) if (store.root / "data").exists() else True


def test_missing_file_names_the_field(tmp_path: Path, tiny_model: Path, store: ArtifactStore) -> None:
    base = provision_base(str(tiny_model), store)
    with pytest.raises(DataError, match=r"data.train_file: not found: .*nope.jsonl"):
        prepare_data(DataConfig(train_file=tmp_path / "nope.jsonl"), base, store)


def test_prompt_is_masked_and_splits_are_deterministic(tmp_path: Path, tiny_model: Path, store: ArtifactStore) -> None:
    path = _write(tmp_path / "train.jsonl", _rows(40))
    base = provision_base(str(tiny_model), store)
    data = prepare_data(DataConfig(train_file=path, seed=1), base, store)
    assert not data.cached
    assert data.metrics["train_rows"] == 32 and data.metrics["validation_rows"] == 4 and data.metrics["test_rows"] == 4
    from loraforge.tasks.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    row = json.loads(data.file("train.jsonl").read_text().splitlines()[0])
    labelled = [t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != IGNORE_INDEX]
    assert tokenizer.decode(labelled).startswith(row["messages"][-1]["content"] + "<|im_end|>")
    assert row["labels"][0] == IGNORE_INDEX
    again = prepare_data(DataConfig(train_file=path, seed=1), base, store)
    assert again.cached and again.key == data.key
    other = prepare_data(DataConfig(train_file=path, seed=2), base, store)
    assert other.key != data.key
    assert other.file("test.jsonl").read_text() != data.file("test.jsonl").read_text()


def test_key_follows_content_not_path(tmp_path: Path, tiny_model: Path, store: ArtifactStore) -> None:
    base = provision_base(str(tiny_model), store)
    a = prepare_data(DataConfig(train_file=_write(tmp_path / "a.jsonl", _rows(20))), base, store)
    b = prepare_data(DataConfig(train_file=_write(tmp_path / "b.jsonl", _rows(20))), base, store)
    c = prepare_data(DataConfig(train_file=_write(tmp_path / "c.jsonl", _rows(21))), base, store)
    assert a.key == b.key != c.key


def test_overlength_rows_are_dropped_truncated_or_refused(
    tmp_path: Path, tiny_model: Path, store: ArtifactStore
) -> None:
    rows = _rows(20)
    rows[0]["messages"][-1]["content"] = "word " * 300
    path = _write(tmp_path / "train.jsonl", rows)
    base = provision_base(str(tiny_model), store)
    dropped = prepare_data(DataConfig(train_file=path, max_length=64, seed=0), base, store)
    report = json.loads(dropped.file("report.json").read_text())
    assert sum(s["dropped_overlength"] for s in report["splits"].values()) == 1
    truncated = prepare_data(DataConfig(train_file=path, max_length=64, overlength="truncate", seed=0), base, store)
    report = json.loads(truncated.file("report.json").read_text())
    assert sum(s["truncated"] for s in report["splits"].values()) == 1
    with pytest.raises(DataError, match=r"\.jsonl:1: \d+ tokens > data.max_length=64"):
        prepare_data(DataConfig(train_file=path, max_length=64, overlength="error", seed=0), base, store)


def test_prompt_completion_format(tmp_path: Path, tiny_model: Path, store: ArtifactStore) -> None:
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)] + [{"prompt": "q", "completion": 3}]
    path = _write(tmp_path / "pc.jsonl", rows)
    base = provision_base(str(tiny_model), store)
    with pytest.raises(
        DataError,
        match=r"pc.jsonl:21: field 'completion' must be a non-empty string \(given: 3; fields found: completion, "
        r"prompt\)",
    ):
        prepare_data(DataConfig(train_file=path, format="prompt_completion"), base, store)
