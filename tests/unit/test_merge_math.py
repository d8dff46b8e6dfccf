"""Merge math: peft's merge equals W + (alpha / r) * B @ A, fp32 merging beats bf16 merging, and the fidelity
figures (mean KL, top-1 agreement, max |Δlogit|) are what their formulas say on logits built to differ."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(32, 24, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _adapted(r: int = 4, alpha: float = 8.0) -> torch.nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(_Net(), LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"]))
    with torch.no_grad():  # B starts at zero; give it values so the merge is not trivial
        model.base_model.model.proj.lora_B["default"].weight.normal_()
    return model


def test_merged_weight_is_w_plus_scaled_ba() -> None:
    model = _adapted(r=4, alpha=8.0)
    layer = model.base_model.model.proj
    w = layer.base_layer.weight.detach().clone()
    a = layer.lora_A["default"].weight.detach()
    b = layer.lora_B["default"].weight.detach()
    expected = w + (8.0 / 4) * b @ a
    x = torch.randn(5, 32)
    before = model(x)
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged.proj.weight, expected)
    torch.testing.assert_close(merged(x), before, atol=1e-5, rtol=1e-5)


def test_fp32_merge_then_cast_is_closer_than_merging_in_bf16() -> None:
    model = _adapted()
    layer = model.base_model.model.proj
    w = layer.base_layer.weight.detach()
    delta = 2.0 * layer.lora_B["default"].weight.detach() @ layer.lora_A["default"].weight.detach()
    exact = w.double() + delta.double()
    fp32_then_cast = (w + delta).bfloat16().double()
    bf16_merge = (w.bfloat16() + delta.bfloat16()).double()
    assert (fp32_then_cast - exact).abs().max() <= (bf16_merge - exact).abs().max()


def test_fidelity_figures_on_logits_built_to_differ() -> None:
    from tasks.merge import _agreement, _max_diff, _mean_kl

    torch.manual_seed(0)
    a = torch.randn(2, 5, 7)
    b = a.clone()
    b[0, 1] = b[0, 1].flip(-1)  # one position's distribution reversed: a different argmax there
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 4] = 0  # a padding position counts in no figure
    keep = mask.bool()
    p, q = torch.log_softmax(a[keep], -1), torch.log_softmax(b[keep], -1)
    expected_kl = float((p.exp() * (p - q)).sum(-1).mean())
    assert expected_kl > 0
    assert _mean_kl(a, b, mask) == expected_kl
    assert _mean_kl(a, a, mask) == 0.0  # identical distributions; float noise below 0 is clamped
    assert _agreement(a, b, mask) == pytest.approx(8 / 9)
    assert _max_diff(a, b, mask) == float((a[0, 1] - b[0, 1]).abs().max())
