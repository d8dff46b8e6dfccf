"""Serve: one base model, a library of published adapters, picked per request through an OpenAI-compatible API.

`loraforge serve --adapter NAME=ORG/REPO@TAG ...` pulls and verifies every adapter exactly as `loraforge pull` does
(the lineage's sha256 of every file, safetensors only, refused when tampered), loads them all onto one base model
(peft `load_adapter`: the base's weights once, a few MB per adapter) and answers

    GET  /health                      the base, the adapters, the queue
    GET  /v1/models                   "base" and every adapter (its repo, commit, tag)
    POST /v1/chat/completions         messages rendered with the adapter's own chat template and system prompt
    POST /v1/completions              a raw prompt
    POST /v1/adapters                 {"name": ..., "repo": "ORG/REPO@TAG"} (admin token)
    DELETE /v1/adapters/{name}        (admin token)

`model` in a request names the adapter (or "base"). Requests that arrive together are answered in one batch,
whatever adapters they name: peft's per-row adapter selection (`adapter_names`) runs each row through its own
adapter in one forward, so a batch of different adapters costs one batch, not one per adapter. Decoding is greedy
by default (temperature 0: the answers the adapter was gated on); each adapter stops at its template's stop tokens
(its lineage's data config) and EOS. Streaming sends the tokens as they are made (server-sent events).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import re
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from loraforge.tasks.errors import StageError
from loraforge.tasks.pull import Pulled

BASE = "base"  # the model name that serves the base model without an adapter
ADAPTER_NAME = r"[A-Za-z][A-Za-z0-9_-]{0,63}"
ADAPTER_NAME_RULE = "a letter, then up to 63 letters, digits, '_' or '-'"


@dataclass
class Adapter:
    """One served adapter: where it came from and how its requests are rendered and stopped."""

    name: str
    pulled: Pulled
    tokenizer: Any  # the adapter's own tokenizer files (its chat template)
    stop_ids: frozenset[int]
    system: str | None  # the system prompt the adapter was trained with, if any

    def describe(self) -> dict[str, Any]:
        return {"id": self.name, "object": "model", "owned_by": "loraforge", "repo": self.pulled.repo_id,
                "commit": self.pulled.commit, "tag": self.pulled.lineage.get("tag"),
                "base_model": self.pulled.lineage.get("base_model", {}).get("base_model")}  # fmt: skip


@dataclass
class Request:
    """One completion to make: its prompt tokens and limits, and where its tokens go (an asyncio queue)."""

    model: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop_ids: frozenset[int]
    tokenizer: Any
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)

    def batch_key(self) -> tuple[Any, ...]:
        """Requests with the same key can share one generate call."""
        return (self.stop_ids, self.temperature, self.top_p, self.seed)

    def send(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Library:
    """The served base, the adapters loaded onto it (through an engine: `PeftEngine` or `GgufEngine`), and the
    worker thread that answers queued requests in batches."""

    def __init__(self, engine: Any, endpoint: str | None, max_batch: int = 8, window_s: float = 0.01) -> None:
        self.engine, self.endpoint, self.max_batch, self.window_s = engine, endpoint, max_batch, window_s
        self.base_path: Path = engine.base_path
        self.tokenizer = engine.tokenizer
        self.adapters: dict[str, Adapter] = {}
        self.lock = threading.Lock()  # the engine: generate, load, unload
        self.queue: queue.Queue[Request | None] = queue.Queue()
        self.waiting: deque[Request] = deque()  # taken from the queue, not yet batched (another batch key)
        self.batches = self.largest_batch = 0  # answered so far (/health)
        self.worker = threading.Thread(target=self._serve_forever, name="loraforge-serve", daemon=True)

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        self.queue.put(None)
        self.worker.join(timeout=60)

    def add(self, name: str, spec: str) -> Adapter:
        """Pull, verify and load one adapter under `name` (a StageError says why not)."""
        from loraforge.tasks.hubclient import hub_endpoint
        from loraforge.tasks.pull import _download, _resolve_base

        if not re.fullmatch(ADAPTER_NAME, name) or name == BASE:
            raise StageError(f"adapter name {name!r}: use {ADAPTER_NAME_RULE}, other than {BASE!r}")
        if name in self.adapters:
            raise StageError(f"adapter {name!r} is already served ({self.adapters[name].pulled.spec}); remove it first")
        pulled = _download(spec, hub_endpoint(self.endpoint), None, extra=self.engine.files)
        trained_on = _resolve_base([pulled], None)
        if trained_on.resolve() != self.base_path.resolve():
            raise StageError(f"adapter {name!r} ({spec}) was trained on {trained_on}, not on the served base "
                             f"{self.base_path}; serve it from a server on that base")  # fmt: skip
        adapter = _adapter(name, pulled, self.tokenizer)
        with self.lock:
            self.engine.load(name, pulled)
            self.adapters[name] = adapter
        print(f"[serve] adapter {name}: {pulled.repo_id}@{pulled.commit[:12]}")
        return adapter

    def remove(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(name)
        with self.lock:
            del self.adapters[name]
            self.engine.unload(name, last=not self.adapters)
        print(f"[serve] adapter {name} removed")

    def submit(self, request: Request) -> None:
        self.queue.put(request)

    def _serve_forever(self) -> None:
        while (batch := self._next_batch()) is not None:
            self.batches, self.largest_batch = self.batches + 1, max(self.largest_batch, len(batch))
            try:
                with self.lock:
                    self.engine.generate(batch, bool(self.adapters))
            except Exception as exc:  # one batch failing must not stop the server: each request hears why
                for request in batch:
                    request.send("error", f"{type(exc).__name__}: {exc}")

    def _next_batch(self) -> list[Request] | None:
        """The oldest request and whatever else is waiting (up to the engine's batch size, same batch key), after
        a short window for requests arriving together."""
        first = self.waiting.popleft() if self.waiting else self.queue.get()
        if first is None:
            return None
        size = min(self.max_batch, self.engine.max_batch)
        batch, deadline = [first], time.monotonic() + self.window_s
        for request in list(self.waiting):
            if len(batch) < size and request.batch_key() == first.batch_key():
                self.waiting.remove(request)
                batch.append(request)
        while len(batch) < size and (left := deadline - time.monotonic()) > 0:
            try:
                arrived = self.queue.get(timeout=left)
            except queue.Empty:
                break
            if arrived is None:
                self.queue.put(None)  # stop after this batch
                break
            (batch if arrived.batch_key() == first.batch_key() else self.waiting).append(arrived)
        return batch


class PeftEngine:
    """transformers + peft: the adapters on one base in memory; a batch whose rows name different adapters (or the
    base) is one generate call, each row through its own adapter (peft's `adapter_names`)."""

    files: tuple[str, ...] = ()  # what it needs from a repo beyond the adapter's own files
    max_batch = 1 << 16

    def __init__(self, base_path: Path) -> None:
        from loraforge.tasks.models import load_causal_lm, load_tokenizer

        self.base_path = base_path
        self.model: Any = load_causal_lm(base_path)
        self.tokenizer = load_tokenizer(base_path)
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)

    def load(self, name: str, pulled: Pulled) -> None:
        from loraforge.tasks.models import import_peft

        PeftModel = import_peft().PeftModel
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(pulled.folder, adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.model, pulled.folder, adapter_name=name)
        self.model.eval()

    def unload(self, name: str, last: bool) -> None:
        if last:  # peft keeps one adapter at least: back to the plain base
            self.model = self.model.unload()
        else:
            self.model.delete_adapter(name)

    def generate(self, batch: list[Request], adapters: bool) -> None:
        import torch
        from transformers import StoppingCriteriaList

        from loraforge.tasks.batching import model_device

        pad = int(self.tokenizer.pad_token_id)
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in batch])
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in batch])
        device = model_device(self.model)
        streamer = RowStreamer(batch)
        first = batch[0]
        sampling = {"do_sample": True, "temperature": first.temperature, "top_p": first.top_p} \
            if first.temperature > 0 else {"do_sample": False}  # fmt: skip
        if sampling["do_sample"] and first.seed is not None:
            torch.manual_seed(first.seed)
        names = {r.model for r in batch}
        extra: dict[str, Any] = {}
        scope: Any = contextlib.nullcontext()
        if adapters and names == {BASE}:  # the base alone: the adapters' layers off
            scope = self.model.disable_adapter()
        elif adapters and len(names) == 1:  # one adapter: its own forward, no per-row selection
            self.model.set_adapter(names.pop())
        elif adapters:  # rows of different adapters (or the base) in one forward
            extra = {"adapter_names": [r.model if r.model != BASE else "__base__" for r in batch]}
        with torch.no_grad(), scope:
            self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), streamer=streamer,
                                max_new_tokens=max(r.max_tokens for r in batch), pad_token_id=pad,
                                eos_token_id=sorted(first.stop_ids), stopping_criteria=StoppingCriteriaList([streamer]),
                                **sampling, **extra)  # fmt: skip
        streamer.end()


