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
    from loraforge.tasks.merge import Closeness

    torch.manual_seed(0)
    a = torch.randn(9, 7)  # 9 probe positions (padding already dropped), vocabulary 7
    b = a.clone()
    b[1] = b[1].flip(-1)  # one position's distribution reversed: a different argmax there
    answer = torch.zeros(9, dtype=torch.bool)
    answer[[1, 2]] = True  # two positions predict a labelled token, one of them the reversed one
    p, q = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    expected_kl = float((p.exp() * (p - q)).sum(-1).mean())
    assert expected_kl > 0
    # Counted over two micro-batches of positions, as the merge stage streams them
    tally, same = Closeness(), Closeness()
    for rows in (slice(0, 4), slice(4, 9)):
        tally.add(a[rows], b[rows], answer[rows])
        same.add(a[rows], a[rows], answer[rows])
    assert tally.mean_kl() == pytest.approx(expected_kl, rel=1e-6)
    assert same.mean_kl() == 0.0  # identical distributions; float noise below 0 is clamped
    assert tally.top1_agreement() == 8 / 9
    assert tally.top1_agreement(answer_only=True) == 1 / 2
    assert tally.max_abs_diff == float((a[1] - b[1]).abs().max())
    assert tally.positions == 9 and tally.answer_positions == 2


