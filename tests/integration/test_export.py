"""Export in depth: the importance matrix is computed from the training data, recorded, changes the low-bit files
and is checked like every type; the base GGUF the adapter types are checked on is converted once; Modelfiles are
written and published beside the GGUF files; a push that dies midway is completed by a re-run; a token from a
Prefect Secret block never shows up anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from pipeline_fixtures import TOKEN, _config, _run, copy_stages

from loraforge.tasks.artifacts import Artifact, ArtifactStore, sha256_file
from loraforge.tasks.errors import StageError

pytestmark = pytest.mark.integration
STAGES = ("base", "data", "train", "eval", "merge", "quantize")
PROMPT = "My card was charged twice for the same order."


def _collect(calls: list[tuple[dict, int]]) -> Callable[[dict, int], None]:
    """An `on_step` that keeps every call."""
    return lambda figures, total: calls.append((figures, total))


def test_imatrix_from_the_training_data_is_used_recorded_and_checked(
    first_run: dict, tiny_model: Path, workdir: Path, hub: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gguf import GGUFReader

    from loraforge.tasks.data import prepare_data
    from loraforge.tasks.evaluate import EvalConfig
    from loraforge.tasks.quantize import quantize_gguf

    store, a = copy_stages(first_run, tmp_path / "store", "base", "data", "train", "merge")
    config = _config(tiny_model, workdir, hub)
    system = "Route the ticket to one category."
    data = prepare_data(config.data.model_copy(update={"system_prompt": system}), a["base"], store)
    runs: dict[str, Artifact] = {}
    steps: dict[str, list[tuple[dict, int]]] = {}
    for mode in ("on", "off", "auto"):
        quantize = config.quantize.model_copy(update={"types": ["q4_0", "q4_k_m", "q8_0"], "imatrix": mode})
        steps[mode] = []
        runs[mode] = quantize_gguf(quantize, "tiny-router", EvalConfig(metrics=["accuracy"]), a["base"], data,
                                   a["train"], a["merge"], store, on_step=_collect(steps[mode]))  # fmt: skip
    on, off, auto = runs["on"], runs["off"], runs["auto"]
    # Progress (the Prefect progress artifact): each piece of work once, in order, the last one at 100%.
    checks = ["check q4_0", "check q4_k_m", "check q8_0"]
    assert [f["work"] for f, _ in steps["off"]] == ["convert", "quantize", "reference", *checks]
    for mode in ("on", "auto"):
        assert [f["work"] for f, _ in steps[mode]] == ["convert", "imatrix", "quantize", "reference", *checks]
        assert [(f["step"], total) for f, total in steps[mode]] == [(step, 7) for step in range(1, 8)]
    assert len({on.key, off.key, auto.key}) == 3 and on.manifest["config"]["imatrix"] == "on"
    # One matrix per (merged model, text): `on` computed it (or found it from an earlier session), `auto` (another
    # key) took it from the machine's cache.
    assert auto.manifest["imatrix"] == on.manifest["imatrix"] | {"used_for": auto.manifest["imatrix"]["used_for"]}
    printed = capsys.readouterr().out
    assert printed.count("computed before for this merged model and text") in (1, 2), printed

    def sha(run: Artifact, qtype: str) -> str:
        return sha256_file(run.file(run.manifest["gguf"][qtype]["file"]))

    for qtype in ("q4_0", "q4_k_m"):
        assert on.manifest["gguf"][qtype]["imatrix"] is True and off.manifest["gguf"][qtype]["imatrix"] is False
        assert sha(on, qtype) != sha(off, qtype), f"{qtype}: the importance matrix did not change the file"
        for run in (on, off, auto):  # checked like every type, with or without the matrix
            info = run.manifest["gguf"][qtype]
            assert {"mean_kl", "top1_agreement", "ppl_ratio", "probe", "hf_probe", "probe_drop", "passed"} <= set(info)
            assert set(info["probe_drop"]) == {"accuracy"}, qtype
            assert info["template_parity"] == "4 prompts identical"
        # auto checked both files and kept the one closer to the merged model; both sets of figures recorded.
        info = auto.manifest["gguf"][qtype]
        both = info["imatrix_vs_plain"]
        assert both["imatrix"]["mean_kl"] == on.manifest["gguf"][qtype]["mean_kl"]
        assert both["plain"]["mean_kl"] == off.manifest["gguf"][qtype]["mean_kl"]
        kept_imatrix = both["imatrix"]["mean_kl"] < both["plain"]["mean_kl"]
        assert info["imatrix"] is kept_imatrix and info["mean_kl"] == min(b["mean_kl"] for b in both.values())
        assert sha(auto, qtype) == sha(on if kept_imatrix else off, qtype)
        assert (qtype in auto.manifest["imatrix"]["used_for"]) is kept_imatrix
    assert sorted(p.name for p in auto.path.glob("*.gguf")) == sorted(
        [auto.manifest["gguf"][q]["file"] for q in ("q4_0", "q4_k_m", "q8_0")] + ["tiny-router-imatrix.gguf"]
    )  # the losing candidates are gone
    assert on.manifest["gguf"]["q8_0"]["imatrix"] is False  # q8_0 takes no importance matrix
    assert sha(on, "q8_0") == sha(off, "q8_0")
    assert "imatrix" not in off.manifest

    imatrix = on.manifest["imatrix"]
    assert imatrix["types"] == ["q4_0", "q4_k_m"] and imatrix["train_rows"] == data.metrics["train_rows"]
    assert imatrix["sha256"] == on.manifest["files"][imatrix["file"]]["sha256"]
    reader = GGUFReader(on.file(imatrix["file"]))
    fields = {name: field.contents() for name, field in reader.fields.items() if name.startswith("imatrix.")}
    assert fields["imatrix.chunk_count"] == imatrix["chunks"] >= 2
    assert fields["imatrix.chunk_size"] == imatrix["ctx"]
    assert any(t.name.startswith("blk.0.") for t in reader.tensors)  # per-weight activation statistics
    # The text it was computed on is the train split as trained: the same token ids, decoded.
    from loraforge.tasks.batching import read_split
    from loraforge.tasks.models import load_tokenizer

    tokenizer = load_tokenizer(a["merge"].file("model"))
    rows = read_split(data.file("train.jsonl"))
    import hashlib

    text = "".join(str(tokenizer.decode(r["input_ids"], skip_special_tokens=False)) for r in rows)
    assert imatrix["text_sha256"] == hashlib.sha256(text.encode()).hexdigest()

    # Modelfiles: one per merged GGUF, with the data's system prompt.
    for qtype in ("q4_0", "q4_k_m", "q8_0"):
        name = on.manifest["gguf"][qtype]["modelfile"]
        text = on.file(name).read_text()
        assert name == on.manifest["gguf"][qtype]["file"].removesuffix(".gguf") + ".Modelfile"
        assert f"FROM ./{on.manifest['gguf'][qtype]['file']}" in text.splitlines()
        assert 'PARAMETER stop "<|im_end|>"' in text.splitlines()
        assert f'SYSTEM """{system}"""' in text.splitlines()


def test_the_base_gguf_the_adapter_is_checked_on_is_converted_once(
    first_run: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The f16 GGUF of the base (with the trained template) that the LoRA GGUF is applied to in the checks is
    converted once per base and template on a machine: a second quantize (another key: another limit, another
    pipeline name) takes it from the cache, and measures the same figures on it."""
    import llama_cpp

    from loraforge.tasks.evaluate import EvalConfig
    from loraforge.tasks.models import cache_dir
    from loraforge.tasks.quantize import QuantizeConfig, _base_gguf_cache, quantize_gguf

    store, a = copy_stages(first_run, tmp_path / "store", "base", "data", "train", "merge")
    # A cache of its own (the machine's llama.cpp linked in): the first run converts whatever other tests kept
    version = llama_cpp.__version__
    (tmp_path / "cache").mkdir()
    for tools in (f"llama.cpp-{version}", f"llama.cpp-{version}-tools"):
        (tmp_path / "cache" / tools).symlink_to(cache_dir() / tools)
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    runs = []
    for name, limit in (("tiny-router", 0.5), ("other-name", 0.4)):
        config = QuantizeConfig(types=["lora_f16"], probe_rows=1, fidelity_rows=1, max_new_tokens=2,
                                min_top1_agreement={"lora_f16": limit})  # fmt: skip
        runs.append(quantize_gguf(config, name, EvalConfig(metrics=["accuracy"], max_new_tokens=2), a["base"],
                                  a["data"], a["train"], a["merge"], store))  # fmt: skip
    first, second = capsys.readouterr().out.split("[quantize] converting the adapter", 2)[1:]
    assert "converting the base to f16 GGUF" in first and "converted before" not in first
    assert "converting the base" not in second
    assert "the base's f16 GGUF (for the adapter checks): converted before" in second
    kept = _base_gguf_cache(a["base"], a["merge"].file("model"))
    assert kept.parent == tmp_path / "cache" / "base-gguf"
    assert sorted(p.name for p in kept.parent.iterdir()) == [f"{kept.name}.gguf", f"{kept.name}.json"]
    figures = [
        {k: v for k, v in r.manifest["gguf"]["lora_f16"].items() if k not in ("file", "passed", "reason")} for r in runs
    ]
    assert runs[0].key != runs[1].key and figures[0] == figures[1]
    assert not any(p.name.startswith(".base") for run in runs for p in run.path.iterdir())  # not part of the artifact


