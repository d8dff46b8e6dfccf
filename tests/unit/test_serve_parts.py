"""`loraforge serve`'s parts that need no model: its argument errors (all at once, exit 1, no traceback) and the
streamer that splits one batch's generated tokens into each request's text, stop and length."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from loraforge.flows.cli import main
from loraforge.tasks.serve import Request, RowStreamer


def test_bad_serve_arguments_are_listed_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["serve", "--adapter", "router", "--adapter", "a=org/x", "--adapter", "a=org/y", "--max-batch", "0"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "--adapter 'router': write NAME=ORG/REPO[@REVISION]" in err
    assert "--adapter 'a=org/y': the name 'a' is given twice" in err and "--max-batch 0: give 1 or more" in err


class _Letters:
    """A tokenizer whose token i is the letter chr(96 + i)."""

    def decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(96 + t) for t in tokens)


def test_each_row_gets_its_own_text_and_stops_at_its_own_stop_or_length() -> None:
    loop = asyncio.new_event_loop()
    try:
        rows = [Request("a", [1], 5, 0.0, 1.0, None, frozenset({9}), _Letters(), loop),
                Request("b", [1], 2, 0.0, 1.0, None, frozenset({9}), _Letters(), loop),
                Request("base", [1], 5, 0.0, 1.0, None, frozenset({9}), _Letters(), loop)]  # fmt: skip
        streamer = RowStreamer(rows)
        streamer.put(torch.tensor([[1], [1], [1]]))  # the prompt
        for step in ([1, 2, 3], [2, 3, 9], [9, 4, 0], [5, 5, 5]):
            streamer.put(torch.tensor(step))
            done = streamer(torch.zeros(3, 1), None)
        streamer.end()
        loop.run_until_complete(asyncio.sleep(0))
        events: list[list[tuple[str, Any]]] = []
        for request in rows:
            got = []
            while not request.events.empty():
                got.append(request.events.get_nowait())
            events.append(got)
    finally:
        loop.close()
    assert bool(done.all())  # every row finished: generation stops
    assert events[0] == [("text", "a"), ("text", "b"), ("done", {"finish_reason": "stop", "completion_tokens": 2})]
    assert events[1] == [("text", "b"), ("text", "c"), ("done", {"finish_reason": "length", "completion_tokens": 2})]
    assert events[2] == [("text", "c"), ("done", {"finish_reason": "stop", "completion_tokens": 1})]
