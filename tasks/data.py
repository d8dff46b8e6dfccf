"""Data stage: read rows, validate them with line numbers, apply the chat template, tokenize with the
prompt masked, split, and write the splits as an artifact.

Files: JSONL, JSON (a list of rows, or {"data": [...]}), CSV, Parquet, a `datasets` folder written by
`save_to_disk` (`folder` for a Dataset, `folder#split` for a split of a DatasetDict), or a Hub dataset repo
(`hub:org/name[@revision][#split]`, downloaded through the Hub client from HF_ENDPOINT, or read from the local
Hub cache when the Hub cannot be reached). Row formats: chat (`messages`), prompt_completion, alpaca
(instruction/input/output), classification (a text and a label, turned into a chat by `data.prompt_template`)
and text (plain documents, loss on every token, no chat template). Every problem names the file and line (or
row) and the field.

The chat template is the tokenizer's own, or a named one from CHAT_TEMPLATES (`data.chat_template`), which
also travels with the merged model and the GGUF. The report (`report.json`, `report.png`) has rows, tokens,
drops, truncations, duplicates and a length histogram per split, and prompt leakage between splits.

What would otherwise pass unnoticed is printed: validation/test prompts also in train (one line per split pair,
with examples; `data.leakage` decides whether it stops the stage, by default when a separate test file overlaps
train), rows dropped or cut for being longer than max_length, and test labels train never shows
(classification). A one-row train split stops the stage. The eval gate reads the leak count through
`leaked_prompts(data_artifact)`.

Run alone: `loraforge stage data CONFIG [key=value ...]`.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator

from loraforge.tasks.artifacts import Artifact, ArtifactStore, sha256_file
from loraforge.tasks.errors import DataError

ROLES = ("system", "user", "assistant")
HUB_PREFIX = "hub:"
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
HISTOGRAM_BINS = 16
# Named chat templates for tokenizers that have none (or to replace theirs). Each renders the generation
# prompt as a prefix of the full conversation, which prompt masking needs, and none trims or rewrites content,
# so tasks/modelfile.py can mirror each in Ollama's Go template exactly. Formats:
#   chatml  (Qwen, SmolLM2) <|im_start|>role\n...<|im_end|>\n
#   zephyr  <|role|>\n...EOS\n
#   alpaca  system\n\n### Instruction:\n...\n\n### Response:\n...EOS\n\n
#   gemma   (Gemma 3) BOS<start_of_turn>user\n...<end_of_turn>\n<start_of_turn>model\n; the system message is
#           folded into the first user turn (followed by a blank line), as Gemma's own template does
#   llama3  (Llama 3.x) BOS<|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|> (no date/tools preamble)
#   mistral (v3-tekken spacing, Mistral Nemo) BOS[INST]user[/INST]answerEOS; the system message is folded into
#           the first user turn (followed by a blank line); the generation prompt adds nothing after [/INST]
#   phi3    (Phi-3/3.5/4-mini) <|role|>\n...<|end|>\n, generation prompt <|assistant|>\n
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "zephyr": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{% else %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
    "gemma": (
        "{{ bos_token }}{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
        "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
        "{% for message in turns %}{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else "
        "message['role']) + '\n' + (system if loop.first else '') + message['content'] + '<end_of_turn>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
        "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
        "{% for message in turns %}{% if message['role'] == 'user' %}"
        "{{ '[INST]' + (system if loop.first else '') + message['content'] + '[/INST]' }}"
        "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    "phi3": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
}
# The special tokens each named template is written with: the tokenizer must have each as one token (a
# template spelled in pieces of ordinary text would train a model that never emits its stop token).
TEMPLATE_TOKENS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "zephyr": (),
    "alpaca": (),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "mistral": ("[INST]", "[/INST]"),
    "phi3": ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>"),
}
# What ends an answer under each named template besides the tokenizer's EOS (which every template stops at):
# the Modelfile's `PARAMETER stop` lines, the Hub's `params`, and generation in eval and quantize (a stop string
# that is one token must also end generation in llama.cpp: the quantize stage checks the GGUF).
TEMPLATE_STOPS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_end|>",),
    "zephyr": (),  # answers end with EOS; <|user|> is one token (not an end of generation) in Phi-3 tokenizers
    "alpaca": ("### Instruction:",),
    "gemma": ("<end_of_turn>",),
    "llama3": ("<|eot_id|>",),
    "mistral": (),  # its answers end with EOS; [INST] is no end-of-generation token in llama.cpp (quantize checks)
    "phi3": ("<|end|>",),
}
MAX_LISTED_PROBLEMS = 30
LEAK_EXAMPLES = 3  # leaked prompts (and unseen labels) named on the console and in errors
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
    format: Literal["chat", "prompt_completion", "alpaca", "classification", "text"] = Field(
        "chat",
        description="Row format: chat = {'messages': [{role, content}...]} ending with an assistant turn; "
        "prompt_completion = {'prompt', 'completion'}; alpaca = {'instruction', 'input' (optional), 'output'}; "
        "classification = {text_field, label_field} rendered with prompt_template; text = {text_field}, a plain "
        "document learned whole (no chat template; eval can only measure loss/perplexity).",
    )
    chat_template: str = Field(
        "auto",
        description="auto = the tokenizer's own chat template (an error if it has none), or a name from the "
        f"registry ({', '.join(CHAT_TEMPLATES)}) used instead; recorded in the artifact with its hash. A named "
        "template's special tokens must be in the tokenizer (gemma: <start_of_turn>/<end_of_turn>, llama3: "
        "<|start_header_id|>/<|end_header_id|>/<|eot_id|>, mistral: [INST]/[/INST], phi3: <|user|>/<|assistant|>/"
        "<|system|>/<|end|>, chatml: <|im_start|>/<|im_end|>; zephyr and alpaca are plain text), else the stage "
        "stops; its stop strings (docs/usage.md) go to the Modelfile and the Hub's params.",
    )
    text_field: str = Field("text", description="classification and text: the column holding the text.")
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
    leakage: Literal["auto", "warn", "error"] = Field(
        "auto",
        description="Validation/test prompts that also appear in train (always counted, printed and in "
        "report.json; the eval gate can check leaked_prompts): warn = go on; error = stop the stage; auto = error "
        "when test_file is a file of its own that shares prompts with train, warn otherwise (splits carved out "
        "of one file overlap only where that file repeats a prompt; a validation overlap skews early stopping, "
        "not the test figures).",
    )

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, name: str) -> str:
        if name != "auto" and name not in CHAT_TEMPLATES:
            raise ValueError(f"unknown chat template {name!r}; use auto or one of: {', '.join(CHAT_TEMPLATES)}")
        return name


class DataSpec(NamedTuple):
    """What the data artifact tells the other stages (read it with `read_data`)."""

    max_length: int  # tokens per row at most (training, and the context the GGUF check needs)
    system_prompt: str | None  # the system message every row was templated with
    special_tokens: dict[str, dict[str, Any]]  # bos/eos/pad: {"id", "text"} as training saw them
    settings: dict[str, Any]  # the data section it was made with (lineage, model card)
    data_sha256: str | None  # of the rows it was made from
    template_sha256: str | None  # of the chat template it rendered them with
    stop_strings: tuple[str, ...] = ()  # what ends an answer besides EOS (the named template's TEMPLATE_STOPS)


def read_data(data: Artifact) -> DataSpec:
    """The data artifact's settings and special tokens."""
    m = data.manifest
    config = dict(m["config"])
    return DataSpec(int(config["max_length"]), config.get("system_prompt"), dict(m["special_tokens"]), config,
                    m.get("data_sha256"), m.get("template_sha256"), tuple(m.get("stop_strings", ())))  # fmt: skip


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
    given = {n: getattr(config, n) for n in ("train_file", "validation_file", "test_file")}
    missing = [
        f"data.{n}: not found: {p}"
        for n, p in given.items()
        if p is not None and not str(p).startswith(HUB_PREFIX) and not _exists(Path(p))
    ]
    if missing:
        raise DataError("\n".join(missing) + "\nFix the path(s) in the config (a file, or a datasets folder).")
    sources = {n: _materialize(str(p)) for n, p in given.items() if p is not None}
    content = {n: _content_hash(source["files"]) for n, source in sources.items()}
    # The key hashes file contents, not paths: the same data anywhere gives the same key.
    key_config = {**config.model_dump(mode="json"), **content}
    key, code = store.stage_key("data", __file__, key_config, {"base": base})
    with store.claim("data", key) as hit:
        return hit or _build_data(config, base, sources, content, store, key, code)