def test_gguf_names_and_modelfiles_are_published(first_run: dict, hub: str, tmp_path: Path) -> None:
    from huggingface_hub import HfApi, hf_hub_download
    from pipeline_fixtures import REPO

    from loraforge.tasks.modelfile import hub_files

    tag = first_run["publish"]["tag"]
    files = set(HfApi(endpoint=hub, token=TOKEN).list_repo_files(REPO, revision=tag))
    gguf = sorted(f for f in files if f.startswith("gguf/"))
    # GGUF naming convention <name>-<encoding>[-<type>].gguf; the Modelfile beside the merged file only.
    assert gguf == [
        "gguf/tiny-router-F16-LoRA.gguf",
        "gguf/tiny-router-Q4_K_M.Modelfile",
        "gguf/tiny-router-Q4_K_M.gguf",
    ]
    modelfile = Path(hf_hub_download(REPO, "gguf/tiny-router-Q4_K_M.Modelfile", revision=tag, endpoint=hub,
                                     token=TOKEN, cache_dir=tmp_path)).read_text()  # fmt: skip
    assert "FROM ./tiny-router-Q4_K_M.gguf" in modelfile.splitlines()
    assert 'TEMPLATE """{{- if .Messages }}' in modelfile and "SYSTEM" not in modelfile  # no data.system_prompt
    assert "PARAMETER temperature 0" in modelfile.splitlines()  # the demo's eval is greedy
    # `ollama run hf.co/...` reads the repo-root template and params: the Modelfile's, word for word.
    assert {"template", "params"} <= files and "system" not in files
    root = {name: Path(hf_hub_download(REPO, name, revision=tag, endpoint=hub, token=TOKEN,
                                       cache_dir=tmp_path)).read_text() for name in ("template", "params")}  # fmt: skip
    assert root == hub_files(modelfile)
    lineage = json.loads(Path(hf_hub_download(REPO, "loraforge/lineage.json", revision=tag, endpoint=hub,
                                              token=TOKEN, cache_dir=tmp_path)).read_text())  # fmt: skip
    assert lineage["files"]["gguf/tiny-router-Q4_K_M.Modelfile"] == sha256_file(
        Path(first_run["stages"]["quantize"]["path"]) / "tiny-router-Q4_K_M.Modelfile"
    )
    q4 = lineage["quantize"]["gguf"]["q4_k_m"]  # demo config: imatrix auto, both versions checked, one kept
    assert (
        q4["imatrix"] is ("q4_k_m" in lineage["quantize"]["imatrix"]["used_for"])
        and lineage["quantize"]["imatrix"]["sha256"]
    )
    assert set(q4["imatrix_vs_plain"]) == {"imatrix", "plain"}


