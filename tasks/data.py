"""Data stage: read rows, validate them with line numbers, apply the chat template, tokenize with the
prompt masked, split, and write the splits as an artifact.

Files: JSONL, JSON (a list of rows, or {"data": [...]}), CSV, Parquet, or a `datasets` folder written by
`save_to_disk` (`folder` for a Dataset, `folder#split` for a split of a DatasetDict). Row formats: chat
(`messages`), prompt_completion, alpaca (instruction/input/output) and classification (a text and a label,
turned into a chat by `data.prompt_template`). Every problem names the file and line (or row) and the field.

Run alone: `loraforge stage data CONFIG [key=value ...]`.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.artifacts import Artifact, ArtifactStore, sha256_file
from tasks.errors import DataError

ROLES = ("system", "user", "assistant")
MAX_LISTED_PROBLEMS = 30
IGNORE_INDEX = -100  # label value that the loss ignores (prompt tokens, padding)


class DataConfig(BaseModel):
    """Where the data comes from and how it becomes training sequences."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    train_file: Path = Field(
        description="Training rows: .jsonl, .json, .csv, .parquet or a datasets folder (folder#split for a "
        "DatasetDict); relative paths are from the YAML's folder."
    )
    validation_file: Path | None = Field(
        None, description="Validation rows (same kinds); when absent, split off train_file by validation_fraction."
    )
    test_file: Path | None = Field(
        None, description="Test rows (same kinds); when absent, split off train_file by test_fraction."
    )
    format: Literal["chat", "prompt_completion", "alpaca", "classification"] = Field(
        "chat",
        description="Row format: chat = {'messages': [{role, content}...]} ending with an assistant turn; "
        "prompt_completion = {'prompt', 'completion'}; alpaca = {'instruction', 'input' (optional), 'output'}; "
        "classification = {text_field, label_field} rendered with prompt_template.",
    )
    text_field: str = Field("text", description="classification: the column holding the text to classify.")
    label_field: str = Field("label", description="classification: the column holding the label (the answer).")
    prompt_template: str = Field(
        "{text}", description="classification: the user message; '{text}' is replaced by the row's text."
    )
    system_prompt: str | None = Field(
        None, description="A system message put first in every row that has none (alpaca, classification, ...)."
    )
    max_length: int = Field(256, ge=16, le=32768, description="Longest sequence in tokens, prompt included.")
    overlength: Literal["drop", "truncate", "error"] = Field(
        "drop", description="What to do with a row longer than max_length: drop it, cut it, or stop."
    )
    train_on_prompt: bool = Field(
        False, description="Also compute the loss on prompt tokens (default: completion tokens only)."
    )
    validation_fraction: float = Field(0.1, ge=0.0, lt=0.5, description="Share split off for validation.")
    test_fraction: float = Field(0.1, ge=0.0, lt=0.5, description="Share split off for test.")
    seed: int = Field(42, description="Seed of the split shuffle.")
    max_rows: int | None = Field(None, ge=1, description="Keep at most this many rows per split (smoke runs).")


def prepare_data(config: DataConfig, base: Artifact, store: ArtifactStore) -> Artifact:
    """Validate, template, tokenize and split the dataset; skipped when the same artifact exists.

    Args:
        config: the data section of the pipeline config.
        base: the base-model artifact (its tokenizer and chat template are used).
        store: where artifacts live.

    Returns:
        The data artifact: `train.jsonl`, `validation.jsonl`, `test.jsonl` (input_ids, labels, messages),
        `report.json` and `chat_template.jinja`.

    Raises:
        DataError: every invalid row, with file, line and field.
    """
    files = {n: getattr(config, n) for n in ("train_file", "validation_file", "test_file")}
    missing = [f"data.{n}: not found: {p}" for n, p in files.items() if p is not None and not _exists(Path(p))]
    if missing:
        raise DataError("\n".join(missing) + "\nFix the path(s) in the config (a file, or a datasets folder).")
    content = {n: _content_hash(Path(p)) if p else None for n, p in files.items()}
    # The key hashes file contents, not paths: the same data anywhere gives the same key.
    key_config = {**config.model_dump(mode="json"), **content}
    key, code = store.stage_key("data", __file__, key_config, {"base": base})
    if (hit := store.find("data", key)) is not None:
        return hit

    rows = {name: _read_rows(Path(path), config) for name, path in files.items() if path is not None}
    splits = _split(rows, config)

    from tasks.models import load_tokenizer

    tokenizer = load_tokenizer(Path(base.manifest["model_path"]))
    template = tokenizer.chat_template or ""
    if not template:
        raise DataError(
            f"the base model's tokenizer ({base.manifest['model_path']}) has no chat template; "
            "use an instruct/chat model as base_model."
        )
    report: dict[str, Any] = {"splits": {}}
    with store.create("data", key, config, {"base": base}, code) as draft:
        for split, split_rows in splits.items():
            encoded, stats = _encode(split_rows, tokenizer, config)
            if not encoded:
                raise DataError(f"the {split} split is empty after filtering ({stats}); add rows or raise max_length.")
            with (draft.path / f"{split}.jsonl").open("w") as out:
                for row in encoded:
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
            report["splits"][split] = stats
        report["leakage"] = _leakage(splits)
        (draft.path / "report.json").write_text(json.dumps(report, indent=2))
        (draft.path / "chat_template.jinja").write_text(template)
        draft.metrics.update({f"{s}_rows": v["rows"] for s, v in report["splits"].items()})
        draft.metrics["leaked_prompts"] = report["leakage"]["test_in_train"] + report["leakage"]["val_in_train"]
        draft.extra["data_sha256"] = content
        draft.extra["template_sha256"] = hashlib.sha256(template.encode()).hexdigest()
        draft.extra["special_tokens"] = {  # what training saw; the GGUF must carry the same
            name: {"id": getattr(tokenizer, f"{name}_token_id"), "text": getattr(tokenizer, f"{name}_token")}
            for name in ("bos", "eos", "pad")
        }
    return store.get("data", key, fresh=True)


