"""The Ollama Modelfile's TEMPLATE, rendered by Go's text/template the way Ollama prepares prompts
(tests/unit/ollama_render.go), gives exactly the text the Hugging Face chat template gives; templates of no known
family are refused with the reason.

Go is part of the set-up (`make setup` installs Debian's golang-go): without it these tests fail, they do not skip,
since the Modelfile's template would otherwise ship untested.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tasks.errors import StageError
from tasks.modelfile import PROBES, modelfile, translate_chat_template

HERE = Path(__file__).parent
CHATML_PLAIN = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CONVERSATIONS = PROBES + [
    [{"role": "user", "content": "Émojis 🙂 and {{ braces }} and <b>tags</b>"}],
    [
        {"role": "user", "content": "My card was charged twice."},
        {"role": "assistant", "content": "billing"},
        {"role": "user", "content": "And the app crashes too.\n\nWith two paragraphs."},
    ],
]


@pytest.fixture(scope="module")
def go_render(tmp_path_factory: pytest.TempPathFactory) -> Path:
    go = shutil.which("go")
    if go is None:
        pytest.fail("Go is not installed: `make setup` installs golang-go (apt-get install golang-go).")
    binary = tmp_path_factory.mktemp("go") / "ollama_render"
    # Standard library only; GOFLAGS=-mod=mod is not needed and nothing is downloaded (GOPROXY=off).
    subprocess.run([go, "build", "-o", str(binary), str(HERE / "ollama_render.go")], check=True,
                   env={**os.environ, "GO111MODULE": "off", "GOPROXY": "off"})  # fmt: skip
    return binary


def _go(binary: Path, template: str, **values: object) -> str:
    result = subprocess.run([str(binary)], input=json.dumps({"template": template, **values}), capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_smollm2_template_renders_in_go_as_in_transformers(go_render: Path, tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    translation = translate_chat_template(tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)
    assert translation.family == "chatml"
    for system in ("", "Route the ticket to one of: billing, technical, sales."):
        for messages in CONVERSATIONS:
            # Ollama puts the Modelfile's SYSTEM first when the request has none; training did the same
            # (data.system_prompt), so the HF side gets the system message the same way.
            hf_messages = messages if not system or messages[0]["role"] == "system" else [
                {"role": "system", "content": system}, *messages]  # fmt: skip
            expected = tokenizer.apply_chat_template(hf_messages, tokenize=False, add_generation_prompt=True)
            assert _go(go_render, translation.go_template, messages=messages, system=system) == expected
    # Ollama's generate path (.System / .Prompt) renders the same single turn.
    for system in ("", "Be brief."):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "Hi"}]
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert _go(go_render, translation.go_template, prompt="Hi", system=system) == expected


def test_chatml_without_a_default_system_message(go_render: Path) -> None:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    translation = translate_chat_template(CHATML_PLAIN)
    jinja = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(CHATML_PLAIN)
    for messages in CONVERSATIONS:
        expected = jinja.render(messages=messages, add_generation_prompt=True)
        assert _go(go_render, translation.go_template, messages=messages) == expected
    assert "You are" not in translation.go_template


def test_templates_of_no_known_family_are_refused_with_the_reason() -> None:
    with pytest.raises(StageError, match=r"cannot write an Ollama TEMPLATE .*known families: ChatML.*"
                       r"its output starts '<s><\|start_header_id\|>user"):  # fmt: skip
        translate_chat_template(LLAMA3, bos_token="<s>")
    near_chatml = CHATML_PLAIN.replace("'<|im_end|>' + '\n'", "'<|im_end|>'")  # no newline between turns
    with pytest.raises(StageError, match=r"chatml: differs at character \d+ of a 1-message conversation: "
                       r"template gives '<\|im_start\|>assistant\\n', chatml '\\n<\|im_start\|>assistant"):  # fmt: skip
        translate_chat_template(near_chatml)


def test_modelfile_lines(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    translation = translate_chat_template(tokenizer.chat_template)
    text = modelfile("router-Q4_K_M.gguf", translation, ["<|im_end|>", "<|endoftext|>"], "Route tickets.")
    lines = text.splitlines()
    assert "FROM ./router-Q4_K_M.gguf" in lines
    assert [line for line in lines if line.startswith("PARAMETER")] == [
        'PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|endoftext|>"']  # fmt: skip
    assert lines[-1] == 'SYSTEM """Route tickets."""'
    assert f'TEMPLATE """{translation.go_template}"""' in text
    assert "SYSTEM" not in modelfile("a.gguf", translation, ["<|im_end|>"], None)
    with pytest.raises(StageError, match="three double quotes"):
        modelfile("a.gguf", translation, ["<|im_end|>"], 'say """hi"""')
