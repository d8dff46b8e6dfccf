"""docs/settings.md is generated from the config models and kept in sync; every field has a description."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from loraforge.tasks.settings_doc import SETTINGS_DOC, config_models, main, render


def test_settings_doc_is_up_to_date() -> None:
    assert SETTINGS_DOC.is_file(), f"{SETTINGS_DOC} is missing; run `make settings-doc`"
    assert SETTINGS_DOC.read_text(encoding="utf-8") == render(), (
        "docs/settings.md differs from the config models' field descriptions; run `make settings-doc`"
    )


def test_render_is_deterministic_and_covers_every_section() -> None:
    text = render()
    assert text == render()
    for section in ("data", "train", "eval", "merge", "quantize", "publish", "orchestration"):
        assert f"## `{section}`" in text
    assert "| `train.r` | int | `16` |" in text and "| `data.train_file` | Path | required |" in text


@pytest.mark.parametrize("model", config_models(), ids=lambda m: m.__name__)
def test_every_field_of_every_config_model_is_described(model: type[BaseModel]) -> None:
    missing = [name for name, field in model.model_fields.items() if not (field.description or "").strip()]
    assert not missing, f"{model.__name__}: fields without a description (add Field(description=...)): {missing}"


def test_check_reports_a_stale_file(tmp_path, monkeypatch, capsys) -> None:
    stale = tmp_path / "settings.md"
    stale.write_text("# old\n")
    monkeypatch.setattr("loraforge.tasks.settings_doc.SETTINGS_DOC", stale)
    assert main(["--check"]) == 1
    assert "make settings-doc" in capsys.readouterr().err
    assert main([]) == 0 and main(["--check"]) == 0
