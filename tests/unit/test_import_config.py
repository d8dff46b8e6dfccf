"""`loraforge import-config`: Axolotl's own example configs (tests/data/axolotl, verbatim) become loraforge
configs that loraforge's loader accepts; every key is carried over or listed; bad input is one clear error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

import loraforge.flows.cli as cli
from loraforge.flows.import_config import Imported, import_axolotl
from loraforge.tasks.config import PipelineConfig, load_config
from loraforge.tasks.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[1] / "data" / "axolotl"
SFT = sorted(p for p in EXAMPLES.glob("*.y*ml") if p.name != "qwen2--dpo.yaml")


def _convert(path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[PipelineConfig, str, str]:
    """Through the CLI, as a user runs it: the YAML on stdout, loaded back with loraforge's own loader."""
    assert cli.main(["import-config", str(path)]) == 0
    out, err = capsys.readouterr()
    mine = tmp_path / "mine.yaml"
    mine.write_text(out)
    return load_config(mine), out, err


def _accounted(imported: Imported, key: str) -> bool:
    def under(name: str) -> bool:
        return name == key or name.startswith((f"{key}.", f"{key}["))

    notes = [n.key for n in (*imported.dropped, *imported.changed)]
    return any(map(under, [*imported.carried.values(), *notes, *imported.as_is, *imported.empty]))