def _build_data(
    config: DataConfig,
    base: Artifact,
    sources: dict[str, dict[str, Any]],
    content: dict[str, str],
    store: ArtifactStore,
    key: str,
    code: str,
) -> Artifact:
    """Read, validate, template, tokenize and split the rows into the data artifact `key` (its lock is held)."""
    started = time.time()

    rows = {name: _read_rows(source["files"], config) for name, source in sources.items()}
    splits = _split(rows, config)

    from loraforge.tasks.models import load_tokenizer, read_base

    model_path = read_base(base).model_path
    tokenizer = load_tokenizer(model_path)
    template = CHAT_TEMPLATES.get(config.chat_template) or tokenizer.chat_template or ""
    if not template and config.format != "text":
        raise DataError(
            f"the base model's tokenizer ({model_path}) has no chat template; set "
            f"data.chat_template to one of {', '.join(CHAT_TEMPLATES)} (or use an instruct/chat base model)."
        )
    if config.format != "text":
        _check_template_tokens(config.chat_template, tokenizer, model_path)
    tokenizer.chat_template = template or None
    encoded: dict[str, list[dict[str, Any]]] = {}
    report: dict[str, Any] = {"splits": {}}
    for split, split_rows in splits.items():
        encoded[split], report["splits"][split] = _encode(split_rows, tokenizer, config)
    overlaps = {split: _overlap(encoded[split], encoded["train"]) for split in ("validation", "test")}
    report.update(_findings(encoded, overlaps, config))
    _print_findings(report, overlaps, config)
    problems = _split_problems(report, overlaps, config)
    if problems:
        raise DataError(problems[0] if len(problems) == 1 else f"{len(problems)} problems with the splits:\n  - "
                        + "\n  - ".join(problems))  # fmt: skip
    with store.create("data", key, config, {"base": base}, code, started=started) as draft:
        for split, split_encoded in encoded.items():
            with (draft.path / f"{split}.jsonl").open("w") as out:
                for row in split_encoded:
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
        (draft.path / "report.json").write_text(json.dumps(report, indent=2))
        _plot_report(report, config.max_length, draft.path / "report.png", title=f"data {key}")
        (draft.path / "chat_template.jinja").write_text(template)
        draft.extra["format"] = config.format
        draft.extra["chat_template"] = config.chat_template if config.chat_template != "auto" else "tokenizer"
        draft.extra["sources"] = {n: {k: v for k, v in s.items() if k != "files"} for n, s in sources.items()}
        draft.extra["hub_datasets"] = sorted({s["repo_id"] for s in sources.values() if "repo_id" in s})
        draft.metrics.update({f"{s}_rows": v["rows"] for s, v in report["splits"].items()})
        draft.metrics["leaked_prompts"] = report["leakage"]["test_in_train"] + report["leakage"]["val_in_train"]
        draft.extra["data_sha256"] = content
        draft.extra["template_sha256"] = hashlib.sha256(template.encode()).hexdigest()
        draft.extra["stop_strings"] = list(TEMPLATE_STOPS.get(config.chat_template, ()))
        draft.extra["special_tokens"] = {  # what training saw; the GGUF must carry the same
            name: {"id": getattr(tokenizer, f"{name}_token_id"), "text": getattr(tokenizer, f"{name}_token")}
            for name in ("bos", "eos", "pad")
        }
    return store.get("data", key, fresh=True)


