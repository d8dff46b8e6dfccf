"""Ollama Modelfiles for GGUF files: FROM, a TEMPLATE in Go's text/template that renders conversations exactly as
the model's (Jinja) chat template does, one `PARAMETER stop` per stop string, the sampling settings the eval
measured with (`PARAMETER temperature 0` for greedy, `num_predict` = eval.max_new_tokens, ...), and SYSTEM when the
data stage put a system prompt in every training row. `hub_files` reads the same translation off a Modelfile as the
repo-root `template`, `system` and `params` files that `ollama run hf.co/ORG/NAME:Q4_K_M` reads.

Ollama cannot run Jinja, so the chat template has to be translated. Rather than translate arbitrary Jinja, a
template is recognised as one of the families below by rendering probe conversations with it and comparing with
the family's own renderer (a Python mirror of the Go template written for it); a template that matches no family
is refused with the reason, never given a guessed TEMPLATE. Families (the named templates of tasks/data.py, and
the same formats written by model makers): ChatML (`<|im_start|>role ... <|im_end|>`, with or without a default
system message, e.g. SmolLM2, Qwen2), Gemma (`<start_of_turn>user ... <end_of_turn>`, system folded into the first
user turn), Llama 3 (`<|start_header_id|>role<|end_header_id|>`), Mistral (`[INST]...[/INST]`, v3-tekken spacing,
system folded into the first user turn), Phi-3 (`<|user|> ... <|end|>`), Zephyr (`<|user|> ... EOS`) and Alpaca
(`### Instruction:` / `### Response:`).

A template that starts with the BOS token (Gemma, Llama 3, Mistral) gets a Go template without it: Ollama's
tokenizer adds BOS itself (the GGUF's add_bos_token), as Ollama's own templates for those models assume.

Ollama fills `.Messages` (each with `.Role`, `.Content`; the Modelfile's SYSTEM becomes the first message when the
request has no system message) for chat requests, and `.System`, `.Prompt`, `.Response` for the older generate
path; the templates handle both. tests/unit/test_modelfile.py renders them with Go itself and compares with
`tokenizer.apply_chat_template` and with llama.cpp's rendering of the GGUF's template.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loraforge.tasks.errors import StageError

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
    [{"role": "user", "content": "  Spaces around, kept as they are.\n"}],  # a template that trims is refused
]


@dataclass(frozen=True)
class Translation:
    """A chat template recognised as a family: the Go template for Ollama and the Python mirror it was checked
    with (`render(messages)` = the prompt, generation prompt included, BOS included)."""

    family: str
    go_template: str
    render: Callable[[list[Message]], str]
    bos: str = ""  # the BOS text the chat template starts with; Ollama's tokenizer adds it, the Go template doesn't

    def for_gguf(self, adds_bos: bool) -> Translation:
        """This translation for a GGUF whose tokenizer adds BOS (`adds_bos`, llama.cpp's llama_vocab_get_add_bos:
        Ollama tokenizes prompts with it) or not (then the Go template writes BOS itself)."""
        if adds_bos or not self.bos:
            return self
        return dataclasses.replace(self, go_template=self.bos + self.go_template, bos="")


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


def _go(messages: str, legacy: str, end: str) -> str:
    """A Go template: `messages` for chat requests, `legacy` for the generate path (.System, .Prompt), then the
    response Ollama appends on the generate path, closed by `end`."""
    return (
        "{{ if .Messages }}"
        + messages
        + "{{ else }}"
        + legacy
        + "{{ end }}{{ .Response }}{{ if .Response }}"
        + end
        + "{{ end }}"
    )


def _tagged(family: str, end: str) -> Translation:
    """Zephyr (`end` = EOS) and Phi-3 (`end` = <|end|>): `<|role|>\ncontent END\n`, prompt `<|assistant|>\n`."""

    def render(messages: list[Message]) -> str:
        return "".join(f"<|{m['role']}|>\n{m['content']}{end}\n" for m in messages) + "<|assistant|>\n"

    go = _go(
        f"{{{{ range .Messages }}}}<|{{{{ .Role }}}}|>\n{{{{ .Content }}}}{end}\n{{{{ end }}}}<|assistant|>\n",
        f"{{{{ if .System }}}}<|system|>\n{{{{ .System }}}}{end}\n{{{{ end }}}}"
        f"{{{{ if .Prompt }}}}<|user|>\n{{{{ .Prompt }}}}{end}\n{{{{ end }}}}<|assistant|>\n",
        f"{end}\n",
    )
    return Translation(family, go, render)


def _alpaca(eos: str) -> Translation:
    """Alpaca: system text, `### Instruction:` for users, `### Response:` (closed by EOS) for answers."""

    def render(messages: list[Message]) -> str:
        parts = {"system": "{}\n\n", "user": "### Instruction:\n{}\n\n"}
        text = "".join(parts.get(m["role"], "### Response:\n{}" + eos + "\n\n").format(m["content"]) for m in messages)
        return text + "### Response:\n"

    go = _go(
        '{{ range .Messages }}{{ if eq .Role "system" }}{{ .Content }}\n\n{{ else if eq .Role "user" }}'
        f"### Instruction:\n{{{{ .Content }}}}\n\n{{{{ else }}}}### Response:\n{{{{ .Content }}}}{eos}\n\n"
        "{{ end }}{{ end }}### Response:\n",
        "{{ if .System }}{{ .System }}\n\n{{ end }}{{ if .Prompt }}### Instruction:\n{{ .Prompt }}\n\n{{ end }}"
        "### Response:\n",
        f"{eos}\n\n",
    )
    return Translation("alpaca", go, render)


def _llama3(bos: str) -> Translation:
    """Llama 3.x headers, without the date/tools preamble of Meta's 3.1+ templates."""

    def header(role: str) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

    def render(messages: list[Message]) -> str:
        return bos + "".join(header(m["role"]) + m["content"] + "<|eot_id|>" for m in messages) + header("assistant")

    go = _go(
        "{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
        + header("assistant"),
        "{{ if .System }}"
        + header("system")
        + "{{ .System }}<|eot_id|>{{ end }}{{ if .Prompt }}"
        + header("user")
        + "{{ .Prompt }}<|eot_id|>{{ end }}"
        + header("assistant"),
        "<|eot_id|>",
    )
    return Translation("llama3", go, render, bos)


