"""`loraforge serve` against the project's Hub server on loopback: two published adapters on one base behind the
OpenAI-compatible API. The served greedy answers equal `pull`'s; concurrent requests naming different adapters
(and the base) are answered in shared batches and get the answers they get alone; streaming sends the same text;
bad requests are 4xx with a message naming the field; adapters are added and removed at run time with the admin
token; SIGTERM stops the server cleanly. The llama.cpp backend (`--gguf f16`) applies each adapter's published
GGUF LoRA per request on one GGUF base."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from pipeline_fixtures import REPO, TOKEN, _config, _run

pytestmark = pytest.mark.integration
OTHER = "loraforge/tiny-router-seed7"
ADMIN = "serve-admin-token"
PROMPTS = ["My card was charged twice for the same order.", "The app crashes when I open settings."]
TOKENS = 6


@pytest.fixture(scope="module")
def published(first_run: dict, tiny_model: Path, workdir: Path, hub: str) -> dict[str, str]:
    """The first run's adapter and a second one (another seed and learning rate) on the same tiny base."""
    other = _run(_config(tiny_model, workdir, hub, "train.seed=7", "train.learning_rate=0.01",
                         f"publish.repo_id={OTHER}"))  # fmt: skip
    return {"router": f"{REPO}@{first_run['publish']['tag']}", "seed7": f"{OTHER}@{other['publish']['tag']}"}