def stop_token_ids(tokenizer: Any, stop_strings: tuple[str, ...] | list[str]) -> list[int]:
    """The ids of the stop strings that are one token of `tokenizer` (what token-level generation can stop at;
    the others, like alpaca's `### Instruction:`, only Ollama's string matching can)."""
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in stop_strings]
    return [found[0] for found in ids if len(found) == 1]


def _check_template_tokens(name: str, tokenizer: Any, model_path: Any) -> None:
    """A named template's special tokens must each be one token of the tokenizer (added tokens would need new,
    untrained embeddings: pick a base model of the template's family instead)."""

    def missing(template: str) -> list[str]:
        return [token for token in TEMPLATE_TOKENS.get(template, ())
                if len(tokenizer(token, add_special_tokens=False)["input_ids"]) != 1]  # fmt: skip

    absent = missing(name)
    if absent:
        fitting = [template for template in CHAT_TEMPLATES if not missing(template)]
        raise DataError(
            f"data.chat_template={name} needs the special tokens {', '.join(absent)}, which the tokenizer of "
            f"{model_path} does not have (it would split them into ordinary text, and the model would never learn "
            f"to emit its stop token); use a base model of the {name} family, or a template this tokenizer can "
            f"write: data.chat_template={' or '.join(fitting + ['auto'])}."
        )


