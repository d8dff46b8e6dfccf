"""Publish stage: assemble the adapter (and optionally merged weights and GGUF files) with a model card and
lineage, then push it to a Hugging Face Hub repo, or, with no token, write the exact bundle it would push.

Layout: one repo with folders, one commit per publish, one tag per pipeline version. The adapter sits at the repo
root (so `PeftModel.from_pretrained(base, REPO, revision=TAG)` works as is), the merged model under `merged/`, the
GGUF files with their Ollama Modelfiles under `gguf/` (and, read off those Modelfiles, the repo-root `template`,
`params` and `system` files that `ollama run hf.co/ORG/NAME:Q4_K_M` uses), the lineage under `loraforge/`. One
repo keeps every artifact of a version behind a single commit and tag, so they can never drift apart; the price is
that a GGUF user filters downloads (`allow_patterns="gguf/*"`, or `hf_hub_download(..., "gguf/NAME-Q4_K_M.gguf")`).

A push is one commit: LFS contents go up first, the commit lands only when all of them are there, then the tag
is created on that commit. A push that dies midway leaves no commit and no tag (uploaded LFS objects wait unused),
and a re-run uploads only what is missing, commits, and tags; a bundle already at the head makes no new commit.

The token comes from a Prefect Secret block (`publish.token_secret`), else HF_TOKEN, else the token saved by
`hf auth login`; it is only sent over https (or plain http to loopback), never enters configs, manifests, cards or
logs, and error messages are scrubbed of it.
Run alone: `loraforge stage publish CONFIG [key=value ...]`.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from loraforge.tasks.artifacts import KEY_LIBRARIES, Artifact, ArtifactStore, compute_key, hash_files
from loraforge.tasks.data import read_data
from loraforge.tasks.errors import GateFailed, StageError
from loraforge.tasks.evaluate import check_gate, read_gate
from loraforge.tasks.hubclient import (
    REPO_ID,
    REPO_ID_RULE,
    check_transport,
    explain,
    hub_endpoint,
    hub_token,
    with_retries,
)
from loraforge.tasks.merge import read_merge
from loraforge.tasks.models import read_base
from loraforge.tasks.quantize import probe_summary, read_quantize
from loraforge.tasks.train import read_train

T = TypeVar("T")


class PublishConfig(BaseModel):
    """Where and what to publish."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    repo_id: str = Field("loraforge/ticket-router-lora", description=f"Hub repo id ({REPO_ID_RULE}).")
    endpoint: str | None = Field(
        None, description="Hub URL; default: the HF_ENDPOINT environment variable, else https://huggingface.co."
    )
    push: Literal["auto", "always", "never"] = Field(
        "auto",
        description="auto: push when a Hub token is found (publish.token_secret, HF_TOKEN, the token of "
        "`hf auth login`), else only write the bundle; always: fail without a token; never: write the bundle only.",
    )
    private: bool = Field(False, description="Create the repo as private.")
    include_merged: bool = Field(False, description="Also upload the merged model under merged/.")
    include_gguf: list[str] = Field(
        default_factory=lambda: ["q4_k_m"], description="GGUF types (from the quantize stage) to upload under gguf/."
    )
    tag: str | None = Field(
        None,
        description="Tag for the pushed revision; default: loraforge-<version>, a hash of every artifact published "
        "(adapter, eval, merge, GGUF keys) and of what shapes the bundle, so a new version never reuses a tag.",
    )
    token_secret: str | None = Field(
        None,
        description="Name of a Prefect Secret block holding the Hub token; when set it is used instead of HF_TOKEN "
        "and `hf auth login` (and push: auto pushes). Only the name is stored anywhere.",
    )
    datasets: list[str] | None = Field(
        None,
        description="Hub dataset ids for the card's `datasets` metadata. Default: the id the training data came "
        "from when it is a datasets folder downloaded from the Hub, else none (the Hub expects ids of Hub datasets; "
        "the local files are named in the card and lineage instead).",
    )

    @field_validator("repo_id")
    @classmethod
    def _hub_repo_id(cls, value: str) -> str:
        if not re.fullmatch(REPO_ID, value):
            raise ValueError(f"not a Hub repo id ({REPO_ID_RULE}), e.g. acme/ticket-router-lora")
        return value