def _read_rows(path: Path, config: DataConfig) -> list[dict[str, Any]]:
    """Parse and validate one input; every problem is collected, then raised together."""
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    for where, row in _records(path, problems):
        messages, row_problems = _to_messages(row, config)
        problems.extend(f"{where}: {p}" for p in row_problems)
        if not row_problems:
            rows.append({"messages": messages, "line": where})
    if not rows and not problems:
        problems.append(f"{path}: no rows (the file is empty)")
    if problems:
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = len(problems) - len(shown)
        raise DataError(
            f"{len(problems)} invalid row{'s' if len(problems) > 1 else ''} in {path} (format: {config.format}):\n  - "
            + "\n  - ".join(shown)
            + (f"\n  ... and {more} more" if more else "")
            + "\nFix the rows above or set data.format to match the file."
        )
    return rows


def _exists(path: Path) -> bool:
    folder = Path(str(path).partition("#")[0])
    return folder.is_file() or (folder.is_dir() and any(folder.glob("*.json")))


def _content_hash(path: Path) -> str:
    """sha256 of a file, or of a datasets folder's files (names and contents) plus the split asked for."""
    folder_text, _, split = str(path).partition("#")
    folder = Path(folder_text)
    if folder.is_file():
        return sha256_file(folder)
    digest = hashlib.sha256(split.encode())
    for item in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{item.relative_to(folder)}:{sha256_file(item)}".encode())
    return digest.hexdigest()


def _records(path: Path, problems: list[str]) -> list[tuple[str, Any]]:
    """(location, record) pairs: 'file:line' for JSONL and CSV, 'file row N' for JSON, Parquet and datasets."""
    folder, _, split = str(path).partition("#")
    if Path(folder).is_dir():
        import datasets

        loaded = datasets.load_from_disk(folder)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{path}: a DatasetDict with splits {list(loaded)}; name one as {folder}#SPLIT.")
            loaded = loaded[split]
        return [(f"{path} row {i}", row) for i, row in enumerate(loaded)]
    suffix = path.suffix.lower()
    if suffix == ".csv":
        import csv

        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            return [(f"{path}:{reader.line_num}", dict(row)) for row in reader]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return [(f"{path} row {i}", row) for i, row in enumerate(pq.read_table(path).to_pylist())]
    if suffix == ".json":
        try:
            loaded_json = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})")
            return []
        items = loaded_json.get("data") if isinstance(loaded_json, dict) else loaded_json
        if not isinstance(items, list):
            problems.append(f'{path}: expected a JSON list of rows or {{"data": [...]}}; use .jsonl for one per line')
            return []
        return [(f"{path} row {i}", row) for i, row in enumerate(items)]
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                problems.append(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})")
    return records


def _fields(row: dict[str, Any], names: tuple[str, ...], optional: tuple[str, ...] = ()) -> list[str]:
    problems = []
    for name in names:
        value = row.get(name)
        if name in optional and (value is None or value == ""):
            continue
        if not isinstance(value, str) or not value.strip():
            keys = ", ".join(sorted(row)) or "none"
            problems.append(f"field {name!r} must be a non-empty string (given: {value!r}; fields found: {keys})")
    return problems


