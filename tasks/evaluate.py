"""Eval stage: score base and tuned models (and the currently published adapter) on the test split and decide
the quality gate.

Metrics (`eval.metrics` picks them): loss and perplexity on the reference answers (teacher-forced), and, on
greedy generations, exact match, classification accuracy and macro-F1 (the label set is the set of test
answers, with per-class precision/recall/F1), ROUGE-L for free-text answers and entity F1 for answers that list
entities as JSON (`[{"type": ..., "text": ...}]`: micro and macro F1, micro precision/recall, unparsed answers,
per-type results). Metrics are computed by `evaluate` from metric modules shipped in tasks/metrics (hub names do
not load offline); `score_answers` is the part the quantize stage reuses for its GGUF answer probe.

The gate takes checks 'METRIC OP NUMBER' on the tuned metrics, their `_delta` over base, `base_` values, and,
with `eval.compare_published`, `published_` values and `_vs_published` differences: the published adapter is
downloaded and scored on the same test rows, so "no regression beyond 0.01" reads `accuracy_vs_published >= -0.01`.
Checks on published figures pass as "not applicable" only while the repo confirmedly holds no loraforge release
(the Hub accepts the token and knows no such repo, or the repo has no lineage and no loraforge-* tag); a refused
token, an unreachable Hub (after retries), a server error or a malformed lineage stop the stage instead.
`leaked_prompts` (validation and test prompts also in train) comes from the data artifact, so
`leaked_prompts <= 0` refuses a leaky test set.
Run alone: `loraforge stage eval CONFIG [key=value ...]`.
"""

from __future__ import annotations

import json
import math
import operator
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from loraforge.tasks.artifacts import Artifact, ArtifactStore, sha256_file
from loraforge.tasks.batching import generate_answers, read_split, row_losses
from loraforge.tasks.data import leaked_prompts, read_data, stop_token_ids
from loraforge.tasks.errors import GateFailed, StageError
from loraforge.tasks.hubclient import LINEAGE_FILE, explain, hub_endpoint, hub_token, read_lineage, with_retries
from loraforge.tasks.process import torch_threads

METRIC_DIR = Path(__file__).resolve().parent / "metrics"
KEYED_DIRS = ("metrics",)  # the metric modules run by path (evaluate.load): part of the eval key's code version
Metric = Literal["accuracy", "macro_f1", "exact_match", "rouge_l", "entity_f1", "perplexity"]
METRICS: tuple[str, ...] = ("accuracy", "macro_f1", "exact_match", "rouge_l", "entity_f1", "perplexity")
ANSWER_METRICS: tuple[str, ...] = ("accuracy", "macro_f1", "exact_match", "rouge_l", "entity_f1")  # on generations
# The figures a metric records, when more than its own name (each is gateable; the first is the headline).
FIGURES: dict[str, tuple[str, ...]] = {
    "entity_f1": ("entity_f1", "entity_macro_f1", "entity_precision", "entity_recall", "unparsed_answers"),
}
DEFAULT_METRICS: list[Metric] = ["accuracy", "macro_f1", "exact_match", "perplexity"]
GATE_PATTERN = re.compile(r"^\s*([a-z_][a-z0-9_]*)\s*(>=|<=|>|<)\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*$")
COMPARE = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
ADAPTER_WEIGHTS = ("adapter_config.json", "adapter_model.safetensors")  # what the published comparison loads
T = TypeVar("T")
DATA_FIGURES: tuple[str, ...] = ("leaked_prompts",)  # gateable figures read from the data artifact, not measured


def _gate_names(metrics: Sequence[str] = METRICS) -> list[str]:
    names = [*(f for m in metrics for f in FIGURES.get(m, (m,))), "loss"]
    return [*names, *(f"{m}_delta" for m in names), *(f"base_{m}" for m in names),
            *(f"published_{m}" for m in names), *(f"{m}_vs_published" for m in names), *DATA_FIGURES]  # fmt: skip


