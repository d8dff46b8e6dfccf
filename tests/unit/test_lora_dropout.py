"""The train stage's LoRA dropout on CPU (tasks/lora_dropout.py): torch's dropout, with masks from 16-bit draws."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from loraforge.tasks.lora_dropout import drop_threshold, keep_mask, make_dropout, use_fast_lora_dropout  # noqa: E402


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_the_keep_rate_is_one_minus_p_to_a_sixty_five_thousandth(p: float) -> None:
    torch.manual_seed(0)
    n = 1 << 22
    kept = keep_mask((n,), p).double().mean().item()
    expected = 1 - drop_threshold(p) / 65536
    assert abs(expected - (1 - p)) <= 0.5 / 65536
    assert abs(kept - expected) < 6 * math.sqrt(p * (1 - p) / n)  # six standard deviations


def test_masks_are_independent_between_calls_and_elements_and_follow_the_seed() -> None:
    torch.manual_seed(3)
    a, b = keep_mask((512, 576), 0.5), keep_mask((512, 576), 0.5)
    agree = (a == b).double().mean().item()
    assert abs(agree - 0.5) < 0.01  # two independent fair masks agree on half the elements
    neighbours = (a[:, 1:] == a[:, :-1]).double().mean().item()  # the four draws of one word are independent
    assert abs(neighbours - 0.5) < 0.01
    torch.manual_seed(3)
    assert torch.equal(keep_mask((512, 576), 0.5), a)


def test_forward_and_backward_are_the_mask_times_the_scale_and_eval_is_the_identity() -> None:
    dropout = make_dropout(0.05).train()
    x = torch.randn(4, 70, 576, requires_grad=True)
    torch.manual_seed(1)
    out = dropout(x)
    torch.manual_seed(1)
    keep = keep_mask(x.shape, 0.05)
    scale = 65536 / (65536 - drop_threshold(0.05))
    assert torch.equal(out, x.detach() * keep * scale)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    assert x.grad is not None and torch.equal(x.grad, weights * keep * scale)
    dropout.eval()
    assert dropout(x) is x
    assert make_dropout(0.0).train()(x) is x


def test_the_stage_swaps_peft_s_dropout_on_cpu_and_nothing_it_saves_changes(tiny_model: Path) -> None:
    from loraforge.tasks.train import TrainConfig, trainable_model

    model, targets = trainable_model(TrainConfig(target_modules=["q_proj", "v_proj"], dropout=0.1), tiny_model, "cpu")
    kinds = {type(m).__name__ for m in model.modules() if type(m).__name__ in {"Dropout", "LoraDropout"}}
    assert kinds == {"LoraDropout"}
    layers = model.get_base_model().config.num_hidden_layers
    swapped = [m for m in model.modules() if type(m).__name__ == "LoraDropout"]
    assert len(swapped) == 2 * layers and {m.p for m in swapped} == {0.1}
    assert all("dropout" not in name for name in model.state_dict())
    assert use_fast_lora_dropout(model) == 0  # swapped once: a second call finds nothing to swap
    plain, _ = trainable_model(TrainConfig(target_modules=["q_proj", "v_proj"], dropout=0.0), tiny_model, "cpu")
    assert use_fast_lora_dropout(plain) == 0  # p = 0: peft's Identity stays