class GgufEngine:
    """llama.cpp through llama-cpp-python: the base as an f16 GGUF (converted once per base, cached) and each
    adapter's published GGUF LoRA (`quantize.types` with lora_f16), applied per request (`llama_set_adapters_lora`)
    on one model in memory. llama.cpp cannot give rows of one batch different adapters: requests run one at a
    time, each from an empty KV cache (a cached prefix made with another adapter would be wrong)."""

    files = ("gguf/*-LoRA.gguf",)
    max_batch = 1

    def __init__(self, base_path: Path, threads: int | None = None) -> None:
        import llama_cpp

        from loraforge.tasks.models import load_tokenizer

        self.base_path = base_path
        self.tokenizer = load_tokenizer(base_path)
        self.gguf = base_gguf(base_path)
        threads = threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1  # as torch's
        self.llm = llama_cpp.Llama(model_path=str(self.gguf), n_ctx=2048, n_threads=threads, verbose=False)
        self.max_positions = self.llm.n_ctx()
        self.loras: dict[str, Any] = {}

    def load(self, name: str, pulled: Pulled) -> None:
        import llama_cpp

        files = sorted((pulled.folder / "gguf").glob("*-LoRA.gguf"))
        if not files:
            raise StageError(f"{pulled.spec}: no GGUF LoRA published (gguf/*-LoRA.gguf); the GGUF backend needs one: "
                             "publish with quantize.types including lora_f16, or serve without --gguf")  # fmt: skip
        lora = llama_cpp.llama_adapter_lora_init(self.llm._model.model, str(files[0]).encode())
        if not lora:
            raise StageError(f"{pulled.spec}: llama.cpp cannot apply {files[0].name} to {self.gguf.name}")
        self.loras[name] = lora

    def unload(self, name: str, last: bool) -> None:
        import llama_cpp

        llama_cpp.llama_set_adapters_lora(self.llm._ctx.ctx, None, 0, None)
        llama_cpp.llama_adapter_lora_free(self.loras.pop(name))

    def generate(self, batch: list[Request], adapters: bool) -> None:
        import ctypes

        import llama_cpp

        for request in batch:
            chosen = [self.loras[request.model]] if request.model in self.loras else []
            array = (llama_cpp.llama_adapter_lora_p_ctypes * len(chosen))(*chosen) if chosen else None
            scales = (ctypes.c_float * len(chosen))(*[1.0] * len(chosen)) if chosen else None
            if llama_cpp.llama_set_adapters_lora(self.llm._ctx.ctx, array, len(chosen), scales):
                raise RuntimeError(f"llama.cpp refused the adapter of {request.model!r}")
            self.llm.reset()  # the KV cache was made with another adapter (or none)
            streamer = RowStreamer([request])
            if request.temperature > 0 and request.seed is not None:
                self.llm.set_seed(request.seed)
            tokens = self.llm.generate(request.prompt_ids, temp=request.temperature, top_p=request.top_p, top_k=0,
                                       min_p=0.0, repeat_penalty=1.0, reset=True)  # fmt: skip
            for token in tokens:
                streamer.step([int(token)])
                if streamer.all_done():
                    break
            streamer.end()