class EvalConfig(BaseModel):
    """How to evaluate and what the gate requires."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    metrics: list[Metric] = Field(
        default_factory=lambda: list(DEFAULT_METRICS),
        min_length=1,
        description="Task metrics to compute: accuracy, macro_f1 (classification answers), exact_match, "
        "rouge_l (free text), entity_f1 (answers listing entities as a JSON list of {type, text}; records "
        "entity_f1 (micro), entity_macro_f1, entity_precision, entity_recall, unparsed_answers), perplexity (of "
        "the reference answers). Loss is always computed. The quantize stage probes each GGUF with the same "
        "answer metrics.",
    )
    temperature: float = Field(0.0, ge=0, le=5, description="0 = greedy decoding (default); above 0, seeded sampling.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass when temperature > 0.")
    seed: int = Field(0, description="Sampling seed when temperature > 0 (the same seed gives the same answers).")
    max_new_tokens: int = Field(
        16, ge=1, le=2048, description="Most tokens generated per answer (greedy, stops at EOS)."
    )
    batch_size: int = Field(16, ge=1, description="Rows per generation / loss batch.")
    max_rows: int | None = Field(None, ge=1, description="Evaluate only the first N test rows (smoke runs).")
    compare_base: bool = Field(True, description="Also evaluate the base model, for deltas and the report.")
    compare_published: str | None = Field(
        None,
        description="Hub repo 'org/name[@revision]' of the currently published adapter: it is scored on the same "
        "test rows for `published_*` and `*_vs_published` gate checks. Endpoint: eval.endpoint, else HF_ENDPOINT.",
    )
    endpoint: str | None = Field(None, description="Hub endpoint URL for compare_published (default: HF_ENDPOINT).")
    worst_errors: int = Field(10, ge=0, description="Wrong tuned answers shown in the report, highest loss first.")
    gate: list[str] = Field(
        default_factory=lambda: ["accuracy >= 0.6", "accuracy_delta >= 0.2"],
        description="Checks 'METRIC OP NUMBER' that must all hold; METRIC is a tuned metric (or one of its "
        "figures, e.g. entity_macro_f1) or loss, its _delta "
        "over base, base_METRIC, published_METRIC or METRIC_vs_published (tuned minus published), or "
        "leaked_prompts (validation/test prompts also in train, from the data stage).",
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice).")

    @field_validator("gate")
    @classmethod
    def _check_gate(cls, checks: list[str]) -> list[str]:
        problems = []
        for check in checks:
            match = GATE_PATTERN.match(check)
            if not match:
                problems.append(f"{check!r} is not 'METRIC OP NUMBER' (e.g. 'accuracy >= 0.8')")
            elif match.group(1) not in _gate_names():
                problems.append(f"{check!r}: unknown metric {match.group(1)!r}; known: {', '.join(_gate_names())}")
        if problems:
            raise ValueError("; ".join(problems))
        return checks

    @model_validator(mode="after")
    def _gate_uses_computed_metrics(self) -> EvalConfig:
        problems = []
        for check in self.gate:
            name = GATE_PATTERN.match(check).group(1)  # type: ignore[union-attr]
            if name not in _gate_names(self.metrics):
                problems.append(f"{check!r} needs a metric that eval.metrics does not compute ({self.metrics})")
            elif (name.startswith("base_") or name.endswith("_delta")) and not self.compare_base:
                problems.append(f"{check!r} needs the base model's figures; set eval.compare_base=true")
            elif ("published" in name) and not self.compare_published:
                problems.append(f"{check!r} needs eval.compare_published=ORG/NAME (the published adapter's repo)")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def evaluate_adapter(
    config: EvalConfig, base: Artifact, data: Artifact, train: Artifact, store: ArtifactStore
) -> Artifact:
    """Evaluate base vs tuned (vs published) on the test split and record the gate verdict; skipped when cached.

    The artifact is written whatever the verdict; call `check_gate` to turn a failed verdict into an error.
    With compare_published, the published revision is resolved first and its commit is part of the key, so a
    new publish makes the next run evaluate again.

    Returns:
        The eval artifact: `metrics.json` (figures, per-class results, gate), `predictions.jsonl` (every
        test row), `report.md`.
    """
    inputs = {"base": base, "data": data, "train": train}
    published = _resolve_published(config) if config.compare_published else None
    settings = {**config.model_dump(), "published_commit": (published or {}).get("commit")}
    key, code = store.stage_key("eval", __file__, settings, inputs)
    with store.claim("eval", key) as hit:
        if hit is not None:
            return hit
        with torch_threads(config.threads):  # this stage's; the process's own count again afterwards
            return _build_eval(config, base, data, train, published, settings, store, key, code)


def _build_eval(
    config: EvalConfig,
    base: Artifact,
    data: Artifact,
    train: Artifact,
    published: dict[str, Any] | None,
    settings: dict[str, Any],
    store: ArtifactStore,
    key: str,
    code: str,
) -> Artifact:
    """Score base, tuned (and published) on the test split into the eval artifact `key` (its lock is held)."""
    inputs = {"base": base, "data": data, "train": train}
    started = time.time()

    from loraforge.tasks.models import autocast, import_peft, load_base_as_trained, load_tokenizer, read_base
    from loraforge.tasks.train import read_train

    PeftModel = import_peft().PeftModel

    model_path = read_base(base).model_path
    tokenizer = load_tokenizer(model_path)
    tokenizer.chat_template = data.file("chat_template.jinja").read_text() or None  # the template training used
    tokenizer.stop_token_ids = stop_token_ids(tokenizer, read_data(data).stop_strings)  # answers end there too
    rows = read_split(data.file("test.jsonl"))[: config.max_rows]
    trained = read_train(train).settings
    base_model = load_base_as_trained(model_path, trained)  # in its training dtype, or QLoRA's 4-bit
    model = PeftModel.from_pretrained(base_model, train.file("adapter"), adapter_name="tuned")
    if published and published.get("commit"):
        model.load_adapter(_download_adapter(published, base), adapter_name="published")
    model.eval()

    references = [r["messages"][-1]["content"] if "messages" in r else r["text"] for r in rows]
    results: dict[str, dict[str, float]] = {}
    per_class: dict[str, dict[str, Any]] = {}
    predictions: dict[str, list[str]] = {}
    losses: dict[str, list[float]] = {}
    variants = ["base"] if config.compare_base else []
    variants += ["tuned"] + (["published"] if published and published.get("commit") else [])
    precision, device = trained["precision"], str(next(model.parameters()).device)  # bf16/fp16: as in training
    for name in variants:
        print(f"[eval] {name} model on {len(rows)} test rows")
        if name == "base":
            with model.disable_adapter(), autocast(precision, device):
                predictions[name], losses[name] = _answer(model, tokenizer, rows, config)
        else:
            model.set_adapter(name)
            with autocast(precision, device):
                predictions[name], losses[name] = _answer(model, tokenizer, rows, config)
        results[name], per_class[name] = _score(config.metrics, predictions[name], references, losses[name], rows)

    flat = {**results["tuned"]}
    if "base" in results:
        flat.update({f"base_{k}": v for k, v in results["base"].items()})
        flat.update({f"{k}_delta": results["tuned"][k] - results["base"][k] for k in results["tuned"]})
    if "published" in results:
        flat.update({f"published_{k}": v for k, v in results["published"].items()})
        flat.update({f"{k}_vs_published": results["tuned"][k] - results["published"][k] for k in results["tuned"]})
    flat = {k: round(v, 5) for k, v in flat.items()}
    flat["leaked_prompts"] = leaked_prompts(data)
    verdict = _judge(config.gate, flat, published)

    with store.create("eval", key, settings, inputs, code, started=started) as draft:
        (draft.path / "metrics.json").write_text(
            json.dumps({"metrics": flat, "per_class": per_class, "gate": verdict, "published": published}, indent=2)
        )
        with (draft.path / "predictions.jsonl").open("w") as out:
            for i, row in enumerate(rows):
                record: dict[str, Any] = {"prompt": _prompt(row), "reference": references[i]}
                record.update({f"{n}_prediction": predictions[n][i] for n in predictions if predictions[n]})
                record.update({f"{n}_loss": round(losses[n][i], 5) for n in losses})
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
        report = _report(results, per_class, verdict, rows, references, predictions, losses["tuned"], config)
        (draft.path / "report.md").write_text(report)
        draft.metrics.update(flat)
        draft.extra["gate"] = verdict
        draft.extra["published"] = published
    return store.get("eval", key, fresh=True)


def _resolve_published(config: EvalConfig) -> dict[str, Any]:
    """Resolve compare_published to a commit that holds a loraforge release.

    Only a confirmed "no loraforge release yet" gives {'commit': None} (the published checks then pass as n/a):
    the Hub says the repo does not exist to a caller whose token it accepts, or the repo exists but holds no
    loraforge release (no loraforge/lineage.json on main, no loraforge-* tag). Anything else stops the stage
    with what to fix: a refused token, a repo that may only be hidden (404 without a token), a missing revision
    of a repo that has releases, an unreachable Hub (after retries), a server error, a malformed lineage.

    Raises:
        StageError: the comparison cannot be made, with the reason and the fix.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    spec = config.compare_published or ""
    repo, _, revision = spec.partition("@")
    endpoint = hub_endpoint(config.endpoint)
    token = hub_token(endpoint=endpoint)
    where = f"eval.compare_published={spec}"
    found: dict[str, Any] = {"repo_id": repo, "revision": revision or "main", "endpoint": endpoint, "commit": None}
    api = HfApi(endpoint=endpoint, token=token or False)
    try:
        info = _hub_call(lambda: api.model_info(repo, revision=revision or None), where, endpoint, token,
                         passing=(RepositoryNotFoundError, RevisionNotFoundError))  # fmt: skip
    except GatedRepoError as exc:
        raise StageError(f"{where}: {explain(exc, endpoint, token)}.") from None
    except RepositoryNotFoundError:
        _confirm_absent(api, where, endpoint, token)
        print(f"[eval] {repo} does not exist at {endpoint} (the Hub accepted the token): published checks pass as n/a")
        return found
    except RevisionNotFoundError:
        releases = _releases(api, repo, where, endpoint, token)
        if releases:
            raise StageError(
                f"{where}: {repo} has no revision {revision!r} at {endpoint}, but it has loraforge releases "
                f"({', '.join(releases[:5])}); name one of them after '@', or drop '@{revision}' to compare "
                "with main."
            ) from None
        print(f"[eval] {repo} has no loraforge release yet (no {revision!r}): published checks pass as n/a")
        return found
    commit = str(info.sha or "")
    if LINEAGE_FILE not in {s.rfilename for s in info.siblings or []}:
        releases = _releases(api, repo, where, endpoint, token)
        if releases:
            raise StageError(
                f"{where}: {repo}@{found['revision']} (commit {commit[:12]}) has no {LINEAGE_FILE}, so it is not "
                f"a loraforge release, but the repo has some ({', '.join(releases[:5])}); name one after '@'."
            )
        print(f"[eval] {repo} exists but has no loraforge release yet: published checks pass as n/a")
        return found
    _published_lineage(api, repo, commit, where, endpoint, token)
    found["commit"] = commit
    return found


