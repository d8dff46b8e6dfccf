"""The quantize stage's verdict on measured GGUF figures, without models: each limit holds at its boundary and
breaks beyond it, NaN breaks every limit, and a changed limit re-judges the same figures. The answer probe is
scored with the eval's own answer metrics and each metric's drop from the merged model has its limit."""

from __future__ import annotations

import math
from typing import Any, get_args

import pytest

from loraforge.tasks.config import load_config
from loraforge.tasks.errors import ConfigError
from loraforge.tasks.evaluate import ANSWER_METRICS
from loraforge.tasks.quantize import (
    DEFAULT_MAX_PROBE_DROP,
    GgufLimits,
    ProbeMetric,
    QuantizeConfig,
    _judged,
    _probe_scores,
    probe_figures,
    probe_metrics,
    probe_summary,
    verdict,
)

DROPS = {"accuracy": 0.1, "rouge_l": 0.05}
LIMITS = GgufLimits(max_mean_kl=0.15, min_top1_agreement=0.8, max_ppl_ratio=1.15, max_probe_drop=DROPS)
# What measure_gguf returns for a q4_k_m that passes its default limits (figures of the demo, docs/demo.md).
FIGURES = {"size_mb": 98.7, "mean_kl": 0.078, "top1_agreement": 0.857, "ppl_ratio": 0.969,
           **probe_figures({"accuracy": 0.75}, {"accuracy": 0.75}), "sample_answer": "billing",
           "template_parity": "4 prompts identical", "fidelity_positions": 512}  # fmt: skip


def _with(**changes: Any) -> dict[str, Any]:
    return {**FIGURES, **changes}


def _probe(gguf: dict[str, float], hf: dict[str, float]) -> dict[str, Any]:
    return _with(**probe_figures(gguf, hf))


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
        (probe_figures({"accuracy": 0.7}, {"accuracy": 0.8}), probe_figures({"accuracy": 0.6875}, {"accuracy": 0.8}),
         "accuracy_drop 0.1125 (limit <= 0.1)"),
        (probe_figures({"rouge_l": 0.4}, {"rouge_l": 0.45}), probe_figures({"rouge_l": 0.3999}, {"rouge_l": 0.45}),
         "rouge_l_drop 0.0501 (limit <= 0.05)"),
    ],
)  # fmt: skip
def test_each_limit_holds_at_its_boundary_and_breaks_beyond_it(
    at_limit: dict[str, Any], beyond: dict[str, Any], reason: str
) -> None:
    assert verdict(_with(**at_limit), LIMITS) == []
    assert verdict(_with(**beyond), LIMITS) == [reason]


@pytest.mark.parametrize(
    ("figure", "reason"),
    [
        ("mean_kl", "mean_kl nan (limit <= 0.15)"),
        ("top1_agreement", "top1_agreement nan (limit >= 0.8)"),
        ("ppl_ratio", "ppl_ratio nan (limit <= 1.15)"),
    ],
)
def test_a_nan_figure_never_passes(figure: str, reason: str) -> None:
    assert verdict(_with(**{figure: math.nan}), LIMITS) == [reason]


def test_each_probe_metric_is_judged_by_its_own_drop() -> None:
    """The probe checks every answer metric the merged model was scored on: a NaN or a missing GGUF figure
    breaks its limit, a metric without a configured limit takes its default, and unparsed_answers (not a score
    that drops) is recorded but not judged."""
    hf = {"rouge_l": 0.5, "entity_f1": 0.8, "entity_macro_f1": 0.7, "unparsed_answers": 0.0}
    gguf = {"rouge_l": 0.46, "entity_f1": 0.65, "entity_macro_f1": 0.1, "unparsed_answers": 3.0}
    assert verdict(_probe(gguf, hf), LIMITS) == ["entity_f1_drop 0.15 (limit <= 0.1)"]
    assert verdict(_probe({**gguf, "rouge_l": math.nan}, hf), LIMITS)[0] == "rouge_l_drop nan (limit <= 0.05)"
    assert verdict(_probe({"entity_f1": 0.8}, hf), LIMITS) == ["rouge_l_drop nan (limit <= 0.05)"]
    assert verdict(_probe({}, {}), LIMITS) == []  # no answer metric in eval.metrics: nothing to judge
    looser = QuantizeConfig(max_probe_drop={"entity_f1": 0.2}).limits("q4_k_m")
    assert verdict(_probe(gguf, hf), looser) == []
    assert probe_figures(gguf, hf)["probe_drop"] == {"rouge_l": 0.04, "entity_f1": 0.15}


