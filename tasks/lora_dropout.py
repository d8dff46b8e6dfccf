"""LoRA dropout whose masks cost a seventh of torch's on CPU (the train stage's, issue 20 item 1).

peft drops out every adapted module's input before its A matrix (`lora_dropout`, a torch `nn.Dropout`). On CPU
torch draws that Bernoulli mask one random number per element: with LoRA on every linear layer of SmolLM2-135M
the masks were 20% of a training step (`bench/train_levers.py`, lever "LoRA dropout"), more than the attention.
Here one 64-bit random word gives four elements their 16-bit draws: an element is kept when its draw is at or
above `round(p * 65536)` of the 65536 values, so the drop probability is p rounded to 1/65536 (0.05 ->
0.0500031) and kept values are scaled by 1/(1 - that p), keeping the expected input unchanged, as torch does.
Masks stay independent per module and per call and come from torch's generator, so `torch.manual_seed` (and the
stage's saved generator state on resume) reproduces them. The mask is kept as booleans for the backward, as
torch keeps its own: no more memory than `nn.Dropout`.

Only on CPU: CUDA draws its masks in one fused kernel, and there the stage keeps peft's `nn.Dropout`.
"""

from __future__ import annotations

import functools
from typing import Any

LEVELS = 1 << 16  # values a 16-bit draw takes


def drop_threshold(p: float) -> int:
    """How many of the 65536 values of a 16-bit draw drop the element: p rounded to 1/65536."""
    return round(p * LEVELS)


def keep_mask(shape: Any, p: float, device: Any = "cpu") -> Any:
    """A boolean mask of `shape`, each element kept with probability 1 - drop_threshold(p)/65536."""
    import torch

    count = 1
    for size in shape:
        count *= int(size)
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_(-(1 << 63), None)
    draws = words.view(torch.int16)[:count].view(shape)  # signed: -32768 .. 32767, uniform
    return draws >= -(LEVELS // 2) + drop_threshold(p)


def make_dropout(p: float) -> Any:
    """An `nn.Module` doing dropout with probability p (to 1/65536) through `keep_mask`; identity in eval mode."""
    return _module_class()(p)


@functools.cache
def _module_class() -> Any:
    """The dropout module's class, built once (torch is imported only when a stage trains)."""
    import torch

    class _KeepAndScale(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any, keep: Any, scale: float) -> Any:
            ctx.save_for_backward(keep)
            ctx.scale = scale
            return torch.where(keep, x, 0).mul_(scale)  # where, not mul: no float copy of the mask

        @staticmethod
        def backward(ctx: Any, grad: Any) -> tuple[Any, None, None]:
            (keep,) = ctx.saved_tensors
            return torch.where(keep, grad, 0).mul_(ctx.scale), None, None

    class LoraDropout(torch.nn.Module):
        def __init__(self, p: float) -> None:
            super().__init__()
            self.p = p
            self.scale = LEVELS / (LEVELS - drop_threshold(p))

        def forward(self, x: Any) -> Any:
            if not self.training or drop_threshold(self.p) == 0:
                return x
            return _KeepAndScale.apply(x, keep_mask(x.shape, self.p, x.device), self.scale)

        def extra_repr(self) -> str:
            return f"p={self.p}, masks from 16-bit draws"

    return LoraDropout


def use_fast_lora_dropout(model: Any) -> int:
    """Swap every peft LoRA dropout (`lora_dropout[...]`, an `nn.Dropout`) in `model` for `make_dropout`'s, in
    place; returns how many were swapped. Adapter weights, configs and saved files are untouched."""
    import torch

    swapped = 0
    for module in model.modules():
        table = getattr(module, "lora_dropout", None)
        if not isinstance(table, torch.nn.ModuleDict):
            continue
        for name, dropout in list(table.items()):
            if isinstance(dropout, torch.nn.Dropout) and 0 < dropout.p < 1:
                table[name] = make_dropout(dropout.p)
                swapped += 1
    return swapped