def _hub_call(
    call: Callable[[], T], where: str, endpoint: str, token: str | None, passing: tuple[type[Exception], ...] = ()
) -> T:
    """`call()` retried while it fails transiently; a failure is a StageError saying what to fix, except the
    `passing` exception types (and their subclasses), raised unchanged for the caller to judge."""
    tries = [0]
    try:
        return with_retries(call, f"{where} at {endpoint}", tries=tries)
    except passing:
        raise
    except Exception as exc:  # HTTP and network errors of every kind, explained
        raise StageError(f"{where}: {explain(exc, endpoint, token, tries[0])}.") from None


def _confirm_absent(api: Any, where: str, endpoint: str, token: str | None) -> None:
    """The Hub said "no such repo": believe it only when it also accepts the token (a private repo answers the
    same to a caller without one, or with a token it refuses)."""
    if not token:
        raise StageError(
            f"{where}: {endpoint} knows no such repo, but no token was sent and a private repo answers the same, "
            'so it cannot tell "nothing published yet": set HF_TOKEN or run `hf auth login` (or check the repo id).'
        )
    _hub_call(api.whoami, f"{where} (checking the token)", endpoint, token)


def _releases(api: Any, repo: str, where: str, endpoint: str, token: str | None) -> list[str]:
    """The repo's loraforge releases: its loraforge-* tags, and main when main holds a lineage."""
    from huggingface_hub.errors import RevisionNotFoundError

    refs = _hub_call(lambda: api.list_repo_refs(repo), where, endpoint, token)
    tags = sorted(t.name for t in refs.tags if t.name.startswith("loraforge-"))
    try:
        main = _hub_call(lambda: api.model_info(repo), where, endpoint, token, passing=(RevisionNotFoundError,))
    except RevisionNotFoundError:  # no main branch
        return tags
    return tags + (["main"] if LINEAGE_FILE in {s.rfilename for s in main.siblings or []} else [])


