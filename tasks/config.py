"""Pipeline configuration: one YAML file per run, `key=value` overrides, one error listing every problem.

Each stage's config model lives in its stage module (tasks/<stage>.py); this module assembles them into
`PipelineConfig`, reads YAML, applies overrides and turns validation errors into messages that name the file,
the line, the field, the value given and what is allowed.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loraforge.tasks.data import DataConfig
from loraforge.tasks.errors import ConfigError
from loraforge.tasks.evaluate import EvalConfig
from loraforge.tasks.merge import MergeConfig
from loraforge.tasks.publish import PublishConfig
from loraforge.tasks.quantize import QuantizeConfig
from loraforge.tasks.train import TrainConfig

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "flows" / "configs" / "demo.yaml"


class OrchestrationConfig(BaseModel):
    """How Prefect runs the stages; no artifact key depends on it (the same run gives the same artifacts)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stages: Literal["in_process", "deployments"] = Field(
        "in_process",
        description="in_process: every stage runs inside the pipeline flow. deployments: each stage runs as its "
        "own flow run on its Prefect deployment (infra/prefect.yaml, `make deploy`) through run_deployment, on "
        "workers that share the artifact store; needs a Prefect server (PREFECT_API_URL).",
    )
    stage_timeout_s: float | None = Field(
        None,
        gt=0,
        description="deployments mode: seconds to wait for one stage's flow run, which is then cancelled; the stage "
        "flow also stops itself once it has run this long (state TimedOut), whoever waits for it (None: no limit).",
    )
    approval: bool = Field(
        False,
        description="Pause before publish until a reviewer resumes the flow run with approve=true (Prefect UI or "
        "`prefect flow-run resume`); needs a Prefect server (PREFECT_API_URL).",
    )
    approval_timeout_s: int = Field(
        86400, gt=0, description="Seconds to wait for the approval; past it the run fails and nothing is published."
    )


class PipelineConfig(BaseModel):
    """Everything one pipeline run needs; every stage reads its own section."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field("loraforge-run", description="Name of this pipeline; used in run records and the card.")
    base_model: str = Field(
        "bundled:smollm2-135m-instruct",
        description="Base model: 'bundled:smollm2-135m-instruct', a local HF folder, or a Hub id org/name[@rev].",
    )
    store: str = Field(
        "./artifacts",
        description="Artifact store URL: a folder path (relative to the working directory), file:///abs, or "
        "s3://bucket/prefix on S3-compatible object storage (credentials and endpoint from AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION; a local copy under LORAFORGE_STORE_CACHE).",
    )
    store_verify: Literal["sha256", "size"] = Field(
        "sha256",
        description="How a reused artifact is checked against its manifest before a cache hit: sha256 of every "
        "file (default, like git) or only sizes (for stores too large to hash on every run). A mismatch sets the "
        "artifact aside under <store>/.damaged/ and rebuilds it. Files downloaded from an s3:// store are always "
        "checked against their sha256.",
    )
    data: DataConfig = Field(description="The data stage: input files, chat template, tokenization, splits.")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(), description="The train stage (LoRA).")
    eval: EvalConfig = Field(default_factory=lambda: EvalConfig(), description="The eval stage and its gate.")
    merge: MergeConfig = Field(default_factory=lambda: MergeConfig(), description="The merge stage.")
    quantize: QuantizeConfig = Field(default_factory=lambda: QuantizeConfig(), description="GGUF export.")
    publish: PublishConfig = Field(default_factory=lambda: PublishConfig(), description="Hub publishing.")
    orchestration: OrchestrationConfig = Field(
        default_factory=lambda: OrchestrationConfig(),
        description="Where the stages run (in-process or on their Prefect deployments) and the approval pause.",
    )


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read a YAML config, apply `dotted.key=value` overrides and validate.

    Relative file paths in the `data` section are resolved against the YAML file's folder.

    Raises:
        ConfigError: listing every problem, each with file:line (or the override) and how to fix it.
    """
    source = Path(path) if path is not None else DEMO_CONFIG
    if not source.is_file():
        raise ConfigError(f"config file not found: {source}. Pass a YAML file, e.g. {DEMO_CONFIG}.")
    raw, lines = read_yaml(
        source, f"a loraforge config maps sections (name, data, train, ...): start from {DEMO_CONFIG}"
    )

    problems: list[str] = []
    from_override: dict[tuple[str, ...], str] = {}
    for item in overrides:
        dotted, sep, value = item.partition("=")
        if not sep or not dotted.strip():
            problems.append(f"override {item!r}: expected key=value, e.g. train.learning_rate=1e-4")
            continue
        keys = tuple(dotted.strip().split("."))
        problem = _set_dotted(raw, keys, yaml.safe_load(value) if value.strip() else None)
        if problem:
            problems.append(f"override {item!r}: {problem}")
        from_override[keys] = item

    _resolve_data_paths(raw, source.parent)
    try:
        config = PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        for error in exc.errors():
            loc = tuple(str(p) for p in error["loc"])
            where = _where(loc, source, lines, from_override)
            problems.append(f"{where}: {'.'.join(loc)}: {_explain(error, loc)}")
        config = None
    if config is not None:
        for loc, problem in _cross_section_problems(config):
            problems.append(f"{_where(loc, source, lines, from_override)}: {'.'.join(loc)}: {problem}")
    if problems or config is None:
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        raise ConfigError(f"invalid config {source} ({count}):\n  - " + "\n  - ".join(problems))
    return config


