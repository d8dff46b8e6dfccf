"""Every bad input ends in one clear message with exit code 1 (issue 17, item 10).

One row per bad input: how the input is built (files under tmp_path), the CLI command, the exit code, a phrase
the message must hold. Each row also checks that the output holds no traceback and that the failing command left
no artifact of its own in the store (no new <store>/<stage>/<key>/, no draft in <store>/.tmp). Commands run
in-process through `flows.cli.main` (fast); the row that needs Prefect's logging (`run`) runs as a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import loraforge.flows.cli as cli

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Ctx:
    """What a row builds its input with: a folder of its own, the tiny model, the store and the base's key."""

    tmp: Path
    model: Path
    store: Path
    base_key: str
    hub: str = ""

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    def config(self, body: str = "", *, data: str = "", base: str | None = None, train: str = "train.jsonl") -> str:
        """A YAML config on the tiny model with this store; `data` adds lines to the data section."""
        if not (self.tmp / "train.jsonl").exists():
            self.write("train.jsonl", chat_rows(10))
        text = (
            f"name: bad-inputs\nbase_model: {base or self.model}\nstore: {self.store}\n"
            f"data:\n  train_file: {train}\n  max_length: 64\n"
            + "".join(f"  {line}\n" for line in data.splitlines() if line)
            + body
        )
        return str(self.write("config.yaml", text))

    def data_stage(self, *overrides: str, base_key: str | None = None, **config: str) -> list[str]:
        """`stage data CONFIG --input base=KEY`: the data stage directly on the store, no Prefect."""
        return ["stage", "data", self.config(**config), *overrides, "--input", f"base={base_key or self.base_key}"]

    def model_copy(self, name: str) -> Path:
        target = self.tmp / name
        shutil.copytree(self.model, target)
        return target


def chat_rows(count: int, start: int = 0) -> str:
    return "".join(
        json.dumps({"messages": [{"role": "user", "content": f"ticket number {i}"},
                                 {"role": "assistant", "content": f"answer {i % 3}"}]}) + "\n"
        for i in range(start, start + count)
    )  # fmt: skip


def chat_line(*turns: tuple[str, str]) -> str:
    return json.dumps({"messages": [{"role": role, "content": content} for role, content in turns]}) + "\n"


def key_of(folder: Path, scratch: Path) -> str:
    """The key the base artifact of `folder` gets (what `--input base=KEY` must give); '0' when it has none."""
    from loraforge.tasks.artifacts import ArtifactStore
    from loraforge.tasks.errors import LoraforgeError
    from loraforge.tasks.models import provision_base

    try:
        return provision_base(str(folder), ArtifactStore(scratch)).key
    except LoraforgeError:
        return "0"


def data_key(ctx: Ctx) -> str:
    """Run the data stage on 10 good rows and return its key (for rows about later stages)."""
    assert cli.main(ctx.data_stage()) == 0
    [folder] = (ctx.store / "data").iterdir()
    return folder.name


@dataclass
class Case:
    id: str
    build: Callable[[Ctx], list[str]]
    code: int
    phrase: str


def _csv(ctx: Ctx, text: str | bytes, *extra: str) -> list[str]:
    ctx.write("rows.csv", text)
    return ctx.data_stage(*extra, train="rows.csv", data="format: classification")


def _no_tokenizer(ctx: Ctx) -> list[str]:
    folder = ctx.model_copy("no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
    return ctx.data_stage(base=str(folder), base_key=key_of(folder, ctx.tmp / "scratch"))


def _truncated(ctx: Ctx) -> list[str]:
    folder = ctx.model_copy("truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return ctx.data_stage(base=str(folder), base_key=key_of(folder, ctx.tmp / "scratch"))


def _truncated_validate(ctx: Ctx) -> list[str]:
    folder = ctx.model_copy("truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    return ["validate", ctx.config(base=str(folder))]


def _pickle_only(ctx: Ctx) -> list[str]:
    folder = ctx.model_copy("pickled")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    return ctx.data_stage(base=str(folder), base_key="0")


def _unknown_arch(ctx: Ctx) -> list[str]:
    folder = ctx.model_copy("custom")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "mystery", "auto_map": {"x": "y"}}))
    return ["validate", ctx.config(base=str(folder))]