def _published_lineage(api: Any, repo: str, commit: str, where: str, endpoint: str, token: str | None) -> None:
    """Check the published lineage at `commit`: well formed, and listing the adapter's files."""
    from huggingface_hub import hf_hub_download

    path = _hub_call(lambda: hf_hub_download(repo, LINEAGE_FILE, revision=commit, endpoint=endpoint,
                                             token=token or False), where, endpoint, token)  # fmt: skip
    lineage = read_lineage(Path(path), f"{where} ({repo}@{commit[:12]})")
    missing = [n for n in ADAPTER_WEIGHTS if n not in lineage["files"]]
    if missing:
        raise StageError(
            f"{where}: the lineage of {repo}@{commit[:12]} lists no {', '.join(missing)}: this release has no "
            "adapter to compare with; compare with a repo published by loraforge with its adapter."
        )


def _download_adapter(published: dict[str, Any], base: Artifact) -> str:
    """Download the published adapter at its resolved commit and check it: each file's sha256 as its lineage
    records it, and an adapter for the same base model."""
    from huggingface_hub import snapshot_download

    repo, commit, endpoint = published["repo_id"], published["commit"], published["endpoint"]
    where = f"eval.compare_published={repo}@{published['revision']}"
    token = hub_token(endpoint=endpoint)
    folder = _hub_call(lambda: snapshot_download(repo, revision=commit, endpoint=endpoint, token=token or False,
                                                 allow_patterns=[*ADAPTER_WEIGHTS, LINEAGE_FILE]),
                       where, endpoint, token)  # fmt: skip
    expected = read_lineage(Path(folder) / LINEAGE_FILE, f"{where} ({repo}@{commit[:12]})")["files"]
    for name in ADAPTER_WEIGHTS:
        if not (Path(folder) / name).is_file():
            raise StageError(f"{where}: {repo}@{commit[:12]} lists {name} in its lineage but does not hold it.")
        if (actual := sha256_file(Path(folder) / name)) != expected[name]:
            raise StageError(
                f"{where}: {repo}@{commit[:12]}: {name} has sha256 {actual[:16]}…, its lineage says "
                f"{expected[name][:16]}…; the published files were changed after publishing: republish."
            )
    adapter_config = json.loads((Path(folder) / "adapter_config.json").read_text())
    from loraforge.tasks.models import read_base

    ref = read_base(base)
    names = {ref.hub_id, ref.spec, str(ref.model_path)}
    if adapter_config.get("base_model_name_or_path") not in names:
        raise StageError(
            f"eval.compare_published: {published['repo_id']}@{published['commit'][:12]} is an adapter for "
            f"{adapter_config.get('base_model_name_or_path')!r}, not for this base model "
            f"({sorted(filter(None, names))}); "
            "compare against a repo trained on the same base."
        )
    return str(folder)