def base_gguf(base_path: Path) -> Path:
    """The base model as an f16 GGUF, converted once per base (by content) with the pinned llama.cpp's converter
    and kept in the loraforge cache; written whole (a temporary name, then renamed)."""
    import llama_cpp

    from loraforge.tasks.models import cache_dir, fingerprint_model
    from loraforge.tasks.quantize import _convert, _converter_dir

    target = cache_dir() / "serve" / f"{fingerprint_model(base_path)[:16]}-llama.cpp-{llama_cpp.__version__}-F16.gguf"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        _convert(_converter_dir(llama_cpp.__version__), base_path, partial, "f16", base_path.name, timeout=3600)
        os.replace(partial, target)
    return target


class RowStreamer:
    """A generate streamer (`put`/`end`) and stopping criterion over a batch of requests: each row's tokens are
    decoded and sent to its request as text deltas; a row is done at one of its stop tokens or its max_tokens,
    and generation stops when every row is."""

    def __init__(self, batch: list[Request]) -> None:
        self.batch = batch
        self.tokens: list[list[int]] = [[] for _ in batch]
        self.sent = [""] * len(batch)
        self.done: list[str | None] = [None] * len(batch)
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate's first put is the prompt
            self.prompt_seen = True
            return
        self.step(value.reshape(len(self.batch), -1)[:, -1].tolist())

    def step(self, tokens: list[int]) -> None:
        """One new token per row."""
        for row, token in enumerate(tokens):
            request = self.batch[row]
            if self.done[row] is not None:
                continue
            if token in request.stop_ids:
                self._finish(row, "stop")
                continue
            self.tokens[row].append(token)
            text = request.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
            if not text.endswith("\ufffd") and len(text) > len(self.sent[row]):  # no half of a UTF-8 character
                request.send("text", text[len(self.sent[row]) :])
                self.sent[row] = text
            if len(self.tokens[row]) >= request.max_tokens:
                self._finish(row, "length")

    def all_done(self) -> bool:
        return all(d is not None for d in self.done)

    def end(self) -> None:
        for row in range(len(self.batch)):
            if self.done[row] is None:
                self._finish(row, "length")

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.all_done(), device=input_ids.device)

    def _finish(self, row: int, reason: str) -> None:
        request = self.batch[row]
        text = request.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
        if len(text) > len(self.sent[row]):
            request.send("text", text[len(self.sent[row]) :])
            self.sent[row] = text
        self.done[row] = reason
        request.send("done", {"finish_reason": reason, "completion_tokens": len(self.tokens[row])})


