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
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            ids, labels, mask = collate(rows[start : start + batch_size], pad_id)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total += float(loss)
            count += int((target != -100).sum())
    model.train(was_training)
    return total / max(count, 1)