def read_yaml(source: Path, hint: str) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    """A YAML file that must hold a mapping, and the line of each of its keys (`key_lines`). Raises ConfigError
    naming the file and line when it is not UTF-8, not YAML, empty or not a mapping; `hint` says what the file
    should hold. Every config reader (the pipeline config, `import-config`) reads through it."""
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = source.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{source}:{line}: not UTF-8 text (byte {exc.object[exc.start]:#04x}); save it as UTF-8."
        ) from None
    try:
        raw = yaml.safe_load(text)
        lines = key_lines(yaml.compose(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else str(source)
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        kind = "empty" if raw is None else f"a {type(raw).__name__}, not a mapping of keys"
        raise ConfigError(f"{source}:1: the file is {kind}; {hint}.")
    return {str(k): v for k, v in raw.items()}, lines


def key_lines(node: yaml.Node | None, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """Map every dotted key path in a YAML document to its 1-based line number."""
    lines: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = (*prefix, str(key_node.value))
            lines[path] = key_node.start_mark.line + 1
            lines.update(key_lines(value_node, path))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            path = (*prefix, str(index))
            lines[path] = item.start_mark.line + 1
            lines.update(key_lines(item, path))
    return lines


def _where(
    loc: tuple[str, ...],
    source: Path,
    lines: dict[tuple[str, ...], int],
    from_override: dict[tuple[str, ...], str],
) -> str:
    # An override replaces the file's value under its key (items of a list too): name the override, not the line.
    for depth in range(len(loc), 0, -1):
        if loc[:depth] in from_override:
            return f"override {from_override[loc[:depth]]!r}"
    for depth in range(len(loc), 0, -1):
        if loc[:depth] in lines:
            return f"{source}:{lines[loc[:depth]]}"
    return str(source)


def _explain(error: Any, loc: tuple[str, ...]) -> str:
    """Pydantic's message plus what was given and, for unknown keys, the closest known ones."""
    if error["type"] == "extra_forbidden":
        allowed = _fields_at(loc[:-1])
        close = difflib.get_close_matches(loc[-1], allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown key; {hint}allowed keys: {', '.join(sorted(allowed))}"
    if error["type"] == "missing":
        return "required field is missing"
    given = error.get("input")
    return f"{error['msg']} (given: {given!r})"


def _fields_at(loc: tuple[str, ...]) -> list[str]:
    model: Any = PipelineConfig
    for part in loc:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(model.model_fields)


def _set_dotted(raw: dict[str, Any], keys: tuple[str, ...], value: Any) -> str | None:
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            return f"{key!r} is not a section, it holds {child!r}"
        node = child
    node[keys[-1]] = value
    return None


def _cross_section_problems(config: PipelineConfig) -> list[tuple[tuple[str, ...], str]]:
    """Settings that are each valid but do not work together."""
    problems: list[tuple[tuple[str, ...], str]] = []
    if config.data.format == "text":
        answered = [m for m in config.eval.metrics if m != "perplexity"]
        if answered:
            problems.append((("eval", "metrics"), f"data.format=text has no prompts to answer, so {answered} cannot be "
                             "measured; use eval.metrics=[perplexity] and gate on loss or perplexity"))  # fmt: skip
    unmade = [t for t in config.publish.include_gguf if t not in config.quantize.types]
    if unmade:
        problems.append((("publish", "include_gguf"), f"{unmade} not made by the quantize stage (quantize.types="
                         f"{list(config.quantize.types)}); add them to quantize.types or drop them here"))  # fmt: skip
    return problems


def _resolve_data_paths(raw: dict[str, Any], base: Path) -> None:
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    for name in ("train_file", "validation_file", "test_file"):
        value = data.get(name)
        if (
            isinstance(value, str)
            and value
            and not value.startswith("hub:")
            and not Path(value).expanduser().is_absolute()
        ):
            data[name] = str((base / value).resolve())