def _answer(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], config: EvalConfig
) -> tuple[list[str], list[float]]:
    """Generated answers (only when a metric needs them: perplexity alone does not) and per-row losses."""
    answers: list[str] = []
    if set(config.metrics) - {"perplexity"}:
        answers = generate_answers(model, tokenizer, [r["messages"][:-1] for r in rows], config.max_new_tokens,
                                   config.batch_size, config.temperature, config.top_p, config.seed)  # fmt: skip
    return answers, row_losses(model, rows, config.batch_size, tokenizer.pad_token_id)


def _prompt(row: dict[str, Any]) -> str:
    """The last user message, or the start of a plain-text row."""
    return row["messages"][-2]["content"] if "messages" in row else row["text"][:200]


class Gate(NamedTuple):
    """The eval artifact's verdict (read it with `read_gate`)."""

    passed: bool
    checks: list[dict[str, Any]]  # {"check": "accuracy >= 0.9", "value": 0.93, "passed": true}, in gate order

    def failures(self) -> str:
        """The failed checks with their values, on one line."""
        return "; ".join(f"{c['check']} (got {c['value']})" for c in self.checks if not c["passed"])

    def summary(self) -> str:
        """Every check with its value, on one line."""
        return ", ".join(f"{c['check']} [{c['value']}]" for c in self.checks)


