"""Entity-level precision, recall and F1 for answers that list entities as JSON (an `evaluate` metric module).

Shipped with loraforge because hub metric names cannot be loaded offline; load with
`evaluate.load("<path to this folder>")`.

Answer format (references and predictions alike): a JSON list of objects with a "type" and a "text", e.g.
`[{"type": "ORDER_ID", "text": "A-1042"}, {"type": "PRODUCT", "text": "router"}]`; `[]` means no entities. An
entity counts as found only when both its type and its text match exactly (after trimming surrounding
whitespace), as seqeval's default (strict span and type) scoring does. Entities are compared per row as
multisets: a reference naming the same entity twice needs it predicted twice, and a prediction repeating an
entity once too often adds a false positive.

A prediction that is not such a list (no JSON, or the wrong shape) counts as predicting nothing; their number is
reported as `unparsed_answers`. A reference that is not such a list is an error naming its row.

Figures, as seqeval's classification_report: per type precision, recall, F1 and support (reference entities of
that type; types only predicted have support 0), micro averages (`entity_precision`, `entity_recall`,
`entity_f1`) and the macro F1 over the types in references or predictions (`entity_macro_f1`). A ratio with a
zero denominator is 0.
"""

import json
from collections import Counter

import datasets
import evaluate


def parse_entities(answer: str) -> Counter[tuple[str, str]] | None:
    """The (type, text) multiset of one answer, or None when it is not a JSON list of {"type", "text"} objects."""
    try:
        value = json.loads(answer)
    except (json.JSONDecodeError, TypeError):
        return None
    if not isinstance(value, list):
        return None
    found: Counter[tuple[str, str]] = Counter()
    for item in value:
        if not (isinstance(item, dict) and isinstance(item.get("type"), str) and isinstance(item.get("text"), str)):
            return None
        found[(item["type"].strip(), item["text"].strip())] += 1
    return found


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


class EntityF1(evaluate.Metric):
    """Entity-level micro/macro F1 and per-type precision/recall/F1 over JSON entity lists."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Entity-level precision/recall/F1 (exact type and text) over JSON entity lists.",
            citation="Nakayama, H. (2018). seqeval: A Python framework for sequence labeling evaluation.",
            inputs_description='predictions, references: list of str, each a JSON list of {"type", "text"}',
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, object]:
        tp: Counter[str] = Counter()
        predicted: Counter[str] = Counter()
        actual: Counter[str] = Counter()
        unparsed = 0
        for row, (prediction, reference) in enumerate(zip(predictions, references, strict=True)):
            truth = parse_entities(reference)
            if truth is None:
                raise ValueError(
                    f"entity_f1: reference {row} is not a JSON list of {{'type', 'text'}} objects: {reference[:80]!r}"
                )
            guess = parse_entities(prediction)
            if guess is None:
                unparsed += 1
                guess = Counter()
            for (kind, _), n in (truth & guess).items():
                tp[kind] += n
            for (kind, _), n in guess.items():
                predicted[kind] += n
            for (kind, _), n in truth.items():
                actual[kind] += n
        per_type = {}
        for kind in sorted(set(actual) | set(predicted)):
            precision, recall = _ratio(tp[kind], predicted[kind]), _ratio(tp[kind], actual[kind])
            per_type[kind] = {"precision": precision, "recall": recall, "f1": _f1(precision, recall),
                              "support": actual[kind]}  # fmt: skip
        precision = _ratio(sum(tp.values()), sum(predicted.values()))
        recall = _ratio(sum(tp.values()), sum(actual.values()))
        return {
            "entity_precision": precision,
            "entity_recall": recall,
            "entity_f1": _f1(precision, recall),
            "entity_macro_f1": sum(c["f1"] for c in per_type.values()) / max(len(per_type), 1),
            "unparsed_answers": unparsed,
            "per_type": per_type,
        }