def test_a_push_that_dies_midway_is_completed_by_a_rerun(
    first_run: dict, tiny_model: Path, workdir: Path, tmp_path: Path
) -> None:
    from hub import hub_server
    from huggingface_hub import HfApi

    from loraforge.tasks.publish import publish_model
    from loraforge.tasks.pull import pull

    root, repo = tmp_path / "hub", "loraforge/tiny-crash"
    store, a = copy_stages(first_run, tmp_path / "store", *STAGES)

    def publish(url: str) -> Artifact:
        config = _config(tiny_model, workdir, url, f"publish.repo_id={repo}")
        return publish_model(config.publish, config.name, False, *(a[s] for s in STAGES), store)

    # The server dies while receiving the second LFS object (the adapter and GGUF files go through LFS).
    with hub_server(root, TOKEN, "--crash-after-lfs-uploads", "1") as url, pytest.raises(StageError) as error:
        publish(url)
    assert str(error.value).startswith(f"push to {url}/{repo} failed")
    assert TOKEN not in str(error.value)
    assert not (tmp_path / "store" / "publish").exists() or not any((tmp_path / "store" / "publish").iterdir())
    stored = {p.name: p.stat().st_mtime_ns for p in (root / "blobs").iterdir() if not p.name.startswith(".")}
    with hub_server(root, TOKEN) as url:  # back up, on the same repos
        api = HfApi(endpoint=url, token=TOKEN)
        assert [c.title for c in api.list_repo_commits(repo)] == ["initial commit"]  # no half commit
        assert api.list_repo_refs(repo).tags == []  # and no tag
        lfs = {info["sha256"] for info in hash_bundle(store, first_run).values()}
        assert 1 <= len(lfs & set(stored)) < len(lfs), "some, not all, LFS objects reached the server"

        done = publish(url)
        commits = api.list_repo_commits(repo)
        assert len(commits) == 2 and commits[0].commit_id == done.manifest["commit"]
        assert {t.name: t.target_commit for t in api.list_repo_refs(repo).tags} == {
            done.manifest["tag"]: done.manifest["commit"]}  # fmt: skip
        for name, mtime in stored.items():  # what had arrived was not sent again
            assert (root / "blobs" / name).stat().st_mtime_ns == mtime
        # Everything at the tag matches the lineage's sha256 list (pull verifies every file, GGUFs included).
        [pulled] = pull([f"{repo}@{done.manifest['tag']}"], [PROMPT], gguf="q4_k_m", endpoint=url, max_new_tokens=2)
        assert "gguf/tiny-router-Q4_K_M.gguf" in pulled.verified
        again = publish(url)  # cached: nothing more to do
        assert again.cached and len(api.list_repo_commits(repo)) == 2


