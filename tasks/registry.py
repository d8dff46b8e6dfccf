"""The stages, declared once: everything else (the pipeline's order, its Prefect tasks, the per-stage flows and
deployments, the CLI's `stage` command, the container images, the store's "run X first" messages) is derived
from `STAGES`.

A stage is a plain function in tasks/ called as

    entry(*config values, *upstream artifacts, store) -> Artifact

where the config values are the dotted attributes of the pipeline config named in `config` (its section
first) and the upstream artifacts are those of `inputs`, in that order. Adding a stage means one file in tasks/
and one `Stage(...)` here (plus its Containerfile and its deployment in infra/prefect.yaml, which a unit test
checks against this list).

Nothing heavy is imported here: an entry point is imported when it is first called.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import reduce
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loraforge.tasks.artifacts import Artifact, ArtifactStore
    from loraforge.tasks.config import PipelineConfig


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline."""

    name: str  # the artifact folder's name, the CLI's `loraforge stage NAME`, the image and deployment name
    entry: str  # "module:function" of its plain function in tasks/
    config: tuple[str, ...]  # the pipeline-config attributes passed first (its section first), dotted
    inputs: tuple[str, ...]  # the upstream stages whose artifacts it takes, in argument order
    produces: str  # what its artifact is, in a few words (help text, the flow's description)
    # The libraries whose versions shape its bytes: part of its key (a new torch retrains, a new llama.cpp
    # re-quantizes). Libraries that only move data (prefect, huggingface-hub) stay out; manifests record all.
    libraries: tuple[str, ...]
    weights: bool = True  # needs the base model's weights on the machine (False: the base manifest is enough)
    check: str | None = None  # "module:function" raising when the artifact must stop the run (the eval gate)
    approval: bool = False  # waits for a reviewer first when orchestration.approval is on
    steps: bool = False  # takes `on_step(figures, total_steps)`: its progress can be shown while it runs (train:
    # optimizer steps; quantize: pieces of work)

    def function(self) -> Callable[..., Artifact]:
        """The stage's entry point (imported now)."""
        return _load(self.entry)

    def arguments(self, config: PipelineConfig, artifacts: Mapping[str, Artifact]) -> list[Any]:
        """The entry point's arguments before `store`: config values, then upstream artifacts."""
        values = [reduce(getattr, path.split("."), config) for path in self.config]
        return [*values, *(artifacts[name] for name in self.inputs)]

    def run(
        self, config: PipelineConfig, artifacts: Mapping[str, Artifact], store: ArtifactStore, **options: Any
    ) -> Artifact:
        """Call the stage (a cache hit returns the stored artifact); `options` are its keyword-only ones."""
        return self.function()(*self.arguments(config, artifacts), store, **options)

    def verify(self, artifact: Artifact) -> None:
        """Raise when the artifact must stop the run (the stage's `check`); nothing when it has none."""
        if self.check is not None:
            _load(self.check)(artifact)

    @property
    def producer(self) -> str:
        """How a user makes this stage's artifact (for "run X first" messages)."""
        if self.name == "base":
            return "the base-model provisioning step (base_model in the config)"
        return f"the {self.name} stage (`loraforge stage {self.name} CONFIG`)"


STAGES: tuple[Stage, ...] = (
    # keyed by the model folder's content, whichever library converted it (every image agrees)
    Stage("base", "loraforge.tasks.models:provision_base", ("base_model",), (),
          "the base model, provisioned from base_model and fingerprinted", ()),
    Stage("data", "loraforge.tasks.data:prepare_data", ("data",), ("base",),
          "tokenized, templated, prompt-masked train/validation/test splits",
          ("transformers", "tokenizers", "jinja2", "datasets")),
    Stage("train", "loraforge.tasks.train:train_adapter", ("train",), ("base", "data"), "the LoRA/QLoRA adapter",
          ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors"), steps=True),
    Stage("eval", "loraforge.tasks.evaluate:evaluate_adapter", ("eval",), ("base", "data", "train"),
          "base vs tuned metrics on the test split and the gate verdict",
          ("torch", "transformers", "peft", "bitsandbytes", "evaluate"), check="loraforge.tasks.evaluate:check_gate"),
    Stage("merge", "loraforge.tasks.merge:merge_adapter", ("merge",), ("base", "data", "train"),
          "the merged model, checked against the adapter",
          ("torch", "transformers", "peft", "bitsandbytes", "safetensors")),
    # the GGUF converter comes with llama.cpp's sdist: llama-cpp-python's version covers it
    Stage("quantize", "loraforge.tasks.quantize:quantize_gguf", ("quantize", "name", "eval"),
          ("base", "data", "train", "merge"),
          "GGUF files, each checked against the merged model in llama.cpp",
          ("llama-cpp-python", "torch", "transformers", "numpy", "evaluate"), steps=True),
    Stage("publish", "loraforge.tasks.publish:publish_model", ("publish", "name", "orchestration.approval"),
          ("base", "data", "train", "eval", "merge", "quantize"),
          "the Hub bundle (adapter, GGUF, model card, lineage), pushed when a token is set", (),
          weights=False, approval=True),
)  # fmt: skip
NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
RUNNABLE: tuple[str, ...] = NAMES[1:]  # what `loraforge stage` and the images run (base is provisioned by each)


def stage(name: str) -> Stage:
    """The stage called `name`."""
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"no stage {name!r}; stages: {', '.join(NAMES)}")


def _load(spec: str) -> Callable[..., Any]:
    module, _, function = spec.partition(":")
    return getattr(importlib.import_module(module), function)  # type: ignore[no-any-return,unused-ignore]


def _check() -> None:
    """The declarations are consistent: unique names, every input declared before the stage that takes it."""
    seen: list[str] = []
    for s in STAGES:
        if s.name in seen or not all(i in seen for i in s.inputs):
            raise RuntimeError(f"tasks/registry.py: stage {s.name} is declared twice or before one of {s.inputs}")
        seen.append(s.name)


_check()

if __name__ == "__main__":  # `python -m tasks.registry`: the runnable stages, one per line (containers/build.sh)
    print("\n".join(RUNNABLE))
