"""Batching helpers shared by the stages that run a model over a data-artifact split (train, eval, merge)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_split(path: Path) -> list[dict[str, Any]]:
    """Rows of a data-artifact split (input_ids, labels, messages)."""
    with path.open() as handle:
        return [json.loads(line) for line in handle]


def collate(batch: list[dict[str, Any]], pad_id: int) -> tuple[Any, Any, Any]:
    """Right-pad a batch to its longest row; padded labels are ignored by the loss."""
    import torch

    width = max(len(r["input_ids"]) for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, row in enumerate(batch):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        mask[i, :n] = 1
    return ids, labels, mask


def mean_loss(model: Any, rows: list[dict[str, Any]], batch_size: int, pad_id: int) -> float:
    """Token-weighted mean loss over rows (labelled tokens only), in eval mode."""
    sums = _loss_sums(model, rows, batch_size, pad_id)
    return sum(total for total, _ in sums) / max(sum(count for _, count in sums), 1)


def row_losses(model: Any, rows: list[dict[str, Any]], batch_size: int, pad_id: int) -> list[float]:
    """Mean loss over each row's labelled tokens (the answer), in eval mode; NaN for a row with no labels."""
    return [total / count if count else float("nan") for total, count in _loss_sums(model, rows, batch_size, pad_id)]


def _loss_sums(model: Any, rows: list[dict[str, Any]], batch_size: int, pad_id: int) -> list[tuple[float, int]]:
    """Per row: the summed next-token loss over its labelled tokens and how many there are."""
    import torch

    was_training = model.training
    model.eval()
    sums: list[tuple[float, int]] = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            ids, labels, mask = collate(rows[start : start + batch_size], pad_id)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            token_loss = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), target, ignore_index=-100, reduction="none"
            )
            sums.extend(zip(token_loss.sum(1).tolist(), (target != -100).sum(1).tolist(), strict=True))
    model.train(was_training)
    return sums


def generate_answers(
    model: Any,
    tokenizer: Any,
    conversations: list[list[dict[str, str]]],
    max_new_tokens: int,
    batch_size: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[str]:
    """Answers to each conversation (rendered with the tokenizer's chat template and a generation prompt),
    batched with left padding, stopping at EOS: greedy when temperature is 0, else seeded sampling."""
    import torch
    from tqdm import tqdm

    tokenizer.padding_side = "left"
    answers: list[str] = []
    try:
        for start in tqdm(range(0, len(conversations), batch_size), desc="generate", unit="batch", leave=False):
            prompts = [
                tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                for messages in conversations[start : start + batch_size]
            ]
            batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {}
            if sampling:
                torch.manual_seed(seed + start)
            with torch.no_grad():
                out = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    **(sampling or {"do_sample": False}),
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new_tokens = out[:, batch["input_ids"].shape[1] :]
            answers.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = "right"
    return answers