def _adapter(name: str, pulled: Pulled, base_tokenizer: Any) -> Adapter:
    """The adapter's tokenizer (its own files when published with it, else the base's), stop tokens and system
    prompt, from its lineage's data config."""
    from loraforge.tasks.data import TEMPLATE_STOPS, stop_token_ids
    from loraforge.tasks.models import load_tokenizer

    tokenizer = load_tokenizer(pulled.folder) if (pulled.folder / "tokenizer.json").is_file() else base_tokenizer
    data = pulled.lineage.get("config", {}).get("data", {})
    stops = stop_token_ids(tokenizer, TEMPLATE_STOPS.get(str(data.get("chat_template")), ()))
    eos = tokenizer.eos_token_id
    return Adapter(name, pulled, tokenizer, frozenset([*stops, *([eos] if eos is not None else [])]),
                   data.get("system_prompt"))  # fmt: skip


def open_library(
    specs: dict[str, str], base_model: str | None, endpoint: str | None, max_batch: int, gguf: bool = False
) -> Library:
    """The base (given, or the one the first adapter was trained on) with every adapter of `specs` loaded, on the
    peft engine or (gguf) the llama.cpp one."""
    from loraforge.tasks.hubclient import hub_endpoint
    from loraforge.tasks.models import resolve_base_model
    from loraforge.tasks.pull import _download, _resolve_base

    if base_model:
        base = resolve_base_model(base_model)
    elif specs:
        base = _resolve_base([_download(next(iter(specs.values())), hub_endpoint(endpoint), None)], None)
    else:
        raise StageError("serve: no adapter and no --base: name at least one --adapter NAME=ORG/REPO@TAG, or the "
                         "base model to serve with --base")  # fmt: skip
    library = Library(GgufEngine(base) if gguf else PeftEngine(base), endpoint, max_batch)
    for name, spec in specs.items():
        library.add(name, spec)
    return library


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


# --- the HTTP API ---------------------------------------------------------------------------------------------


