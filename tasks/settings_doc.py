"""docs/settings.md, generated from the config models' field descriptions (`make settings-doc`).

One table per section of `PipelineConfig` (key as written in `key=value` overrides, type, default, description);
a nested model gets its own section. `python -m loraforge.tasks.settings_doc --check` fails when the file is stale.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

SETTINGS_DOC = Path(__file__).resolve().parent.parent / "docs" / "settings.md"

HEADER = """\
# Settings reference

Generated from the `Field(description=...)` of the config models by `make settings-doc`
(`python -m loraforge.tasks.settings_doc`); do not edit by hand: a unit test (tests/unit/test_settings_doc.py)
fails when this file and the code differ. Every key can be set in the YAML config (flows/configs/demo.yaml shows them in
place) or on the command line as `key=value` (`loraforge run CONFIG train.r=8 eval.gate='[accuracy >= 0.9]'`);
`loraforge validate CONFIG [key=value ...]` checks a config and lists every problem with file:line.
"""


def render() -> str:
    """The text of docs/settings.md for the config models as they are now.

    Returns:
        Markdown: a header, then one section per model (the top level first), each a table of its fields.
    """
    from loraforge.tasks.config import PipelineConfig

    parts = [HEADER]
    for prefix, model, field in _sections(PipelineConfig):
        title = f"`{prefix}`" if prefix else "Top level"
        intro = field.description if field is not None else _doc(model)
        where = f"`{model.__name__}` in {model.__module__.replace('.', '/')}.py"
        lines = [f"## {title}", "", f"{intro} ({where}.)" if intro else f"{where}.", ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        for name, info in model.model_fields.items():
            if _submodel(info.annotation) is not None:
                continue  # its own section below
            key = f"{prefix}.{name}" if prefix else name
            cells = (f"`{key}`", _type(info.annotation), _default(info), info.description or "")
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def config_models() -> list[type[BaseModel]]:
    """Every config model reachable from `PipelineConfig`, the top one first."""
    from loraforge.tasks.config import PipelineConfig

    return [model for _, model, _ in _sections(PipelineConfig)]


def _sections(
    model: type[BaseModel], prefix: str = "", field: FieldInfo | None = None
) -> Iterator[tuple[str, type[BaseModel], FieldInfo | None]]:
    """(dotted prefix, model, the field holding it) for the model and, depth first, every nested model."""
    yield prefix, model, field
    for name, info in model.model_fields.items():
        sub = _submodel(info.annotation)
        if sub is not None:
            yield from _sections(sub, f"{prefix}.{name}" if prefix else name, info)


def _submodel(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _doc(model: type[BaseModel]) -> str:
    return (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")


def _type(annotation: Any) -> str:
    """A type as a reader writes it: `int | None`, `'auto' | 'cpu'`, `list[str]`, `dict['f16' | ..., float]`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " | ".join(json.dumps(a) if isinstance(a, str) else str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join("None" if a is type(None) else _type(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, str):
        return f"`{value}`"
    return f"`{json.dumps(value)}`"


def _cell(text: str) -> str:
    """Markdown table cell: one line, every `|` escaped (code spans too, as GFM tables need), `<` outside code
    spans written as `&lt;` (else `<store>` reads as an HTML tag and disappears)."""
    spans = " ".join(text.split()).replace("|", "\\|").split("`")
    return "`".join(s if i % 2 else s.replace("<", "&lt;") for i, s in enumerate(spans))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/settings.md is not up to date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not SETTINGS_DOC.is_file() or SETTINGS_DOC.read_text(encoding="utf-8") != text:
            print(f"{SETTINGS_DOC} is out of date with the config models; run `make settings-doc`", file=sys.stderr)
            return 1
        return 0
    SETTINGS_DOC.write_text(text, encoding="utf-8")
    print(f"wrote {SETTINGS_DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