def _read_rows(files: list[tuple[str, str]], config: DataConfig) -> list[dict[str, Any]]:
    """Parse and validate one input (one or more files, each as (path, name shown in messages)); every
    problem is collected, then raised together."""
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    columns: list[str] = []  # a field absent from every row of a file: said once for the file, not per row
    for path, shown in files:
        records = _records(Path(path), shown, problems)
        if absent := _absent_everywhere(records, config):
            columns.extend(_absent_problem(shown, name, records, config) for name in absent)
            continue
        for where, row in records:
            if config.format == "text":
                row_problems = ["expected an object with fields"] if not isinstance(row, dict) else []
                row_problems = row_problems or _fields(row, (config.text_field,))
                if not row_problems:
                    rows.append({"text": row[config.text_field], "line": where})
            else:
                messages, row_problems = _to_messages(row, config)
                if not row_problems:
                    rows.append({"messages": messages, "line": where})
            problems.extend(f"{where}: {p}" for p in row_problems)
    names = ", ".join(shown for _, shown in files)
    if not rows and not problems and not columns:
        problems.append(f"{names}: no rows (the file is empty)")
    if columns and not problems:
        raise DataError(f"{names} (format: {config.format}) lacks a field every row needs:\n  - "
                        + "\n  - ".join(columns))  # fmt: skip
    if problems:
        shown_problems = columns + problems[:MAX_LISTED_PROBLEMS]
        more = len(problems) - MAX_LISTED_PROBLEMS
        raise DataError(
            f"{len(problems)} invalid row{'s' if len(problems) > 1 else ''} in {names} (format: {config.format}):\n  - "
            + "\n  - ".join(shown_problems)
            + (f"\n  ... and {more} more" if more > 0 else "")
            + "\nFix the rows above or set data.format to match the file."
        )
    return rows


def _required_fields(config: DataConfig) -> dict[str, str]:
    """The fields every row of the format must have, each with the setting that names it."""
    return {
        "chat": {"messages": "data.format"},
        "prompt_completion": {"prompt": "data.format", "completion": "data.format"},
        "alpaca": {"instruction": "data.format", "output": "data.format"},
        "classification": {config.text_field: "data.text_field", config.label_field: "data.label_field"},
        "text": {config.text_field: "data.text_field"},
    }[config.format]


def _absent_everywhere(records: list[tuple[str, Any]], config: DataConfig) -> list[str]:
    """Required fields that no row of a file has (a missing column), when there are rows and all are objects."""
    if not records or not all(isinstance(row, dict) for _, row in records):
        return []
    return [name for name in _required_fields(config) if not any(name in row for _, row in records)]


def _absent_problem(shown: str, name: str, records: list[tuple[str, Any]], config: DataConfig) -> str:
    found = sorted({str(k) for _, row in records for k in row})
    setting = _required_fields(config)[name]
    if setting == "data.format":
        fix = (f"set data.format to the format of the file (now {config.format}: chat = messages, "
               "prompt_completion = prompt + completion, alpaca = instruction + output, classification/text = "
               "data.text_field (+ data.label_field)), or rename the fields")  # fmt: skip
    else:
        fix = f"set {setting} to the field that holds it (now {name!r}), or rename that field"
    return (f"{shown}: no {name!r} field in any of its {len(records)} rows (fields found: "
            f"{', '.join(found) or 'none'}); {fix}")  # fmt: skip