def create_app(library: Library, admin_token: str | None) -> Any:
    """The OpenAI-compatible FastAPI app over `library`. A bad request is a 4xx whose message names the field and
    the fix (all problems at once); an unexpected failure is a 500 that says so, never a traceback."""
    from fastapi import FastAPI, Header
    from fastapi import Request as HttpRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        library.start()
        yield
        library.stop()  # after uvicorn has finished the requests in flight

    app = FastAPI(title="loraforge serve", lifespan=lifespan)
    routes = _Routes(library, admin_token)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: HttpRequest, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in exc.errors()]
        return _error(400, "; ".join(problems), "invalid_request_error")

    @app.exception_handler(ApiError)
    async def refused(_: HttpRequest, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.kind)

    @app.exception_handler(Exception)
    async def failed(_: HttpRequest, exc: Exception) -> JSONResponse:
        print(f"[serve] error: {type(exc).__name__}: {exc}")
        return _error(500, f"the server failed on this request ({type(exc).__name__}); see its log", "server_error")

    app.get("/health")(routes.health)
    app.get("/v1/models")(routes.models)
    app.post("/v1/chat/completions")(routes.chat)
    app.post("/v1/completions")(routes.completions)

    @app.post("/v1/adapters")
    def add_adapter(body: AdapterRequest, authorization: str | None = Header(None)) -> dict[str, Any]:
        return routes.add_adapter(body, authorization)

    @app.delete("/v1/adapters/{name}")
    def remove_adapter(name: str, authorization: str | None = Header(None)) -> dict[str, Any]:
        return routes.remove_adapter(name, authorization)

    return app


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _error(status: int, message: str, kind: str) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


class _Common(BaseModel):
    """What every completion request says; OpenAI's fields that change the answer are honoured or refused by name,
    the ones that do not (user, metadata...) are ignored, as OpenAI clients send them."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    model: str = Field(description=f"the adapter's name, or {BASE!r} for the base model")
    max_tokens: int = Field(256, ge=1, le=4096, description="most tokens to generate")
    temperature: float = Field(0.0, ge=0, le=2, description="0 = greedy (the default: what the gate measured)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling (with temperature > 0)")
    seed: int | None = Field(None, description="the sampling seed (with temperature > 0)")
    stream: bool = Field(False, description="send the tokens as server-sent events")
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stop: None = Field(None, description="not supported: the adapter's own stop tokens apply")

    @model_validator(mode="before")
    @classmethod
    def _openai_names(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_completion_tokens" in data and "max_tokens" not in data:
            data = {**data, "max_tokens": data["max_completion_tokens"]}
        return data


class Message(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    role: Literal["system", "user", "assistant"] = Field(description="who says it")
    content: str | list[dict[str, Any]] = Field(description="the text (or a list of text parts)")

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")


class ChatRequest(_Common):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1, description="the conversation so far")


class CompletionRequest(_Common):
    """POST /v1/completions."""

    prompt: str = Field(description="the raw prompt (no chat template)")


class AdapterRequest(BaseModel):
    """POST /v1/adapters: which published adapter to add, under which name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description=f"the model name requests will use: {ADAPTER_NAME_RULE}")
    repo: str = Field(description="the published repo, ORG/NAME[@REVISION]")


