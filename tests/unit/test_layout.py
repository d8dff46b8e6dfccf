"""The project mirrors itself: every stage has its config model, one public entry point, a Containerfile, a
deployment and a stage flow; every config field is described; every path in the layout trees (the README's
top-level one, the one line per file in docs/development.md) exists."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from loraforge.tasks.registry import RUNNABLE
from loraforge.tasks.registry import stage as declared

ROOT = Path(__file__).resolve().parents[2]


def _section(stage: str) -> type[BaseModel]:
    """The config model of the stage's section (the first config value it takes), from PipelineConfig."""
    from loraforge.tasks.config import PipelineConfig

    annotation = PipelineConfig.model_fields[declared(stage).config[0]].annotation
    assert isinstance(annotation, type) and issubclass(annotation, BaseModel), stage
    return annotation


@pytest.mark.parametrize("stage", RUNNABLE)
def test_every_stage_has_its_pieces(stage: str) -> None:
    """Each registered stage: one module in tasks/ holding its config model and its entry point, a Containerfile,
    a stage flow, a deployment and a test that calls it."""
    module_name, _, entry = declared(stage).entry.partition(":")
    module = importlib.import_module(module_name)
    config = _section(stage)
    assert config.__module__ == module_name, f"{stage}: its config model lives in {config.__module__}"
    assert config.model_config.get("frozen") and config.model_config.get("extra") == "forbid"
    function = getattr(module, entry)
    assert inspect.signature(function).return_annotation in ("Artifact", "'Artifact'"), entry
    assert function.__doc__ and "Returns:" in function.__doc__, f"{entry} needs a docstring with Returns:"
    assert (ROOT / "containers" / f"{stage}.Containerfile").is_file()

    from loraforge.flows.stages import STAGE_FLOWS

    assert stage in STAGE_FLOWS
    deployments = {d["name"] for d in yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())["deployments"]}
    assert stage in deployments
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    assert re.search(rf"\b{entry}\b", tests), f"no test calls {entry}"


def _models() -> list[type[BaseModel]]:
    from loraforge.tasks.config import OrchestrationConfig, PipelineConfig

    found: list[type[BaseModel]] = [PipelineConfig, OrchestrationConfig]
    found += [_section(stage) for stage in RUNNABLE]
    return found


@pytest.mark.parametrize("model", _models(), ids=lambda m: m.__name__)
def test_every_config_field_is_described(model: type[BaseModel]) -> None:
    missing = [name for name, field in model.model_fields.items() if not (field.description or "").strip()]
    assert not missing, f"{model.__name__}: fields without a description: {missing}"


def _layout_tree(page: str) -> list[str]:
    """The paths named in a page's layout block (indentation = nesting; wrapped descriptions skipped)."""
    text = (ROOT / page).read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    paths, parents = [], []
    for line in block.splitlines():
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if not stripped or indent >= 20:  # blank, or a description wrapped onto its own line
            continue
        name = stripped.split()[0]
        depth = indent // 2
        parents = parents[:depth]
        path = "/".join([*parents, name.rstrip("/")])
        paths.append(path)
        if name.endswith("/"):
            parents.append(name.rstrip("/"))
    return paths


def test_every_path_in_the_layout_trees_exists() -> None:
    full, top = _layout_tree("docs/development.md"), _layout_tree("README.md")
    assert len(full) > 30 and "tasks/train.py" in full and "flows/configs/demo.yaml" in full
    assert {"flows", "tasks", "infra", "tests", "docs"} <= set(top)
    missing = [p for p in [*full, *top] if not (ROOT / p).exists()]
    assert not missing, f"layout trees (README.md, docs/development.md) name paths that do not exist: {missing}"