def _probe_rows(count: int, vocab: int) -> list[dict[str, list[int]]]:
    """Rows of different lengths (so micro-batches pad differently), the second half of each labelled."""
    generator = torch.Generator().manual_seed(1)
    rows = []
    for index in range(count):
        ids = torch.randint(1, vocab, (6 + 3 * index,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (len(ids) // 2) + ids[len(ids) // 2 :]})
    return rows


def _tiny_adapted(tiny_model):  # type: ignore[no-untyped-def]
    from peft import LoraConfig, get_peft_model

    from loraforge.tasks.models import load_causal_lm

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(load_causal_lm(tiny_model, "float32"), lora).eval()


def _all_at_once(model, rows, dtype: str) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """The figures as the merge stage computed them before issue 15: every probe row's logits at once."""
    from loraforge.tasks.batching import collate

    ids, labels, mask = collate(rows, 0)
    answer = torch.zeros_like(mask)
    answer[:, :-1] = (labels[:, 1:] != -100).long()
    keep, on_answer = mask.bool(), answer.bool()
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
        merged = model.merge_and_unload()
        fp32 = merged(input_ids=ids, attention_mask=mask).logits
        cast = merged.to(getattr(torch, dtype))(input_ids=ids, attention_mask=mask).logits.float()
    log_a, log_b = torch.log_softmax(reference[keep], -1), torch.log_softmax(cast[keep], -1)
    return {
        "fp32_max_abs_logit_diff": float((reference[keep] - fp32[keep]).abs().max()),
        "cast_max_abs_logit_diff": float((reference[keep] - cast[keep]).abs().max()),
        "cast_top1_agreement": float((reference[keep].argmax(-1) == cast[keep].argmax(-1)).float().mean()),
        "cast_top1_agreement_answer": float(
            (reference[on_answer].argmax(-1) == cast[on_answer].argmax(-1)).float().mean()
        ),
        "cast_mean_kl": max(float((log_a.exp() * (log_a - log_b)).sum(-1).mean()), 0.0),
        "probe_tokens": int(mask.sum()),
    }


@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_streamed_figures_equal_the_all_at_once_figures(tiny_model, tmp_path, batch_size: int) -> None:  # type: ignore[no-untyped-def]
    from loraforge.tasks.merge import measure_fidelity

    rows = _probe_rows(7, 49152)
    expected = _all_at_once(_tiny_adapted(tiny_model), rows, "bfloat16")
    merged, figures = measure_fidelity(_tiny_adapted(tiny_model), rows, 0, "bfloat16", batch_size, tmp_path)
    assert merged.dtype == torch.bfloat16
    assert figures.keys() == expected.keys()
    # Each row's logits are the same bits whatever the grouping (every micro-batch is padded to the longest row),
    # so the maxima are equal; shares and means differ only in summation (float64 over micro-batches here, one
    # float32 mean before).
    exact = ("fp32_max_abs_logit_diff", "cast_max_abs_logit_diff", "probe_tokens")
    assert {k: figures[k] for k in exact} == {k: expected[k] for k in exact}
    assert figures == pytest.approx(expected, rel=1e-6, abs=0)
    assert len(list((tmp_path / "adapter").iterdir())) == -(-len(rows) // batch_size)  # one file per micro-batch


def test_verdict_names_each_limit_broken_and_rejudges_without_measuring() -> None:
    from loraforge.tasks.merge import MergeConfig, judge_fidelity

    good = {"fp32_max_abs_logit_diff": 2e-4, "cast_top1_agreement": 0.972, "cast_mean_kl": 7e-3}
    assert judge_fidelity(good, MergeConfig(), "bfloat16") == []
    gemma_fp16 = {**good, "cast_top1_agreement": 0.379}  # measured: Gemma 3 270M merged and cast to float16
    assert judge_fidelity(gemma_fp16, MergeConfig(), "float16") == [
        "float16 top-1 agreement 0.379 < merge.min_top1_agreement=0.95"
    ]
    # re-judged with other limits, without measuring again
    assert judge_fidelity(gemma_fp16, MergeConfig(min_top1_agreement=0.3), "float16") == []
    far = {"fp32_max_abs_logit_diff": 1.0, "cast_top1_agreement": 1.0, "cast_mean_kl": 0.5}
    assert [p.split(" ")[0] for p in judge_fidelity(far, MergeConfig(), "bfloat16")] == ["fp32", "bfloat16"]


def test_advice_names_the_dtypes_that_pass_with_their_figures() -> None:
    from loraforge.tasks.merge import MergeConfig, advice

    fp32 = {"fp32_max_abs_logit_diff": 2e-4}
    others = {
        "bfloat16": {**fp32, "cast_top1_agreement": 0.991, "cast_mean_kl": 2.1e-3},
        "float32": {**fp32, "cast_top1_agreement": 1.0, "cast_mean_kl": 0.0},
    }
    assert advice(others, MergeConfig()) == (
        "measured on the same probe rows: bfloat16: top-1 0.991, mean KL 2.10e-03 (passes), "
        "float32: top-1 1.000, mean KL 0.00e+00 (passes); set merge.dtype=bfloat16"
    )
    strict = advice(others, MergeConfig(min_top1_agreement=0.999))
    assert "bfloat16: top-1 0.991, mean KL 2.10e-03 (fails too)" in strict and strict.endswith("merge.dtype=float32")
    broken = {name: {**f, "fp32_max_abs_logit_diff": 1.0} for name, f in others.items()}
    assert "no dtype passes" in advice(broken, MergeConfig())


def test_other_dtypes_are_measured_on_a_fresh_merge_against_the_same_logits(tiny_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from loraforge.tasks.merge import measure_fidelity, measure_other_dtypes

    rows = _probe_rows(5, 49152)
    _, figures = measure_fidelity(_tiny_adapted(tiny_model), rows, 0, "float16", 2, tmp_path)
    others = measure_other_dtypes(lambda: _tiny_adapted(tiny_model), rows, 0, 2, tmp_path, "float16", figures)
    assert list(others) == ["bfloat16", "float32"]
    for dtype, measured in others.items():
        expected = _all_at_once(_tiny_adapted(tiny_model), rows, dtype)
        assert measured["cast_top1_agreement"] == pytest.approx(expected["cast_top1_agreement"], rel=1e-6)
        assert measured["cast_mean_kl"] == pytest.approx(expected["cast_mean_kl"], rel=1e-5, abs=1e-12)
    assert others["float32"]["cast_max_abs_logit_diff"] == figures["fp32_max_abs_logit_diff"]


@pytest.mark.parametrize(
    ("declared", "wanted", "resolved"),
    [({"dtype": "bfloat16"}, "auto", "bfloat16"), ({"torch_dtype": "float16"}, "auto", "float16"),
     ({}, "auto", "float32"), ({"dtype": "float8_e4m3fn"}, "auto", "float32"),
     ({"dtype": "bfloat16"}, "float16", "float16")],
)  # fmt: skip
def test_auto_dtype_is_what_the_base_config_declares(tmp_path, declared, wanted, resolved) -> None:  # type: ignore[no-untyped-def]
    import json

    from loraforge.tasks.merge import resolve_dtype

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3_text", **declared}))
    assert resolve_dtype(wanted, tmp_path) == resolved
