"""The Ollama Modelfile's TEMPLATE, rendered by Go's text/template the way Ollama prepares prompts
(tests/unit/ollama_render.go), gives exactly the text the Hugging Face chat template gives; templates of no known
family are refused with the reason. Every named template (tasks/data.py CHAT_TEMPLATES) is also rendered by
llama.cpp from a tiny GGUF carrying it (llama-cpp-python's Jinja2ChatFormatter on the GGUF's
`tokenizer.chat_template`, through the quantize stage's `_template_parity`), and the three token sequences compared.

Go is part of the set-up (`make setup` installs Debian's golang-go): without it these tests fail, they do not skip,
since the Modelfile's template would otherwise ship untested.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from loraforge.tasks.data import CHAT_TEMPLATES, TEMPLATE_STOPS, TEMPLATE_TOKENS, stop_token_ids
from loraforge.tasks.errors import StageError
from loraforge.tasks.modelfile import PROBES, Sampling, modelfile, translate_chat_template

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
VICUNA = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' + message['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
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
    with pytest.raises(StageError, match=r"cannot write an Ollama TEMPLATE .*known families: ChatML, Gemma, Llama 3, "
                       r"Mistral, Phi-3, Zephyr, Alpaca.*its output starts 'USER: Hello there."):  # fmt: skip
        translate_chat_template(VICUNA)
    # Llama 3's format, but the template trims the content, which Go's template cannot mirror.
    with pytest.raises(StageError, match=r"llama3: differs at character 45 of a 1-message conversation: template "
                       r"gives 'Spaces around"):  # fmt: skip
        translate_chat_template(LLAMA3, bos_token="<s>")
    near_chatml = CHATML_PLAIN.replace("'<|im_end|>' + '\n'", "'<|im_end|>'")  # no newline between turns
    with pytest.raises(StageError, match=r"chatml: differs at character \d+ of a 1-message conversation: "
                       r"template gives '<\|im_start\|>assistant\\n', chatml '\\n<\|im_start\|>assistant"):  # fmt: skip
        translate_chat_template(near_chatml)


def test_modelfile_lines(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    translation = translate_chat_template(tokenizer.chat_template)
    greedy = Sampling(temperature=0.0, top_p=0.9, seed=3, num_predict=64)
    text = modelfile("router-Q4_K_M.gguf", translation, ["<|im_end|>", "<|endoftext|>"], "Route tickets.", greedy)
    lines = text.splitlines()
    assert "FROM ./router-Q4_K_M.gguf" in lines
    assert [line for line in lines if line.startswith("PARAMETER")] == [
        'PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|endoftext|>"', "PARAMETER temperature 0",
        "PARAMETER top_k 1", "PARAMETER top_p 1", "PARAMETER repeat_penalty 1", "PARAMETER seed 3",
        "PARAMETER num_predict 64"]  # fmt: skip
    sampled = modelfile("a.gguf", translation, [], None, Sampling(temperature=0.7, top_p=0.9, seed=3, num_predict=8))
    assert "PARAMETER temperature 0.7\nPARAMETER top_k 0\nPARAMETER top_p 0.9\n" in sampled
    assert lines[-1] == 'SYSTEM """Route tickets."""'
    assert f'TEMPLATE """{translation.go_template}"""' in text
    assert "SYSTEM" not in modelfile("a.gguf", translation, ["<|im_end|>"], None, greedy)
    with pytest.raises(StageError, match="three double quotes"):
        modelfile("a.gguf", translation, ["<|im_end|>"], 'say """hi"""', greedy)


@pytest.fixture(scope="module")
def template_gguf(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny model with every named template's special tokens added, and its f16 GGUF, converted once with the
    vendored convert_hf_to_gguf.py as the quantize stage does: (HF folder, GGUF)."""
    import llama_cpp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.tasks.quantize import _convert, _converter_dir

    folder = tmp_path_factory.mktemp("templates")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.add_tokens(sorted({t for tokens in TEMPLATE_TOKENS.values() for t in tokens}), special_tokens=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    gguf = folder / "tiny-f16.gguf"
    _convert(_converter_dir(llama_cpp.__version__), folder / "model", gguf, "f16", "tiny", timeout=300)
    return folder / "model", gguf


@pytest.mark.parametrize("name", list(CHAT_TEMPLATES))
def test_named_template_renders_alike_in_transformers_llama_cpp_and_ollama(
    name: str, template_gguf: tuple[Path, Path], go_render: Path, tmp_path: Path
) -> None:
    """One named template, three renderers, one text: transformers' apply_chat_template (training), llama.cpp
    (llama-cpp-python's Jinja2ChatFormatter on the template embedded in a GGUF, through the quantize stage's own
    parity check `_template_parity`, as the pipeline checks every GGUF) and Ollama (Go's text/template on the
    Modelfile's TEMPLATE, tokenized as Ollama does: llama.cpp adds BOS when the vocabulary says so)."""
    import llama_cpp
    from transformers import AutoTokenizer

    from loraforge.tasks.quantize import _adds_bos, _template_parity

    model_dir, base_gguf = template_gguf
    template = CHAT_TEMPLATES[name]
    gguf = tmp_path / f"{name}.gguf"  # the same GGUF carrying this template (metadata copied, tensors kept)
    _with_chat_template(base_gguf, gguf, template)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = template
    tokenizer.stop_token_ids = stop_token_ids(tokenizer, TEMPLATE_STOPS[name])  # as eval and quantize set them
    llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    assert llm.metadata["tokenizer.chat_template"] == template
    problems, llama_ids = _template_parity(llm, tokenizer, CONVERSATIONS)  # stop tokens end generation there too
    assert problems == []
    translation = translate_chat_template(template, tokenizer.bos_token, tokenizer.eos_token).for_gguf(_adds_bos(gguf))
    assert translation.family == name
    for messages, ids in zip(CONVERSATIONS, llama_ids, strict=True):
        hf_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ollama_text = _go(go_render, translation.go_template, messages=messages)
        assert translation.bos + ollama_text == hf_text
        assert llm.tokenize(ollama_text.encode(), add_bos=True, special=True) == ids
        answered = [*messages, {"role": "assistant", "content": "An answer."}]  # prompt masking needs a prefix
        assert tokenizer.apply_chat_template(answered, tokenize=False).startswith(hf_text)
    for stop in TEMPLATE_STOPS[name]:  # each stop string is one token when it is a special token of the template
        assert stop not in TEMPLATE_TOKENS[name] or len(llm.tokenize(stop.encode(), add_bos=False, special=True)) == 1
    llm.close()


@functools.cache
def _gguf_reader(source: Path) -> Any:
    """The parsed GGUF, read once for every template: gguf-py parses its ~1M vocabulary parts one numpy view at a
    time (measured: ~2.4 s a parse; the seven templates' tests took 23 s parsing it each, 7 s parsing it once)."""
    import gguf

    return gguf.GGUFReader(source, "r")


def _with_chat_template(source: Path, target: Path, template: str) -> None:
    """A copy of the GGUF `source` whose tokenizer.chat_template is `template`: what gguf-py's gguf_new_metadata.py
    --chat-template-file does, called in this process (its main() would also set up the root logger)."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata, get_field_data

    reader = _gguf_reader(source)
    writer = gguf.GGUFWriter(target, arch=get_field_data(reader, gguf.Keys.General.ARCHITECTURE),
                             endianess=reader.endianess)  # fmt: skip
    if (alignment := get_field_data(reader, gguf.Keys.General.ALIGNMENT)) is not None:
        writer.data_alignment = alignment
    new = {gguf.Keys.Tokenizer.CHAT_TEMPLATE: MetadataDetails(gguf.GGUFValueType.STRING, template)}
    copy_with_new_metadata(reader, writer, new, [])


def test_publish_writes_the_hub_ollama_files_the_modelfile_implies(tmp_path: Path) -> None:
    """The repo-root `template`, `params`, `system` (for `ollama run hf.co/ORG/NAME:Q4_K_M`) say what the
    Modelfile says: its TEMPLATE, its PARAMETER lines (stop as a list), its SYSTEM."""
    from loraforge.tasks.publish import _write_ollama_files

    translation = translate_chat_template(CHAT_TEMPLATES["gemma"], "<bos>", "<eos>")
    sampling = Sampling(temperature=0.0, top_p=1.0, seed=0, num_predict=32)
    text = modelfile("m-Q4_K_M.gguf", translation, ["<eos>", "<end_of_turn>"], 'Say "hi".\nTwice.', sampling)
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "m-Q4_K_M.Modelfile").write_text(text)
    _write_ollama_files(tmp_path)
    assert (tmp_path / "template").read_text() == translation.go_template
    assert (tmp_path / "system").read_text() == 'Say "hi".\nTwice.'
    assert json.loads((tmp_path / "params").read_text()) == {
        "stop": ["<eos>", "<end_of_turn>"], "temperature": 0, "top_k": 1, "top_p": 1, "repeat_penalty": 1,
        "seed": 0, "num_predict": 32}  # fmt: skip
    bare = tmp_path / "bare"  # no system prompt: no system file; no Modelfile (adapter-only): none of them
    (bare / "gguf").mkdir(parents=True)
    (bare / "gguf" / "m-F16.Modelfile").write_text(modelfile("m-F16.gguf", translation, ["<eos>"], None, sampling))
    _write_ollama_files(bare)
    assert sorted(p.name for p in bare.iterdir()) == ["gguf", "params", "template"]
    (tmp_path / "none").mkdir()
    _write_ollama_files(tmp_path / "none")
    assert list((tmp_path / "none").iterdir()) == []


def test_quantize_writes_a_modelfile_that_prompts_as_training_did(
    template_gguf: tuple[Path, Path], go_render: Path, tmp_path: Path
) -> None:
    """The quantize stage's Modelfile for a GGUF of a named template (gemma: BOS first, stop <end_of_turn>):
    its TEMPLATE, rendered by Go and tokenized as Ollama does (llama.cpp adds BOS only when the vocabulary says
    so), gives the ids training used; it stops at EOS and the template's stop strings; greedy as the eval was."""
    import llama_cpp
    from transformers import AutoTokenizer

    from loraforge.tasks.data import DataSpec
    from loraforge.tasks.modelfile import hub_files
    from loraforge.tasks.quantize import _GgufFile, _write_modelfiles

    model_dir, base_gguf = template_gguf
    gguf = tmp_path / "m-F16.gguf"
    shutil.copy2(base_gguf, gguf)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = CHAT_TEMPLATES["gemma"]
    tokenizer.stop_token_ids = []
    translation = translate_chat_template(tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)
    spec = DataSpec(256, "Be brief.", {}, {}, None, None, TEMPLATE_STOPS["gemma"])
    files = {"f16": _GgufFile("f16", gguf), "lora_f16": _GgufFile("lora_f16", tmp_path / "m-F16-LoRA.gguf")}
    _write_modelfiles(files, translation, tokenizer, spec, Sampling(num_predict=24))
    assert files["lora_f16"].modelfile is None and files["f16"].modelfile == "m-F16.Modelfile"
    text = (tmp_path / "m-F16.Modelfile").read_text()
    params = json.loads(hub_files(text)["params"])
    assert params["stop"] == [tokenizer.eos_token, "<end_of_turn>"]
    assert (params["temperature"], params["num_predict"]) == (0, 24)
    llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    for messages in CONVERSATIONS:
        ollama_text = _go(go_render, hub_files(text)["template"], messages=messages, system="Be brief.")
        with_system = messages if messages[0]["role"] == "system" else [
            {"role": "system", "content": "Be brief."}, *messages]  # fmt: skip
        hf_ids = tokenizer.apply_chat_template(with_system, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert llm.tokenize(ollama_text.encode(), add_bos=True, special=True) == list(hf_ids)
    llm.close()
