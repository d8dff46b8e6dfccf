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


def pack_rows(rows: list[dict[str, Any]], capacity: int) -> list[dict[str, Any]]:
    """Pack rows into sequences of at most `capacity` tokens, best-fit decreasing (deterministic).

    Each packed row holds the rows' input_ids and labels back to back and `doc_lens`; the first label of
    every row is ignored, so no row learns to predict the start of the next one. `collate_packed` turns
    `doc_lens` into restarting positions and a block-diagonal causal mask: each row sees only itself, exactly
    as if it were alone in the batch.
    """
    import bisect

    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]["input_ids"]), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted: the tightest bin that fits wins
    for i in order:
        size = len(rows[i]["input_ids"])
        if size > capacity:
            raise ValueError(f"a row of {size} tokens does not fit a packed sequence of {capacity}")
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            room, b = free.pop(at)
            bins[b].append(i)
        else:
            room, b = capacity, len(bins)
            bins.append([i])
        bisect.insort(free, (room - size, b))
    packed = []
    for members in bins:
        members.sort()  # keep the data's own order inside a sequence
        ids: list[int] = []
        labels: list[int] = []
        for i in members:
            ids += rows[i]["input_ids"]
            labels += [-100] + rows[i]["labels"][1:]
        packed.append({"input_ids": ids, "labels": labels, "doc_lens": [len(rows[i]["input_ids"]) for i in members]})
    return packed


def collate_packed(batch: list[dict[str, Any]], pad_id: int) -> tuple[Any, Any, Any, Any]:
    """Right-pad packed rows; returns ids, labels, a (B, 1, L, L) boolean block-diagonal causal mask and
    position ids restarting at every row. Padding positions attend only to themselves (no NaN rows)."""
    import torch

    ids, labels, _ = collate(batch, pad_id)
    width = ids.shape[1]
    doc = torch.arange(width).repeat(len(batch), 1).neg_().sub_(1)  # padding: a one-token block of its own
    positions = torch.zeros((len(batch), width), dtype=torch.long)
    for i, row in enumerate(batch):
        start = 0
        for number, length in enumerate(row["doc_lens"]):
            doc[i, start : start + length] = number
            positions[i, start : start + length] = torch.arange(length)
            start += length
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    mask = (doc[:, :, None] == doc[:, None, :]) & causal
    return ids, labels, mask[:, None], positions


def shared_prefix_length(batch: list[dict[str, Any]]) -> int:
    """How many leading tokens every row of the batch shares before any labelled token is predicted.

    The prefix ends before the position that predicts the first labelled token of any row (so no loss is
    read from it) and leaves every row at least one token of its own. 0 for a batch of one row.
    """
    if len(batch) < 2:
        return 0
    limit = min(len(row["input_ids"]) for row in batch) - 1
    for row in batch:
        first_labelled = next((i for i, label in enumerate(row["labels"]) if label != -100), len(row["labels"]))
        limit = min(limit, first_labelled - 1)
    first = batch[0]["input_ids"]
    length = 0
    while length < limit and all(row["input_ids"][length] == first[length] for row in batch):
        length += 1
    return length


def collate_shared_prefix(batch: list[dict[str, Any]], prefix: int) -> tuple[Any, Any, Any, Any]:
    """The batch as one sequence: the `prefix` tokens all rows share, once, then each row's remainder.

    Returns ids, labels, a (1, 1, L, L) boolean mask and position ids. Every remainder attends to the prefix
    and causally to itself, never to another row, and its positions continue from the prefix, so each row
    gets the keys, values and positions of its own forward: its losses equal those of the padded batch (up to
    float summation order). The prefix is computed once instead of once per row, and its gradient is the sum
    of every row's. Each remainder's first label is ignored (`shared_prefix_length` keeps it unlabelled).
    """
    import torch

    ids: list[int] = list(batch[0]["input_ids"][:prefix])
    labels: list[int] = [-100] * prefix
    doc: list[int] = [-1] * prefix  # -1: the shared prefix, seen by every row
    positions: list[int] = list(range(prefix))
    for number, row in enumerate(batch):
        length = len(row["input_ids"])
        ids += row["input_ids"][prefix:]
        labels += [-100] + row["labels"][prefix + 1 :]
        doc += [number] * (length - prefix)
        positions += range(prefix, length)
    rows = torch.tensor(doc)
    causal = torch.ones((len(ids), len(ids)), dtype=torch.bool).tril()
    mask = ((rows[:, None] == rows[None, :]) | (rows[None, :] == -1)) & causal
    return torch.tensor([ids]), torch.tensor([labels]), mask[None, None], torch.tensor([positions])


def model_device(model: Any) -> Any:
    """The device of the model's first parameter (where inputs must go)."""
    return next(model.parameters()).device


