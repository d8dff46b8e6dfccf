"""Sequence packing: rows packed into one sequence give the same per-token loss as each row alone."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from loraforge.tasks.batching import as_attention_mask, collate, collate_packed, pack_rows


def _rows(lengths: list[int], seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for n in lengths:
        ids = [rng.randrange(10, 1000) for _ in range(n)]
        prompt = n // 2
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def test_best_fit_decreasing_fills_sequences_and_keeps_every_token() -> None:
    rows = _rows([9, 7, 5, 4, 3, 3, 2, 1])
    packed = pack_rows(rows, capacity=12)
    assert [sum(p["doc_lens"]) for p in packed] == [12, 12, 10]  # 34 tokens in 3 sequences, not 8 padded rows
    assert sorted(n for p in packed for n in p["doc_lens"]) == sorted(len(r["input_ids"]) for r in rows)
    assert all(len(p["input_ids"]) == len(p["labels"]) == sum(p["doc_lens"]) for p in packed)
    assert pack_rows(rows, capacity=12) == packed  # deterministic


def test_a_row_longer_than_the_sequence_is_refused() -> None:
    with pytest.raises(ValueError, match="13 tokens does not fit a packed sequence of 12"):
        pack_rows(_rows([13]), capacity=12)


def test_first_label_of_every_packed_row_is_ignored() -> None:
    rows = _rows([4, 4])
    for row in rows:
        row["labels"] = list(row["input_ids"])  # train_on_prompt: every token labelled
    (packed,) = pack_rows(rows, capacity=8)
    assert packed["labels"][0] == -100 and packed["labels"][4] == -100
    assert packed["labels"][1:4] == rows[0]["input_ids"][1:] and packed["labels"][5:] == rows[1]["input_ids"][1:]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # eager takes the mask additive (as_attention_mask)
def test_packed_forward_equals_each_row_alone(tiny_model: Path, attention: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attention).eval()
    rows = _rows([11, 7, 5, 9, 3], seed=1)
    packed = pack_rows(rows, capacity=20)
    assert len(packed) < len(rows)
    ids, labels, boolean, positions = collate_packed(packed, pad_id=0)
    mask = as_attention_mask(model, boolean)
    assert mask.shape == (len(packed), 1, ids.shape[1], ids.shape[1])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        packed_loss = model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels).loss
        alone_ids, alone_labels, alone_mask = collate(rows, pad_id=0)
        alone_loss = model(input_ids=alone_ids, attention_mask=alone_mask, labels=alone_labels).loss
        by_row = {tuple(r["input_ids"]): model(input_ids=torch.tensor([r["input_ids"]])).logits[0] for r in rows}
    for p, sequence in enumerate(packed):
        start = 0
        for length in sequence["doc_lens"]:
            own = tuple(sequence["input_ids"][start : start + length])
            assert torch.allclose(logits[p, start : start + length], by_row[own], atol=1e-5)
            start += length
        assert torch.isfinite(logits[p]).all()  # padding positions included
    assert packed_loss.item() == pytest.approx(alone_loss.item(), abs=1e-5)