def read_gate(eval_: Artifact) -> Gate:
    """The gate verdict the eval stage recorded."""
    verdict = eval_.manifest["gate"]
    return Gate(bool(verdict["passed"]), list(verdict["checks"]))


def check_gate(artifact: Artifact) -> None:
    """Raise GateFailed with a one-line reason when the eval artifact's gate did not pass."""
    gate = read_gate(artifact)
    if not gate.passed:
        raise GateFailed(f"eval gate failed: {gate.failures()}")


def _score(
    metrics: Sequence[str],
    predictions: list[str],
    references: list[str],
    losses: list[float],
    rows: list[dict[str, Any]],
) -> tuple[dict[str, float], dict[str, Any]]:
    """The configured metrics for one model: loss (and perplexity) from the row losses, the rest from its answers."""
    tokens = [sum(label != -100 for label in r["labels"]) for r in rows]
    loss = sum(x * n for x, n in zip(losses, tokens, strict=True) if n) / max(sum(tokens), 1)
    scores: dict[str, float] = {"loss": loss}
    if "perplexity" in metrics:
        scores["perplexity"] = math.exp(loss)
    answered, per_class = score_answers(metrics, predictions, references)
    return {**scores, **answered}, per_class


def score_answers(
    metrics: Sequence[str], predictions: list[str], references: list[str]
) -> tuple[dict[str, float], dict[str, Any]]:
    """Score generated answers with the answer metrics among `metrics` (ANSWER_METRICS; others are ignored).

    Returns:
        (figures by name, per-class results): per class for accuracy/macro_f1 (the label set is the set of
        normalized references), per entity type as `entity:TYPE` for entity_f1.

    Raises:
        StageError: entity_f1 is asked for and a reference is not a JSON entity list.
    """
    import evaluate

    scores: dict[str, float] = {}
    per_class: dict[str, Any] = {}
    for name in ("exact_match", "rouge_l"):
        if name in metrics:
            result = evaluate.load(str(METRIC_DIR / name)).compute(predictions=predictions, references=references)
            scores[name] = float((result or {})[name])
    if "entity_f1" in metrics:
        try:
            result = evaluate.load(str(METRIC_DIR / "entity_f1")).compute(
                predictions=predictions, references=references
            )
        except ValueError as exc:
            raise StageError(f"eval.metrics has entity_f1, but {exc}; fix the test split or drop entity_f1.") from None
        scores.update({f: float((result or {})[f]) for f in FIGURES["entity_f1"]})
        per_class.update({f"entity:{t}": {k: round(v, 4) for k, v in c.items()}
                          for t, c in (result or {})["per_type"].items()})  # fmt: skip
    if {"accuracy", "macro_f1"} & set(metrics):
        normalize = _normalizer()
        names = sorted({normalize(r) for r in references})
        ids = {label: i for i, label in enumerate(names)}
        result = (
            evaluate.load(str(METRIC_DIR / "accuracy")).compute(
                predictions=[ids.get(normalize(p), -1) for p in predictions],
                references=[ids[normalize(r)] for r in references],
            )
            or {}
        )
        scores.update({m: float(result[m]) for m in ("accuracy", "macro_f1") if m in metrics})
        per_class.update(
            {names[int(i)]: {k: round(v, 4) for k, v in c.items()} for i, c in result["per_class"].items()}
        )
    return scores, per_class