@pytest.mark.parametrize("path", SFT, ids=lambda p: p.name)
def test_every_example_converts_to_a_config_the_loader_accepts_and_no_key_is_lost(
    path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, out, err = _convert(path, tmp_path, capsys)
    raw: dict[str, Any] = yaml.safe_load(path.read_text())
    assert config.base_model == raw["base_model"]
    imported = import_axolotl(path)
    lost = [key for key in raw if not _accounted(imported, key)]
    assert lost == [], f"silently dropped: {lost}"
    for note in (*imported.dropped, *imported.changed):  # on stderr and in the YAML's header, with file:line
        assert f"#   - {note}" in out and str(note) in err and note.where.startswith(f"{path}:")
    assert f"import-config: {len(imported.dropped)} keys not carried over" in err


def test_llama3_lora_1b_maps_its_values_and_lists_what_loraforge_lacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = EXAMPLES / "llama-3--lora-1b.yml"
    config, _, _ = _convert(path, tmp_path, capsys)
    assert (str(config.data.train_file), config.data.format, config.data.chat_template) == (
        "hub:teknium/GPT4-LLM-Cleaned", "alpaca", "alpaca")  # fmt: skip
    assert (config.data.max_length, config.data.validation_fraction) == (2048, 0.1)
    t = config.train
    assert (t.r, t.alpha, t.dropout, t.quantization) == (16, 32, 0.05, "none")
    assert t.target_modules == ["gate_proj", "down_proj", "up_proj", "q_proj", "v_proj", "k_proj", "o_proj"]
    assert (t.batch_size, t.grad_accum, t.epochs, t.learning_rate) == (2, 2, 1.0, 2e-4)
    assert (t.optimizer, t.scheduler, t.warmup_ratio, t.weight_decay) == ("adamw_8bit", "cosine", 0.1, 0.0)
    assert (t.packing, t.gradient_checkpointing, t.precision, t.log_every) == (True, True, "auto", 1)
    assert (config.store, config.publish.push) == ("./outputs/lora-out", "never")
    assert config.eval.gate == ["loss_delta <= 0"]
    imported = import_axolotl(path)
    assert {n.key for n in imported.dropped} == {
        "eval_sample_packing", "attn_implementation", "loss_watchdog_threshold", "loss_watchdog_patience",
        "evals_per_epoch", "saves_per_epoch", "special_tokens"}  # fmt: skip
    assert {n.key for n in imported.changed} == {"datasets[0].type", "output_dir", "bf16"}
    [pad] = [n for n in imported.dropped if n.key == "special_tokens"]
    assert pad.where == f"{path}:61" and "<|end_of_text|>" in pad.reason
    [per_epoch] = [n for n in imported.dropped if n.key == "evals_per_epoch"]
    assert per_epoch.closest == "train.eval_every"
    assert {"wandb_project", "lora_model_dir", "resume_from_checkpoint"} <= set(imported.empty)
    assert "tf32" in imported.as_is  # tf32: false is what loraforge does anyway


def test_qlora_examples_load_the_base_in_4bit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, _, _ = _convert(EXAMPLES / "llama-3--qlora-1b.yml", tmp_path, capsys)
    t = config.train
    assert (t.quantization, t.r, t.alpha, t.grad_accum) == ("4bit", 32, 16, 4)
    config, _, _ = _convert(EXAMPLES / "mistral--lora.yml", tmp_path, capsys)  # lora + load_in_8bit
    assert (config.train.quantization, config.train.target_modules) == ("8bit", "all-linear")
    assert "lora_target_modules" in {n.key for n in import_axolotl(EXAMPLES / "mistral--lora.yml").changed}


def test_gemma3_sharegpt_style_rows_are_listed_not_dropped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = EXAMPLES / "gemma3--gemma-3-1b-qlora.yml"
    config, _, _ = _convert(path, tmp_path, capsys)
    assert (config.data.format, config.data.chat_template, str(config.data.train_file)) == (
        "chat", "auto", "hub:cgato/SlimOrcaDedupCleaned")  # fmt: skip
    assert (config.train.quantization, config.train.target_modules, config.train.epochs) == ("4bit", "all-linear", 4)
    assert config.data.validation_fraction == 0.1  # val_set_size 0 cannot be honoured: the default is kept, listed
    imported = import_axolotl(path)
    dropped = {n.key: n for n in imported.dropped}
    assert {"datasets[0].field_messages", "datasets[0].message_property_mappings", "tf32", "unfrozen_parameters",
            "eot_tokens"} <= set(dropped)  # fmt: skip
    assert dropped["datasets[0].field_messages"].where == f"{path}:19"
    assert "'conversations'" in dropped["datasets[0].field_messages"].reason
    assert {"chat_template", "val_set_size"} <= {n.key for n in imported.changed}


def test_a_pretraining_config_becomes_text_rows_and_a_perplexity_gate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = EXAMPLES / "tiny-llama--pretrain.yml"
    config, _, _ = _convert(path, tmp_path, capsys)
    data = config.data
    assert (data.format, data.text_field, str(data.train_file)) == ("text", "text", "hub:allenai/c4")
    assert (config.train.max_steps, config.eval.metrics, config.eval.gate) == (
        200, ["perplexity"], ["perplexity_delta <= 0"])  # fmt: skip
    imported = import_axolotl(path)
    assert "pretraining_dataset[0].name" in {n.key for n in imported.dropped}  # the 'en' configuration
    assert "adapter" in {n.key for n in imported.changed}  # no adapter = a full fine-tune in Axolotl


def test_preference_training_is_an_error_naming_the_line(capsys: pytest.CaptureFixture[str]) -> None:
    path = EXAMPLES / "qwen2--dpo.yaml"
    assert cli.main(["import-config", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert f"{path}:6: rl: 'dpo': loraforge trains supervised LoRA adapters only" in err


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "axolotl.yaml"
    path.write_text(text)
    return path


BASE = "base_model: org/model\ndatasets:\n  - path: org/rows\n    type: alpaca\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("base_model: [unclosed\n", r"axolotl.yaml:2: not valid YAML"),
        ("- base_model: x\n", r"axolotl.yaml:1: the file is a list, not a mapping"),
        ("# nothing\n", r"axolotl.yaml:1: the file is empty"),
        ("datasets:\n  - path: x\n    type: alpaca\nbase_model:\n", r"axolotl.yaml:4: base_model is missing or empty"),
        ("adapter: lora\n", r"axolotl.yaml:1: base_model is missing"),
    ],
)
def test_bad_input_is_one_message_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=message):
        import_axolotl(path)
    assert cli.main(["import-config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_missing_file_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["import-config", str(tmp_path / "nope.yml")]) == 1
    assert "nope.yml: not found" in capsys.readouterr().err


def test_what_loraforge_cannot_honour_is_reported_all_at_once(tmp_path: Path) -> None:
    path = _write(tmp_path, "base_model: org/model\n"
                            "datasets:\n"
                            "  - path: org/rows\n"
                            "    type: sharegpt\n"  # line 4
                            "sequence_len: 65536\n"  # line 5
                            "learning_rate: fast\n"  # line 6
                            "adapter: llama-adapter\n")  # fmt: skip
    with pytest.raises(ConfigError) as error:
        import_axolotl(path)
    message = str(error.value)
    assert "3 problems" in message  # the range of sequence_len is checked once the rest converts
    assert f"{path}:4: datasets[0].type: 'sharegpt': loraforge has no such row format" in message
    assert f"{path}:6: learning_rate: 'fast': expected float" in message
    assert f"{path}:7: adapter: 'llama-adapter'" in message
    with pytest.raises(ConfigError, match=rf"{path}:5: sequence_len -> data.max_length: Input should be less"):
        import_axolotl(_write(tmp_path, BASE + "sequence_len: 65536\n"))


def test_derived_values_hub_revision_local_files_and_warmup_steps(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"messages": []}\n')
    path = _write(tmp_path, "base_model: org/model\nrevision_of_model: v2\n"
                            f"datasets:\n  - path: {rows}\n    type: chat_template\n"
                            "    roles:\n      user: [user]\n      assistant: [assistant]\n"
                            "test_datasets:\n  - path: org/held-out\n    type: chat_template\n    split: test\n"
                            "max_steps: 400\nwarmup_steps: 20\nlearning_rate: 2e-5\nbf16: false\nseed: 7\n"
                            "hub_model_id: me/my-adapter\nlr_scheduler: one_cycle\n")  # fmt: skip
    imported = import_axolotl(path)
    config = PipelineConfig.model_validate(imported.config)
    assert config.base_model == "org/model@v2"
    assert (config.data.train_file, str(config.data.validation_file)) == (rows, "hub:org/held-out#test")
    assert (config.train.warmup_ratio, config.train.learning_rate, config.train.precision) == (0.05, 2e-5, "fp32")
    assert (config.train.seed, config.data.seed) == (7, 7)
    assert (config.publish.repo_id, config.publish.push) == ("me/my-adapter", "auto")
    assert config.train.scheduler == "cosine"  # the default: one_cycle is listed with the closest setting
    [scheduler] = [n for n in imported.dropped if n.key == "lr_scheduler"]
    assert scheduler.closest == "train.scheduler" and scheduler.where == f"{path}:19"
    assert "datasets[0].roles" not in {n.key for n in imported.dropped}  # identity roles: nothing lost
    assert {"warmup_steps", "test_datasets", "datasets[0].path"} <= {n.key for n in imported.changed}