class Published(NamedTuple):
    """What the publish artifact tells a run's record (read it with `read_publish`)."""

    mode: str | None  # push, or bundle (written, not pushed)
    repo_id: str | None
    endpoint: str | None
    tag: str | None  # the version tag of what was published
    commit: str | None  # the Hub commit, when pushed


def read_publish(publish: Artifact) -> Published:
    """Where and as what the publish stage put the bundle."""
    m = publish.manifest
    return Published(m.get("mode"), m.get("repo_id"), m.get("endpoint"), m.get("tag"), m.get("commit"))


def publish_model(
    config: PublishConfig,
    pipeline_name: str,
    approval_required: bool,
    base: Artifact,
    data: Artifact,
    train: Artifact,
    eval_: Artifact,
    merge: Artifact,
    quantize: Artifact,
    store: ArtifactStore,
) -> Artifact:
    """Build the bundle and push it (or explain that it only wrote it); skipped when cached.

    Publish refuses, whatever called it, an eval artifact whose gate did not pass and, when
    `approval_required` (orchestration.approval), artifacts no reviewer approved (`record_approval`).

    Returns:
        The publish artifact: `bundle/` (exactly what is or would be pushed) and, after a push, the commit and
        tag in the manifest.
    """
    try:
        check_gate(eval_)  # whoever calls publish (pipeline, `stage publish --input`, a deployment, a container)
    except GateFailed as exc:
        raise GateFailed(f"publish refused: {exc} (eval {eval_.key}); nothing was published") from None
    if approval_required and approval(store, eval_, quantize) is None:
        raise GateFailed(
            f"publish refused: orchestration.approval is on and no reviewer approved eval {eval_.key} with quantize "
            f"{quantize.key}; run the pipeline under a Prefect server and approve it when it pauses before publish."
        )
    token = None if config.push == "never" else hub_token(config.token_secret)
    mode = "push" if config.push == "always" or (config.push == "auto" and token) else "bundle"
    if mode == "push" and not token:
        raise StageError(
            "publish.push is 'always' but no Hub token was found; export HF_TOKEN, run `hf auth login`, name a "
            "Prefect Secret block in publish.token_secret, or set publish.push=auto."
        )
    endpoint = hub_endpoint(config.endpoint)
    inputs = {"base": base, "data": data, "train": train, "eval": eval_, "merge": merge, "quantize": quantize}
    settings = {**config.model_dump(), "endpoint": endpoint, "mode": mode, "name": pipeline_name}
    key, code = store.stage_key("publish", __file__, settings, inputs)
    with store.claim("publish", key) as hit:
        return hit or _build_publish(config, pipeline_name, inputs, settings, token, store, key, code)


