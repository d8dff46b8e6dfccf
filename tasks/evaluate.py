"""Eval stage: score base and tuned models on the test split and decide the quality gate.

Metrics: loss and perplexity on the reference answers (teacher-forced), and, on greedy generations,
exact match plus classification accuracy and macro-F1 (the label set is the set of test answers).
Metrics are computed by `evaluate` from metric modules shipped in tasks/metrics (hub names do not load offline).
Run alone: `loraforge stage eval CONFIG [key=value ...]`.
"""

from __future__ import annotations

import contextlib
import json
import math
import operator
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.artifacts import Artifact, ArtifactStore
from tasks.batching import mean_loss, read_split
from tasks.errors import GateFailed

METRIC_DIR = Path(__file__).resolve().parent / "metrics"
METRICS = ("accuracy", "macro_f1", "exact_match", "loss", "perplexity")
GATE_PATTERN = re.compile(r"^\s*([a-z_]+)\s*(>=|<=|>|<)\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*$")
COMPARE = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


def _gate_names() -> list[str]:
    return [*METRICS, *(f"{m}_delta" for m in METRICS), *(f"base_{m}" for m in METRICS)]


class EvalConfig(BaseModel):
    """How to evaluate and what the gate requires."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_new_tokens: int = Field(16, ge=1, le=2048, description="Most tokens generated per answer (greedy).")
    batch_size: int = Field(16, ge=1, description="Rows per generation / loss batch.")
    max_rows: int | None = Field(None, ge=1, description="Evaluate only the first N test rows (smoke runs).")
    compare_base: bool = Field(True, description="Also evaluate the base model, for deltas and the report.")
    gate: list[str] = Field(
        default_factory=lambda: ["accuracy >= 0.6", "accuracy_delta >= 0.2"],
        description="Checks 'METRIC OP NUMBER' that must all hold; METRIC is a tuned metric (accuracy, macro_f1, "
        "exact_match, loss, perplexity), its _delta over base, or base_METRIC.",
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


def evaluate_adapter(
    config: EvalConfig, base: Artifact, data: Artifact, train: Artifact, store: ArtifactStore
) -> Artifact:
    """Evaluate base vs tuned on the test split and record the gate verdict; skipped when cached.

    The artifact is written whatever the verdict; call `check_gate` to turn a failed verdict into an error.

    Returns:
        The eval artifact: `metrics.json`, `predictions.jsonl` (every test row), `report.md`.
    """
    inputs = {"base": base, "data": data, "train": train}
    key, code = store.stage_key("eval", __file__, config, inputs)
    if (hit := store.find("eval", key)) is not None:
        return hit

    import torch
    from peft import PeftModel

    from tasks.models import load_causal_lm, load_tokenizer

    if config.threads:
        torch.set_num_threads(config.threads)
    model_path = Path(base.manifest["model_path"])
    tokenizer = load_tokenizer(model_path)
    rows = read_split(data.file("test.jsonl"))[: config.max_rows]
    model = PeftModel.from_pretrained(load_causal_lm(model_path), train.file("adapter"))
    model.eval()

    references = [r["messages"][-1]["content"] for r in rows]
    results: dict[str, dict[str, float]] = {}
    predictions: dict[str, list[str]] = {}
    variants = [("base", True), ("tuned", False)] if config.compare_base else [("tuned", False)]
    for name, disable in variants:
        with model.disable_adapter() if disable else contextlib.nullcontext():
            print(f"[eval] {name} model on {len(rows)} test rows")
            predictions[name] = _generate(model, tokenizer, rows, config)
            loss = mean_loss(model, rows, config.batch_size, tokenizer.pad_token_id)
        results[name] = {**_score(predictions[name], references), "loss": loss, "perplexity": math.exp(loss)}

    flat = {**results["tuned"]}
    if "base" in results:
        flat.update({f"base_{k}": v for k, v in results["base"].items()})
        flat.update({f"{k}_delta": results["tuned"][k] - results["base"][k] for k in results["tuned"]})
    flat = {k: round(v, 5) for k, v in flat.items()}
    verdict = _judge(config.gate, flat)

    with store.create("eval", key, config, inputs, code) as draft:
        (draft.path / "metrics.json").write_text(json.dumps({"metrics": flat, "gate": verdict}, indent=2))
        with (draft.path / "predictions.jsonl").open("w") as out:
            for i, row in enumerate(rows):
                record = {"prompt": row["messages"][-2]["content"], "reference": references[i]}
                record.update({f"{n}_prediction": predictions[n][i] for n in predictions})
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
        (draft.path / "report.md").write_text(_report(results, verdict, rows, references, predictions))
        draft.metrics.update(flat)
        draft.extra["gate"] = verdict
    return store.get("eval", key, fresh=True)


def check_gate(artifact: Artifact) -> None:
    """Raise GateFailed with a one-line reason when the eval artifact's gate did not pass."""
    verdict = artifact.manifest["gate"]
    if not verdict["passed"]:
        failed = [c for c in verdict["checks"] if not c["passed"]]
        reason = "; ".join(f"{c['check']} (got {c['value']})" for c in failed)
        raise GateFailed(f"eval gate failed: {reason}")


