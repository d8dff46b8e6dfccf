"""The eval gate: parsing, judgement and the one-line failure reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraforge.tasks.artifacts import Artifact
from loraforge.tasks.errors import GateFailed
from loraforge.tasks.evaluate import EvalConfig, _judge, _score, check_gate


def test_judge_checks_every_threshold() -> None:
    verdict = _judge(["accuracy >= 0.8", "accuracy_delta > 0.1", "perplexity < 5"],
                     {"accuracy": 0.85, "accuracy_delta": 0.05, "perplexity": 3.0}, None)  # fmt: skip
    assert not verdict["passed"]
    assert [c["passed"] for c in verdict["checks"]] == [True, False, True]


def test_missing_metric_fails_the_check() -> None:
    verdict = _judge(["accuracy_delta >= 0.1"], {"accuracy": 0.9}, None)
    assert verdict["checks"][0] == {"check": "accuracy_delta >= 0.1", "metric": "accuracy_delta", "value": None,
                                    "passed": False}  # fmt: skip


def test_check_gate_raises_one_line_reason() -> None:
    verdict = _judge(["accuracy >= 0.9", "loss < 1"], {"accuracy": 0.5, "loss": 0.5}, None)
    artifact = Artifact("eval", "k", Path("."), {"gate": verdict})
    with pytest.raises(GateFailed, match=r"^eval gate failed: accuracy >= 0.9 \(got 0.5\)$"):
        check_gate(artifact)
    check_gate(Artifact("eval", "k", Path("."), {"gate": _judge(["loss < 1"], {"loss": 0.5}, None)}))


def test_gate_expressions_are_validated() -> None:
    with pytest.raises(ValueError, match="not 'METRIC OP NUMBER'"):
        EvalConfig(gate=["accuracy => 1"])
    assert EvalConfig(gate=["base_loss <= 1e3"]).gate == ["base_loss <= 1e3"]


def test_gate_checks_must_match_what_eval_computes() -> None:
    with pytest.raises(ValueError) as error:
        EvalConfig(metrics=["accuracy"], compare_base=False,
                   gate=["rouge_l >= 0.5", "accuracy_delta > 0", "accuracy_vs_published >= -0.01"])  # fmt: skip
    message = str(error.value)
    assert "'rouge_l >= 0.5' needs a metric that eval.metrics does not compute" in message
    assert "'accuracy_delta > 0' needs the base model's figures; set eval.compare_base=true" in message
    assert "needs eval.compare_published=ORG/NAME" in message


def test_published_checks_pass_as_not_applicable_before_anything_is_published() -> None:
    verdict = _judge(["accuracy_vs_published >= -0.01", "accuracy >= 0.5"], {"accuracy": 0.9}, {"commit": None})
    assert verdict["passed"]
    assert verdict["checks"][0]["note"] == "nothing published yet"
    failed = _judge(["accuracy_vs_published >= -0.01"], {"accuracy_vs_published": -0.05}, {"commit": "a" * 40})
    assert not failed["passed"]


def test_nan_never_passes_a_check() -> None:
    assert not _judge(["loss < 1"], {"loss": float("nan")}, None)["passed"]


def _rows(n: int) -> list[dict]:
    return [{"labels": [-100, 5, 6]} for _ in range(n)]


def test_scores_from_shipped_evaluate_metrics() -> None:
    predictions = ["Billing", "technical.", "hello there", "account"]
    references = ["billing", "technical", "account", "account"]
    metrics = ["accuracy", "macro_f1", "exact_match", "rouge_l", "perplexity"]
    scores, per_class = _score(metrics, predictions, references, [0.5, 1.0, 1.5, 1.0], _rows(4))
    assert scores["exact_match"] == pytest.approx(0.75)
    assert scores["accuracy"] == pytest.approx(0.75)
    # per class F1: billing 1, technical 1, account 2/3 (one miss) -> mean 8/9
    assert scores["macro_f1"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    assert per_class["account"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(0.6667), "support": 2}
    assert scores["rouge_l"] == pytest.approx(0.75)
    assert scores["loss"] == pytest.approx(1.0) and scores["perplexity"] == pytest.approx(2.718281828)


def test_rouge_l_is_lcs_f_measure() -> None:
    scores, per_class = _score(["rouge_l"], ["the cat sat on the mat"], ["the cat lay on a mat"], [1.0], _rows(1))
    # LCS = the cat on mat (4 of 6 each way): P = R = F = 2/3
    assert scores["rouge_l"] == pytest.approx(2 / 3)
    assert per_class == {} and "accuracy" not in scores


def test_leaked_prompts_from_the_data_stage_can_be_gated() -> None:
    from loraforge.tasks.config import DEMO_CONFIG, load_config
    from loraforge.tasks.data import leaked_prompts

    config = load_config(DEMO_CONFIG, ["eval.gate=[accuracy >= 0.9, leaked_prompts <= 0]"])
    assert config.eval.gate == ["accuracy >= 0.9", "leaked_prompts <= 0"]
    assert EvalConfig(metrics=["perplexity"], compare_base=False, gate=["leaked_prompts <= 0"]).gate
    data = Artifact("data", "k", Path("."), {"metrics": {"train_rows": 10, "leaked_prompts": 3}})
    assert leaked_prompts(data) == 3
    verdict = _judge(["accuracy >= 0.9", "leaked_prompts <= 0"], {"accuracy": 0.95, "leaked_prompts": 3}, None)
    with pytest.raises(GateFailed, match=r"^eval gate failed: leaked_prompts <= 0 \(got 3\)$"):
        check_gate(Artifact("eval", "k", Path("."), {"gate": verdict}))