class _Routes:
    """The endpoints' bodies (create_app registers them)."""

    def __init__(self, library: Library, admin_token: str | None) -> None:
        self.library, self.admin_token = library, admin_token

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "base": str(self.library.base_path), "adapters": sorted(self.library.adapters),
                "queued": self.library.queue.qsize() + len(self.library.waiting), "batches": self.library.batches,
                "largest_batch": self.library.largest_batch}  # fmt: skip

    async def models(self) -> dict[str, Any]:
        base = {"id": BASE, "object": "model", "owned_by": "loraforge", "path": str(self.library.base_path)}
        return {"object": "list", "data": [base] + [a.describe() for a in self.library.adapters.values()]}

    async def chat(self, body: ChatRequest) -> Any:
        tokenizer, stops, system = self._pick(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # a template that refuses the conversation (e.g. roles out of order)
            raise ApiError(400, f"messages: the chat template of {body.model!r} refuses them: {exc}") from None
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return await self._answer(body, ids, tokenizer, stops, chat=True)

    async def completions(self, body: CompletionRequest) -> Any:
        tokenizer, stops, _ = self._pick(body.model)
        ids = tokenizer(body.prompt)["input_ids"]
        return await self._answer(body, ids, tokenizer, stops, chat=False)

    def add_adapter(self, body: AdapterRequest, authorization: str | None) -> dict[str, Any]:
        self._admin(authorization)
        try:
            return self.library.add(body.name, body.repo).describe()
        except StageError as exc:
            raise ApiError(409 if "already served" in str(exc) else 400, str(exc)) from None

    def remove_adapter(self, name: str, authorization: str | None) -> dict[str, Any]:
        self._admin(authorization)
        try:
            self.library.remove(name)
        except KeyError:
            raise ApiError(404, self._unknown(name), "not_found_error") from None
        return {"id": name, "object": "model", "deleted": True}

    def _admin(self, authorization: str | None) -> None:
        if not self.admin_token:
            raise ApiError(403, "adapter management is off: start the server with LORAFORGE_ADMIN_TOKEN set",
                           "permission_error")  # fmt: skip
        if authorization != f"Bearer {self.admin_token}":
            raise ApiError(401, "adapter management needs the admin token: Authorization: Bearer "
                           "$LORAFORGE_ADMIN_TOKEN", "authentication_error")  # fmt: skip

    def _unknown(self, name: str) -> str:
        return f"model {name!r} is not served; loaded: {', '.join([BASE, *sorted(self.library.adapters)])}"

    def _pick(self, name: str) -> tuple[Any, frozenset[int], str | None]:
        if name == BASE:
            eos = self.library.tokenizer.eos_token_id
            return self.library.tokenizer, frozenset([eos] if eos is not None else []), None
        adapter = self.library.adapters.get(name)
        if adapter is None:
            raise ApiError(404, self._unknown(name), "not_found_error")
        return adapter.tokenizer, adapter.stop_ids, adapter.system

    async def _answer(self, body: Any, ids: list[int], tokenizer: Any, stops: frozenset[int], chat: bool) -> Any:
        from fastapi.responses import StreamingResponse

        limit = self.library.engine.max_positions
        if limit and len(ids) + body.max_tokens > limit:
            raise ApiError(400, f"max_tokens: the prompt's {len(ids)} tokens + max_tokens {body.max_tokens} exceed "
                                f"the model's {limit} positions; shorten the prompt or lower max_tokens")  # fmt: skip
        request = Request(body.model, ids, body.max_tokens, body.temperature, body.top_p, body.seed, stops, tokenizer,
                          asyncio.get_running_loop())  # fmt: skip
        self.library.submit(request)
        reply = _Reply(body.model, chat, len(ids))
        if body.stream:
            return StreamingResponse(reply.events(request), media_type="text/event-stream")
        return await reply.whole(request)


class _Reply:
    """A request's answer in OpenAI's shapes: whole, or as server-sent event chunks."""

    def __init__(self, model: str, chat: bool, prompt_tokens: int) -> None:
        self.model, self.chat, self.prompt_tokens = model, chat, prompt_tokens
        self.id, self.created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())

    async def whole(self, request: Request) -> dict[str, Any]:
        parts: list[str] = []
        while True:
            kind, value = await request.events.get()
            if kind == "text":
                parts.append(value)
            elif kind == "error":
                raise ApiError(500, f"generation failed: {value}", "server_error")
            else:
                text = "".join(parts)
                choice = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
                return {**self._head(), "choices": [{"index": 0, **choice, "finish_reason": value["finish_reason"]}],
                        "usage": self._usage(value["completion_tokens"])}  # fmt: skip

    async def events(self, request: Request) -> Any:
        if self.chat:
            yield self._chunk({"delta": {"role": "assistant"}})
        while True:
            kind, value = await request.events.get()
            if kind == "text":
                yield self._chunk({"delta": {"content": value}} if self.chat else {"text": value})
            elif kind == "error":
                yield _sse({"error": {"message": f"generation failed: {value}", "type": "server_error", "code": 500}})
                break
            else:
                last: dict[str, Any] = {"delta": {}} if self.chat else {"text": ""}
                yield self._chunk(last, value["finish_reason"], self._usage(value["completion_tokens"]))
                break
        yield "data: [DONE]\n\n"

    def _chunk(self, piece: dict[str, Any], finish: str | None = None, usage: dict[str, int] | None = None) -> str:
        chunk = {**self._head(chunk=True), "choices": [{"index": 0, **piece, "finish_reason": finish}]}
        return _sse({**chunk, "usage": usage} if usage else chunk)

    def _head(self, chunk: bool = False) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _usage(self, completion: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}  # fmt: skip


def _sse(payload: dict[str, Any]) -> str:
    import json

    return f"data: {json.dumps(payload)}\n\n"