def _generate(model: Any, tokenizer: Any, rows: list[dict[str, Any]], config: EvalConfig) -> list[str]:
    """Greedy answers for each row's prompt (all messages but the last), batched with left padding."""
    import torch
    from tqdm import tqdm

    tokenizer.padding_side = "left"
    answers: list[str] = []
    for start in tqdm(range(0, len(rows), config.batch_size), desc="generate", unit="batch", leave=False):
        prompts = [
            tokenizer.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True)
            for r in rows[start : start + config.batch_size]
        ]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **batch,
                max_new_tokens=config.max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        new_tokens = out[:, batch["input_ids"].shape[1] :]
        answers.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    tokenizer.padding_side = "right"
    return answers


def _score(predictions: list[str], references: list[str]) -> dict[str, float]:
    import evaluate

    exact = evaluate.load(str(METRIC_DIR / "exact_match"))
    classes = evaluate.load(str(METRIC_DIR / "accuracy"))
    normalize = _normalizer()
    labels = {label: i for i, label in enumerate(sorted({normalize(r) for r in references}))}
    pred_ids = [labels.get(normalize(p), -1) for p in predictions]
    ref_ids = [labels[normalize(r)] for r in references]
    scores = exact.compute(predictions=predictions, references=references) or {}
    scores.update(classes.compute(predictions=pred_ids, references=ref_ids) or {})
    return {k: float(v) for k, v in scores.items()}


def _normalizer() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("lf_exact_match", METRIC_DIR / "exact_match" / "exact_match.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.normalize


def _judge(checks: list[str], metrics: dict[str, float]) -> dict[str, Any]:
    results = []
    for check in checks:
        match = GATE_PATTERN.match(check)
        assert match  # validated with the config
        name, op, threshold = match.group(1), match.group(2), float(match.group(3))
        value = metrics.get(name)
        passed = value is not None and COMPARE[op](value, threshold)
        results.append({"check": check, "metric": name, "value": value, "passed": passed})
    return {"passed": all(r["passed"] for r in results), "checks": results}


def _report(
    results: dict[str, dict[str, float]],
    verdict: dict[str, Any],
    rows: list[dict[str, Any]],
    references: list[str],
    predictions: dict[str, list[str]],
) -> str:
    names = list(results)
    lines = [
        "## Eval: base vs tuned",
        "",
        "| metric | " + " | ".join(names) + (" | delta |" if len(names) > 1 else " |"),
    ]
    lines.append("|---" * (len(names) + 1 + (len(names) > 1)) + "|")
    for metric in results["tuned"]:
        values = [f"{results[n][metric]:.4f}" for n in names]
        delta = f" | {results['tuned'][metric] - results['base'][metric]:+.4f}" if len(names) > 1 else ""
        lines.append(f"| {metric} | " + " | ".join(values) + delta + " |")
    lines += [
        "",
        f"## Gate: {'PASSED' if verdict['passed'] else 'FAILED'}",
        "",
        "| check | value | result |",
        "|---|---|---|",
    ]
    lines += [f"| `{c['check']}` | {c['value']} | {'pass' if c['passed'] else 'FAIL'} |" for c in verdict["checks"]]
    wrong = [i for i, p in enumerate(predictions["tuned"]) if p.strip().lower() != references[i].strip().lower()]
    lines += [
        "",
        f"## Tuned errors ({len(wrong)} of {len(rows)}; first 10)",
        "",
        "| prompt | reference | tuned |",
        "|---|---|---|",
    ]
    for i in wrong[:10]:
        prompt = rows[i]["messages"][-2]["content"].replace("|", "/")[:100]
        lines.append(f"| {prompt} | {references[i]} | {predictions['tuned'][i].replace('|', '/')[:40]} |")
    return "\n".join(lines) + "\n"
