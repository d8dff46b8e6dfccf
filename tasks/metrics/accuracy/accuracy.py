"""Classification accuracy and macro-F1 over class ids (an `evaluate` metric module).

Shipped with loraforge because hub metric names cannot be loaded offline; load with
`evaluate.load("<path to this folder>")`. Predictions outside the label set should be given as -1: they count
as wrong for accuracy and as a false negative of their reference class for F1. `per_class` gives
precision, recall, F1 and support for every reference class id.
"""

import datasets
import evaluate


class Accuracy(evaluate.Metric):
    """Accuracy and macro-averaged F1 over the reference classes."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Accuracy and macro-F1 for single-label classification.",
            citation="",
            inputs_description="predictions: list of int (-1 = not a known class); references: list of int",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions: list[int], references: list[int]) -> dict[str, object]:
        pairs = list(zip(predictions, references, strict=True))
        accuracy = sum(p == r for p, r in pairs) / max(len(pairs), 1)
        per_class = {}
        for label in sorted(set(references)):
            tp = sum(p == label and r == label for p, r in pairs)
            fp = sum(p == label and r != label for p, r in pairs)
            fn = sum(p != label and r == label for p, r in pairs)
            per_class[label] = {
                "precision": tp / (tp + fp) if tp + fp else 0.0,
                "recall": tp / (tp + fn) if tp + fn else 0.0,
                "f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0,
                "support": tp + fn,
            }
        macro_f1 = sum(c["f1"] for c in per_class.values()) / max(len(per_class), 1)
        return {"accuracy": accuracy, "macro_f1": macro_f1, "per_class": per_class}