def test_the_probe_scores_answers_with_the_eval_metrics() -> None:
    """Free text: ROUGE-L sees what exact match cannot (the Alpaca run read 0.000 accuracy everywhere)."""
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": a}]}
            for a in ("The sky is blue.", "Water boils at 100 C.")]  # fmt: skip
    answers = [" The sky is blue today.", "Water boils at 90 C."]
    scores = _probe_scores(probe_metrics(["rouge_l", "exact_match", "perplexity"]), answers, rows)
    assert set(scores) == {"exact_match", "rouge_l"}
    assert scores["exact_match"] == 0.0
    # 4/5 tokens in common: P 4/5 R 4/4 -> 0.8889; 4 of 5 both ways -> 0.8
    assert scores["rouge_l"] == pytest.approx(round((8 / 9 + 0.8) / 2, 4))
    assert probe_metrics(["perplexity"]) == []
    assert probe_metrics(["entity_f1", "accuracy"]) == ["accuracy", "entity_f1"]


def test_probe_metrics_and_their_limits_are_the_eval_answer_metrics() -> None:
    assert get_args(ProbeMetric) == ANSWER_METRICS == tuple(DEFAULT_MAX_PROBE_DROP)


def test_the_console_line_shows_each_headline_metric_and_old_records_still_read() -> None:
    figures = probe_figures({"rouge_l": 0.41234, "entity_f1": 0.5, "unparsed_answers": 2}, {"rouge_l": 0.45,
                            "entity_f1": 0.6, "unparsed_answers": 0})  # fmt: skip
    assert probe_summary(figures) == "probe rouge_l 0.412 (HF 0.450), entity_f1 0.500 (HF 0.600)"
    assert probe_summary({"accuracy": 0.5, "hf_accuracy": 0.75}) == "probe accuracy 0.500 (HF 0.750)"
    assert probe_summary(probe_figures({}, {})) == "probe not scored (no answer metric in eval.metrics)"
    in_order = probe_figures({"rouge_l": 0.5, "accuracy": 0.25}, {"rouge_l": 0.5, "accuracy": 0.5})
    assert probe_summary(in_order) == "probe accuracy 0.250 (HF 0.500), rouge_l 0.500 (HF 0.500)"


def test_the_renamed_drop_limit_errors_clearly(tmp_path: Any) -> None:
    config = tmp_path / "old.yaml"
    config.write_text("data:\n  train_file: t.jsonl\nquantize:\n  max_accuracy_drop: 0.05\n")
    with pytest.raises(ConfigError, match=r"old.yaml:4: quantize.max_accuracy_drop: unknown key; did you mean "
                       r"'max_probe_drop'\?"):  # fmt: skip
        load_config(config)
    with pytest.raises(ValueError, match=r"drops are shares between 0 and 1, given rouge_l=1.5"):
        QuantizeConfig(max_probe_drop={"rouge_l": 1.5})
    with pytest.raises(ValueError, match="max_probe_drop.perplexity"):
        QuantizeConfig(max_probe_drop={"perplexity": 0.1})  # type: ignore[dict-item]


def test_every_broken_limit_is_named_and_the_manifest_joins_them() -> None:
    figures = _with(
        mean_kl=0.3, top1_agreement=0.5, ppl_ratio=2.0, **probe_figures({"accuracy": 0.25}, {"accuracy": 0.75})
    )
    reasons = verdict(figures, LIMITS)
    assert [r.split()[0] for r in reasons] == ["mean_kl", "top1_agreement", "ppl_ratio", "accuracy_drop"]
    judged = _judged(figures, LIMITS)
    assert judged == {**figures, "passed": False, "reason": "; ".join(reasons)}
    assert _judged(FIGURES, LIMITS) == {**FIGURES, "passed": True, "reason": ""}


def test_a_changed_limit_rejudges_the_same_figures() -> None:
    """What a quantize manifest records per type is enough to judge it again under other limits."""
    recorded = _judged(FIGURES, QuantizeConfig().limits("q4_k_m"))
    assert recorded["passed"]
    stricter = QuantizeConfig(max_mean_kl={"q4_k_m": 0}, max_probe_drop={"accuracy": 0})
    assert verdict(recorded, stricter.limits("q4_k_m")) == ["mean_kl 0.078 (limit <= 0.0)"]
    assert verdict(recorded, stricter.limits("q8_0")) == [  # q8_0 keeps its defaults
        "mean_kl 0.078 (limit <= 0.02)", "top1_agreement 0.857 (limit >= 0.9)"]  # fmt: skip
    looser = QuantizeConfig(min_top1_agreement={"q4_k_m": 0.5}).limits("q4_k_m")
    assert verdict(_with(top1_agreement=0.6), looser) == [] and verdict(_with(top1_agreement=0.6), LIMITS)
    assert recorded == {**FIGURES, "passed": True, "reason": ""}  # judging never changes the figures


def test_limits_per_type_come_from_the_config_over_the_defaults() -> None:
    config = QuantizeConfig(max_mean_kl={"q4_k_m": 0.2}, max_ppl_ratio={"f16": 1.5}, max_probe_drop={"rouge_l": 0.05})
    drops = {**DEFAULT_MAX_PROBE_DROP, "rouge_l": 0.05}
    assert config.limits("q4_k_m") == GgufLimits(0.2, 0.80, 1.15, drops)
    assert config.limits("f16") == GgufLimits(0.002, 0.99, 1.5, drops)
    assert config.limits("lora_f16") == GgufLimits(0.01, 0.95, 1.03, drops)