def _build_publish(
    config: PublishConfig,
    pipeline_name: str,
    inputs: dict[str, Artifact],
    settings: dict[str, Any],
    token: str | None,
    store: ArtifactStore,
    key: str,
    code: str,
) -> Artifact:
    """Write the bundle of the publish artifact `key` and push it when settings["mode"] is push (lock held)."""
    base, data, train, eval_ = inputs["base"], inputs["data"], inputs["train"], inputs["eval"]
    merge, quantize = inputs["merge"], inputs["quantize"]
    mode, endpoint = settings["mode"], settings["endpoint"]
    started = time.time()

    gguf = read_quantize(quantize).gguf
    missing = [t for t in config.include_gguf if t not in gguf]
    if missing:
        raise StageError(
            f"publish.include_gguf asks for {', '.join(missing)} but the quantize stage produced "
            f"{', '.join(gguf)}; add them to quantize.types."
        )
    withheld = {q: gguf[q]["reason"] for q in config.include_gguf if not gguf[q].get("passed", True)}
    for qtype, reason in withheld.items():
        print(f"[publish] not publishing {qtype} GGUF: it failed its fidelity check ({reason})")
    # The version: what the bundle is made of, not where it goes (endpoint, push mode, privacy); the same
    # artifacts republished keep their tag, and any changed stage (a new merge dtype, say) gets a new one.
    shaping = {k: settings[k] for k in ("name", "repo_id", "include_merged", "include_gguf", "datasets")}
    version = compute_key("publish", code, shaping, {n: a.key for n, a in inputs.items()})
    tag = config.tag or f"loraforge-{version[:12]}"
    with store.create("publish", key, settings, inputs, code, started=started) as draft:
        bundle = draft.path / "bundle"
        shutil.copytree(train.file("adapter"), bundle)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            source = merge.file("model") / name
            if source.is_file():
                shutil.copy2(source, bundle / name)
        if config.include_merged:
            shutil.copytree(merge.file("model"), bundle / "merged")
        for qtype in [q for q in config.include_gguf if q not in withheld]:
            (bundle / "gguf").mkdir(exist_ok=True)
            for kind in ("file", "modelfile"):  # the GGUF and its Ollama Modelfile (merged types have one)
                if kind in gguf[qtype]:
                    shutil.copy2(quantize.file(gguf[qtype][kind]), bundle / "gguf")
        _write_ollama_files(bundle)
        lineage = _lineage(pipeline_name, inputs, tag)
        lineage["datasets"] = config.datasets if config.datasets is not None else hub_datasets(data)
        # Every published file's sha256, so `loraforge pull` can verify what it downloads against the lineage.
        lineage["files"] = {name: info["sha256"] for name, info in hash_files(bundle).items()}
        (bundle / "loraforge").mkdir()
        (bundle / "loraforge" / "lineage.json").write_text(json.dumps(lineage, indent=2, sort_keys=True))
        (bundle / "README.md").write_text(_model_card(config, lineage, base, eval_, quantize))
        draft.extra.update({"repo_id": config.repo_id, "endpoint": endpoint, "mode": mode, "tag": tag,
                            "withheld_gguf": withheld})  # fmt: skip
        if mode == "push":
            draft.extra["commit"] = _push(bundle, config, endpoint, token or "", tag)
            print(f"[publish] pushed {config.repo_id}@{tag} to {endpoint} (commit {draft.extra['commit'][:12]})")
        else:
            why = "publish.push=never" if config.push == "never" else "no Hub token (HF_TOKEN, `hf auth login`)"
            print(
                f"[publish] {why}: wrote the bundle that would be pushed to {endpoint}/{config.repo_id} "
                f"(tag {tag}) at {store.path('publish', key) / 'bundle'}"
            )
    return store.get("publish", key, fresh=True)


def _write_ollama_files(bundle: Path) -> None:
    """The repo-root `template`, `params` and `system` files that `ollama run hf.co/ORG/NAME:Q4_K_M` reads, from
    the published Modelfiles (all of one model, so alike; the first by name is used)."""
    from loraforge.tasks.modelfile import hub_files

    modelfiles = sorted((bundle / "gguf").glob("*.Modelfile")) if (bundle / "gguf").is_dir() else []
    if modelfiles:
        for name, text in hub_files(modelfiles[0].read_text()).items():
            (bundle / name).write_text(text)


def record_approval(store: ArtifactStore, eval_: Artifact, quantize: Artifact, answer: dict[str, Any]) -> str:
    """Record that a reviewer approved publishing these eval and quantize artifacts (what publish then checks);
    returns where the record is."""
    return store.write_record(_approval_name(eval_, quantize), {"eval": eval_.key, "quantize": quantize.key, **answer})


def approval(store: ArtifactStore, eval_: Artifact, quantize: Artifact) -> dict[str, Any] | None:
    """The reviewer's approval of publishing these artifacts, or None when there is none."""
    answer = store.read_record(_approval_name(eval_, quantize))
    return answer if answer is not None and answer.get("approved") is True else None


def _approval_name(eval_: Artifact, quantize: Artifact) -> str:
    return f"approvals/{eval_.key}-{quantize.key}.json"


