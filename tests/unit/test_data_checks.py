"""Data stage: what must not pass unnoticed. Leakage between splits (printed, an error by default for a test
file that overlaps train, gateable as leaked_prompts), over-length rows dropped or cut, test labels train never
shows, and a one-row training set."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from loraforge.tasks.artifacts import Artifact, ArtifactStore
from loraforge.tasks.config import DEMO_CONFIG, load_config
from loraforge.tasks.data import DataConfig, leaked_prompts, prepare_data
from loraforge.tasks.errors import DataError
from loraforge.tasks.models import provision_base

CATEGORIES = ["billing", "technical", "account", "shipping"]


def _row(i: int, answer: str | None = None) -> dict:
    return {"messages": [
        {"role": "system", "content": "Answer with the category."},
        {"role": "user", "content": f"ticket number {i} about {CATEGORIES[i % 4]}"},
        {"role": "assistant", "content": answer or CATEGORIES[i % 4]},
    ]}  # fmt: skip


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def base(tiny_model: Path, store: ArtifactStore) -> Artifact:
    return provision_base(str(tiny_model), store)


def _files(tmp_path: Path) -> dict[str, Path]:
    """train 0-19; validation 20-23; test 24-27 plus 16-18 (identical to train rows) and 19 with another answer."""
    test = [_row(i) for i in (24, 16, 25, 17, 26, 18, 27)] + [_row(19, "refund")]
    return {
        "train_file": _write(tmp_path / "train.jsonl", [_row(i) for i in range(20)]),
        "validation_file": _write(tmp_path / "validation.jsonl", [_row(i) for i in range(20, 24)]),
        "test_file": _write(tmp_path / "test.jsonl", test),
    }


def test_a_test_file_that_overlaps_train_stops_the_stage_by_default(
    tmp_path: Path, base: Artifact, store: ArtifactStore, capsys: pytest.CaptureFixture[str]
) -> None:
    files = _files(tmp_path)
    with pytest.raises(DataError) as error:
        prepare_data(DataConfig(**files), base, store)  # type: ignore[arg-type]
    message = str(error.value)
    assert message.startswith(
        f"data.test_file {files['test_file']} shares 4 of its 8 prompts with data.train_file {files['train_file']}"
        ", 3 identical rows (answer included), e.g. 'ticket number 16 about billing', 'ticket number 17 about "
        "technical', 'ticket number 18 about account': "
    )
    assert "(dedupe), or set data.leakage=warn" in message
    assert not (store.root / "data").exists()
    out = capsys.readouterr().out
    assert "[data] validation vs train: no shared prompt (4 validation prompts checked)" in out
    assert ("[data] test vs train: 4 of 8 test prompts are also train prompts, 3 of them identical rows (answer "
            "included), e.g. 'ticket number 16 about billing', 'ticket number 17 about technical', 'ticket number "
            "18 about account', ... (data.leakage=auto)") in out  # fmt: skip


def test_leakage_warn_goes_on_and_the_count_reaches_the_gate(
    tmp_path: Path, base: Artifact, store: ArtifactStore, capsys: pytest.CaptureFixture[str]
) -> None:
    data = prepare_data(DataConfig(**_files(tmp_path), leakage="warn"), base, store)  # type: ignore[arg-type]
    report = json.loads(data.file("report.json").read_text())
    assert report["leakage"] == {"val_in_train": 0, "test_in_train": 4, "val_rows_in_train": 0,
                                 "test_rows_in_train": 3}  # fmt: skip
    assert leaked_prompts(data) == 4
    assert "[data] test vs train: 4 of 8 test prompts are also train prompts" in capsys.readouterr().out


def test_carved_splits_warn_unless_leakage_is_error(
    tmp_path: Path, base: Artifact, store: ArtifactStore, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [_row(i) for i in range(20)]
    train = _write(tmp_path / "train.jsonl", rows + rows)  # every row twice: carved splits share prompts
    data = prepare_data(DataConfig(train_file=train), base, store)
    assert leaked_prompts(data) > 0
    out = capsys.readouterr().out
    assert re.search(r"\[data\] test vs train: [1-4] of 4 test prompts are also train prompts", out)
    assert re.search(r"\[data\] validation vs train: [1-4] of 4 validation prompts are also train prompts", out)
    with pytest.raises(DataError) as error:
        prepare_data(DataConfig(train_file=train, leakage="error"), base, store)
    message = str(error.value)
    assert message.startswith("2 problems with the splits:\n  - the validation split carved out of data.train_file ")
    carved = r"\n  - the test split carved out of data.train_file shares [1-4] of its 4 prompts with data.train_file "
    assert re.search(carved + re.escape(str(train)), message)


def test_over_length_rows_are_said_on_the_console(
    tmp_path: Path, base: Artifact, store: ArtifactStore, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [_row(i) for i in range(20)]
    for i in (0, 1):
        rows[i]["messages"][-1]["content"] = "word " * 300
    files = {"train_file": _write(tmp_path / "train.jsonl", rows),
             "validation_file": _write(tmp_path / "validation.jsonl", [_row(i) for i in range(20, 24)]),
             "test_file": _write(tmp_path / "test.jsonl", [_row(i) for i in range(24, 28)])}  # fmt: skip
    prepare_data(DataConfig(**files, max_length=64), base, store)  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert "[data] train: 2 of 20 rows longer than data.max_length=64 tokens: 2 dropped (data.overlength=drop)" in out
    prepare_data(DataConfig(**files, max_length=64, overlength="truncate"), base, store)  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert ("[data] train: 2 of 20 rows longer than data.max_length=64 tokens: 2 truncated (answer cut) "
            "(data.overlength=truncate)") in out  # fmt: skip
    assert "[data] validation:" not in out and "[data] test:" not in out  # nothing cut there: nothing said


def test_test_labels_never_seen_in_train_are_named(
    tmp_path: Path, base: Artifact, store: ArtifactStore, capsys: pytest.CaptureFixture[str]
) -> None:
    train = [{"text": f"ticket {i}", "label": CATEGORIES[i % 2]} for i in range(20)]
    test = [{"text": f"ticket {i}", "label": label} for i, label in enumerate(["billing", "refund", "spam", "refund"],
                                                                              start=100)]  # fmt: skip
    config = DataConfig(train_file=_write(tmp_path / "train.jsonl", train),
                        test_file=_write(tmp_path / "test.jsonl", test), format="classification")  # fmt: skip
    data = prepare_data(config, base, store)
    assert json.loads(data.file("report.json").read_text())["unseen_test_labels"] == {"refund": 2, "spam": 1}
    assert ("[data] test: 2 labels never seen in train: 'refund' (2 rows), 'spam' (1 row); the tuned model cannot "
            "have learned them") in capsys.readouterr().out  # fmt: skip


def test_a_one_row_training_set_is_an_error_reported_with_the_other_problems(
    tmp_path: Path, base: Artifact, store: ArtifactStore
) -> None:
    files = {"train_file": _write(tmp_path / "train.jsonl", [_row(0)]),
             "validation_file": _write(tmp_path / "validation.jsonl", [_row(1)]),
             "test_file": _write(tmp_path / "test.jsonl", [_row(0), _row(2)])}  # fmt: skip
    with pytest.raises(DataError) as error:
        prepare_data(DataConfig(**files), base, store)  # type: ignore[arg-type]
    message = str(error.value)
    assert message.startswith("2 problems with the splits:\n  - the train split has 1 row (")
    assert "a fine-tune on one row learns that row only" in message
    assert f"\n  - data.test_file {files['test_file']} shares 1 of its 2 prompts" in message
    prepare_data(DataConfig(**{**files, "train_file": _write(tmp_path / "two.jsonl", [_row(3), _row(4)])}),  # type: ignore[arg-type]
                 base, store)  # fmt: skip


def test_the_demo_data_stage_runs_clean(
    tiny_model: Path, base: Artifact, store: ArtifactStore, capsys: pytest.CaptureFixture[str]
) -> None:
    config = load_config(DEMO_CONFIG, [f"base_model={tiny_model}"])
    assert config.data.leakage == "auto" and config.data.test_file is not None
    data = prepare_data(config.data, base, store)
    assert leaked_prompts(data) == 0
    out = capsys.readouterr().out
    assert "[data] validation vs train: no shared prompt (64 validation prompts checked)" in out
    assert "[data] test vs train: no shared prompt (80 test prompts checked)" in out
    assert "longer than" not in out and "never seen" not in out
