"""Pull: the consumer side of publish. Download published adapters (or a GGUF) from a Hub repo, verify every file
against the sha256 recorded in the repo's loraforge lineage (and that every file it lists came), and answer
prompts with them.

Several adapters can be pulled at once: they are loaded onto one base model under their own names and made
active one after another (peft's load_adapter / set_adapter), which is how a library of adapters is served.
Run: `loraforge pull ORG/NAME[@REVISION] [ORG/NAME2 ...] --prompt TEXT [--gguf q4_k_m]`.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraforge.tasks.artifacts import sha256_file
from loraforge.tasks.errors import StageError
from loraforge.tasks.hubclient import (
    LINEAGE_FILE,
    REPO_ID,
    REPO_ID_RULE,
    explain,
    hub_endpoint,
    hub_token,
    read_lineage,
    with_retries,
)

ADAPTER_WEIGHTS = ["adapter_config.json", "adapter_model.safetensors"]  # what makes a repo an adapter release
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "README.md", "loraforge/lineage.json",
                 "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]  # fmt: skip


@dataclass
class Pulled:
    """One pulled repo: where its files are, the commit they came from, and its lineage."""

    spec: str
    repo_id: str
    commit: str
    folder: Path
    lineage: dict[str, Any]
    verified: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)


def pull(
    specs: list[str],
    prompts: list[str],
    gguf: str | None = None,
    base_model: str | None = None,
    endpoint: str | None = None,
    max_new_tokens: int = 32,
    system: str | None = None,
) -> list[Pulled]:
    """Download and verify each repo, then answer `prompts` with each adapter (or with the GGUF file).

    Args:
        specs: Hub repos `org/name[@revision]` (a revision is a tag, branch or commit).
        prompts: user messages to answer, each rendered with the adapter's chat template.
        gguf: a GGUF type published under gguf/ (e.g. q4_k_m): answer with llama-cpp-python instead of peft.
        base_model: the base to load the adapters on (default: the one the lineage names; the bundled
            SmolLM2 conversion when that is the base the adapter was trained on).
        endpoint: Hub URL (default HF_ENDPOINT, then huggingface.co).
        max_new_tokens: most tokens per answer (greedy).
        system: an optional system message put before each prompt.

    Raises:
        StageError: unreachable repo, a malformed lineage, a file whose sha256 differs from the lineage or that
            the lineage lists but the repo lacks, adapters for different bases.
    """
    endpoint = hub_endpoint(endpoint)
    malformed = [spec for spec in specs if not re.fullmatch(REPO_ID + r"(@\S+)?", spec)]
    if malformed:
        raise StageError(f"pull: {', '.join(map(repr, malformed))}: a published repo is {REPO_ID_RULE}, with an "
                         "optional @REVISION (a tag, branch or commit), e.g. acme/ticket-router-lora@v1")  # fmt: skip
    if gguf and gguf.lower().startswith("lora"):
        raise StageError(
            f"--gguf {gguf}: a GGUF LoRA runs on top of a GGUF of its base model, e.g. llama-cpp-python "
            "Llama(model_path=BASE.gguf, lora_path=NAME-F16-LoRA.gguf); pull the adapter itself (no --gguf) "
            "or a merged type such as q4_k_m."
        )
    pulled = [_download(spec, endpoint, gguf) for spec in specs]
    conversations = [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
                     for p in prompts]  # fmt: skip
    if gguf:
        for item in pulled:
            item.answers = _answer_gguf(item, gguf, conversations, max_new_tokens)
        return pulled
    _answer_adapters(pulled, conversations, base_model, max_new_tokens)
    return pulled


def _download(spec: str, endpoint: str, gguf: str | None, extra: tuple[str, ...] = ()) -> Pulled:
    """Download one repo's files (the adapter's, or with `gguf` that type's GGUF; `extra`: more patterns) and verify
    them against its lineage."""
    from huggingface_hub import HfApi, snapshot_download

    repo_id, _, revision = spec.partition("@")
    token = hub_token(endpoint=endpoint)
    patterns = ["README.md", LINEAGE_FILE] + (["gguf/*.gguf"] if gguf else ADAPTER_FILES) + list(extra)
    try:
        info = with_retries(lambda: HfApi(endpoint=endpoint, token=token or False).model_info(
            repo_id, revision=revision or None), f"pull {spec} from {endpoint}")  # fmt: skip
        commit = info.sha or ""
        folder = Path(snapshot_download(repo_id, revision=commit, endpoint=endpoint, token=token or False,
                                        allow_patterns=patterns))  # fmt: skip
    except Exception as exc:  # HTTP and network errors of every kind
        raise StageError(f"pull {spec}: cannot download from {endpoint}: {explain(exc, endpoint, token)}.") from None
    where = f"pull {spec} ({repo_id}@{commit[:12]})"
    lineage_file = folder / LINEAGE_FILE
    if not lineage_file.is_file():
        raise StageError(f"pull {spec}: no {LINEAGE_FILE} in {repo_id}@{commit[:12]}; not a loraforge repo.")
    lineage = read_lineage(lineage_file, where)
    item = Pulled(spec, repo_id, commit, folder, lineage)
    expected: dict[str, str] = lineage["files"]
    present = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    problems = []
    for name in present:
        if name in ("README.md", LINEAGE_FILE) or name.startswith("."):
            continue
        if name not in expected:
            problems.append(f"{name}: not in the lineage's file list")
        elif (actual := sha256_file(folder / name)) != expected[name]:
            problems.append(f"{name}: sha256 {actual[:16]}… differs from the lineage's {expected[name][:16]}…")
        else:
            item.verified.append(name)
    # Every file the lineage lists that this pull asked for must have come: a file deleted from the repo after
    # publishing (a tokenizer, a GGUF) would otherwise go unnoticed, or be silently replaced by the base's.
    wanted = [n for n in sorted(expected) if any(fnmatch.fnmatch(n, p) for p in patterns)]
    problems += [f"{name}: listed in the lineage but missing from the repo" for name in wanted if name not in present]
    if not gguf:
        problems += [f"{name}: not in the lineage's file list (no adapter was published)" for name in ADAPTER_WEIGHTS
                     if name not in expected]  # fmt: skip
    adapter_sha = lineage["train"].get("adapter_sha256")
    readme = folder / "README.md"
    if not gguf and adapter_sha and (not readme.is_file() or adapter_sha not in readme.read_text()):
        problems.append("README.md: the model card does not carry the adapter sha256 of the lineage")
    if gguf and not any(n.startswith("gguf/") and n.lower().endswith(f"-{gguf.lower()}.gguf") for n in present):
        published = sorted(n for n in expected if n.startswith("gguf/") and n.endswith(".gguf"))
        problems.append(f"no {gguf} GGUF published; the repo has {published or 'none'}")
    if problems:
        raise StageError(f"{where}: verification failed:\n  - " + "\n  - ".join(problems))
    print(f"[pull] {repo_id}@{commit[:12]}: {len(item.verified)} files verified against the lineage")
    return item


def _resolve_base(pulled: list[Pulled], base_model: str | None) -> Path:
    from loraforge.tasks.models import BUNDLED_PREFIX, fingerprint_model, resolve_base_model

    if base_model:
        return resolve_base_model(base_model)
    bases = {json.loads((p.folder / "adapter_config.json").read_text())["base_model_name_or_path"] for p in pulled}
    if len(bases) > 1:
        raise StageError(f"the adapters were trained on different bases ({sorted(bases)}); pull them separately.")
    base = bases.pop()
    fingerprints = {p.lineage.get("base_model", {}).get("fingerprint") for p in pulled}
    trained_on = {p.lineage.get("base_model", {}).get("base_model") or "" for p in pulled}
    bundled = sorted(spec for spec in trained_on if spec.startswith(BUNDLED_PREFIX))
    if bundled:  # the adapter names the public repo, but it was trained on the bundled conversion of it
        print(f"[pull] base {base}: the bundled conversion it was trained on ({bundled[0]})")
    folder = resolve_base_model(bundled[0] if bundled else base)
    if None not in fingerprints and fingerprint_model(folder) not in fingerprints:
        print(f"[pull] note: the base at {folder} is not byte-identical to the one the adapter was trained on")
    return folder


def _answer_adapters(
    pulled: list[Pulled], conversations: list[list[dict[str, str]]], base_model: str | None, max_new_tokens: int
) -> None:
    from loraforge.tasks.batching import generate_answers
    from loraforge.tasks.models import import_peft, load_causal_lm, load_tokenizer

    PeftModel = import_peft().PeftModel

    base = _resolve_base(pulled, base_model)
    tokenizer = load_tokenizer(pulled[0].folder if (pulled[0].folder / "tokenizer.json").is_file() else base)
    names = [f"adapter_{i}" for i in range(len(pulled))]
    model: Any = PeftModel.from_pretrained(load_causal_lm(base), pulled[0].folder, adapter_name=names[0])
    for name, item in zip(names[1:], pulled[1:], strict=True):
        model.load_adapter(item.folder, adapter_name=name)  # one base in memory, one adapter active at a time
    model.eval()
    for name, item in zip(names, pulled, strict=True):
        model.set_adapter(name)
        item.answers = generate_answers(model, tokenizer, conversations, max_new_tokens, batch_size=8)


def _answer_gguf(item: Pulled, gguf: str, conversations: list[list[dict[str, str]]], max_new_tokens: int) -> list[str]:
    from llama_cpp import Llama

    path = next(p for p in (item.folder / "gguf").glob("*.gguf") if p.name.lower().endswith(f"-{gguf.lower()}.gguf"))
    llm = Llama(model_path=str(path), n_ctx=2048, n_threads=max(1, (os.cpu_count() or 2) // 2), verbose=False)
    answers = []
    for messages in conversations:
        reply = llm.create_chat_completion(messages=messages, max_tokens=max_new_tokens, temperature=0.0)  # type: ignore[arg-type]
        answers.append((reply["choices"][0]["message"]["content"] or "").strip())  # type: ignore[index]
    return answers