def _push(bundle: Path, config: PublishConfig, endpoint: str, token: str, tag: str) -> str:
    from huggingface_hub import HfApi

    check_transport(endpoint, token)  # before anything is sent: never a token over plain http off this machine
    api = HfApi(endpoint=endpoint, token=token)
    where = f"push {config.repo_id} to {endpoint}"
    tries = [0]  # of the call that failed, for the message

    def retried(call: Callable[[], T]) -> T:
        return with_retries(call, where, tries=tries)

    try:
        # Each call is retried on its own while the Hub is unreachable or answers 5xx/429: repeating one is safe
        # (exist_ok; a re-upload skips what the server has; the tag was looked up before it is created).
        retried(lambda: api.create_repo(config.repo_id, private=config.private, exist_ok=True))
        tags = {t.name: t.target_commit for t in retried(lambda: api.list_repo_refs(config.repo_id)).tags}
        if tag in tags:  # this version was published before: the tag must hold exactly this bundle
            if different := retried(lambda: _differences(api, config.repo_id, tags[tag], bundle)):
                raise StageError(
                    f"tag {tag} already exists on {config.repo_id} (commit {tags[tag][:12]}) with other files "
                    f"({', '.join(different[:5])}): a tag names one pipeline version; set publish.tag to a new name."
                )
            return tags[tag]
        # One commit with every file; the client skips files the head already has (no new commit when nothing
        # changed) and LFS objects the server already stores (what an interrupted push got up).
        # delete_patterns: files of an earlier version that this bundle does not have go in the same commit.
        info = retried(lambda: api.upload_folder(
            repo_id=config.repo_id, folder_path=bundle, commit_message=f"loraforge: publish {tag}",
            delete_patterns="*"))  # fmt: skip
        commit = str(info.oid)
        retried(lambda: api.create_tag(config.repo_id, tag=tag, revision=commit))
    except StageError:
        raise
    except Exception as exc:  # network and HTTP errors of every kind: report what to fix, never leak the token
        raise StageError(
            f"push to {endpoint}/{config.repo_id} failed: {explain(exc, endpoint, token, tries=tries[0])}."
        ) from None
    return commit


def _differences(api: Any, repo_id: str, commit: str, bundle: Path) -> list[str]:
    """Paths that differ between the bundle and the repo at `commit` (LFS files by sha256, others by git oid)."""
    import hashlib

    remote = {}
    for entry in api.list_repo_tree(repo_id, revision=commit, recursive=True):
        if getattr(entry, "blob_id", None) is not None:  # a file, not a folder
            remote[entry.path] = entry.lfs.sha256 if entry.lfs else entry.blob_id
    local = {}
    for name, info in hash_files(bundle).items():
        if (remote_entry := remote.get(name)) is not None and len(remote_entry) == 40:  # compared by git blob oid
            data = (bundle / name).read_bytes()
            local[name] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        else:
            local[name] = info["sha256"]
    return sorted(n for n in set(remote) | set(local) if remote.get(n) != local.get(n) and n != ".gitattributes")


def hub_datasets(data: Artifact) -> list[str]:
    """The Hub dataset ids the training data came from: a `hub:ORG/NAME` data source, or, for a `datasets` folder
    saved from a Hub dataset, the repo its dataset_info.json download URLs name (hf://datasets/ORG/NAME@REV/... or
    .../datasets/ORG/NAME/resolve/...); local files have none."""
    import re

    found: list[str] = []
    for field in ("train_file", "validation_file", "test_file"):
        value = read_data(data).settings.get(field)
        if not value:
            continue
        if str(value).startswith("hub:"):  # the data stage read a Hub dataset repo: hub:ORG/NAME[@REV][#SPLIT]
            repo = re.split(r"[@#]", str(value).removeprefix("hub:"))[0]
            if repo not in found:
                found.append(repo)
            continue
        folder = Path(str(value).partition("#")[0])
        for info_file in sorted(folder.rglob("dataset_info.json")) if folder.is_dir() else []:
            try:
                urls = json.loads(info_file.read_text()).get("download_checksums") or {}
            except (OSError, json.JSONDecodeError):
                continue
            for url in urls:
                match = re.search(r"(?:hf://datasets/|/datasets/)([\w.-]+/[\w.-]+?)(?:@|/resolve/)", url)
                if match and match.group(1) not in found:
                    found.append(match.group(1))
    return found


# Figures of one run, not of what it made: the same keys rebuilt elsewhere (another machine, a copied store) give
# other values. They stay in the local manifests; a published tag holds only what its keys determine, so two
# stores with the same keys push byte-identical bundles (and a second push of a tag finds the same files).
RUN_DEPENDENT = frozenset({"created_at", "duration_s", "train_seconds", "tokens_per_s", "peak_rss_mb",
                           "cuda_peak_mb", "rss_mb", "cuda_mb"})  # fmt: skip


def _without_run_figures(value: Any) -> Any:
    """`value` with every RUN_DEPENDENT key removed, at any depth."""
    if isinstance(value, dict):
        return {k: _without_run_figures(v) for k, v in value.items() if k not in RUN_DEPENDENT}
    if isinstance(value, list):
        return [_without_run_figures(v) for v in value]
    return value


