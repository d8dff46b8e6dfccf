"""The stage registry (tasks/registry.py) drives the pipeline, the stage flows, the CLI, the images and the store's
messages: each of those is checked against it here, and each stage's declaration against its function."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from loraforge.tasks import registry
from loraforge.tasks.config import DEMO_CONFIG, load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("stage", registry.STAGES, ids=lambda s: s.name)
def test_each_declaration_matches_its_function(stage: registry.Stage) -> None:
    """The entry point takes the declared config values, then the declared artifacts, then the store."""
    params = [p for p in inspect.signature(stage.function()).parameters.values() if p.kind != p.KEYWORD_ONLY]
    assert len(params) == len(stage.config) + len(stage.inputs) + 1, stage.name
    artifacts = [p.name.rstrip("_") for p in params[len(stage.config) : -1]]  # eval_ is the eval artifact
    assert artifacts == list(stage.inputs) and params[-1].name == "store"


def test_arguments_are_the_config_values_then_the_artifacts() -> None:
    config = load_config(DEMO_CONFIG)
    artifacts = {name: object() for name in registry.NAMES}
    publish = registry.stage("publish").arguments(config, artifacts)  # type: ignore[arg-type]
    assert publish[:3] == [config.publish, config.name, config.orchestration.approval]
    assert publish[3:] == [artifacts[n] for n in ("base", "data", "train", "eval", "merge", "quantize")]
    assert registry.stage("base").arguments(config, {}) == [config.base_model]


def test_the_rest_is_derived_from_it() -> None:
    from loraforge.flows.cli import _parser
    from loraforge.flows.pipeline import DEPLOYMENTS, IN_PROCESS
    from loraforge.flows.stages import STAGE_FLOWS
    from loraforge.tasks import artifacts

    assert list(IN_PROCESS) == list(STAGE_FLOWS) == list(artifacts.STAGES) == list(registry.NAMES)
    assert set(DEPLOYMENTS) == set(registry.NAMES) and set(artifacts.PRODUCERS) == set(registry.NAMES)
    assert artifacts.KEY_LIBRARIES["train"] == registry.stage("train").libraries
    stage_command = _parser()._subparsers._group_actions[0].choices["stage"]  # type: ignore[union-attr]
    (name,) = [a for a in stage_command._actions if a.dest == "name"]
    assert tuple(name.choices) == registry.RUNNABLE == registry.NAMES[1:]
    images = subprocess.run(
        [sys.executable, "-m", "loraforge.tasks.registry"], cwd=ROOT, capture_output=True, text=True
    )
    assert images.stdout.split() == list(registry.RUNNABLE)  # containers/build.sh builds one image for each
    assert "loraforge.tasks.registry" in (ROOT / "containers" / "build.sh").read_text()
    for stage in registry.RUNNABLE:
        assert (ROOT / "containers" / f"{stage}.Containerfile").is_file()


def test_an_unknown_stage_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="no stage 'serve'; stages: base, data, train"):
        registry.stage("serve")


def test_only_the_eval_gate_stops_a_run_and_only_publish_waits_for_approval() -> None:
    assert [s.name for s in registry.STAGES if s.check] == ["eval"]
    assert [s.name for s in registry.STAGES if s.approval] == ["publish"]
    assert [s.name for s in registry.STAGES if not s.weights] == ["publish"]