def _normalizer() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("lf_exact_match", METRIC_DIR / "exact_match" / "exact_match.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.normalize


def _judge(checks: list[str], metrics: dict[str, float], published: dict[str, Any] | None) -> dict[str, Any]:
    nothing_published = published is not None and not published.get("commit")
    results = []
    for check in checks:
        match = GATE_PATTERN.match(check)
        assert match  # validated with the config
        name, op, threshold = match.group(1), match.group(2), float(match.group(3))
        if "published" in name and nothing_published:
            results.append(
                {"check": check, "metric": name, "value": None, "passed": True, "note": "nothing published yet"}
            )
            continue
        value = metrics.get(name)
        passed = value is not None and not math.isnan(value) and COMPARE[op](value, threshold)
        results.append({"check": check, "metric": name, "value": value, "passed": passed})
    return {"passed": all(r["passed"] for r in results), "checks": results}


def _report(
    results: dict[str, dict[str, float]],
    per_class: dict[str, dict[str, Any]],
    verdict: dict[str, Any],
    rows: list[dict[str, Any]],
    references: list[str],
    predictions: dict[str, list[str]],
    tuned_losses: list[float],
    config: EvalConfig,
) -> str:
    names = list(results)
    deltas = [n for n in ("base", "published") if n in results]
    header = "| metric | " + " | ".join(names) + "".join(f" | tuned - {n}" for n in deltas) + " |"
    lines = ["## Eval: " + " vs ".join(names), "", header, "|---" * (1 + len(names) + len(deltas)) + "|"]
    for metric in results["tuned"]:
        values = [f"{results[n][metric]:.4f}" for n in names]
        values += [f"{results['tuned'][metric] - results[n][metric]:+.4f}" for n in deltas]
        lines.append(f"| {metric} | " + " | ".join(values) + " |")
    lines += ["", f"## Gate: {'PASSED' if verdict['passed'] else 'FAILED'}", "", "| check | value | result |",
              "|---|---|---|"]  # fmt: skip
    for c in verdict["checks"]:
        result = "pass" if c["passed"] else "FAIL"
        lines.append(f"| `{c['check']}` | {c['value']} | {result}{' (' + c['note'] + ')' if c.get('note') else ''} |")
    if per_class.get("tuned"):
        lines += [
            "",
            "## Per class (tuned)",
            "",
            "| class | precision | recall | F1 | support |" + (" base F1 |" if "base" in per_class else ""),
            "|---|---|---|---|---|" + ("---|" if "base" in per_class else ""),
        ]
        for label, c in per_class["tuned"].items():
            base = per_class.get("base", {}).get(label)  # an entity type only the tuned model predicted: none
            base_f1 = (f" {base['f1']:.3f} |" if base else " - |") if "base" in per_class else ""
            lines.append(
                f"| {label} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |{base_f1}"
            )
    if not predictions["tuned"]:  # loss/perplexity only: nothing was generated
        return "\n".join(lines) + "\n"
    wrong = [i for i, p in enumerate(predictions["tuned"]) if p.strip().lower() != references[i].strip().lower()]
    wrong.sort(key=lambda i: -tuned_losses[i])
    lines += ["", f"## Worst tuned errors ({len(wrong)} of {len(rows)} wrong; {min(len(wrong), config.worst_errors)} "
              "with the highest loss)", "", "| prompt | reference | tuned | loss |", "|---|---|---|---|"]  # fmt: skip
    for i in wrong[: config.worst_errors]:
        prompt = _prompt(rows[i]).replace("|", "/").replace("\n", " ")[:100]
        answer = predictions["tuned"][i].replace("|", "/").replace("\n", " ")[:40]
        lines.append(f"| {prompt} | {references[i]} | {answer} | {tuned_losses[i]:.3f} |")
    return "\n".join(lines) + "\n"
