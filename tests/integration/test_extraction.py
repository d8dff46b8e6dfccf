"""The extraction case end to end on the tiny model: the bundled extraction dataset (tests/data/extraction, entities
as JSON) through data -> train -> eval with entity_f1 as the metric and in the gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraforge.tasks.artifacts import ArtifactStore
from loraforge.tasks.config import DEMO_CONFIG, load_config
from loraforge.tasks.errors import GateFailed

pytestmark = pytest.mark.integration
EXTRACTION = Path(__file__).resolve().parents[1] / "data" / "extraction"


def test_extraction_data_trains_and_eval_gates_on_entity_f1(tiny_model: Path, store: ArtifactStore) -> None:
    from loraforge.tasks.data import prepare_data
    from loraforge.tasks.evaluate import check_gate, evaluate_adapter, read_gate
    from loraforge.tasks.models import provision_base
    from loraforge.tasks.train import train_adapter

    config = load_config(DEMO_CONFIG, [
        f"base_model={tiny_model}", *(f"data.{s}_file={EXTRACTION / s}.jsonl" for s in ("train", "validation", "test")),
        "train.max_steps=3", "train.batch_size=4", "eval.metrics=[entity_f1]", "eval.max_new_tokens=24",
        "eval.gate=[entity_f1 >= 0, unparsed_answers <= 16, entity_f1 > 0.99]",
    ])  # fmt: skip
    base = provision_base(str(tiny_model), store)
    data = prepare_data(config.data, base, store)
    train = train_adapter(config.train, base, data, store)
    evaluated = evaluate_adapter(config.eval, base, data, train, store)

    figures = evaluated.metrics
    for name in ("entity_f1", "entity_macro_f1", "entity_precision", "entity_recall", "unparsed_answers"):
        assert figures[name] >= 0 and figures[f"base_{name}"] >= 0, name
    assert figures["unparsed_answers"] <= 16 and figures["entity_f1"] <= 1
    recorded = json.loads(evaluated.file("metrics.json").read_text())
    # every reference type has its row, with its support in the 16 test rows (a 3-step tiny model finds little)
    support = {t.removeprefix("entity:"): c["support"] for t, c in recorded["per_class"]["tuned"].items()
               if c["support"]}  # fmt: skip
    expected: dict[str, int] = {}
    for line in (EXTRACTION / "test.jsonl").read_text().splitlines():
        for entity in json.loads(json.loads(line)["messages"][-1]["content"]):
            expected[entity["type"]] = expected.get(entity["type"], 0) + 1
    assert support == expected
    gate = read_gate(evaluated)
    assert [c["passed"] for c in gate.checks[:2]] == [True, True]
    if not gate.checks[2]["passed"]:  # a tiny model does not extract every entity: the gate stops the run
        with pytest.raises(GateFailed, match=r"eval gate failed: entity_f1 > 0.99 \(got [0-9.]+\)"):
            check_gate(evaluated)
    assert "## Gate:" in evaluated.file("report.md").read_text()
