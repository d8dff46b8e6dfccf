"""Answer generation for eval, quantize and pull: greedy by default, seeded sampling when asked."""

from __future__ import annotations

from pathlib import Path

from loraforge.tasks.batching import generate_answers
from loraforge.tasks.models import load_causal_lm, load_tokenizer

CONVERSATIONS = [[{"role": "user", "content": f"ticket {i}: my parcel is late"}] for i in range(3)]


def test_greedy_is_the_default_and_sampling_is_seeded(tiny_model: Path) -> None:
    model, tokenizer = load_causal_lm(tiny_model), load_tokenizer(tiny_model)
    greedy = generate_answers(model, tokenizer, CONVERSATIONS, max_new_tokens=6, batch_size=2)
    assert greedy == generate_answers(model, tokenizer, CONVERSATIONS, max_new_tokens=6, batch_size=3)
    sampled = [generate_answers(model, tokenizer, CONVERSATIONS, 6, 2, temperature=1.5, seed=s) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]  # the same seed, the same answers
    assert sampled[0] != greedy and sampled[2] != greedy  # sampling really samples
    assert sampled[0] != sampled[2]  # another seed, other answers
    assert tokenizer.padding_side == "right"  # restored for training-style batching


def test_generation_stops_at_the_templates_stop_tokens(tiny_model: Path) -> None:
    """Besides EOS, answers end at the tokenizer's stop_token_ids (a named template's stop tokens, as eval and
    quantize set them from the data artifact)."""
    from loraforge.tasks.data import stop_token_ids

    model, tokenizer = load_causal_lm(tiny_model), load_tokenizer(tiny_model)
    free = generate_answers(model, tokenizer, CONVERSATIONS[:1], 12, 1, temperature=1.5, seed=1)[0]
    words = tokenizer(free, add_special_tokens=False)["input_ids"]  # the (random) model's answer, as tokens
    assert len(words) > 2
    assert stop_token_ids(tokenizer, ["<|im_end|>", "### Instruction:"]) == [tokenizer.convert_tokens_to_ids(
        "<|im_end|>")]  # several tokens: not a stop id  # fmt: skip
    tokenizer.stop_token_ids = words  # the same seed samples the same first token, which now ends the answer
    stopped = generate_answers(model, tokenizer, CONVERSATIONS[:1], 12, 1, temperature=1.5, seed=1)[0]
    assert free.startswith(stopped) and len(stopped) < len(free)
