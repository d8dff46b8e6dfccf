"""Config loading: every shipped YAML validates; bad configs and overrides are reported all at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraforge.tasks.config import DEMO_CONFIG, load_config
from loraforge.tasks.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "flows" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    config = load_config(path)
    assert config.data.train_file.is_file()


def test_overrides_apply_with_yaml_types() -> None:
    config = load_config(DEMO_CONFIG, ["train.r=8", "train.learning_rate=1e-4", "eval.gate=[accuracy >= 0.5]"])
    assert config.train.r == 8
    assert config.train.learning_rate == pytest.approx(1e-4)
    assert config.eval.gate == ["accuracy >= 0.5"]


def test_all_problems_reported_at_once_with_lines(tmp_path: Path) -> None:
    (tmp_path / "rows.jsonl").write_text("")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\n"
        "data:\n"
        "  train_file: rows.jsonl\n"
        "  max_lenght: 100\n"  # line 4: typo
        "train:\n"
        "  r: -1\n"  # line 6
        "  scheduler: exponential\n"  # line 7
        "eval:\n"
        "  gate: ['accuracy >> 1']\n"  # line 9
    )
    with pytest.raises(ConfigError) as info:
        load_config(bad, ["merge.dtype=int8"])
    message = str(info.value)
    assert "5 problems" in message
    assert f"{bad}:4: data.max_lenght: unknown key; did you mean 'max_length'?" in message
    assert f"{bad}:6: train.r: Input should be greater than or equal to 1 (given: -1)" in message
    assert f"{bad}:7: train.scheduler:" in message and "'exponential'" in message
    assert f"{bad}:9: eval.gate" in message and "not 'METRIC OP NUMBER'" in message
    assert "override 'merge.dtype=int8': merge.dtype" in message


def test_missing_required_section(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n")
    with pytest.raises(ConfigError, match="data: required field is missing"):
        load_config(bad)


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata:\n  train_file: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{bad}:\d+: not valid YAML"):
        load_config(bad)


def test_malformed_override_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(DEMO_CONFIG, ["=3"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_unknown_gate_metric_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown metric 'acc'; known: accuracy"):
        load_config(DEMO_CONFIG, ["eval.gate=[acc >= 1]"])


def test_configs_are_frozen() -> None:
    config = load_config(DEMO_CONFIG)
    with pytest.raises(Exception, match="frozen"):
        config.train.r = 3  # type: ignore[misc]


def test_per_type_gguf_limits_override_one_type_and_keep_the_rest() -> None:
    config = load_config(DEMO_CONFIG, ["quantize.max_mean_kl.q8_0=0.01", "quantize.min_top1_agreement.q4_k_m=0.9"])
    assert config.quantize.max_mean_kl["q8_0"] == 0.01
    assert config.quantize.max_mean_kl["q4_k_m"] == 0.20  # the demo file's own limit kept
    assert config.quantize.max_mean_kl["f16"] == 0.002  # default kept
    assert config.quantize.min_top1_agreement["q4_k_m"] == 0.9
    assert config.quantize.min_top1_agreement["q8_0"] == 0.90


def test_unknown_gguf_type_in_limits_is_reported() -> None:
    with pytest.raises(ConfigError) as error:
        load_config(DEMO_CONFIG, ["quantize.max_mean_kl.q9_k=0.2", "train.quantization=3bit", "eval.metrics=[bleu]"])
    message = str(error.value)
    assert "3 problems" in message
    assert "override 'quantize.max_mean_kl.q9_k=0.2': quantize.max_mean_kl.q9_k" in message
    assert "override 'train.quantization=3bit': train.quantization: Input should be 'none', '4bit' or '8bit'" in message
    assert "eval.metrics.0" in message and "'rouge_l'" in message


def test_target_modules_take_a_preset_or_names() -> None:
    assert load_config(DEMO_CONFIG, ["train.target_modules=all-linear"]).train.target_modules == "all-linear"
    assert load_config(DEMO_CONFIG, ["train.target_modules=[q_proj, v_proj]"]).train.target_modules == [
        "q_proj",
        "v_proj",
    ]


def test_on_off_values_survive_yaml() -> None:
    """PyYAML reads a bare on/off as a boolean; quantize.imatrix takes them as the words they are."""
    assert load_config(DEMO_CONFIG, ["quantize.imatrix=off"]).quantize.imatrix == "off"
    assert load_config(DEMO_CONFIG, ["quantize.imatrix=on"]).quantize.imatrix == "on"
    assert load_config(DEMO_CONFIG, ["quantize.imatrix=auto"]).quantize.imatrix == "auto"
