"""The quantize stage's verdict on measured GGUF figures, without models: each limit holds at its boundary and
breaks beyond it, NaN breaks every limit, and a changed limit re-judges the same figures."""

from __future__ import annotations

import math

import pytest

from tasks.quantize import GgufLimits, QuantizeConfig, _judged, verdict

LIMITS = GgufLimits(max_mean_kl=0.15, min_top1_agreement=0.8, max_ppl_ratio=1.15, max_accuracy_drop=0.1)
# What measure_gguf returns for a q4_k_m that passes its default limits (figures of the demo, docs/demo.md).
FIGURES = {"size_mb": 98.7, "mean_kl": 0.078, "top1_agreement": 0.857, "ppl_ratio": 0.969, "accuracy": 0.75,
           "hf_accuracy": 0.75, "sample_answer": "billing", "template_parity": "4 prompts identical",
           "fidelity_positions": 512}  # fmt: skip


def _with(**changes: float) -> dict[str, object]:
    return {**FIGURES, **changes}


def test_figures_within_the_limits_pass() -> None:
    assert verdict(FIGURES, LIMITS) == []
    assert verdict(FIGURES, QuantizeConfig().limits("q4_k_m")) == []


@pytest.mark.parametrize(
    ("at_limit", "beyond", "reason"),
    [
        ({"mean_kl": 0.15}, {"mean_kl": 0.1501}, "mean_kl 0.1501 (limit <= 0.15)"),
        ({"top1_agreement": 0.8}, {"top1_agreement": 0.7999}, "top1_agreement 0.7999 (limit >= 0.8)"),
        ({"ppl_ratio": 1.15}, {"ppl_ratio": 1.15001}, "ppl_ratio 1.15001 (limit <= 1.15)"),
        # 0.8 - 0.7 is 0.10000000000000009 in floats: a drop equal to the limit still holds
        ({"hf_accuracy": 0.8, "accuracy": 0.7}, {"hf_accuracy": 0.8, "accuracy": 0.6875},
         "accuracy_drop 0.1125 (limit <= 0.1)"),
    ],
)  # fmt: skip
def test_each_limit_holds_at_its_boundary_and_breaks_beyond_it(
    at_limit: dict[str, float], beyond: dict[str, float], reason: str
) -> None:
    assert verdict(_with(**at_limit), LIMITS) == []
    assert verdict(_with(**beyond), LIMITS) == [reason]


@pytest.mark.parametrize(
    ("figure", "reason"),
    [
        ("mean_kl", "mean_kl nan (limit <= 0.15)"),
        ("top1_agreement", "top1_agreement nan (limit >= 0.8)"),
        ("ppl_ratio", "ppl_ratio nan (limit <= 1.15)"),
        ("accuracy", "accuracy_drop nan (limit <= 0.1)"),
        ("hf_accuracy", "accuracy_drop nan (limit <= 0.1)"),
    ],
)
def test_a_nan_figure_never_passes(figure: str, reason: str) -> None:
    assert verdict(_with(**{figure: math.nan}), LIMITS) == [reason]


def test_every_broken_limit_is_named_and_the_manifest_joins_them() -> None:
    figures = _with(mean_kl=0.3, top1_agreement=0.5, ppl_ratio=2.0, accuracy=0.25)
    reasons = verdict(figures, LIMITS)
    assert [r.split()[0] for r in reasons] == ["mean_kl", "top1_agreement", "ppl_ratio", "accuracy_drop"]
    judged = _judged(figures, LIMITS)
    assert judged == {**figures, "passed": False, "reason": "; ".join(reasons)}
    assert _judged(FIGURES, LIMITS) == {**FIGURES, "passed": True, "reason": ""}


def test_a_changed_limit_rejudges_the_same_figures() -> None:
    """What a quantize manifest records per type is enough to judge it again under other limits."""
    recorded = _judged(FIGURES, QuantizeConfig().limits("q4_k_m"))
    assert recorded["passed"]
    stricter = QuantizeConfig(max_mean_kl={"q4_k_m": 0}, max_accuracy_drop=0)
    assert verdict(recorded, stricter.limits("q4_k_m")) == ["mean_kl 0.078 (limit <= 0.0)"]
    assert verdict(recorded, stricter.limits("q8_0")) == [  # q8_0 keeps its defaults
        "mean_kl 0.078 (limit <= 0.02)", "top1_agreement 0.857 (limit >= 0.9)"]  # fmt: skip
    looser = QuantizeConfig(min_top1_agreement={"q4_k_m": 0.5}).limits("q4_k_m")
    assert verdict(_with(top1_agreement=0.6), looser) == [] and verdict(_with(top1_agreement=0.6), LIMITS)
    assert recorded == {**FIGURES, "passed": True, "reason": ""}  # judging never changes the figures


def test_limits_per_type_come_from_the_config_over_the_defaults() -> None:
    config = QuantizeConfig(max_mean_kl={"q4_k_m": 0.2}, max_ppl_ratio={"f16": 1.5}, max_accuracy_drop=0.05)
    assert config.limits("q4_k_m") == GgufLimits(0.2, 0.80, 1.15, 0.05)
    assert config.limits("f16") == GgufLimits(0.002, 0.99, 1.5, 0.05)
    assert config.limits("lora_f16") == GgufLimits(0.01, 0.95, 1.03, 0.05)