@pytest.fixture(scope="module")
def server(published: dict[str, str], hub: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    yield from _serve(published, hub, tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def gguf_server(
    published: dict[str, str], hub: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    yield from _serve(published, hub, tmp_path_factory.mktemp("serve-gguf"), "--gguf", "f16")


def _serve(published: dict[str, str], hub: str, folder: Path, *options: str) -> Iterator[dict[str, Any]]:
    """`loraforge serve` with the published adapters, in its own process, until the test module ends."""
    from hub import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "loraforge.flows.cli", "serve", "--endpoint", hub, "--port", str(port), *options,
           *[arg for name, spec in published.items() for arg in ("--adapter", f"{name}={spec}")]]  # fmt: skip
    env = {**os.environ, "HF_TOKEN": TOKEN, "LORAFORGE_ADMIN_TOKEN": ADMIN, "OMP_NUM_THREADS": "1"}
    log_path = folder / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                assert process.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, f"the server did not start: {log_path.read_text()}"
                time.sleep(0.5)
        yield {"url": url, "process": process, "log": log_path}
        if process.poll() is None:
            process.kill()
            process.wait()


def _call(server: dict[str, Any], method: str, path: str, body: Any = None, token: str | None = None) -> Any:
    """(status, JSON body) of one request."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server["url"] + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _chat(server: dict[str, Any], model: str, prompt: str) -> str:
    request = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": TOKENS}
    status, body = _call(server, "POST", "/v1/chat/completions", request)
    assert status == 200, body
    assert body["object"] == "chat.completion" and body["model"] == model
    assert body["usage"]["completion_tokens"] <= TOKENS
    return str(body["choices"][0]["message"]["content"]).strip()


def test_served_answers_equal_pull_and_concurrent_adapters_do_not_bleed(
    server: dict[str, Any], published: dict[str, str], hub: str
) -> None:
    from loraforge.tasks.pull import pull

    status, models = _call(server, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["base", "router", "seed7"]
    assert models["data"][1]["repo"] == REPO and models["data"][2]["repo"] == OTHER
    alone = {name: [_chat(server, name, p) for p in PROMPTS] for name in ("router", "seed7", "base")}
    for name, spec in published.items():
        assert alone[name] == pull([spec], PROMPTS, endpoint=hub, max_new_tokens=TOKENS)[0].answers
    assert alone["router"] != alone["seed7"]  # two different adapters: the comparison below can tell them apart

    before = _call(server, "GET", "/health")[1]["batches"]
    jobs = [(name, prompt) for _ in range(3) for name in ("router", "seed7", "base") for prompt in PROMPTS]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: _chat(server, *job), jobs))
    assert together == [alone[name][PROMPTS.index(prompt)] for name, prompt in jobs]
    health = _call(server, "GET", "/health")[1]
    assert health["largest_batch"] > 1 and health["batches"] - before < len(jobs)  # shared batches, mixed adapters


def test_streaming_sends_the_same_text_as_server_sent_events(server: dict[str, Any]) -> None:
    body = {"model": "router", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": TOKENS,
            "stream": True}  # fmt: skip
    request = urllib.request.Request(server["url"] + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        lines = [line.decode().strip() for line in response if line.strip()]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text.strip() == _chat(server, "router", PROMPTS[0])
    request = {"model": "seed7", "prompt": "Hello", "max_tokens": 3}
    status, completion = _call(server, "POST", "/v1/completions", request)
    assert status == 200 and completion["object"] == "text_completion"
    assert completion["usage"]["completion_tokens"] <= 3 and isinstance(completion["choices"][0]["text"], str)


def test_bad_requests_are_4xx_that_name_the_field(server: dict[str, Any]) -> None:
    status, body = _call(server, "POST", "/v1/chat/completions",
                         {"model": "nope", "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert status == 404 and body["error"]["message"] == "model 'nope' is not served; loaded: base, router, seed7"
    status, body = _call(server, "POST", "/v1/chat/completions",
                         {"model": "router", "messages": [{"role": "robot", "content": "hi"}], "temperature": 5,
                          "n": 2})  # fmt: skip
    message = body["error"]["message"]
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert "temperature:" in message and "n:" in message and "messages.0.role:" in message  # every problem at once
    assert "Traceback" not in message
    status, body = _call(server, "POST", "/v1/completions", {"model": "router"})
    assert status == 400 and "prompt: Field required" in body["error"]["message"]
    status, body = _call(server, "POST", "/v1/completions", {"model": "router", "prompt": "x", "max_tokens": 100000})
    assert status == 400 and "max_tokens:" in body["error"]["message"]


def test_adapters_are_added_and_removed_at_run_time_with_the_admin_token(
    server: dict[str, Any], published: dict[str, str]
) -> None:
    status, body = _call(server, "POST", "/v1/adapters", {"name": "again", "repo": published["seed7"]})
    assert status == 401 and "Authorization: Bearer" in body["error"]["message"]
    status, body = _call(server, "POST", "/v1/adapters", {"name": "router", "repo": published["seed7"]}, ADMIN)
    assert status == 409 and "already served" in body["error"]["message"]
    status, body = _call(server, "POST", "/v1/adapters", {"name": "bad.name", "repo": published["seed7"]}, ADMIN)
    assert status == 400 and "adapter name 'bad.name'" in body["error"]["message"]
    status, body = _call(server, "POST", "/v1/adapters", {"name": "x", "repo": "loraforge/absent"}, ADMIN)
    assert status == 400 and "cannot download" in body["error"]["message"]

    status, body = _call(server, "POST", "/v1/adapters", {"name": "again", "repo": published["seed7"]}, ADMIN)
    assert status == 200 and body["id"] == "again" and body["repo"] == OTHER
    assert _chat(server, "again", PROMPTS[0]) == _chat(server, "seed7", PROMPTS[0])
    assert _call(server, "DELETE", "/v1/adapters/again", token=ADMIN) == (200, {"id": "again", "object": "model",
                                                                              "deleted": True})  # fmt: skip
    assert _call(server, "DELETE", "/v1/adapters/again", token=ADMIN)[0] == 404
    status, _ = _call(server, "POST", "/v1/chat/completions",
                      {"model": "again", "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert status == 404


def test_gguf_backend_applies_each_adapters_gguf_lora_per_request(
    gguf_server: dict[str, Any], published: dict[str, str], hub: str, tiny_model: Path
) -> None:
    """llama.cpp: the base as an f16 GGUF, each adapter's published GGUF LoRA switched per request. Each answer
    equals llama.cpp's own, with that LoRA applied when the model is loaded; concurrent requests naming different
    adapters and the base get the answers they get alone."""
    import llama_cpp

    from loraforge.tasks.hubclient import hub_endpoint
    from loraforge.tasks.models import load_tokenizer
    from loraforge.tasks.pull import _download
    from loraforge.tasks.serve import base_gguf

    alone = {name: [_chat(gguf_server, name, p) for p in PROMPTS] for name in ("router", "seed7", "base")}
    assert alone["router"] != alone["seed7"]
    for name, spec in published.items():
        pulled = _download(spec, hub_endpoint(hub), None, extra=("gguf/*-LoRA.gguf",))
        lora = next((pulled.folder / "gguf").glob("*-LoRA.gguf"))
        tokenizer = load_tokenizer(pulled.folder)
        llm = llama_cpp.Llama(model_path=str(base_gguf(tiny_model)), lora_path=str(lora), n_ctx=512, verbose=False)
        try:
            for prompt, served in zip(PROMPTS, alone[name], strict=True):
                text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                     add_generation_prompt=True)  # fmt: skip
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                made = []
                for token in llm.generate(ids, temp=0.0, top_k=0, min_p=0.0, repeat_penalty=1.0, reset=True):
                    if token == tokenizer.eos_token_id or len(made) == TOKENS:
                        break
                    made.append(int(token))
                assert tokenizer.decode(made, skip_special_tokens=True).strip() == served
        finally:
            llm.close()

    jobs = [(name, prompt) for _ in range(2) for name in ("router", "seed7", "base") for prompt in PROMPTS]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: _chat(gguf_server, *job), jobs))
    assert together == [alone[name][PROMPTS.index(prompt)] for name, prompt in jobs]


def test_sigterm_stops_the_server_cleanly(server: dict[str, Any]) -> None:
    process = server["process"]
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    log = server["log"].read_text()
    assert "Traceback" not in log, log