def _lineage(name: str, inputs: dict[str, Artifact], tag: str) -> dict[str, Any]:
    """What the bundle records of its making (loraforge/lineage.json and the card): a function of the input
    artifacts' keys and manifests, without run-dependent figures (`RUN_DEPENDENT`)."""
    base, data, train, eval_, merge, quantize = (
        inputs[k] for k in ("base", "data", "train", "eval", "merge", "quantize")
    )
    ref, spec, gate, merged, ggufs = (read_base(base), read_data(data), read_gate(eval_), read_merge(merge),
                                      read_quantize(quantize))  # fmt: skip
    return _without_run_figures({
        "pipeline": name,
        "tag": tag,
        "artifacts": {stage: a.key for stage, a in inputs.items()},
        "base_model": {"base_model": ref.spec, "hub_id": ref.hub_id, "fingerprint": ref.fingerprint,
                       "architecture": ref.architecture},
        "data": {"sha256": spec.data_sha256, "template_sha256": spec.template_sha256,
                 "files": {k: Path(str(v)).name for k, v in spec.settings.items() if k.endswith("_file") and v},
                 "rows": data.metrics},
        "train": {"config": train.config, "metrics": train.metrics, "adapter_sha256": read_train(train).adapter_sha256},
        "eval": {"metrics": eval_.metrics, "gate": gate._asdict()},
        "merge": {"policy": merged.policy, "fidelity": merge.metrics, "dtype": merged.dtype},
        "quantize": {"llama_cpp_version": ggufs.llama_cpp_version, "gguf": ggufs.gguf, "imatrix": ggufs.imatrix},
        # Every gate between the data and this repo: eval's thresholds, the merge's fidelity limits (the merge
        # artifact exists only when they held) and each GGUF's fidelity limits.
        "gates": {"eval": gate.passed, "merge": True,
                  "gguf": {q: bool(g.get("passed", True)) for q, g in ggufs.gguf.items()}},
        "config": {stage: a.config for stage, a in inputs.items()},
        "code_versions": {stage: a.manifest.get("code_version") for stage, a in inputs.items()},
        # The libraries in the keys (KEY_LIBRARIES), as each stage recorded them: the same keys, the same versions.
        # Other installed libraries (prefect, huggingface-hub...) say where a run happened, not what it made.
        "versions": {lib: version for stage, a in inputs.items() for lib, version in (a.manifest.get("versions") or
                     {}).items() if lib in KEY_LIBRARIES.get(stage, ())},
    })  # fmt: skip


# the eval metrics in the model-index and the card's table
CARD_METRICS = ("accuracy", "macro_f1", "exact_match", "rouge_l", "entity_f1", "perplexity")
CARD_TEMPLATE = "model_card.md.j2"  # in tasks/templates/
KEYED_FILES = ("templates/model_card.md.j2",)  # the card's template: part of the publish key's code version


def base_license(base: Artifact) -> str:
    """The base model's license id: from its provisioning record (the bundled base), else the `license` of the
    model folder's own card (README.md front matter, as a Hub snapshot has), else 'other'."""
    import yaml

    ref = read_base(base)
    if ref.license:
        return ref.license
    readme = ref.model_path / "README.md"
    if readme.is_file() and (text := readme.read_text(errors="replace")).startswith("---"):
        try:
            meta = yaml.safe_load(text.split("---")[1]) or {}
        except yaml.YAMLError:
            meta = {}
        if isinstance(meta, dict) and meta.get("license"):
            return str(meta["license"])
    return "other"


def _model_card(
    config: PublishConfig, lineage: dict[str, Any], base: Artifact, eval_: Artifact, quantize: Artifact
) -> str:
    """The bundle's README.md: tasks/templates/model_card.md.j2 rendered with `_card_context`."""
    import jinja2

    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    return environment.get_template(CARD_TEMPLATE).render(_card_context(config, lineage, base, eval_))


