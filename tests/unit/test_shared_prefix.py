"""A micro-batch's shared prompt prefix computed once: the same losses and LoRA gradient as the padded batch."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from loraforge.tasks.batching import collate, collate_shared_prefix, labelled_token_losses, shared_prefix_length
from loraforge.tasks.train import Sharing, collate_micro_batch, prefix_sharing

SYSTEM = [5, 17, 23, 42, 99, 7, 311, 12, 64]  # a system prompt every row starts with


def _rows(tails: list[tuple[int, int]], seed: int = 0) -> list[dict]:
    """Rows of SYSTEM + a user part of `prompt` tokens + an answer of `answer` tokens (labelled)."""
    rng = random.Random(seed)
    rows = []
    for prompt, answer in tails:
        user = [rng.randrange(100, 900) for _ in range(prompt)]
        reply = [rng.randrange(100, 900) for _ in range(answer)]
        ids = SYSTEM + user + reply
        rows.append({"input_ids": ids, "labels": [-100] * (len(SYSTEM) + prompt) + reply})
    return rows


def test_the_prefix_is_what_every_row_shares_before_its_first_labelled_token() -> None:
    rows = _rows([(3, 2), (6, 1), (4, 3)])
    assert shared_prefix_length(rows) == len(SYSTEM)  # the user parts differ from their first token
    assert shared_prefix_length(rows[:1]) == 0  # nothing to share in one row
    same = _rows([(3, 2)]) * 3  # identical rows: the prefix stops before the first labelled token's predictor
    assert shared_prefix_length(same) == len(SYSTEM) + 3 - 1
    early = [dict(r, labels=list(r["input_ids"])) for r in rows]  # train_on_prompt: labelled from token 0
    assert shared_prefix_length(early) == 0
    assert shared_prefix_length([rows[0], {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}]) == 0


def test_the_one_sequence_layout_keeps_each_row_to_itself() -> None:
    rows = _rows([(2, 1), (3, 2)])
    prefix = shared_prefix_length(rows)
    ids, labels, mask, positions = collate_shared_prefix(rows, prefix)
    first, second = (len(r["input_ids"]) - prefix for r in rows)
    assert ids.shape == (1, prefix + first + second) and mask.shape == (1, 1, ids.shape[1], ids.shape[1])
    own = [list(range(prefix, len(r["input_ids"]))) for r in rows]  # each row's positions after the prefix
    assert positions[0].tolist() == list(range(prefix)) + own[0] + own[1]
    start = prefix + first  # the second row's first token: sees the prefix and itself, not the first row
    assert mask[0, 0, start].tolist() == [True] * prefix + [False] * first + [True] + [False] * (second - 1)
    assert labels[0, prefix].item() == -100 and labels[0, start].item() == -100
    assert sorted(t for t in labels[0].tolist() if t != -100) == sorted(
        t for r in rows for t in r["labels"] if t != -100
    )


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # eager adds the mask to the scores (as_attention_mask)
def test_losses_and_lora_gradient_equal_the_padded_batch(tiny_model: Path, attention: str) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attention)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    model = get_peft_model(base, config, autocast_adapter_dtype=False)
    for name, param in model.named_parameters():  # B = 0 at init: give it weights so gradients reach A too
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    model.train()
    rows = _rows([(5, 2), (2, 3), (7, 1), (4, 2)], seed=3)

    def loss_and_grads(ids, mask, labels, **extra):  # noqa: ANN001, ANN202
        model.zero_grad()
        losses, targets = labelled_token_losses(model, ids, mask, labels, **extra)
        total = losses.sum()
        total.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return total.item(), sorted(losses[targets != -100].tolist()), grads

    padded_total, padded_losses, padded_grads = loss_and_grads(*_padded(rows))
    ids, labels, mask, positions = collate_shared_prefix(rows, shared_prefix_length(rows))
    shared_total, shared_losses, shared_grads = loss_and_grads(ids, mask, labels, position_ids=positions)
    assert shared_total == pytest.approx(padded_total, rel=1e-5)
    assert shared_losses == pytest.approx(padded_losses, rel=1e-4, abs=1e-5)
    assert padded_grads.keys() == shared_grads.keys() and len(padded_grads) == 12
    for name, grad in padded_grads.items():
        assert grad.abs().max() > 0, name  # the comparison below is not between zeros
        assert torch.allclose(shared_grads[name], grad, rtol=1e-4, atol=1e-6), name


def _padded(rows: list[dict]) -> tuple:
    ids, labels, mask = collate(rows, pad_id=0)
    return ids, mask, labels


def test_sharing_is_used_only_where_it_costs_less(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    sharing = prefix_sharing(AutoModelForCausalLM.from_pretrained(tiny_model))
    assert 0 < sharing.pair_per_token < 1
    rows = _rows([(5, 2), (2, 3), (7, 1), (4, 2)])
    shared = collate_micro_batch(rows, pad_id=0, packed=False, sharing=sharing)
    padded = collate_micro_batch(rows, pad_id=0, packed=False)
    assert shared.input_ids.shape[0] == 1 and shared.padding == 0 and "position_ids" in shared.extra
    assert shared.real_tokens == padded.real_tokens == sum(len(r["input_ids"]) for r in rows)
    assert shared.input_ids.numel() == shared.real_tokens - 3 * len(SYSTEM)  # the prefix once, not four times
    assert padded.padding == padded.input_ids.numel() - padded.real_tokens > 0
    # long rows with a short shared prefix: one sequence's dense attention would cost more than padding
    assert not Sharing(sharing.pair_per_token, None, True).pays(_rows([(400, 10)] * 4), len(SYSTEM))
    assert Sharing(sharing.pair_per_token, None, True).pays(rows, len(SYSTEM))
    assert not Sharing(sharing.pair_per_token, 16, True).pays(rows, len(SYSTEM))  # rows longer than a window
    eager = prefix_sharing(AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="eager"))
    assert sharing.masks_4d and eager.masks_4d and eager.pays(rows, len(SYSTEM))
    assert not Sharing(sharing.pair_per_token, None, False).pays(rows, len(SYSTEM))  # a kernel without 4-D masks
