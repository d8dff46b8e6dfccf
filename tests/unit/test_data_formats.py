"""Data stage inputs: every file kind and row format becomes the same chat rows; bad rows name file, line, field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraforge.tasks.artifacts import ArtifactStore
from loraforge.tasks.batching import read_split
from loraforge.tasks.data import DataConfig, prepare_data
from loraforge.tasks.errors import DataError
from loraforge.tasks.models import provision_base

CATEGORIES = ["billing", "technical", "account", "shipping"]
SYSTEM = "Answer with the category."


def _tickets(n: int = 20) -> list[tuple[str, str]]:
    return [(f"ticket number {i} about {CATEGORIES[i % 4]}", CATEGORIES[i % 4]) for i in range(n)]


def _expected(text: str, label: str, user_prefix: str = "") -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": user_prefix + text},
        {"role": "assistant", "content": label},
    ]


def _messages(store: ArtifactStore, tiny_model: Path, config: DataConfig) -> list[list[dict[str, str]]]:
    data = prepare_data(config, provision_base(str(tiny_model), store), store)
    rows = [r for split in ("train", "validation", "test") for r in read_split(data.file(f"{split}.jsonl"))]
    return sorted((r["messages"] for r in rows), key=json.dumps)


def _all_expected(user_prefix: str = "") -> list[list[dict[str, str]]]:
    return sorted((_expected(t, lab, user_prefix) for t, lab in _tickets()), key=json.dumps)


def test_alpaca_jsonl(tmp_path: Path, tiny_model: Path, store: ArtifactStore) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(
        "".join(json.dumps({"instruction": "Route:", "input": t, "output": lab}) + "\n" for t, lab in _tickets())
    )
    config = DataConfig(train_file=path, format="alpaca", system_prompt=SYSTEM)
    assert _messages(store, tiny_model, config) == _all_expected("Route:\n\n")


def test_prompt_completion_json_list(tmp_path: Path, tiny_model: Path, store: ArtifactStore) -> None:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"data": [{"prompt": t, "completion": lab} for t, lab in _tickets()]}))
    config = DataConfig(train_file=path, format="prompt_completion", system_prompt=SYSTEM)
    assert _messages(store, tiny_model, config) == _all_expected()


def test_classification_csv(tmp_path: Path, tiny_model: Path, store: ArtifactStore) -> None:
    import csv

    path = tmp_path / "rows.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["body", "queue"])
        writer.writerows(_tickets())
    config = DataConfig(train_file=path, format="classification", text_field="body", label_field="queue",
                        prompt_template="Ticket: {text}", system_prompt=SYSTEM)  # fmt: skip
    assert _messages(store, tiny_model, config) == _all_expected("Ticket: ")


def test_chat_parquet(tmp_path: Path, tiny_model: Path, store: ArtifactStore) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": _expected(t, lab)} for t, lab in _tickets()]), path)
    assert _messages(store, tiny_model, DataConfig(train_file=path)) == _all_expected()


def test_datasets_folder_with_splits(tmp_path: Path, tiny_model: Path, store: ArtifactStore) -> None:
    import datasets

    rows = [{"text": t, "label": lab} for t, lab in _tickets()]
    folder = tmp_path / "tickets"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list(rows[:12]), "validation": datasets.Dataset.from_list(rows[12:16]),
        "test": datasets.Dataset.from_list(rows[16:]),
    }).save_to_disk(str(folder))  # fmt: skip
    config = DataConfig(train_file=Path(f"{folder}#train"), validation_file=Path(f"{folder}#validation"),
                        test_file=Path(f"{folder}#test"), format="classification", system_prompt=SYSTEM)  # fmt: skip
    assert _messages(store, tiny_model, config) == _all_expected()
    with pytest.raises(DataError, match=r"a DatasetDict with splits \['train', 'validation', 'test'\]; name one as"):
        prepare_data(DataConfig(train_file=folder, format="classification"), provision_base(str(tiny_model), store),
                     store)  # fmt: skip


def test_bad_rows_in_every_kind_name_file_line_and_field(
    tmp_path: Path, tiny_model: Path, store: ArtifactStore
) -> None:
    base = provision_base(str(tiny_model), store)
    csv_path = tmp_path / "rows.csv"
    csv_path.write_text("text,label\nfine ticket,billing\nno label here,\n,technical\n")
    with pytest.raises(DataError) as error:
        prepare_data(DataConfig(train_file=csv_path, format="classification"), base, store)
    message = str(error.value)
    assert message.startswith(f"2 invalid rows in {csv_path} (format: classification):")
    assert f"{csv_path}:3: field 'label' must be a non-empty string (given: ''; fields found: label, text)" in message
    assert f"{csv_path}:4: field 'text' must be a non-empty string" in message

    alpaca = tmp_path / "rows.jsonl"
    alpaca.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n" + json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(DataError, match=rf"{alpaca}:2: field 'output' must be a non-empty string"):
        prepare_data(DataConfig(train_file=alpaca, format="alpaca"), base, store)

    broken = tmp_path / "rows.json"
    broken.write_text('[{"prompt": "a",\n "completion": }]')
    with pytest.raises(DataError, match=rf"{broken}:2: not valid JSON"):
        prepare_data(DataConfig(train_file=broken, format="prompt_completion"), base, store)

    with pytest.raises(DataError) as missing:
        prepare_data(DataConfig(train_file=tmp_path / "nope.csv", test_file=tmp_path / "gone"), base, store)
    assert "data.train_file: not found" in str(missing.value) and "data.test_file: not found" in str(missing.value)