def _bad_model_config(ctx: Ctx) -> list[str]:
    folder = ctx.model_copy("broken-config")
    (folder / "config.json").write_text('{"model_type": "llama",')
    return ["validate", ctx.config(base=str(folder))]


def _train_unknown_module(ctx: Ctx) -> list[str]:
    key = data_key(ctx)
    return ["stage", "train", ctx.config(), "train.target_modules=[q_projj]", "--input", f"data={key}"]


def _publish(ctx: Ctx, *overrides: str, gate: bool = True, token: str | None = None) -> list[str]:
    """`stage publish` on upstream artifacts written straight into the store (small stand-ins with the files and
    manifest fields publish reads), so a publish failure is tried without training anything."""
    from loraforge.tasks.artifacts import ArtifactStore

    store = ArtifactStore(ctx.store)
    check = {"check": "accuracy >= 0.5", "value": 0.75 if gate else 0.25, "passed": gate}
    extra = {
        "base": {"base_model": str(ctx.model), "hub_id": None, "fingerprint": "f" * 64, "architecture": "Llama",
                 "source": {"license": "apache-2.0"}, "model_path": str(ctx.model)},
        "data": {"data_sha256": {"train_file": "a" * 64}, "template_sha256": "b" * 64, "special_tokens": {}},
        "eval": {"gate": {"passed": gate, "checks": [check]}},
        "merge": {"merge_policy": "fp32 merge"},
        "quantize": {"llama_cpp_version": "0.3.36", "gguf": {}, "imatrix": None},
    }  # fmt: skip
    configs = {"data": {"train_file": "train.jsonl", "max_length": 512}, "merge": {"dtype": "float32"}}
    for stage in ("base", "data", "train", "eval", "merge", "quantize"):
        with store.create(stage, f"{stage}-key", configs.get(stage, {}), {}, "code") as draft:
            draft.extra.update(extra.get(stage, {}))
            draft.metrics.update({"accuracy": 0.75} if stage == "eval" else {})
            if stage == "train":
                (draft.path / "adapter").mkdir()
                (draft.path / "adapter" / "adapter_config.json").write_text("{}")
            if stage == "merge":
                (draft.path / "model").mkdir()
    if token:
        os.environ["HF_TOKEN"] = token  # the test's monkeypatch.delenv puts the variable back afterwards
    inputs = [arg for stage in ("base", "data", "train", "eval", "merge", "quantize")
              for arg in ("--input", f"{stage}={stage}-key")]  # fmt: skip
    return ["stage", "publish", ctx.config(), "publish.include_gguf=[]", *overrides, *inputs]


def _pull(ctx: Ctx, *args: str, token: str | None = None) -> list[str]:
    if token:
        os.environ["HF_TOKEN"] = token  # the test's monkeypatch.delenv puts the variable back afterwards
    return ["pull", *args, "--prompt", "hi"]


def _data(ctx: Ctx, settings: str = "", suffix: str = ".jsonl", **files: str | bytes) -> list[str]:
    """Write t (train), v (validation) and s (test) files, then `stage data` on them with extra data settings."""
    if settings.startswith("."):
        settings, suffix = "", settings
    for name, content in files.items():
        ctx.write(name + suffix, content)
    given = {"v": "validation_file", "s": "test_file"}
    lines = [f"{given[n]}: {n}{suffix}" for n in files if n in given] + [settings]
    return ctx.data_stage(train="t" + suffix, data="\n".join(lines))


