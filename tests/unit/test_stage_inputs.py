"""`loraforge stage NAME CONFIG --input STAGE=KEY`: the container entrypoint's command, on the host (fast; no
containers, no Prefect)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraforge.flows.cli import main
from loraforge.tasks.config import DEMO_CONFIG


def test_bad_inputs_are_all_named(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["stage", "train", str(DEMO_CONFIG), "--input", "foo", "--input", "eval=abc"])
    err = capsys.readouterr().err
    assert code == 1
    assert "--input 'foo': expected STAGE=KEY" in err
    assert "--input eval=abc: the train stage takes no eval artifact (it takes base, data)" in err
    assert "the train stage needs --input data=KEY" in err
    assert "Traceback" not in err


def test_output_needs_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stage", "data", str(DEMO_CONFIG), "--output", "x.json"]) == 1
    assert "--output goes with --input" in capsys.readouterr().err


def test_a_stage_on_given_keys(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from loraforge.tasks.artifacts import ArtifactStore
    from loraforge.tasks.models import provision_base

    store = tmp_path / "store"
    base = provision_base(str(tiny_model), ArtifactStore(store))
    args = ["stage", "data", str(DEMO_CONFIG), f"base_model={tiny_model}", "data.max_rows=16", "--store", str(store)]

    assert main([*args, "--input", "base=0123456789abcdef0123"]) == 1
    assert f"has key {base.key}" in capsys.readouterr().err

    assert main([*args, "--input", f"base={base.key}", "--output", str(tmp_path / "data.json")]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first == json.loads((tmp_path / "data.json").read_text())
    assert first["stage"] == "data" and not first["cached"]
    manifest = json.loads((store / "data" / first["key"] / "manifest.json").read_text())
    assert manifest["inputs"] == {"base": {"stage": "base", "key": base.key}}

    # The same stage again is a cache hit; the train stage on that data key refuses a missing one by name.
    assert main([*args, "--input", f"base={base.key}"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {**first, "cached": True}
    assert main(["stage", "train", *args[2:], "--input", "data=ffffffffffffffffffff"]) == 1
    assert "no data artifact with key ffffffffffffffffffff" in capsys.readouterr().err


def test_a_stage_flow_names_its_bad_inputs_as_the_cli_does(tmp_path: Path) -> None:
    """flows/stages.py's `upstream` (what a deployed stage flow runs) checks with the same function as
    `loraforge stage`: every problem at once, named by where the keys were given."""
    from loraforge.flows.stages import upstream
    from loraforge.tasks.artifacts import ArtifactStore
    from loraforge.tasks.config import load_config
    from loraforge.tasks.errors import ConfigError
    from loraforge.tasks.registry import STAGES

    (merge,) = [s for s in STAGES if s.name == "merge"]
    config = load_config(DEMO_CONFIG, [f"store={tmp_path}"])
    with pytest.raises(ConfigError) as raised:
        upstream(merge, config, ArtifactStore(str(tmp_path)), {"eval": "abc"})
    assert str(raised.value) == (
        f"inputs eval=abc: the merge stage takes no eval artifact (it takes {', '.join(merge.inputs)}); "
        "the merge stage needs inputs data=KEY train=KEY"
    )