def mean_loss(model: Any, rows: list[dict[str, Any]], batch_size: int, pad_id: int) -> float:
    """Token-weighted mean loss over rows (labelled tokens only), in eval mode."""
    sums = _loss_sums(model, rows, batch_size, pad_id, None)
    return sum(total for total, _ in sums) / max(sum(count for _, count in sums), 1)


def loss_total(
    model: Any, rows: list[dict[str, Any]], batch_size: int, pad_id: int, bar: str | None = None
) -> tuple[float, int]:
    """The summed loss over the rows' labelled tokens and how many there are, in eval mode (a progress bar named
    `bar` while it runs, when given)."""
    sums = _loss_sums(model, rows, batch_size, pad_id, bar)
    return sum(total for total, _ in sums), sum(count for _, count in sums)


def row_losses(model: Any, rows: list[dict[str, Any]], batch_size: int, pad_id: int) -> list[float]:
    """Mean loss over each row's labelled tokens (the answer), in eval mode; NaN for a row with no labels."""
    sums = _loss_sums(model, rows, batch_size, pad_id, "loss")
    return [total / count if count else float("nan") for total, count in sums]


def labelled_token_losses(
    model: Any, input_ids: Any, attention_mask: Any, labels: Any, **extra: Any
) -> tuple[Any, Any]:
    """Next-token losses at the positions whose next token is labelled: (losses [B, K], targets [B, K]).

    The output head and the softmax run only on those K positions (`logits_to_keep` with their indices): with
    the loss on the completion only, most positions of a chat row are prompt, and the head (vocabulary x hidden)
    is a large share of a small model's compute. Ignored targets (-100) get a loss of 0; the result equals
    the model's own loss on full logits. Inputs must already be on the model's device.
    """
    import torch

    targets = labels[:, 1:]
    keep = (targets != -100).any(dim=0).nonzero().squeeze(1)
    # use_cache=False: no key/value cache for a single forward (transformers builds one by default)
    logits = model(input_ids=input_ids, attention_mask=as_attention_mask(model, attention_mask), logits_to_keep=keep,
                   use_cache=False, **extra).logits  # fmt: skip
    targets = targets[:, keep]
    losses = torch.nn.functional.cross_entropy(
        logits.float().transpose(1, 2), targets, ignore_index=-100, reduction="none"
    )
    return losses, targets


def as_attention_mask(model: Any, mask: Any) -> Any:
    """`mask` as the model's attention takes it. A boolean 4-D mask (packed rows, a shared prompt prefix) goes
    to sdpa as it is; eager attention adds the mask to the scores, so it gets 0 where a query attends and the
    float32 minimum elsewhere (a boolean there would add 1 and 0: measured wrong on Gemma 3 270M). 2-D padding
    masks pass unchanged: transformers builds the 4-D mask from them itself."""
    import torch

    if mask.dim() != 4 or mask.dtype != torch.bool:
        return mask
    if getattr(model, "module", model).config._attn_implementation != "eager":  # DDP wraps the model as .module
        return mask
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(
        ~mask, torch.finfo(torch.float32).min
    )


def _loss_sums(
    model: Any, rows: list[dict[str, Any]], batch_size: int, pad_id: int, bar: str | None
) -> list[tuple[float, int]]:
    """Per row: the summed next-token loss over its labelled tokens and how many there are."""
    import torch
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    sums: list[tuple[float, int]] = []
    starts = range(0, len(rows), batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc=bar, unit="batch", dynamic_ncols=True, leave=False, disable=bar is None):
            ids, labels, mask = collate(rows[start : start + batch_size], pad_id)
            device = model_device(model)
            losses, targets = labelled_token_losses(model, ids.to(device), mask.to(device), labels.to(device))
            sums.extend(zip(losses.sum(1).tolist(), (targets != -100).sum(1).tolist(), strict=True))
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
    batched with left padding, stopping at EOS and at the tokenizer's `stop_token_ids` when it has them (the named
    template's stop tokens, see `tasks.data.stop_token_ids`): greedy when temperature is 0, else seeded sampling."""
    import torch
    from tqdm import tqdm

    tokenizer.padding_side = "left"
    answers: list[str] = []
    try:
        starts = range(0, len(conversations), batch_size)
        for start in tqdm(starts, desc="generate", unit="batch", dynamic_ncols=True, leave=False):
            prompts = [
                tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                for messages in conversations[start : start + batch_size]
            ]
            batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            batch = batch.to(model_device(model))
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {}
            if sampling:
                torch.manual_seed(seed + start)
            with torch.no_grad():
                out = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    **(sampling or {"do_sample": False}),
                    eos_token_id=[tokenizer.eos_token_id, *getattr(tokenizer, "stop_token_ids", [])],
                    pad_token_id=tokenizer.pad_token_id,
                )
            new_tokens = out[:, batch["input_ids"].shape[1] :]
            answers.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = "right"
    return answers