def hash_bundle(store: ArtifactStore, first_run: dict) -> dict[str, dict]:
    """sha256 of the files the publish stage would push (the first run's bundle: same artifacts, same bytes)."""
    from loraforge.tasks.artifacts import hash_files

    bundle = Path(first_run["stages"]["publish"]["path"]) / "bundle"
    big = {n for n in hash_files(bundle) if n.endswith((".gguf", ".safetensors"))}
    return {n: info for n, info in hash_files(bundle).items() if n in big}


def test_token_from_a_prefect_secret_block_never_appears(
    first_run: dict,
    tiny_model: Path,
    workdir: Path,
    hub: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
) -> None:
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogHandler

    from loraforge.tasks.pull import pull

    Secret(value=TOKEN).save("loraforge-hub-token", overwrite=True)
    monkeypatch.delenv("HF_TOKEN")
    repo = "loraforge/tiny-secret"
    extra = ("publish.token_secret=loraforge-hub-token", "publish.push=auto", "publish.private=true",
             f"publish.repo_id={repo}")  # fmt: skip
    record = _run(_config(tiny_model, workdir, hub, *extra))
    assert record["publish"]["mode"] == "push" and record["publish"]["commit"]
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    [pulled] = pull([f"{repo}@{record['publish']['tag']}"], [PROMPT], endpoint=hub, max_new_tokens=2)
    assert pulled.verified  # private, pushed with the block's token, readable with it
    monkeypatch.delenv("HF_TOKEN")

    missing = _config(tiny_model, workdir, hub, "publish.token_secret=no-such-block", f"publish.repo_id={repo}-2")
    with pytest.raises(StageError, match=r"publish.token_secret: cannot load the Prefect Secret block 'no-such-block'"):
        _run(missing)

    # Scan everything this produced: the store (manifests, bundles, cards, lineage, run records), output, logs.
    secret = TOKEN.encode()
    leaked = [str(p) for p in (workdir / "store").rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert leaked == []
    out, err = capfd.readouterr()
    assert TOKEN not in out and TOKEN not in err
    APILogHandler().flush()  # send what is queued to the API, then read every log the session's runs wrote
    with get_client(sync_client=True) as client:
        logs = client.read_logs()
    assert logs and not [log.message for log in logs if TOKEN in log.message]
    publish = json.loads((Path(record["stages"]["publish"]["path"]) / "manifest.json").read_text())
    assert publish["config"]["token_secret"] == "loraforge-hub-token"  # the name is recorded, never the value