def _to_messages(row: Any, config: DataConfig) -> tuple[list[dict[str, str]], list[str]]:
    if not isinstance(row, dict):
        return [], [f"expected an object with fields, got {type(row).__name__}"]
    system = [{"role": "system", "content": config.system_prompt}] if config.system_prompt else []
    if config.format == "prompt_completion":
        problems = _fields(row, ("prompt", "completion"))
        if problems:
            return [], problems
        return system + [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["completion"]},
        ], []
    if config.format == "alpaca":
        problems = _fields(row, ("instruction", "input", "output"), optional=("input",))
        if problems:
            return [], problems
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return system + [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}], []
    if config.format == "classification":
        label = row.get(config.label_field)
        if isinstance(label, (int, float)) and not isinstance(label, bool):
            label = str(label)  # numeric labels in CSV/Parquet
        problems = _fields({**row, config.label_field: label}, (config.text_field, config.label_field))
        if problems:
            return [], problems
        user = config.prompt_template.replace("{text}", row[config.text_field])
        return system + [{"role": "user", "content": user}, {"role": "assistant", "content": str(label).strip()}], []
    given = row.get("messages")
    if not isinstance(given, list) or not given:
        keys = ", ".join(sorted(row)) or "none"
        return [], [f"field 'messages' must be a non-empty list of {{role, content}} (keys found: {keys})"]
    messages: list[dict[str, Any]] = given
    problems = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            problems.append(f"messages[{index}] must be an object with role and content")
            continue
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            problems.append(f"messages[{index}].role: unknown role {role!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            problems.append(f"messages[{index}].content must be a non-empty string (given: {content!r})")
    if not problems and messages[-1].get("role") != "assistant":
        problems.append("the last message must have role 'assistant' (it is the completion to learn)")
    clean = [{"role": m["role"], "content": m["content"]} for m in messages] if not problems else []
    if clean and system and clean[0]["role"] != "system":
        clean = system + clean
    return clean, problems


def _split(rows: dict[str, list[dict[str, Any]]], config: DataConfig) -> dict[str, list[dict[str, Any]]]:
    """Use the given split files; carve missing splits out of train deterministically by seed."""
    train = list(rows["train_file"])
    random.Random(config.seed).shuffle(train)
    splits = {}
    for name, file_key, fraction in (
        ("test", "test_file", config.test_fraction),
        ("validation", "validation_file", config.validation_fraction),
    ):
        if file_key in rows:
            splits[name] = rows[file_key]
        else:
            count = max(1, round(len(rows["train_file"]) * fraction))
            if count >= len(train):
                raise DataError(
                    f"data.{file_key} is not set and {config.train_file} has too few rows ({len(train)}) "
                    f"to split off a {name} set; add rows or give {file_key}."
                )
            splits[name], train = train[:count], train[count:]
    result = {"train": train, "validation": splits["validation"], "test": splits["test"]}
    if config.max_rows is not None:
        result = {k: v[: config.max_rows] for k, v in result.items()}
    return result


def _encode(rows: list[dict[str, Any]], tokenizer: Any, config: DataConfig) -> tuple[list[dict[str, Any]], dict]:
    """Chat-template and tokenize rows; labels are IGNORE_INDEX on the prompt unless train_on_prompt."""
    encoded = []
    lengths = []
    dropped = truncated = 0
    for row in rows:
        messages = row["messages"]
        prompt_text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full_text.startswith(prompt_text):
            raise DataError(
                "the chat template renders the prompt differently inside the full conversation, so the "
                "prompt cannot be masked; use a template whose generation prompt is a prefix."
            )
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
        input_ids = prompt_ids + completion_ids
        if len(input_ids) > config.max_length:
            if config.overlength == "error":
                raise DataError(
                    f"{row['line']}: {len(input_ids)} tokens > data.max_length="
                    f"{config.max_length}; raise max_length or set data.overlength to drop or truncate."
                )
            if config.overlength == "drop" or len(prompt_ids) >= config.max_length:
                dropped += 1
                continue
            truncated += 1
            input_ids = input_ids[: config.max_length]
        prompt_len = 0 if config.train_on_prompt else len(prompt_ids)
        labels = [IGNORE_INDEX] * prompt_len + input_ids[prompt_len:]
        lengths.append(len(input_ids))
        encoded.append({"input_ids": input_ids, "labels": labels, "messages": messages})
    stats = {
        "rows": len(encoded),
        "dropped_overlength": dropped,
        "truncated": truncated,
        "tokens": sum(lengths),
        "max_len": max(lengths, default=0),
        "mean_len": round(sum(lengths) / max(len(lengths), 1), 1),
        "duplicates": len(rows) - len({json.dumps(r["messages"], sort_keys=True) for r in rows}),
    }
    return encoded, stats


def _leakage(splits: dict[str, list[dict[str, Any]]]) -> dict[str, int]:
    """How many validation/test prompts also appear in train (same conversation minus the answer)."""

    def prompts(rows: list[dict[str, Any]]) -> set[str]:
        return {json.dumps(r["messages"][:-1], sort_keys=True) for r in rows}

    train = prompts(splits["train"])
    return {
        "val_in_train": len(prompts(splits["validation"]) & train),
        "test_in_train": len(prompts(splits["test"]) & train),
    }
