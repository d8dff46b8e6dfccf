"""Train-stage variants on the tiny model: QLoRA 4-bit/8-bit on CPU (trained, evaluated and merged as trained),
DoRA, rsLoRA, LoRA+, target-module presets, seed determinism, and no silent fallback when quantization
cannot run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from test_train_variants_helper import SMALL
from test_train_variants_helper import train as _train

from loraforge.tasks.artifacts import Artifact, ArtifactStore, sha256_file
from loraforge.tasks.config import DEMO_CONFIG, load_config
from loraforge.tasks.errors import StageError

pytestmark = pytest.mark.integration


def _inputs(tiny_model: Path, store: ArtifactStore) -> tuple[Artifact, Artifact]:
    from loraforge.tasks.data import prepare_data
    from loraforge.tasks.models import provision_base

    config = load_config(DEMO_CONFIG, [f"base_model={tiny_model}", *SMALL])
    base = provision_base(str(tiny_model), store)
    return base, prepare_data(config.data, base, store)


def _adapter_config(train: Artifact) -> dict:
    return json.loads((train.file("adapter") / "adapter_config.json").read_text())


def test_same_config_and_seed_give_the_same_adapter_bytes(tiny_model: Path, tmp_path: Path) -> None:
    one = _train(tiny_model, ArtifactStore(tmp_path / "one"))
    two = _train(tiny_model, ArtifactStore(tmp_path / "two"))
    assert one.key == two.key
    weights = "adapter_model.safetensors"
    assert sha256_file(one.file("adapter") / weights) == sha256_file(two.file("adapter") / weights)
    other_seed = _train(tiny_model, ArtifactStore(tmp_path / "three"), "train.seed=7")
    assert sha256_file(other_seed.file("adapter") / weights) != sha256_file(one.file("adapter") / weights)


def test_qlora_4bit_trains_evaluates_and_merges_as_trained(tiny_model: Path, store: ArtifactStore) -> None:
    from loraforge.tasks.evaluate import EvalConfig, evaluate_adapter
    from loraforge.tasks.merge import MergeConfig, merge_adapter

    train = _train(tiny_model, store, "train.quantization=4bit", "train.compute_dtype=bfloat16")
    assert train.manifest["config"]["quantization"] == "4bit"
    assert train.metrics["trainable_params"] > 0
    base, data = _inputs(tiny_model, store)
    evaluated = evaluate_adapter(EvalConfig(max_rows=4, gate=["loss > 0"]), base, data, train, store)
    assert evaluated.metrics["loss"] > 0

    merged = merge_adapter(MergeConfig(probe_rows=4), base, data, train, store)
    assert merged.manifest["merge_policy"].startswith("fp32 merge onto dequant(quant(W)) with the train stage's 4bit")
    # merged onto the weights training saw: close to the bitsandbytes model (bf16 compute is the only gap)
    assert merged.metrics["vs_trained_top1_agreement"] >= 0.9
    original = merge_adapter(MergeConfig(probe_rows=4, qlora_base="original"), base, data, train, store)
    assert original.manifest["merge_policy"].startswith("fp32 merge onto the original base weights")
    assert original.metrics["vs_trained_mean_kl"] > merged.metrics["vs_trained_mean_kl"]


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_qlora_4bit_gradients_are_the_same_after_a_validation_pass(tiny_model: Path, compute_dtype: str) -> None:
    """The train stage measures validation loss (eval mode, no grad) before and while training. bitsandbytes
    repacks 4-bit CPU weights for inference on such a pass and its backward then gets the input gradients
    wrong: QLoRA hardly learned (SmolLM2, 16 steps: val loss 7.0 -> 6.7, where LoRA reaches 0.6). The model
    the train stage builds must give the same gradients with and without that pass."""
    import torch

    from loraforge.tasks.batching import collate, labelled_token_losses, mean_loss
    from loraforge.tasks.train import TrainConfig, trainable_model

    config = TrainConfig(quantization="4bit", compute_dtype=compute_dtype, dropout=0, init="gaussian")
    generator = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": [-100] * 6 + ids[6:]}
            for ids in torch.randint(3, 200, (4, 24), generator=generator).tolist()]  # fmt: skip

    def gradients(validate_first: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model, _ = trainable_model(config, tiny_model, "cpu")
        if validate_first:
            mean_loss(model, rows, 2, pad_id=0)
        model.train()
        ids, labels, mask = collate(rows, 0)
        labelled_token_losses(model, ids, mask, labels)[0].sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}

    plain, validated = gradients(False), gradients(True)
    assert plain.keys() == validated.keys() and len(plain) > 0
    differing = [n for n in plain if not torch.equal(plain[n], validated[n])]
    assert differing == [], f"{len(differing)} of {len(plain)} adapter gradients change after a validation pass"


def test_micro_batches_of_a_step_accumulate_the_gradient_of_one_batch(tiny_model: Path) -> None:
    """A step run as grad_accum micro-batches with uneven numbers of labelled tokens gets the loss and the
    gradient of one batch of all its rows: the mean over the step's labelled tokens, not of micro-batch means."""
    import torch

    from loraforge.tasks.train import TrainConfig, accumulate_gradients, collate_micro_batch, trainable_model

    generator = torch.Generator().manual_seed(0)
    rows = []
    for length, prompt in [(30, 28), (12, 4), (24, 6), (18, 16), (9, 3), (27, 25)]:  # 2 to 18 labelled tokens
        ids = torch.randint(3, 200, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})

    def step(bounds: list[tuple[int, int]]) -> tuple[float, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model, _ = trainable_model(TrainConfig(dropout=0), tiny_model, "cpu")
        with torch.no_grad():  # B starts at zero, which would leave A without a gradient
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
        model.train()
        loss = accumulate_gradients(model, [collate_micro_batch(rows[i:j], 0, False) for i, j in bounds], "cpu")
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole_loss, whole = step([(0, 6)])
    split_loss, split = step([(0, 2), (2, 4), (4, 6)])
    assert split_loss == pytest.approx(whole_loss, rel=1e-5)
    assert whole.keys() == split.keys() and len(whole) > 0
    errors = {n: float((split[n] - whole[n]).norm() / whole[n].norm()) for n in whole}
    assert max(errors.values()) < 1e-4, errors


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory mappings (Linux)")
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_a_quantized_load_keeps_no_mapping_of_the_fp32_file(tiny_model: Path, tmp_path: Path, bits: str) -> None:
    """A 4/8-bit load touches the whole fp32 safetensors file; while any tensor (the embedding) points into its
    mapping, all those pages stay resident (SmolLM2: 517 MB). The loader copies those tensors out instead."""
    import shutil

    import torch

    from loraforge.tasks.models import load_base_as_trained

    folder = shutil.copytree(tiny_model, tmp_path / "model")  # a path no other test has mapped
    model = load_base_as_trained(folder, {"quantization": bits})
    weights = str((folder / "model.safetensors").resolve())
    assert [line for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(weights)] == []
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
    with torch.no_grad():  # and still the same model
        reference = load_base_as_trained(tiny_model, {"quantization": bits})
        ids = torch.tensor([[5, 17, 42, 9]])
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantization_roundtrip_equals_what_bitsandbytes_loads(tiny_model: Path, bits: str) -> None:
    import torch

    from loraforge.tasks.merge import quantization_roundtrip
    from loraforge.tasks.models import load_base_as_trained, load_causal_lm

    settings = {"quantization": bits, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}
    loaded = load_base_as_trained(tiny_model, settings)
    model = load_causal_lm(tiny_model)
    quantization_roundtrip(model, settings)
    ours = dict(model.named_modules())
    checked = 0
    for name, module in loaded.named_modules():
        if type(module).__name__ == "Linear4bit":
            import bitsandbytes.functional as bnbf

            theirs = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        elif type(module).__name__ == "Linear8bitLt":
            theirs = module.weight.CB.float() * module.weight.SCB.float()[:, None] / 127
        else:
            continue
        assert torch.equal(theirs, ours[name].weight.data.float()), name
        checked += 1
    assert checked == 14  # 2 layers x (4 attention + 3 mlp); the tied output head stays unquantized


def test_dora_rslora_and_loraplus(tiny_model: Path, store: ArtifactStore) -> None:
    plain = _train(tiny_model, store)
    dora = _train(tiny_model, store, "train.use_dora=true", "train.use_rslora=true", "train.loraplus_lr_ratio=16")
    settings = _adapter_config(dora)
    assert settings["use_dora"] is True and settings["use_rslora"] is True
    # DoRA adds one magnitude vector per adapted layer: out_features values each
    assert dora.metrics["trainable_params"] > plain.metrics["trainable_params"]
    assert dora.key != plain.key

    from loraforge.tasks.evaluate import EvalConfig
    from loraforge.tasks.merge import MergeConfig, merge_adapter
    from loraforge.tasks.quantize import QuantizeConfig, quantize_gguf

    base, data = _inputs(tiny_model, store)
    merged = merge_adapter(MergeConfig(probe_rows=4), base, data, dora, store)  # DoRA merges like LoRA
    with pytest.raises(StageError, match=r"llama.cpp's LoRA GGUF cannot hold DoRA magnitudes; drop lora_f16"):
        quantize_gguf(QuantizeConfig(types=["lora_f16"], probe_rows=2, fidelity_rows=2), "t", EvalConfig(), base, data,
                      dora, merged, store)  # fmt: skip


def test_target_module_presets_resolve_on_the_model(tiny_model: Path) -> None:
    from loraforge.tasks.models import load_causal_lm
    from loraforge.tasks.train import resolve_target_modules

    model = load_causal_lm(tiny_model)
    assert resolve_target_modules(model, "attention") == ["k_proj", "o_proj", "q_proj", "v_proj"]
    everything = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert resolve_target_modules(model, "attention+mlp") == everything
    assert resolve_target_modules(model, "all-linear") == everything  # lm_head excluded
    with pytest.raises(StageError, match=r"'qkv' not found in the model's linear layers; valid names: down_proj, "):
        resolve_target_modules(model, ["q_proj", "qkv"])


def test_preset_is_recorded_resolved(tiny_model: Path, store: ArtifactStore) -> None:
    train = _train(tiny_model, store, "train.target_modules=attention")
    assert train.manifest["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert sorted(_adapter_config(train)["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_quantization_that_cannot_run_stops_instead_of_falling_back(
    tiny_model: Path, store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as on a machine without bitsandbytes
    with pytest.raises(StageError) as error:
        _train(tiny_model, store, "train.quantization=4bit")
    message = str(error.value)
    assert message.startswith("train.quantization=4bit cannot run on this machine (cpu): ")
    assert "loraforge does not fall back to full precision" in message
    assert not (Path(store.root) / "train").exists() or not any((Path(store.root) / "train").iterdir())


def _train_in_subprocess(tiny_model: Path, store_dir: Path, crash_after: int | None, *overrides: str) -> int:
    import subprocess

    code = (
        "import sys; sys.path.insert(0, 'tests'); from pathlib import Path;"
        "from tasks.artifacts import ArtifactStore; from test_train_variants_helper import train;"
        f"train(Path({str(tiny_model)!r}), ArtifactStore({str(store_dir)!r}), *sys.argv[1:], "
        f"kill_after_step={crash_after or 0})"
    )
    return subprocess.run([sys.executable, "-c", code, *overrides], cwd=Path(__file__).parents[2]).returncode


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])  # the states resume through weights_only loading
def test_resume_after_a_kill_gives_the_same_adapter(tiny_model: Path, tmp_path: Path, optimizer: str) -> None:
    settings = ["train.max_steps=8", "train.save_every=2", "train.eval_every=4", f"train.optimizer={optimizer}"]
    assert _train_in_subprocess(tiny_model, tmp_path / "killed", 5, *settings) == 137
    checkpoints = sorted(p.name for p in (tmp_path / "killed" / ".checkpoints").glob("train-*/step-*"))
    assert checkpoints == ["step-0000002", "step-0000004"]  # the newest two; step 5 was never saved
    assert not (tmp_path / "killed" / "train").exists()

    resumed = _train(tiny_model, ArtifactStore(tmp_path / "killed"), *settings)
    straight = _train(tiny_model, ArtifactStore(tmp_path / "straight"), *settings)
    weights = "adapter_model.safetensors"
    assert sha256_file(resumed.file("adapter") / weights) == sha256_file(straight.file("adapter") / weights)

    def learning(train: Artifact) -> list[dict]:  # the history without wall-clock figures
        rows = [json.loads(line) for line in train.file("history.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "rss_mb")} for r in rows]

    assert learning(resumed) == learning(straight)
    assert [r["step"] for r in learning(resumed)] == [4, 5, 8]  # eval at 4 and 8, a log line every 5
    assert not any((tmp_path / "killed" / ".checkpoints").glob("train-*"))  # cleaned up once the artifact exists


def test_early_stopping_keeps_the_best_weights(tiny_model: Path, store: ArtifactStore) -> None:
    settings = [
        "train.max_steps=30", "train.eval_every=2", "train.early_stopping_patience=2",
        "train.early_stopping_min_delta=0.01", "train.learning_rate=1.0", "train.scheduler=constant",
    ]  # fmt: skip
    train = _train(tiny_model, store, *settings)
    history = [json.loads(line) for line in train.file("history.jsonl").read_text().splitlines()]
    losses = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    best_step, best_loss = losses[0]
    for step, loss in losses[1:]:  # the last improvement by more than min_delta
        if loss < best_loss - 0.01:
            best_step, best_loss = step, loss
    assert train.metrics["best_step"] == best_step < losses[-1][0]
    assert train.metrics["steps_done"] == losses[-1][0] == losses.index((best_step, best_loss)) * 2 + 2 + 4 < 30
    assert train.metrics["val_loss"] == pytest.approx(best_loss, abs=1e-4)  # the best weights were kept


def test_early_stopping_needs_eval_every() -> None:
    from loraforge.tasks.errors import ConfigError

    with pytest.raises(ConfigError, match="early_stopping_patience needs eval_every"):
        load_config(DEMO_CONFIG, ["train.early_stopping_patience=2"])


def test_packing_trains_without_padding_and_records_the_curve(tiny_model: Path, store: ArtifactStore) -> None:
    plain = _train(tiny_model, store, "train.group_by_length=false", "train.share_prompt_prefix=false")
    packed = _train(tiny_model, store, "train.packing=true", "train.max_steps=2")
    assert packed.key != plain.key
    assert packed.manifest["packed_sequences"] < plain.manifest["packed_sequences"] == 24  # data.max_rows
    assert packed.metrics["padding_share"] < plain.metrics["padding_share"]
    assert packed.metrics["val_loss"] < packed.metrics["val_loss_before"]
    history = [json.loads(line) for line in packed.file("history.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "rss_mb"} <= set(history[-1])
    curve = packed.file("loss_curve.png").read_bytes()
    assert curve.startswith(b"\x89PNG\r\n\x1a\n") and len(curve) > 10_000


def test_a_shared_prompt_prefix_computed_once_trains_the_same_adapter(tiny_model: Path, store: ArtifactStore) -> None:
    from safetensors.torch import load_file

    settings = ["train.dropout=0", "train.max_steps=4", "train.log_every=1"]
    shared = _train(tiny_model, store, *settings)  # the default: the prefix once per micro-batch
    whole = _train(tiny_model, store, *settings, "train.share_prompt_prefix=false")  # every row computed whole
    assert shared.key != whole.key and whole.metrics["shared_prefix_share"] == 0
    assert shared.metrics["shared_prefix_share"] > 0.3  # the demo's system prompt, once per micro-batch of 4
    assert shared.metrics["padding_share"] == 0 < whole.metrics["padding_share"]
    assert shared.metrics["tokens"] == whole.metrics["tokens"]  # the same rows trained on

    def losses(train: Artifact) -> list[float]:
        lines = train.file("history.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines]

    assert len(losses(shared)) == 4 and losses(shared) == pytest.approx(losses(whole), rel=1e-4)
    assert shared.metrics["val_loss"] == pytest.approx(whole.metrics["val_loss"], rel=1e-4)
    weights = "adapter/adapter_model.safetensors"
    a, b = load_file(shared.file(weights)), load_file(whole.file(weights))
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max() <= 1e-4 * b[name].abs().max() + 1e-7, name


def test_8bit_optimizer_trains_on_cpu_and_paged_ones_are_refused(tiny_model: Path, store: ArtifactStore) -> None:
    eight = _train(tiny_model, store, "train.optimizer=adamw_8bit")
    assert eight.manifest["optimizer"] == "adamw_8bit" and eight.manifest["device"] == "cpu"
    assert eight.metrics["val_loss"] < eight.metrics["val_loss_before"]
    with pytest.raises(StageError) as error:
        _train(tiny_model, store, "train.optimizer=paged_adamw_8bit")
    assert str(error.value) == (
        "train.optimizer=paged_adamw_8bit pages optimizer states between GPU and CPU memory and needs CUDA "
        "(training on cpu here); use train.optimizer=adamw_8bit or adamw on CPU."
    )


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_cuda_is_an_error(tiny_model: Path, store: ArtifactStore) -> None:
    with pytest.raises(StageError, match=r"train.device=cuda but torch sees no CUDA device here; set train.device"):
        _train(tiny_model, store, "train.device=cuda")
