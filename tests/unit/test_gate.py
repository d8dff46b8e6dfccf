"""The eval gate: parsing, judgement and the one-line failure reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.artifacts import Artifact
from tasks.errors import GateFailed
from tasks.evaluate import EvalConfig, _judge, _score, check_gate


def test_judge_checks_every_threshold() -> None:
    verdict = _judge(["accuracy >= 0.8", "accuracy_delta > 0.1", "perplexity < 5"],
                     {"accuracy": 0.85, "accuracy_delta": 0.05, "perplexity": 3.0})  # fmt: skip
    assert not verdict["passed"]
    assert [c["passed"] for c in verdict["checks"]] == [True, False, True]


def test_missing_metric_fails_the_check() -> None:
    verdict = _judge(["accuracy_delta >= 0.1"], {"accuracy": 0.9})
    assert verdict["checks"][0] == {"check": "accuracy_delta >= 0.1", "metric": "accuracy_delta", "value": None,
                                    "passed": False}  # fmt: skip


def test_check_gate_raises_one_line_reason() -> None:
    verdict = _judge(["accuracy >= 0.9", "loss < 1"], {"accuracy": 0.5, "loss": 0.5})
    artifact = Artifact("eval", "k", Path("."), {"gate": verdict})
    with pytest.raises(GateFailed, match=r"^eval gate failed: accuracy >= 0.9 \(got 0.5\)$"):
        check_gate(artifact)
    check_gate(Artifact("eval", "k", Path("."), {"gate": _judge(["loss < 1"], {"loss": 0.5})}))


def test_gate_expressions_are_validated() -> None:
    with pytest.raises(ValueError, match="not 'METRIC OP NUMBER'"):
        EvalConfig(gate=["accuracy => 1"])
    assert EvalConfig(gate=["base_loss <= 1e3"]).gate == ["base_loss <= 1e3"]


def test_scores_from_shipped_evaluate_metrics() -> None:
    scores = _score(["Billing", "technical.", "hello there", "account"], ["billing", "technical", "account", "account"])
    assert scores["exact_match"] == pytest.approx(0.75)
    assert scores["accuracy"] == pytest.approx(0.75)
    # per class F1: billing 1, technical 1, account 2/3 (one miss) -> mean 8/9
    assert scores["macro_f1"] == pytest.approx((1 + 1 + 2 / 3) / 3)
