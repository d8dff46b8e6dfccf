"""Exact match of generated text against references, after light normalization (an `evaluate` metric module).

Shipped with loraforge because hub metric names cannot be loaded offline; load with
`evaluate.load("<path to this folder>")`.
"""

import string

import datasets
import evaluate

_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Lowercase, drop punctuation, collapse whitespace."""
    return " ".join(text.lower().translate(_PUNCT).split())


class ExactMatch(evaluate.Metric):
    """Share of predictions equal to their reference after normalization."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Exact match after lowercasing, removing punctuation and collapsing whitespace.",
            citation="",
            inputs_description="predictions: list of str; references: list of str",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        hits = [normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=True)]
        return {"exact_match": sum(hits) / max(len(hits), 1)}