def _card_context(config: PublishConfig, lineage: dict[str, Any], base: Artifact, eval_: Artifact) -> dict[str, Any]:
    """What the model card shows, as plain values: the card's metadata (YAML front matter), the eval and GGUF
    tables, what was published and the lineage summary."""
    import yaml

    ref = read_base(base)
    base_id = ref.public_name
    metrics = eval_.metrics
    gguf_meta = lineage["quantize"]["gguf"] or {}
    published = [q for q in config.include_gguf if gguf_meta.get(q, {}).get("passed", True)]
    modelfiles = [gguf_meta[q]["modelfile"] for q in published if "modelfile" in gguf_meta.get(q, {})]
    datasets = lineage["datasets"]
    short_name = config.repo_id.split("/")[-1]
    card_meta: dict[str, Any] = {
        "base_model": base_id,
        "base_model_relation": "adapter",
        "library_name": "peft",
        "pipeline_tag": "text-generation",
        "license": base_license(base),
        "tags": ["loraforge", "lora", "peft"] + (["gguf"] if published else []) + (["ollama"] if modelfiles else []),
    }
    if ref.license_name:  # a custom license ("other"): the Hub shows its name and links its terms
        card_meta.update(license_name=ref.license_name, license_link=ref.license_link)
    if datasets:  # Hub dataset ids only (the Hub links them); local data is named in the lineage below
        card_meta["datasets"] = datasets
    card_meta["model-index"] = [{
        "name": short_name,
        "results": [{
            "task": {"type": "text-generation", "name": "Text Generation"},
            "dataset": {"name": f"{lineage['pipeline']} (test split)", "type": datasets[0] if datasets else "custom",
                        "split": "test"},
            "metrics": [{"type": m, "name": m, "value": metrics[m]} for m in CARD_METRICS if m in metrics],
        }],
    }]  # fmt: skip
    nan = float("nan")
    gguf_rows = [{"qtype": q, "file": g["file"], "size_mb": g["size_mb"], "imatrix": bool(g.get("imatrix")),
                  "mean_kl": g.get("mean_kl", nan), "top1_agreement": g.get("top1_agreement", nan),
                  "ppl_ratio": g.get("ppl_ratio", nan), "probe": probe_summary(g).removeprefix("probe "),
                  "passed": g.get("passed", True),
                  "reason": "" if g.get("passed", True) else g["reason"]}
                 for q, g in gguf_meta.items()]  # fmt: skip
    gate = lineage["eval"]["gate"] or {}
    imatrix = lineage["quantize"].get("imatrix")
    return {
        "front_matter": yaml.safe_dump(card_meta, sort_keys=False, allow_unicode=True).strip(),
        "short_name": short_name,
        "base_id": base_id,
        "base_gguf": {"file": ref.gguf[0], "sha256": ref.gguf[1]} if ref.gguf else None,
        "repo_id": config.repo_id,
        "tag": lineage["tag"],
        "pipeline": lineage["pipeline"],
        "data_files": list(lineage["data"]["files"].values()),
        "include_merged": config.include_merged,
        "eval_rows": [
            {"metric": m, "base": metrics.get("base_" + m, nan), "tuned": metrics[m]}
            for m in CARD_METRICS
            if m in metrics
        ],
        "gate_passed": bool(gate.get("passed")),
        "gate_checks": [c["check"] for c in gate.get("checks", [])],
        "llama_cpp_version": lineage["quantize"]["llama_cpp_version"],
        "imatrix": imatrix or None,
        "imatrix_auto": bool(imatrix) and lineage["config"]["quantize"].get("imatrix") == "auto",
        "gguf_rows": gguf_rows,
        "merged_gguf": next((gguf_meta[q]["file"] for q in published if not q.startswith("lora")), None),
        "lora_gguf": next((gguf_meta[q]["file"] for q in published if q.startswith("lora")), None),
        "modelfiles": modelfiles,
        "system_prompt": bool(modelfiles) and bool(lineage["config"]["data"].get("system_prompt")),
        "data_sha256": json.dumps(lineage["data"]["sha256"]),
        "template_sha256": lineage["data"]["template_sha256"],
        "adapter_sha256": lineage["train"]["adapter_sha256"],
        "merge_policy": lineage["merge"]["policy"],
        "eval_gate_passed": bool(lineage["gates"]["eval"]),
        "gguf_gates": lineage["gates"]["gguf"],
        "code_versions": json.dumps(lineage["code_versions"]),
        "artifact_keys": json.dumps(lineage["artifacts"]),
    }
