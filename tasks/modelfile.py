"""Ollama Modelfiles for GGUF files: FROM, a TEMPLATE in Go's text/template that renders conversations exactly as
the model's (Jinja) chat template does, one `PARAMETER stop` per stop token, and SYSTEM when the data stage put a
system prompt in every training row.

Ollama cannot run Jinja, so the chat template has to be translated. Rather than translate arbitrary Jinja, a
template is recognised as one of the families below by rendering probe conversations with it and comparing with
the family's own renderer (a Python mirror of the Go template written for it); a template that matches no family
is refused with the reason, never given a guessed TEMPLATE. Families: ChatML (`<|im_start|>role ... <|im_end|>`,
with or without a default system message, e.g. SmolLM2, Qwen2).

Ollama fills `.Messages` (each with `.Role`, `.Content`; the Modelfile's SYSTEM becomes the first message when the
request has no system message) for chat requests, and `.System`, `.Prompt`, `.Response` for the older generate
path; the templates handle both. tests/unit/test_modelfile.py renders them with Go itself and compares with
`tokenizer.apply_chat_template`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from tasks.errors import StageError

Message = dict[str, str]

# Conversations every family renderer must reproduce exactly (with the generation prompt appended).
PROBES: list[list[Message]] = [
    [{"role": "user", "content": "Hello there."}],
    [{"role": "system", "content": "You route tickets."}, {"role": "user", "content": "My card was charged twice."}],
    [
        {"role": "user", "content": "First question?"},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "Second\nquestion, on two lines?"},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ],
]


@dataclass(frozen=True)
class Translation:
    """A chat template recognised as a family: the Go template for Ollama and the Python mirror it was checked
    with (`render(messages)` = the prompt, generation prompt included)."""

    family: str
    go_template: str
    render: Callable[[list[Message]], str]


def _chatml(default_system: str | None) -> Translation:
    """ChatML; `default_system` is the system message the template adds when the conversation has none."""

    def render(messages: list[Message]) -> str:
        text = ""
        if default_system is not None and (not messages or messages[0]["role"] != "system"):
            text += f"<|im_start|>system\n{default_system}<|im_end|>\n"
        for message in messages:
            text += f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n"
        return text + "<|im_start|>assistant\n"

    default = (
        f'{{{{- if ne (index .Messages 0).Role "system" }}}}<|im_start|>system\n{default_system}<|im_end|>\n'
        "{{ end }}"
        if default_system is not None
        else ""
    )
    legacy_default = f"{{{{ else }}}}<|im_start|>system\n{default_system}<|im_end|>\n" if default_system else ""
    go = (
        "{{- if .Messages }}\n"
        f"{default}"
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n"
        "{{ else }}\n"
        "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n"
        f"{legacy_default}"
        "{{ end }}\n"
        "{{- if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
        "{{ end }}{{ .Response }}{{ if .Response }}<|im_end|>\n{{ end }}"
    )
    return Translation("chatml", go, render)


def translate_chat_template(template: str, bos_token: str = "", eos_token: str = "") -> Translation:
    """Recognise the Jinja chat template as a family and return its Go template, checked on PROBES.

    Raises:
        StageError: the template matches no family; the message names the closest family and where it differs.
    """
    render_hf = _jinja_renderer(template, bos_token, eos_token)
    lone = render_hf(PROBES[0])
    candidates: list[Translation] = []
    found = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n<\|im_start\|>user\n", lone, re.DOTALL)
    if lone.startswith("<|im_start|>"):
        candidates.append(_chatml(found.group(1) if found else None))
    problems = []
    for candidate in candidates:
        for probe in PROBES:
            expected, got = render_hf(probe), candidate.render(probe)
            if expected != got:
                at = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b),
                          min(len(expected), len(got)))  # fmt: skip
                problems.append(
                    f"{candidate.family}: differs at character {at} of a {len(probe)}-message conversation: "
                    f"template gives {expected[at : at + 40]!r}, {candidate.family} {got[at : at + 40]!r}"
                )
                break
        else:
            return candidate
    families = "ChatML"
    reason = "; ".join(problems) or f"its output starts {lone[:60]!r}, which is none of: {families}"
    raise StageError(
        f"cannot write an Ollama TEMPLATE for this chat template (known families: {families}): {reason}. "
        "Set quantize.modelfile=false to export without Modelfiles, or add the family to tasks/modelfile.py."
    )


def _jinja_renderer(template: str, bos_token: str, eos_token: str) -> Callable[[list[Message]], str]:
    """Render as transformers does (sandboxed Jinja, trim_blocks/lstrip_blocks, raise_exception)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(template)

    def render(messages: list[Message]) -> str:
        return compiled.render(messages=messages, add_generation_prompt=True, bos_token=bos_token,
                               eos_token=eos_token)  # fmt: skip

    return render


def modelfile(gguf_name: str, translation: Translation, stop_tokens: list[str], system_prompt: str | None) -> str:
    """The Modelfile text for `gguf_name` (a file in the same folder)."""
    for text in [translation.go_template, system_prompt or ""]:
        if '"""' in text:
            raise StageError(f"cannot quote {text[:40]!r}... in a Modelfile: it contains three double quotes.")
    lines = [
        f"# Ollama Modelfile written by loraforge ({translation.family} chat template).",
        f"#   ollama create NAME -f {gguf_name.removesuffix('.gguf')}.Modelfile && ollama run NAME",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{translation.go_template}"""',
    ]
    lines += [f"PARAMETER stop {json.dumps(token)}" for token in stop_tokens]
    if system_prompt:
        lines.append(f'SYSTEM """{system_prompt}"""')
    return "\n".join(lines) + "\n"
