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

ROOT = Path(__file__).resolve().parents[2]
# stage: (module in tasks/, its config model, its entry point)
STAGES = {
    "data": ("data", "DataConfig", "prepare_data"),
    "train": ("train", "TrainConfig", "train_adapter"),
    "eval": ("evaluate", "EvalConfig", "evaluate_adapter"),
    "merge": ("merge", "MergeConfig", "merge_adapter"),
    "quantize": ("quantize", "QuantizeConfig", "quantize_gguf"),
    "publish": ("publish", "PublishConfig", "publish_model"),
}


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_its_pieces(stage: str) -> None:
    module_name, config_name, entry = STAGES[stage]
    module = importlib.import_module(f"tasks.{module_name}")
    config = getattr(module, config_name)
    assert config.model_config.get("frozen") and config.model_config.get("extra") == "forbid"
    function = getattr(module, entry)
    assert inspect.signature(function).return_annotation in ("Artifact", "'Artifact'"), entry
    assert function.__doc__ and "Returns:" in function.__doc__, f"{entry} needs a docstring with Returns:"
    assert (ROOT / "containers" / f"{stage}.Containerfile").is_file()

    from flows.stages import STAGE_FLOWS

    assert stage in STAGE_FLOWS
    deployments = {d["name"] for d in yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())["deployments"]}
    assert stage in deployments
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    assert re.search(rf"\b{entry}\b", tests), f"no test calls {entry}"


def _models() -> list[type[BaseModel]]:
    from tasks.config import OrchestrationConfig, PipelineConfig

    found: list[type[BaseModel]] = [PipelineConfig, OrchestrationConfig]
    for module_name, config_name, _ in STAGES.values():
        found.append(getattr(importlib.import_module(f"tasks.{module_name}"), config_name))
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
