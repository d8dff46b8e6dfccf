"""The train stage's data order: micro-batches, optimizer steps and length grouping (tasks.train.batch_stream)."""

from __future__ import annotations

import random
from itertools import islice
from typing import Any

from loraforge.tasks.train import TrainConfig, batch_stream


def _rows(count: int = 96, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"input_ids": list(range(rng.randrange(20, 120))), "row": i} for i in range(count)]


def _steps(rows: list[dict[str, Any]], config: TrainConfig, steps: int) -> list[list[list[dict[str, Any]]]]:
    """The first `steps` optimizer steps, each a list of grad_accum micro-batches."""
    micro = list(islice(batch_stream(rows, config, random.Random(config.seed)), steps * config.grad_accum))
    return [micro[i : i + config.grad_accum] for i in range(0, len(micro), config.grad_accum)]


def _padding(steps: list[list[list[dict[str, Any]]]]) -> int:
    return sum(
        max(len(r["input_ids"]) for r in batch) - len(row["input_ids"])
        for step in steps
        for batch in step
        for row in batch
    )


def test_a_one_step_window_sorts_only_inside_each_step() -> None:
    """Every step holds the same rows as with random batches (the same gradient), sorted into its micro-batches."""
    rows = _rows()
    grouped = _steps(rows, TrainConfig(batch_size=2, grad_accum=4, length_group_steps=1), steps=12)
    plain = _steps(rows, TrainConfig(batch_size=2, grad_accum=4, group_by_length=False), steps=12)
    assert [sorted(r["row"] for b in step for r in b) for step in grouped] == [
        sorted(r["row"] for b in step for r in b) for step in plain
    ]
    for step in grouped:  # longest rows first, two by two
        lengths = [len(r["input_ids"]) for b in step for r in b]
        assert lengths == sorted(lengths, reverse=True)
    assert _padding(grouped) < _padding(plain) / 2


def test_wider_windows_group_across_steps() -> None:
    """length_group_steps=16 with one micro-batch per step: steps of similar lengths, not random samples."""
    rows = _rows()
    wide = _steps(rows, TrainConfig(batch_size=8, grad_accum=1, length_group_steps=16), steps=12)
    plain = _steps(rows, TrainConfig(batch_size=8, grad_accum=1, group_by_length=False), steps=12)
    step_rows = [sorted(r["row"] for b in step for r in b) for step in wide]
    assert step_rows != [sorted(r["row"] for b in step for r in b) for step in plain]
    assert _padding(wide) < _padding(plain) / 3
    # with one micro-batch per step and a one-step window, grouping changes nothing
    same = _steps(rows, TrainConfig(batch_size=8, grad_accum=1, length_group_steps=1), steps=12)
    assert [sorted(r["row"] for r in step[0]) for step in same] == [sorted(r["row"] for r in step[0]) for step in plain]
    assert _padding(same) == _padding(plain)


def test_every_row_once_per_epoch_and_the_order_is_seeded() -> None:
    rows = _rows(count=40)
    config = TrainConfig(batch_size=2, grad_accum=4, seed=3)
    epoch = _steps(rows, config, steps=5)
    assert sorted(r["row"] for step in epoch for b in step for r in b) == list(range(40))
    assert epoch == _steps(rows, config, steps=5)
    assert epoch != _steps(rows, TrainConfig(batch_size=2, grad_accum=4, seed=4), steps=5)
