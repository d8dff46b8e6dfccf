"""ROUGE-L F-measure (an `evaluate` metric module), for free-text answers.

Shipped with loraforge because hub metric names cannot be loaded offline; load with
`evaluate.load("<path to this folder>")`. Texts are lower-cased and split on whitespace and punctuation; the
score per pair is the F-measure of the longest common subsequence of tokens (beta = 1), averaged over pairs,
as `rouge_score`'s rougeL without stemming.
"""

import re

import datasets
import evaluate

TOKEN = re.compile(r"[a-z0-9]+")


def tokens(text: str) -> list[str]:
    return TOKEN.findall(text.lower())


def lcs(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


class RougeL(evaluate.Metric):
    """Mean ROUGE-L F-measure over prediction/reference pairs."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="ROUGE-L: longest-common-subsequence F-measure over word tokens.",
            citation="Lin, C.-Y. (2004). ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description="predictions: list of str; references: list of str",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        scores = []
        for prediction, reference in zip(predictions, references, strict=True):
            p, r = tokens(prediction), tokens(reference)
            common = lcs(p, r)
            if not p and not r:
                scores.append(1.0)
            elif common == 0:
                scores.append(0.0)
            else:
                precision, recall = common / len(p), common / len(r)
                scores.append(2 * precision * recall / (precision + recall))
        return {"rouge_l": sum(scores) / max(len(scores), 1)}