def _folded(messages: list[Message]) -> list[Message]:
    """A leading system message folded into the first turn after it (Gemma's and Mistral's way)."""
    if not messages or messages[0]["role"] != "system":
        return messages
    if len(messages) == 1:
        return []
    first = {**messages[1], "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
    return [first, *messages[2:]]


# Go side of _folded: a system message is kept in $system and written before the next turn's content.
_FOLD = '{{ $system := "" }}{{ range .Messages }}{{ if eq .Role "system" }}{{ $system = printf "%s\\n\\n" .Content }}'


def _gemma(bos: str) -> Translation:
    """Gemma 3: `<start_of_turn>user|model\n...<end_of_turn>\n`, system folded into the first user turn."""

    def render(messages: list[Message]) -> str:
        turns = "".join(
            f"<start_of_turn>{'model' if m['role'] == 'assistant' else m['role']}\n{m['content']}<end_of_turn>\n"
            for m in _folded(messages)
        )
        return bos + turns + "<start_of_turn>model\n"

    go = _go(
        _FOLD + '{{ else }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n'
        '{{ $system }}{{ .Content }}<end_of_turn>\n{{ $system = "" }}{{ end }}{{ end }}<start_of_turn>model\n',
        "<start_of_turn>user\n{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}<end_of_turn>\n"
        "<start_of_turn>model\n",
        "<end_of_turn>\n",
    )
    return Translation("gemma", go, render, bos)


def _mistral(bos: str, eos: str) -> Translation:
    """Mistral v3-tekken: `[INST]user[/INST]answerEOS`, system folded into the first user turn; the generation
    prompt adds nothing after `[/INST]`."""

    def render(messages: list[Message]) -> str:
        return bos + "".join(f"[INST]{m['content']}[/INST]" if m["role"] == "user" else m["content"] + eos
                             for m in _folded(messages))  # fmt: skip

    go = _go(
        _FOLD + '{{ else if eq .Role "user" }}[INST]{{ $system }}{{ .Content }}[/INST]{{ $system = "" }}'
        f"{{{{ else }}}}{{{{ .Content }}}}{eos}{{{{ end }}}}{{{{ end }}}}",
        "[INST]{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}[/INST]",
        eos,
    )
    return Translation("mistral", go, render, bos)


def _candidates(lone: str, bos_token: str, eos_token: str) -> list[Translation]:
    """The families whose marks the template's rendering of a one-message conversation carries."""
    found = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n<\|im_start\|>user\n", lone, re.DOTALL)
    bos = bos_token if bos_token and lone.startswith(bos_token) else ""
    marks: list[tuple[str, Callable[[], Translation]]] = [
        ("<|im_start|>", lambda: _chatml(found.group(1) if found else None)),
        ("<start_of_turn>", lambda: _gemma(bos)),
        ("<|start_header_id|>", lambda: _llama3(bos)),
        ("[INST]", lambda: _mistral(bos, eos_token)),
        ("<|end|>", lambda: _tagged("phi3", "<|end|>")),
        ("<|user|>", lambda: _tagged("zephyr", eos_token)),
        ("### Instruction:", lambda: _alpaca(eos_token)),
    ]
    return [make() for mark, make in marks if mark in lone]


FAMILIES = "ChatML, Gemma, Llama 3, Mistral, Phi-3, Zephyr, Alpaca"


def translate_chat_template(template: str, bos_token: str = "", eos_token: str = "") -> Translation:
    """Recognise the Jinja chat template as a family and return its Go template, checked on PROBES.

    Raises:
        StageError: the template matches no family; the message names the closest family and where it differs.
    """
    render_hf = _jinja_renderer(template, bos_token, eos_token)
    lone = render_hf(PROBES[0])
    problems = []
    for candidate in _candidates(lone, bos_token, eos_token):
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
    families = FAMILIES
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


@dataclass(frozen=True)
class Sampling:
    """How the eval generated its answers (eval.temperature, top_p, seed, max_new_tokens), as Ollama parameters:
    greedy (temperature 0) stays greedy, and Ollama's defaults that transformers' generate does not apply
    (repeat_penalty 1.1, top_k 40) are turned off, so Ollama answers what the model card measured."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    num_predict: int = 16

    def parameters(self) -> dict[str, float | int]:
        """Ollama's parameter names and values, in Modelfile order."""
        greedy = self.temperature == 0
        return {"temperature": self.temperature, "top_k": 1 if greedy else 0, "top_p": 1.0 if greedy else self.top_p,
                "repeat_penalty": 1.0, "seed": self.seed, "num_predict": self.num_predict}  # fmt: skip


def modelfile(
    gguf_name: str, translation: Translation, stop_tokens: list[str], system_prompt: str | None, sampling: Sampling
) -> str:
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
    lines += [f"PARAMETER {name} {value:g}" for name, value in sampling.parameters().items()]
    if system_prompt:
        lines.append(f'SYSTEM """{system_prompt}"""')
    return "\n".join(lines) + "\n"


def hub_files(modelfile_text: str) -> dict[str, str]:
    """The repo-root files Hugging Face's Ollama integration reads for `ollama run hf.co/ORG/NAME:TYPE`, read off
    a Modelfile written by `modelfile` so the two cannot disagree: `template` (its TEMPLATE), `params` (JSON: its
    PARAMETER lines, `stop` as a list) and `system` (its SYSTEM, when it has one)."""
    template = re.search(r'^TEMPLATE """(.*?)"""$', modelfile_text, re.DOTALL | re.MULTILINE)
    if template is None:
        raise StageError("the Modelfile has no TEMPLATE: write it with tasks.modelfile.modelfile (quantize stage).")
    params: dict[str, Any] = {"stop": []}
    for name, value in re.findall(r"^PARAMETER (\w+) (.*)$", modelfile_text, re.MULTILINE):
        if name == "stop":
            params["stop"].append(json.loads(value))
        else:
            params[name] = json.loads(value)
    files = {"template": template.group(1), "params": json.dumps(params, indent=2) + "\n"}
    system = re.search(r'^SYSTEM """(.*?)"""$', modelfile_text, re.DOTALL | re.MULTILINE)
    if system is not None:
        files["system"] = system.group(1)
    return files