# fmt: off
CASES = [
    # config: `validate`
    Case("config-missing-file", lambda c: ["validate", str(c.tmp / "nope.yaml")], 1, "config file not found"),
    Case("config-empty", lambda c: ["validate", str(c.write("e.yaml", "\n"))], 1, "the file is empty"),
    Case("config-bad-yaml", lambda c: ["validate", str(c.write("b.yaml", "name: [x\ndata: 1\n"))], 1, "not valid YAML"),
    Case("config-not-mapping", lambda c: ["validate", str(c.write("l.yaml", "- a\n- b\n"))], 1, "is a list, not a"),
    Case("config-not-utf8", lambda c: ["validate", str(c.write("u.yaml", b"name: \xff\n"))],
         1, "u.yaml:1: not UTF-8 text (byte 0xff)"),
    Case("config-no-data", lambda c: ["validate", str(c.write("n.yaml", "name: x\n"))],
         1, "data: required field is missing"),
    Case("config-unknown-section", lambda c: ["validate", c.config("trian:\n  r: 4\n")], 1, "did you mean 'train'?"),
    Case("config-unknown-key", lambda c: ["validate", c.config(), "train.lerning_rate=1"],
         1, "did you mean 'learning_rate'?"),
    Case("config-r-zero", lambda c: ["validate", c.config(), "train.r=0"], 1, "train.r: Input should be greater"),
    Case("config-lr-text", lambda c: ["validate", c.config(), "train.learning_rate=fast"], 1, "train.learning_rate"),
    Case("config-format", lambda c: ["validate", c.config(data="format: xml")], 1, "data.format"),
    Case("config-two-files", lambda c: ["validate", c.config(), c.config()], 1, "give one config file, got 2"),
    Case("config-bad-override", lambda c: ["validate", c.config(), "=3"], 1, "expected key=value"),
    Case("config-override-not-section", lambda c: ["validate", c.config(), "name.x=1"], 1, "is not a section"),
    Case("config-chat-template", lambda c: ["validate", c.config(), "data.chat_template=mine"],
         1, "unknown chat template 'mine'"),
    Case("config-text-accuracy", lambda c: ["validate", c.config(data="format: text"), "eval.metrics=[accuracy]"],
         1, "has no prompts to answer"),
    Case("config-max-length", lambda c: ["validate", c.config(), "data.max_length=4"], 1, "data.max_length"),
    Case("config-store-proc", lambda c: ["validate", c.config(), "store=/proc/loraforge"],
         1, "cannot write artifacts to /proc/loraforge"),
    Case("config-store-scheme", lambda c: ["validate", c.config(), "store=gs://bucket/x"], 1,
         "supported: local folders"),
    Case("config-store-s3-secret", lambda c: ["validate", c.config(), "store=s3://AKIA:hunter2@bucket/x"], 1,
         "it carries credentials: take them out"),
    Case("config-base-missing", lambda c: ["validate", c.config(base="/nonexistent/model")],
         1, "/nonexistent/model does not exist"),
    Case("config-bundled-unknown", lambda c: ["validate", c.config(base="bundled:nope")],
         1, "unknown bundled model 'nope'"),
    Case("config-base-hub-id", lambda c: ["validate", c.config(base="my models/tiny llama")],
         1, "nor a Hub repo id (owner/name, letters digits . _ - only"),
    Case("config-target-modules", lambda c: ["validate", c.config(), "train.target_modules=[q_projj]"],
         1, "'q_projj' not found in the model's linear layers; valid names: down_proj, gate_proj, k_proj"),
    # publish settings
    Case("publish-repo-spaces", lambda c: ["validate", c.config(), "publish.repo_id=my org/my model"],
         1, "owner/name, letters digits . _ - only"),
    Case("publish-gguf-not-made",
         lambda c: ["validate", c.config(), "publish.include_gguf=[q8_0]", "quantize.types=[f16]"],
         1, "not made by the quantize stage"),
    Case("publish-push-mode", lambda c: ["validate", c.config(), "publish.push=sometimes"], 1, "publish.push"),
    Case("publish-missing-inputs", lambda c: ["stage", "publish", c.config(), "--input", "data=abc"],
         1, "the publish stage needs --input train=KEY eval=KEY merge=KEY quantize=KEY"),
    Case("publish-no-token", lambda c: _publish(c, "publish.push=always"), 1, "no Hub token was found"),
    Case("publish-gate-failed", lambda c: _publish(c, gate=False), 2, "publish refused: eval gate failed"),
    Case("publish-hub-unreachable",
         lambda c: _publish(c, "publish.push=always", "publish.endpoint=http://127.0.0.1:9", token="tok"),
         1, "cannot reach http://127.0.0.1:9 after 3 tries"),
    Case("publish-token-refused", lambda c: _publish(c, "publish.push=always", f"publish.endpoint={c.hub}",
                                                     token="not-the-token"),
         1, "refused the token (401: invalid or expired)"),
    # quantize settings and inputs
    Case("quantize-type", lambda c: ["validate", c.config(), "quantize.types=[q3_x]"],
         1, "override 'quantize.types=[q3_x]': quantize.types.0"),
    Case("quantize-no-types", lambda c: ["validate", c.config(), "quantize.types=[]"], 1, "quantize.types"),
    Case("quantize-probe-rows", lambda c: ["validate", c.config(), "quantize.probe_rows=0"], 1, "quantize.probe_rows"),
    Case("quantize-needs-merge", lambda c: ["stage", "quantize", c.config(), "--input", "data=abc"],
         1, "the quantize stage needs --input train=KEY merge=KEY"),
    Case("quantize-unknown-keys",
         lambda c: ["stage", "quantize", c.config(), "--input", "data=abc", "--input", "train=t",
                    "--input", "merge=def"],
         1, "no data artifact with key abc"),
    # stage inputs
    Case("input-syntax", lambda c: ["stage", "train", c.config(), "--input", "data"], 1, "expected STAGE=KEY"),
    Case("input-wrong-stage", lambda c: ["stage", "train", c.config(), "--input", "merge=x"],
         1, "--input merge=x: the train stage takes no merge artifact (it takes base, data)"),
    Case("input-base-mismatch", lambda c: c.data_stage(base_key="feedbeef"),
         1, "--input base=feedbeef: the base model here"),
    # data: `stage data --input base=KEY`
    Case("data-missing-file", lambda c: c.data_stage(train="missing.jsonl"), 1, "data.train_file: not found"),
    Case("data-bad-json-line",
         lambda c: _data(c, t=chat_rows(5) + "{oops\n" + chat_rows(5, 5)),
         1, "t.jsonl:6: not valid JSON"),
    Case("data-json-at-at",
         lambda c: _data(c, t=chat_rows(5) + '{"messages": "x\n'),
         1, "t.jsonl:6: not valid JSON (Invalid control character at column 16)"),
    Case("data-not-utf8-jsonl",
         lambda c: _data(c, t=chat_rows(3).encode() + b'{"a": "\xe9t\xe9"}\n' + chat_rows(3, 3).encode() * 200),
         1, "t.jsonl:4: not UTF-8 text (byte 0xe9"),
    Case("data-not-utf8-csv", lambda c: _csv(c, b"text,label\nfine,a\ncaf\xe9,b\n"),
         1, "rows.csv:3: not UTF-8 text (byte 0xe9"),
    Case("data-csv-extra-cells", lambda c: _csv(c, "text,label\nhello,a\nhello,b,oops\nbye,c\n"),
         1, "rows.csv:3: expected 2 columns (text, label), got 3"),
    Case("data-csv-no-label", lambda c: _csv(c, "text,category\n" + "".join(f"t{i},c\n" for i in range(40))),
         1, "data.label_field"),
    Case("data-no-messages",
         lambda c: _data(c, t=chat_rows(9) + '{"prompt": "x"}\n'),
         1, "t.jsonl:10: field 'messages' must be"),
    Case("data-last-not-assistant",
         lambda c: _data(c, t=chat_rows(9) + chat_line(("user", "x"))),
         1, "t.jsonl:10: the last message must have role 'assistant'"),
    Case("data-unknown-role",
         lambda c: _data(c, t=chat_rows(9) + chat_line(("bot", "x"), ("assistant", "y"))),
         1, "unknown role 'bot'"),
    Case("data-empty-file", lambda c: _data(c, t=""),
         1, "no rows (the file is empty)"),
    Case("data-json-not-list", lambda c: _data(c, ".json", t='{"rows": []}'),
         1, "expected a JSON list of rows"),
    Case("data-parquet-damaged",
         lambda c: _data(c, ".parquet", t=b"PAR1 not really"),
         1, "t.parquet: not a readable"),
    Case("data-too-few-rows", lambda c: _data(c, t=chat_rows(2)),
         1, "too few rows (2)"),
    Case("data-one-train-row",
         lambda c: _data(c, t=chat_rows(1), v=chat_rows(2, 10), s=chat_rows(2, 20)),
         1, "the train split has 1 row"),
    Case("data-test-is-train",
         lambda c: _data(c, t=chat_rows(10), s=chat_rows(3)),
         1, "shares 3 of its 3 prompts with data.train_file"),
    Case("data-all-too-long",
         lambda c: _data(c, t=chat_rows(10).replace("ticket", "word " * 80)),
         1, "split is empty after filtering"),
    Case("data-overlength-error",
         lambda c: _data(c, "overlength: error", t=chat_rows(10).replace("ticket number 3", "w " * 80)),
         1, "tokens > data.max_length=64"),
    Case("data-hub-spec", lambda c: c.data_stage(train="hub:justaname"), 1, "hub:ORG/NAME"),
    Case("data-csv-fewer-cells", lambda c: _csv(c, "text,label\nhello,a\nlonely\nbye,c\n"),
         1, "rows.csv:3: expected 2 columns (text, label), got 1"),
    Case("data-json-file-at-at", lambda c: _data(c, ".json", t='[{"messages": "x\n'),
         1, "t.json:1: not valid JSON (Invalid control character at column 17)"),
    Case("store-proc-stage", lambda c: [*c.data_stage(), "--store", "/proc/loraforge"],
         1, "cannot write artifacts to /proc/loraforge"),
    # model folders
    Case("model-no-tokenizer", _no_tokenizer, 1, "no tokenizer files"),
    Case("model-truncated-weights", _truncated, 1, "model.safetensors is truncated"),
    Case("model-truncated-validate", _truncated_validate, 1, "model.safetensors is truncated"),
    Case("model-pickle-only", _pickle_only, 1, "holds its weights only as pickle"),
    Case("model-config-not-json", _bad_model_config, 1, "config.json is not valid JSON"),
    Case("model-unknown-architecture", _unknown_arch, 1, "model_type 'mystery' is not an architecture"),
    Case("model-not-a-folder", lambda c: ["validate", c.config(base=str(c.write("f.txt", "x")))],
         1, "is not a Hugging Face model folder"),
    Case("train-unknown-module", _train_unknown_module, 1, "valid names: down_proj"),
    # other commands
    Case("run-bad-config", lambda c: ["run", c.config(), "train.r=0"], 1, "train.r: Input should be greater"),
    Case("plan-bad-config", lambda c: ["plan", c.config(), "data.format=xml"], 1, "data.format"),
    Case("eval-gate-syntax", lambda c: ["validate", c.config(), "eval.gate=[accuracy >> 0.5]"], 1, "eval.gate"),
    Case("sweep-nothing", lambda c: ["sweep", c.config()], 1, "nothing to sweep; give --r 4,8,16"),
    Case("sweep-bad-grid", lambda c: ["sweep", c.config(), "--grid", "train.r"], 1, "expected KEY=V1,V2"),
    Case("show-unknown", lambda c: ["show", "abc123", "--store", str(c.store)], 1, "match 'abc123'"),
    Case("register-data-missing", lambda c: ["register-data", str(c.tmp / "new.jsonl")], 1, "new.jsonl does not exist"),
    # pull
    Case("pull-token-refused",
         lambda c: _pull(c, "team/model", "--endpoint", c.hub, token="not-the-token"),
         1, "refused the token (401: invalid or expired)"),
    Case("pull-repo-spaces", lambda c: _pull(c, "my org/my model"), 1, "owner/name, letters digits . _ - only"),
    Case("pull-gguf-lora", lambda c: _pull(c, "a/b", "--gguf", "lora_f16"), 1, "a GGUF LoRA runs on top"),
    Case("pull-unreachable", lambda c: _pull(c, "a/b", "--endpoint", "http://127.0.0.1:9"), 1, "cannot reach"),
]
# fmt: on