def _materialize(spec: str) -> dict[str, Any]:
    """The local files behind a data source: the path itself, or a Hub dataset repo's files for one split
    (downloaded through the Hub client, or taken from the local Hub cache when the Hub is unreachable)."""
    if not spec.startswith(HUB_PREFIX):
        return {"files": [(spec, spec)]}
    repo_rev, _, split = spec[len(HUB_PREFIX) :].partition("#")
    repo_id, _, revision = repo_rev.partition("@")
    split = split or "train"
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise DataError(f"{spec}: a Hub dataset is hub:ORG/NAME[@REVISION][#SPLIT], e.g. hub:acme/tickets@v1#train")
    from huggingface_hub import snapshot_download

    from loraforge.tasks.hubclient import hub_endpoint, hub_token, scrub

    endpoint = hub_endpoint()
    token = hub_token(endpoint=endpoint)  # HF_TOKEN or `hf auth login`; never over plain http off loopback
    try:
        folder = Path(snapshot_download(repo_id, repo_type="dataset", revision=revision or None,
                                        endpoint=endpoint, token=token or False))  # fmt: skip
    except Exception as exc:  # unreachable, unknown repo or revision, no access: all stop the stage
        detail = scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else "", token)
        raise DataError(
            f"{spec}: cannot get dataset {repo_id}@{revision or 'main'} from {endpoint} and it is not in the "
            f"local Hub cache ({type(exc).__name__}: {detail}). Check the name and revision, HF_ENDPOINT and "
            "HF_TOKEN, or download it and point the data file at the folder."
        ) from None
    commit = folder.name  # snapshot folders are named by commit
    shown = f"{HUB_PREFIX}{repo_id}@{commit[:12]}"
    if (folder / "dataset_dict.json").is_file():
        files = [(f"{folder}#{split}", f"{shown}#{split}")]
    elif (folder / "dataset_info.json").is_file() and (folder / "state.json").is_file():
        files = [(str(folder), shown)]
    else:
        found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
        by_split = {name: [p for p in found if _split_of(p.relative_to(folder)) == name] for name in (split,)}
        named = any(_split_of(p.relative_to(folder)) for p in found)
        chosen = by_split[split] if named else (found if split == "train" else [])
        if not chosen:
            listing = ", ".join(str(p.relative_to(folder)) for p in found) or "no data files"
            raise DataError(
                f"{spec}: no {split!r} files in dataset {repo_id}@{commit[:12]} ({listing}); name a split that "
                "exists (files train.jsonl, data/test-00000-of-00001.parquet, ...) after '#'."
            )
        files = [(str(p), f"{shown}/{p.relative_to(folder)}") for p in chosen]
    return {"files": files, "repo_id": repo_id, "revision": revision or "main", "commit": commit,
            "split": split, "endpoint": endpoint}  # fmt: skip


def _split_of(relative: Path) -> str | None:
    """The split a Hub data file belongs to by the Hub's naming conventions (train.jsonl, data/train-0000…,
    test/part-1.parquet), or None when the name says nothing."""
    aliases = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
               "val": "validation", "dev": "validation", "test": "test", "testing": "test"}  # fmt: skip
    stem = relative.name.split(".")[0].lower()
    for word in [stem.split("-")[0].split("_")[0], *(part.lower() for part in relative.parts[:-1])]:
        if word in aliases:
            return aliases[word]
    return None


def _exists(path: Path) -> bool:
    folder = Path(str(path).partition("#")[0])
    return folder.is_file() or (folder.is_dir() and any(folder.glob("*.json")))


def _content_hash(files: list[tuple[str, str]]) -> str:
    """sha256 of a file, or of several files / a datasets folder's files (names and contents) plus the split."""
    if len(files) == 1 and Path(files[0][0]).is_file():
        return sha256_file(Path(files[0][0]))
    digest = hashlib.sha256()
    for spec, _ in files:
        folder_text, _, split = spec.partition("#")
        folder = Path(folder_text)
        digest.update(split.encode())
        items = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
        for item in items:
            name = item.name if folder.is_file() else item.relative_to(folder)
            digest.update(f"{name}:{sha256_file(item)}".encode())
    return digest.hexdigest()


