"""The entity_f1 metric module, on hand-computed cases: exact type-and-text matches counted per row as multisets,
unparsable answers as predicting nothing, per-type figures and micro/macro averages as seqeval reports them; and
how eval selects and gates on it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loraforge.tasks.errors import StageError
from loraforge.tasks.evaluate import METRIC_DIR, EvalConfig, score_answers


def _ents(*pairs: tuple[str, str]) -> str:
    return json.dumps([{"type": t, "text": x} for t, x in pairs])


def _compute(predictions: list[str], references: list[str]) -> dict[str, Any]:
    import evaluate

    result = evaluate.load(str(METRIC_DIR / "entity_f1")).compute(predictions=predictions, references=references)
    assert result is not None
    return result


def test_partial_overlap_wrong_type_and_per_type_figures() -> None:
    references = [_ents(("ORDER", "A-17"), ("PRODUCT", "router")), _ents(("PERSON", "Ana Ruiz"))]
    predictions = [
        _ents(("ORDER", "A-17"), ("PRODUCT", "wifi router")),  # the order right, the product's span too long
        _ents(("PRODUCT", "Ana Ruiz")),  # the right text with the wrong type
    ]
    result = _compute(predictions, references)
    # tp 1 (ORDER); predicted 3, actual 3 -> P = R = F1 = 1/3
    assert result["entity_precision"] == pytest.approx(1 / 3)
    assert result["entity_recall"] == pytest.approx(1 / 3)
    assert result["entity_f1"] == pytest.approx(1 / 3)
    assert result["per_type"] == {
        "ORDER": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1},
        "PERSON": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
        "PRODUCT": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
    }
    assert result["entity_macro_f1"] == pytest.approx(1 / 3)
    assert result["unparsed_answers"] == 0


def test_duplicates_count_as_a_multiset() -> None:
    references = [_ents(("SKU", "X1"), ("SKU", "X1"), ("SKU", "Y2"))]
    # X1 predicted three times: two match, one is a false positive; Y2 missed
    result = _compute([_ents(("SKU", "X1"), ("SKU", "X1"), ("SKU", "X1"))], references)
    assert result["entity_precision"] == pytest.approx(2 / 3)
    assert result["entity_recall"] == pytest.approx(2 / 3)
    assert result["per_type"]["SKU"] == {"precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3),
                                         "f1": pytest.approx(2 / 3), "support": 3}  # fmt: skip


def test_bad_json_predicts_nothing_and_is_counted() -> None:
    references = [_ents(("ORDER", "A-1")), _ents(("ORDER", "B-2")), _ents(("ORDER", "C-3"), ("CITY", "Lyon"))]
    predictions = ['[{"type": "ORDER", "text": "A-1"}', "ORDER: B-2", _ents(("ORDER", "C-3"), ("CITY", "Lyon"))]
    result = _compute(predictions, references)
    assert result["unparsed_answers"] == 2
    # tp 2, predicted 2, actual 4: P 1, R 0.5, F1 2/3; per type ORDER P 1 R 1/3 F1 0.5, CITY 1/1/1 -> macro 0.75
    assert result["entity_precision"] == 1.0
    assert result["entity_recall"] == pytest.approx(0.5)
    assert result["entity_f1"] == pytest.approx(2 / 3)
    assert result["entity_macro_f1"] == pytest.approx(0.75)
    wrong_shape = _compute(['{"ORDER": ["A-1"]}', '[{"type": "ORDER"}]', "[]"], references)
    assert wrong_shape["unparsed_answers"] == 2 and wrong_shape["entity_f1"] == 0.0


def test_empty_answers_and_types_only_predicted() -> None:
    result = _compute(["[]", _ents(("CITY", "Oslo"))], ["[]", "[]"])
    # nothing to find: a predicted type has support 0, precision 0; zero denominators give 0 as in seqeval
    assert result["per_type"] == {"CITY": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}}
    assert (result["entity_precision"], result["entity_recall"], result["entity_f1"]) == (0.0, 0.0, 0.0)
    perfect = _compute([_ents((" CITY", "Oslo "))], [_ents(("CITY", "Oslo"))])  # surrounding spaces trimmed
    assert perfect["entity_f1"] == 1.0 and perfect["entity_macro_f1"] == 1.0
    assert _compute(["nothing"], ["[]"])["unparsed_answers"] == 1
    case = _compute([_ents(("City", "oslo"))], [_ents(("CITY", "Oslo"))])  # exact: case matters
    assert case["entity_f1"] == 0.0


def test_eval_scores_entity_figures_and_reports_per_type() -> None:
    scores, per_class = score_answers(
        ["entity_f1"], [_ents(("ORDER", "A-1")), "oops"], [_ents(("ORDER", "A-1")), _ents(("CITY", "Rome"))]
    )
    assert scores == {"entity_f1": pytest.approx(2 / 3), "entity_macro_f1": 0.5, "entity_precision": 1.0,
                      "entity_recall": 0.5, "unparsed_answers": 1.0}  # fmt: skip
    assert per_class["entity:CITY"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_a_reference_that_is_not_an_entity_list_stops_eval_with_the_row() -> None:
    with pytest.raises(StageError, match=r"reference 1 is not a JSON list .*fix the test split or drop entity_f1"):
        score_answers(["entity_f1"], ["[]", "[]"], ["[]", "billing"])


def test_eval_config_selects_entity_f1_and_gates_on_its_figures() -> None:
    config = EvalConfig(metrics=["entity_f1"], gate=["entity_f1 >= 0.5", "entity_macro_f1_delta > 0",
                                                     "unparsed_answers <= 0"])  # fmt: skip
    assert config.metrics == ["entity_f1"]
    with pytest.raises(ValueError, match=r"'entity_macro_f1 >= 0.5' needs a metric that eval.metrics does not"):
        EvalConfig(metrics=["accuracy"], gate=["entity_macro_f1 >= 0.5"])
    assert EvalConfig(metrics=["macro_f1"], gate=["macro_f1 >= 0.5"]).gate  # a digit in the name
    with pytest.raises(ValueError, match="unknown metric 'entity_f2'"):
        EvalConfig(metrics=["entity_f1"], gate=["entity_f2 >= 0.5"])
    with pytest.raises(ValueError, match="entity_f1"):
        EvalConfig(metrics=["entity"])  # type: ignore[list-item]


def test_the_bundled_extraction_dataset_is_regenerated_byte_for_byte_and_every_answer_parses() -> None:
    import importlib.util

    from loraforge.tasks.evaluate import METRIC_DIR

    root = Path(__file__).resolve().parents[1] / "data"
    done = subprocess.run([sys.executable, str(root / "make_extraction_dataset.py"), "--check"], capture_output=True)
    assert done.returncode == 0, done.stdout.decode()
    spec = importlib.util.spec_from_file_location("entity_f1_module", METRIC_DIR / "entity_f1" / "entity_f1.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    answers = {split: [json.loads(line)["messages"][-1]["content"]
                       for line in (root / "extraction" / f"{split}.jsonl").read_text().splitlines()]
               for split in ("train", "validation", "test")}  # fmt: skip
    assert {s: len(a) for s, a in answers.items()} == {"train": 64, "validation": 16, "test": 16}
    parsed = [module.parse_entities(a) for a in answers["test"]]
    assert all(p is not None for p in parsed)
    assert {kind for p in parsed for kind, _ in p} == {"ORDER_ID", "PRODUCT", "AMOUNT", "DATE", "EMAIL"}
    assert any(not p for p in parsed) and any(max(p.values(), default=0) == 2 for p in parsed)  # empty; a duplicate
    assert _compute(answers["test"], answers["test"])["entity_f1"] == 1.0