def _artifacts(store: Path) -> set[str]:
    if not store.is_dir():
        return set()
    return {f"{p.parent.name}/{p.name}" for p in store.glob("*/*")
            if p.is_dir() and not p.parent.name.startswith(".")}  # fmt: skip


@pytest.fixture(scope="module")
def base_key(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    return key_of(tiny_model, tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from hub import hub_server

    with hub_server(tmp_path_factory.mktemp("hub") / "repos", "the-token") as url:
        yield url


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_bad_input_ends_in_one_clear_message(
    case: Case,
    tiny_model: Path,
    base_key: str,
    hub: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("loraforge.tasks.hubclient.RETRY_DELAYS", (0.0, 0.0))
    monkeypatch.setenv("LORAFORGE_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    ctx = Ctx(tmp_path, tiny_model, tmp_path / "store", base_key, hub)
    argv = case.build(ctx)
    capsys.readouterr()
    before = _artifacts(ctx.store)
    code = cli.main(argv)
    out, err = capsys.readouterr()
    combined = out + err
    assert code == case.code, combined[-3000:]
    assert case.phrase in combined, combined[-3000:]
    assert "Traceback" not in combined
    assert len(combined) < 6000, f"{len(combined)} characters of output"
    new = {a for a in _artifacts(ctx.store) - before if not a.startswith("base/")}
    assert not new, f"the failing command left artifacts: {new}"
    drafts = list((ctx.store / ".tmp").glob("*")) if (ctx.store / ".tmp").is_dir() else []
    assert not drafts, f"drafts left in {ctx.store / '.tmp'}: {drafts}"


def test_a_missing_label_column_is_said_once_per_file_with_the_row_count(
    tiny_model: Path, base_key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ctx = Ctx(tmp_path, tiny_model, tmp_path / "store", base_key)
    argv = _csv(ctx, "text,category\n" + "".join(f"t{i},c\n" for i in range(40)))
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("no 'label' field in any of its 40 rows (fields found: category, text)") == 1, err
    assert len(err.splitlines()) == 2 and "set data.label_field to the field that holds it" in err, err
    assert "data.format" not in err.replace("(format: classification)", ""), err


def test_a_stage_error_under_run_is_printed_once(tiny_model: Path, tmp_path: Path) -> None:
    ctx = Ctx(tmp_path, tiny_model, tmp_path / "store", "0")
    ctx.write("t.jsonl", chat_rows(9) + '{"prompt": "lonely"}\n')
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORAFORGE_LOG_DIR": str(tmp_path / "logs")}
    result = subprocess.run([sys.executable, "-m", "loraforge.flows.cli", "run", ctx.config(train="t.jsonl")], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    combined = result.stdout + result.stderr
    assert result.returncode == 1, combined[-3000:]
    assert "Traceback" not in combined
    assert combined.count("field 'messages' must be") == 1, combined[-5000:]
    assert not {a for a in _artifacts(ctx.store) if not a.startswith("base/")}
