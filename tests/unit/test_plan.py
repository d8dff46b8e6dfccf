"""`loraforge plan` on the tiny model: parameter counts and adapter file size against a real peft model (weights
loaded, adapter saved), the safetensors size formula, the memory terms' arithmetic, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraforge.tasks.config import DEMO_CONFIG, load_config
from loraforge.tasks.plan import (
    Plan,
    activation_floats_per_token_layer,
    format_plan,
    plan_training,
    read_architecture,
    safetensors_bytes,
)

VARIANTS = [
    ["train.target_modules=[q_proj,v_proj]", "train.r=8"],
    ["train.target_modules=attention", "train.r=4", "train.use_dora=true"],
    ["train.target_modules=attention+mlp", "train.r=32", "train.use_rslora=true", "train.dropout=0",
     "train.modules_to_save=[lm_head]"],
]  # fmt: skip


def _config(tiny_model: Path, *overrides: str):  # type: ignore[no-untyped-def]
    return load_config(DEMO_CONFIG, [f"base_model={tiny_model}", *overrides])


def _real_peft_model(tiny_model: Path, plan: Plan, config):  # type: ignore[no-untyped-def]
    """The model the train stage trains: weights loaded, LoRA applied by peft."""
    from peft import LoraConfig, get_peft_model

    from loraforge.tasks.models import load_causal_lm

    train = config.train
    lora = LoraConfig(
        r=train.r, lora_alpha=train.alpha, lora_dropout=train.dropout, target_modules=plan.target_modules,
        use_dora=train.use_dora, use_rslora=train.use_rslora, bias=train.bias,
        modules_to_save=list(train.modules_to_save) or None, task_type="CAUSAL_LM",
    )  # fmt: skip
    return get_peft_model(load_causal_lm(tiny_model), lora)


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: " ".join(o))
def test_counts_and_file_size_match_peft_on_real_weights(
    tiny_model: Path, tmp_path: Path, overrides: list[str]
) -> None:
    config = _config(tiny_model, *overrides)
    plan = plan_training(config)
    model = _real_peft_model(tiny_model, plan, config)

    assert (plan.trainable_params, plan.peft_total_params) == model.get_nb_trainable_parameters()
    assert sum(plan.params_per_module.values()) == plan.trainable_params
    model.save_pretrained(tmp_path / "adapter")
    assert plan.adapter_file_bytes == (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size


def test_per_module_counts_are_r_times_in_plus_out_per_layer(tiny_model: Path) -> None:
    plan = plan_training(_config(tiny_model, "train.target_modules=all-linear", "train.r=8"))
    arch = plan.architecture  # tiny: 2 layers, hidden 64, intermediate 128, 4 heads, 2 kv heads (head dim 16)
    kv = arch.kv_heads * arch.head_dim
    shapes = {"q_proj": (64, 64), "k_proj": (64, kv), "v_proj": (64, kv), "o_proj": (64, 64),
              "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}  # fmt: skip
    expected = {name: arch.layers * 8 * (i + o) for name, (i, o) in shapes.items()}
    assert plan.params_per_module == expected
    assert plan.total_params == 3_219_776  # embeddings tied with the head, counted once (as peft does)


def test_modules_to_save_and_dora_are_their_own_entries(tiny_model: Path) -> None:
    plan = plan_training(_config(tiny_model, "train.target_modules=[q_proj]", "train.modules_to_save=[lm_head]"))
    assert plan.params_per_module["lm_head (modules_to_save)"] == 49152 * 64
    dora = plan_training(_config(tiny_model, "train.target_modules=[q_proj]", "train.use_dora=true", "train.r=4"))
    # DoRA adds one magnitude per output feature to each adapted layer
    assert dora.params_per_module["q_proj"] == 2 * (4 * (64 + 64) + 64)


def test_qlora_4bit_counts_match_a_real_4bit_model(tiny_model: Path) -> None:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from loraforge.tasks.models import load_base_as_trained

    config = _config(tiny_model, "train.target_modules=all-linear", "train.quantization=4bit")
    plan = plan_training(config)
    model = prepare_model_for_kbit_training(load_base_as_trained(tiny_model, config.train.model_dump()))
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=plan.target_modules))
    assert (plan.trainable_params, plan.peft_total_params) == model.get_nb_trainable_parameters()
    four, full = plan.memory["qlora-4bit"].components_mb, plan.memory["lora"].components_mb
    linear = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)  # the tiny model's quantized weights
    assert four["weights"] == pytest.approx(full["weights"] - linear * (4 - 0.5 - 1 / 64 - 4 / 16384) / 2**20, abs=0.1)


def test_safetensors_size_formula_is_exact() -> None:
    import torch
    from safetensors.torch import save

    tensors = {"b.weight": torch.zeros(3, 5), "a.bias": torch.zeros(7, dtype=torch.bfloat16),
               "z.long_name.lora_A.weight": torch.zeros(16, 576), "m": torch.zeros(1, dtype=torch.float16)}  # fmt: skip
    shapes = {n: (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in tensors.items()}
    assert safetensors_bytes(shapes) == len(save(tensors, metadata={"format": "pt"}))
    assert safetensors_bytes(shapes, metadata={}) != safetensors_bytes(shapes)


def test_activation_count_for_smollm2_shape() -> None:
    from loraforge.tasks.plan import Architecture

    smol = Architecture("llama", 30, 576, 1536, 9, 3, 64, 49152, True)
    # 11h + n + 4i with no adapters; q,v LoRA at r=16 with dropout: 2 x (576 + 576) on CPU (output + float noise),
    # 1.25 x on CUDA (output + 1-byte mask), + 2 x 16 for A's outputs; no dropout: no copy at all
    base = 11 * 576 + 9 + 4 * 1536
    assert activation_floats_per_token_layer(smol, 0, 0, 16, 0.05) == base
    assert activation_floats_per_token_layer(smol, 1152, 2, 16, 0.05) == base + 2304 + 32
    assert activation_floats_per_token_layer(smol, 1152, 2, 16, 0.05, device="cuda") == base + 1440 + 32
    assert activation_floats_per_token_layer(smol, 1152, 2, 16, 0.0) == base + 32


def test_memory_grows_with_batch_and_length_and_shrinks_with_checkpointing(tiny_model: Path) -> None:
    small = plan_training(_config(tiny_model, "train.batch_size=2"), seq_len=64)
    wide = plan_training(_config(tiny_model, "train.batch_size=4"), seq_len=64)
    long = plan_training(_config(tiny_model, "train.batch_size=2"), seq_len=128)
    checkpointed = plan_training(_config(tiny_model, "train.batch_size=2", "train.gradient_checkpointing=true"),
                                 seq_len=128)  # fmt: skip
    act = {n: p.memory["lora"].components_mb["activations"] for n, p in
           {"small": small, "wide": wide, "long": long, "ckpt": checkpointed}.items()}  # fmt: skip
    assert act["wide"] == pytest.approx(2 * act["small"], rel=0.01)
    assert act["long"] == pytest.approx(2 * act["small"], rel=0.01)
    assert act["ckpt"] < act["long"] / 1.5  # 2 layers: inputs + one layer instead of two layers
    assert "lower bound" in format_plan(checkpointed) and "lower bound" not in format_plan(long)
    full, lora = small.memory["full"], small.memory["lora"]
    assert full.trainable_params == small.total_params
    assert full.components_mb["adamw_states"] == pytest.approx(small.total_params * 8 / 2**20, abs=0.1)
    assert lora.components_mb["adamw_states"] == pytest.approx(small.trainable_params * 8 / 2**20, abs=0.1)
    assert lora.components_mb["grads"] == pytest.approx(small.trainable_params * 4 / 2**20, abs=0.1)


def test_architecture_refuses_a_model_without_decoder_fields(tmp_path: Path) -> None:
    from loraforge.tasks.errors import StageError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 512, "vocab_size": 100}))
    with pytest.raises(StageError, match="hidden_size, intermediate_size, num_hidden_layers, num_attention_heads"):
        read_architecture(tmp_path)


def test_cli_prints_the_plan_and_writes_json(tiny_model: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from loraforge.flows.cli import main

    out = tmp_path / "plan.json"
    code = main(
        ["plan", str(DEMO_CONFIG), f"base_model={tiny_model}", "train.r=8", "--seq-len", "96", "--json", str(out)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["seq_len"] == 96 and saved["trainable_params"] == 2 * 8 * 1024  # r x (in + out) of 7 layers, 2 layers
    assert f"{saved['trainable_params']:,}" in printed and "qlora-4bit" in printed and "full" in printed
    assert f"{saved['adapter_file_bytes']:,} bytes" in printed


def test_cli_unknown_target_module_lists_the_valid_names(tiny_model: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from loraforge.flows.cli import main

    assert main(["plan", str(DEMO_CONFIG), f"base_model={tiny_model}", "train.target_modules=[qkv]"]) == 1
    err = capsys.readouterr().err
    assert "'qkv' not found" in err and "q_proj" in err and "Traceback" not in err


def test_child_peak_is_its_own_not_the_parents() -> None:
    """A child's ru_maxrss starts at its parent's RSS high-water (Linux, at exec); the measured peak must not."""
    import sys

    from loraforge.tasks.plan import run_measuring_peak_rss

    ballast = bytearray(600 * 2**20)
    ballast[::4096] = b"\x01" * len(ballast[::4096])  # touch every page: this process is now > 600 MB
    # The child touches every page it allocates (an untouched bytearray is not resident) and lives a little
    # longer than the 50 ms poll interval after its peak, as a training run does.
    child = (
        "import resource, time; x = bytearray(200 * 2**20); x[::4096] = b'\\x01' * len(x[::4096]); time.sleep(0.3); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    code, peak_mb, output = run_measuring_peak_rss([sys.executable, "-c", child])
    assert code == 0
    assert int(output.strip()) // 1024 > 600  # what the child's own ru_maxrss claims
    assert 200 < peak_mb < 400  # its VmHWM: the 200 MB it allocated plus the interpreter
    del ballast


def test_bf16_base_halves_the_weights_and_is_marked_when_configured(tiny_model: Path) -> None:
    fp32 = plan_training(_config(tiny_model))
    bf16 = plan_training(_config(tiny_model, "train.precision=bf16"))
    assert (fp32.configured_mode, bf16.configured_mode) == ("lora", "lora-bf16")
    full, half = bf16.memory["lora"].components_mb, bf16.memory["lora-bf16"].components_mb
    assert half["weights"] == pytest.approx(full["weights"] / 2, abs=0.1)
    assert half["adapter_weights"] == full["adapter_weights"] and half["adamw_states"] == full["adamw_states"]
    assert "lora-bf16 *" in format_plan(bf16)


def test_every_stage_has_a_peak_and_the_checks_grow_with_their_micro_batch(tiny_model: Path) -> None:
    from loraforge.tasks.plan import EVAL_LOGIT_COPIES, MERGE_LOGIT_COPIES, STAGES

    plan = plan_training(_config(tiny_model, "merge.probe_rows=16", "merge.probe_batch_size=4"), seq_len=64)
    more_rows = plan_training(_config(tiny_model, "merge.probe_rows=64", "merge.probe_batch_size=4"), seq_len=64)
    wider = plan_training(_config(tiny_model, "merge.probe_rows=16", "merge.probe_batch_size=8"), seq_len=64)
    assert list(plan.stages) == list(STAGES)
    assert plan.stages["train"].peak_rss_mb == plan.memory[plan.configured_mode].peak_rss_mb
    row = 64 * 49152 * 4 / 2**20  # one probe row's logits, MiB
    merge = plan.stages["merge"]
    assert merge.components_mb["logits"] == pytest.approx(MERGE_LOGIT_COPIES * 4 * row, abs=0.1)
    assert merge.peak_rss_mb == pytest.approx(sum(merge.components_mb.values()), abs=0.5)
    # the probe rows wait on disk: more rows cost disk, not memory; a wider micro-batch costs memory
    assert more_rows.stages["merge"].peak_rss_mb == merge.peak_rss_mb
    assert more_rows.stages["merge"].scratch_disk_mb == pytest.approx(4 * merge.scratch_disk_mb, abs=0.5)
    assert wider.stages["merge"].components_mb["logits"] == pytest.approx(2 * merge.components_mb["logits"], abs=0.1)
    config = _config(tiny_model)
    eval_logits = EVAL_LOGIT_COPIES * config.eval.batch_size * 64 * 49152 * 4 / 2**20
    assert plan.stages["eval"].components_mb["logits"] == pytest.approx(eval_logits, abs=0.1)
    assert plan.stages["quantize"].scratch_disk_mb == pytest.approx(config.quantize.fidelity_rows * row, abs=0.1)
    printed = format_plan(plan)
    assert "peak memory per stage" in printed
    for stage in STAGES:
        assert f"\n  {stage:<12}{plan.stages[stage].peak_rss_mb / 1024:>10.2f} GiB" in printed
    saved = plan.to_json()["stages"]
    assert saved["merge"]["scratch_disk_mb"] == merge.scratch_disk_mb