def _records(path: Path, shown: str, problems: list[str]) -> list[tuple[str, Any]]:
    """(location, record) pairs: 'file:line' for JSONL and CSV, 'file row N' for JSON, Parquet and datasets."""
    folder, _, split = str(path).partition("#")
    if Path(folder).is_dir():
        import datasets

        loaded = datasets.load_from_disk(folder)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{shown}: a DatasetDict with splits {list(loaded)}; name one as {folder}#SPLIT.")
            loaded = loaded[split]
        return [(f"{shown} row {i}", row) for i, row in enumerate(loaded)]
    path = Path(folder)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_records(path, shown, problems)
    if (undecodable := _not_utf8(path, shown)) is not None:
        problems.append(undecodable)
        return []
    if suffix == ".csv":
        return _csv_records(path, shown, problems)
    if suffix == ".json":
        try:
            loaded_json = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            problems.append(f"{shown}:{exc.lineno}: not valid JSON ({_json_problem(exc)})")
            return []
        items = loaded_json.get("data") if isinstance(loaded_json, dict) else loaded_json
        if not isinstance(items, list):
            problems.append(f'{shown}: expected a JSON list of rows or {{"data": [...]}}; use .jsonl for one per line')
            return []
        return [(f"{shown} row {i}", row) for i, row in enumerate(items)]
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append((f"{shown}:{number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                problems.append(f"{shown}:{number}: not valid JSON ({_json_problem(exc)})")
    return records


def _json_problem(exc: json.JSONDecodeError) -> str:
    """The decoder's complaint with its column ("Unterminated string starting at" ends in "at" already)."""
    return f"{exc.msg.removesuffix(' at')} at column {exc.colno}"


def _not_utf8(path: Path, shown: str) -> str | None:
    """A problem naming the line and the byte when the file is not UTF-8 text, else None."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        return (
            f"{shown}:{line}: not UTF-8 text (byte {data[exc.start]:#04x} at byte offset {exc.start}); save the "
            "file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        )
    return None


def _csv_records(path: Path, shown: str, problems: list[str]) -> list[tuple[str, Any]]:
    """CSV rows as dicts keyed by the header; a row with more or fewer cells than the header is a problem."""
    import csv

    records = []
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return []
        for cells in reader:
            where = f"{shown}:{reader.line_num}"
            if not cells:
                continue
            if len(cells) != len(header):
                problems.append(
                    f"{where}: expected {len(header)} columns ({', '.join(header)}), got {len(cells)}; quote cells "
                    'that hold commas ("a, b") or fix the row'
                )
                continue
            records.append((where, dict(zip(header, cells, strict=True))))
    return records


def _parquet_records(path: Path, shown: str, problems: list[str]) -> list[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        problems.append(f"{shown}: not a readable Parquet file ({str(exc).splitlines()[0][:160]}); write it again "
                        "(e.g. pandas DataFrame.to_parquet) or convert it to .jsonl")  # fmt: skip
        return []
    return [(f"{shown} row {i}", row) for i, row in enumerate(table.to_pylist())]


def _fields(
    row: dict[str, Any], names: tuple[str, ...], optional: tuple[str, ...] = (), found: dict[str, Any] | None = None
) -> list[str]:
    """Problems with the string fields `names` of a row; `found` is the row as read (its keys are listed)."""
    problems = []
    for name in names:
        value = row.get(name)
        if name in optional and (value is None or value == ""):
            continue
        if not isinstance(value, str) or not value.strip():
            keys = ", ".join(sorted(map(str, row if found is None else found))) or "none"
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
        problems = _fields({**row, config.label_field: label}, (config.text_field, config.label_field), found=row)
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
                    f"data.{file_key} is not set and {config.train_file} has too few rows "
                    f"({len(rows['train_file'])}) "
                    f"to split off a {name} set; add rows or give {file_key}."
                )
            splits[name], train = train[:count], train[count:]
    result = {"train": train, "validation": splits["validation"], "test": splits["test"]}
    if config.max_rows is not None:
        result = {k: v[: config.max_rows] for k, v in result.items()}
    return result


def _encode(rows: list[dict[str, Any]], tokenizer: Any, config: DataConfig) -> tuple[list[dict[str, Any]], dict]:
    """Chat-template and tokenize rows (labels IGNORE_INDEX on the prompt unless train_on_prompt), or, for
    plain text, tokenize the document with an EOS at the end and learn every token."""
    encoded = []
    lengths = []
    dropped = truncated = 0
    for row in rows:
        if config.format == "text":
            prompt_ids: list[int] = []
            input_ids = tokenizer(row["text"])["input_ids"]
            if tokenizer.eos_token_id is not None and input_ids[-1:] != [tokenizer.eos_token_id]:
                input_ids = input_ids + [tokenizer.eos_token_id]  # the document ends here
        else:
            messages = row["messages"]
            prompt_text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            full_text = tokenizer.apply_chat_template(messages, tokenize=False)
            if not full_text.startswith(prompt_text):
                raise DataError(
                    "the chat template renders the prompt differently inside the full conversation, so the "
                    "prompt cannot be masked; use a template whose generation prompt is a prefix "
                    f"(data.chat_template: {', '.join(CHAT_TEMPLATES)})."
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
        content = {"text": row["text"]} if config.format == "text" else {"messages": row["messages"]}
        encoded.append({"input_ids": input_ids, "labels": labels, **content})
    width = max(1, -(-config.max_length // HISTOGRAM_BINS))
    histogram = [0] * HISTOGRAM_BINS
    for length in lengths:
        histogram[min((length - 1) // width, HISTOGRAM_BINS - 1)] += 1
    stats = {
        "rows": len(encoded),
        "dropped_overlength": dropped,
        "truncated": truncated,
        "tokens": sum(lengths),
        "max_len": max(lengths, default=0),
        "mean_len": round(sum(lengths) / max(len(lengths), 1), 1),
        "duplicates": len(rows) - len({_identity(r) for r in rows}),
        "length_histogram": {"bin_width": width, "counts": histogram},
    }
    return encoded, stats


def _identity(row: dict[str, Any], prompt_only: bool = False) -> str:
    """What makes two rows the same (the whole conversation or text), or the same prompt (all but the answer)."""
    if "text" in row:
        return row["text"]
    return json.dumps(row["messages"][:-1] if prompt_only else row["messages"], sort_keys=True)


class Overlap(NamedTuple):
    """The rows of a validation or test split whose prompt (or text) also appears in the train split."""

    prompts: int  # distinct prompts also in train (leakage)
    checked: int  # distinct prompts in the split
    identical: int  # distinct rows identical to a train row, answer included
    examples: list[str]  # the first few leaked prompts, shortened for a console line


def _overlap(rows: list[dict[str, Any]], train: list[dict[str, Any]]) -> Overlap:
    """Which of `rows` (a validation or test split) share their prompt, or their whole row, with `train`; both
    as encoded, so a row dropped for its length, neither trained nor tested on, does not count."""
    train_prompts = {_identity(r, prompt_only=True) for r in train}
    leaked: dict[str, str] = {}  # prompt identity -> shown prompt, in the split's order
    for row in rows:
        identity = _identity(row, prompt_only=True)
        if identity in train_prompts and identity not in leaked:
            leaked[identity] = _shorten(_prompt_text(row))
    identical = {_identity(r) for r in rows} & {_identity(r) for r in train}
    checked = len({_identity(r, prompt_only=True) for r in rows})
    return Overlap(len(leaked), checked, len(identical), list(leaked.values())[:LEAK_EXAMPLES])


def leaked_prompts(data: Artifact) -> int:
    """How many validation and test prompts of a data artifact also appear in its train split.

    The eval gate's `leaked_prompts` figure (e.g. `eval.gate='[accuracy >= 0.9, leaked_prompts <= 0]'`).

    Args:
        data: an artifact of the data stage.

    Returns:
        Distinct validation prompts plus distinct test prompts that are also train prompts.
    """
    return int(data.metrics["leaked_prompts"])


def _prompt_text(row: dict[str, Any]) -> str:
    """What a person recognises a row by: its text, or the last user message before the answer."""
    if "text" in row:
        return str(row["text"])
    before = row["messages"][:-1]
    users = [m["content"] for m in before if m["role"] == "user"]
    return str(users[-1] if users else (before[-1]["content"] if before else ""))


def _shorten(text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _findings(
    encoded: dict[str, list[dict[str, Any]]], overlaps: dict[str, Overlap], config: DataConfig
) -> dict[str, Any]:
    """The report's leakage counts and examples and, for classification, the test labels train never shows."""
    findings: dict[str, Any] = {
        "leakage": {
            "val_in_train": overlaps["validation"].prompts,
            "test_in_train": overlaps["test"].prompts,
            "val_rows_in_train": overlaps["validation"].identical,
            "test_rows_in_train": overlaps["test"].identical,
        },
        "leaked_examples": {split: overlap.examples for split, overlap in overlaps.items()},
    }
    if config.format == "classification":
        seen = {r["messages"][-1]["content"] for r in encoded["train"]}
        unseen = [r["messages"][-1]["content"] for r in encoded["test"] if r["messages"][-1]["content"] not in seen]
        findings["unseen_test_labels"] = {label: unseen.count(label) for label in dict.fromkeys(unseen)}
    return findings


def _print_findings(report: dict[str, Any], overlaps: dict[str, Overlap], config: DataConfig) -> None:
    """Say on the console what the report holds that the user must not miss: leakage (a line per split pair,
    even when clean), over-length rows dropped or cut, and test labels that train never shows."""
    for split, overlap in overlaps.items():
        if not overlap.prompts:
            print(f"[data] {split} vs train: no shared prompt ({overlap.checked} {split} prompts checked)")
            continue
        same = f", {overlap.identical} of them identical rows (answer included)" if overlap.identical else ""
        same = same if config.format != "text" else ""
        examples = ", ".join(repr(e) for e in overlap.examples)
        more = ", ..." if overlap.prompts > len(overlap.examples) else ""
        print(f"[data] {split} vs train: {overlap.prompts} of {overlap.checked} {split} prompts are also train "
              f"prompts{same}, e.g. {examples}{more} (data.leakage={config.leakage})")  # fmt: skip
    for split, stats in report["splits"].items():
        longer = stats["dropped_overlength"] + stats["truncated"]
        cut = [f"{stats['dropped_overlength']} dropped"] * bool(stats["dropped_overlength"])
        cut += [f"{stats['truncated']} truncated (answer cut)"] * bool(stats["truncated"])
        if cut:
            print(f"[data] {split}: {longer} of {stats['rows'] + stats['dropped_overlength']} rows longer than "
                  f"data.max_length={config.max_length} tokens: {', '.join(cut)} (data.overlength="
                  f"{config.overlength})")  # fmt: skip
    if unseen := report.get("unseen_test_labels"):
        shown = ", ".join(f"{label!r} ({n} row{'s' * (n > 1)})" for label, n in list(unseen.items())[:LEAK_EXAMPLES])
        more = f" and {len(unseen) - LEAK_EXAMPLES} more" if len(unseen) > LEAK_EXAMPLES else ""
        print(f"[data] test: {len(unseen)} label{'s' * (len(unseen) > 1)} never seen in train: {shown}{more}; the "
              "tuned model cannot have learned them, so accuracy counts those rows wrong")  # fmt: skip


def _split_problems(report: dict[str, Any], overlaps: dict[str, Overlap], config: DataConfig) -> list[str]:
    """What stops the stage, all at once: an empty split, a one-row train split, and leakage that
    `data.leakage` (auto: a separate test file that shares prompts with train) turns into an error."""
    problems = []
    for split, stats in report["splits"].items():
        if not stats["rows"]:
            problems.append(f"the {split} split is empty after filtering ({stats['dropped_overlength']} rows over "
                            f"data.max_length={config.max_length} dropped); add rows or raise max_length.")  # fmt: skip
    train = report["splits"]["train"]
    if train["rows"] == 1:
        dropped = f", {train['dropped_overlength']} more dropped as too long" if train["dropped_overlength"] else ""
        problems.append(
            f"the train split has 1 row{dropped} ({config.train_file}): a fine-tune on one row learns that row "
            "only, so the adapter and its eval figures would mean nothing. Add rows (with validation and test "
            "carved out of train_file, each takes at least one), give data.validation_file/test_file, or raise "
            "data.max_length if rows were dropped."
        )
    for split, overlap in overlaps.items():
        separate = getattr(config, f"{split}_file") is not None
        stop = config.leakage == "error" or (config.leakage == "auto" and split == "test" and separate)
        if not overlap.prompts or not stop:
            continue
        source = (f"data.{split}_file {getattr(config, f'{split}_file')}" if separate
                  else f"the {split} split carved out of data.train_file")  # fmt: skip
        same = f", {overlap.identical} identical rows (answer included)" if overlap.identical else ""
        same = same if config.format != "text" else ""
        problems.append(
            f"{source} shares {overlap.prompts} of its {overlap.checked} prompts with data.train_file "
            f"{config.train_file}{same}, e.g. {', '.join(repr(e) for e in overlap.examples)}: figures on rows the "
            "model trained on measure memory, not skill. Remove those rows from one of the files (dedupe), or set "
            "data.leakage=warn to go on (the count stays in report.json; eval.gate can require "
            "'leaked_prompts <= 0')."
        )
    return problems


def _plot_report(report: dict[str, Any], max_length: int, target: Path, title: str) -> None:
    """report.png: the token-length histogram of each split against max_length, with counts in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    for split, stats in report["splits"].items():
        width = stats["length_histogram"]["bin_width"]
        counts = stats["length_histogram"]["counts"]
        label = (f"{split}: {stats['rows']} rows, {stats['dropped_overlength']} dropped, "
                 f"{stats['truncated']} truncated, {stats['duplicates']} duplicates")  # fmt: skip
        axis.stairs(counts, [i * width for i in range(len(counts) + 1)], label=label, linewidth=1.5)
    axis.axvline(max_length, color="tab:red", linestyle="--", label=f"data.max_length={max_length}")
    axis.set_xlabel("tokens per row (prompt + completion)")
    axis.set_ylabel("rows")
    leakage = report.get("leakage", {})
    axis.set_title(f"{title}; prompts also in train: validation {leakage.get('val_in_train')}, "
                   f"test {leakage.get('test_in_train')}", fontsize=9)  # fmt: skip
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(target, metadata={"Software": None})
    plt.close(figure)
