"""The artifact store: content-addressed, versioned stage outputs (a folder + manifest.json each).

Layout under the store root: `<stage>/<key>/` holds one artifact; `runs/<run-id>.json` records a pipeline run.
A key is the hash of the stage's code version, its resolved config and its inputs' keys, so the same inputs and
config give the same key and the stage is skipped. Artifacts are written into a temporary folder and renamed
into place only once complete: a crash never leaves a half-written artifact under a real key.

The store is addressed by URL (`file:///abs/path` or a plain path); only local folders are implemented.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pydantic import BaseModel

from tasks.errors import StageError

MANIFEST = "manifest.json"
STAGES = ("base", "data", "train", "eval", "merge", "quantize", "publish")
PRODUCERS = {
    "base": "the base-model provisioning step (base_model in the config)",
    "data": "the data stage (`loraforge stage data CONFIG`)",
    "train": "the train stage (`loraforge stage train CONFIG`)",
    "eval": "the eval stage (`loraforge stage eval CONFIG`)",
    "merge": "the merge stage (`loraforge stage merge CONFIG`)",
    "quantize": "the quantize stage (`loraforge stage quantize CONFIG`)",
    "publish": "the publish stage (`loraforge stage publish CONFIG`)",
}
TRACKED_LIBRARIES = (
    "torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "evaluate",
    "huggingface-hub", "llama-cpp-python", "prefect", "loraforge",
)  # fmt: skip


@dataclass(frozen=True)
class Artifact:
    """A finished artifact: where it is and what its manifest says."""

    stage: str
    key: str
    path: Path
    manifest: dict[str, Any]
    cached: bool = False

    @property
    def metrics(self) -> dict[str, Any]:
        """The metrics the stage recorded."""
        return dict(self.manifest.get("metrics", {}))

    def file(self, name: str) -> Path:
        """A file inside the artifact; a clear error names the producing stage when it is missing."""
        path = self.path / name
        if not path.exists():
            raise StageError(
                f"{self.stage} artifact {self.key} has no {name!r} (in {self.path}); it is incomplete or from "
                f"an older version: delete the folder and re-run {PRODUCERS[self.stage]}."
            )
        return path


@dataclass
class Draft:
    """An artifact being written: files go under `path`; metrics and extra fields go into the manifest."""

    stage: str
    key: str
    path: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the form that gets hashed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def code_version(source_file: str | Path) -> str:
    """The version of a stage's code: the hash of its source file (any edit makes new keys)."""
    return hashlib.sha256(Path(source_file).read_bytes()).hexdigest()[:16]


def compute_key(stage: str, code: str, config: Mapping[str, Any], inputs: Mapping[str, str]) -> str:
    """The content key of an artifact: hash of stage name, code version, config and input keys."""
    payload = canonical_json({"stage": stage, "code": code, "config": config, "inputs": dict(inputs)})
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def config_dict(config: BaseModel | Mapping[str, Any]) -> dict[str, Any]:
    """A config as plain JSON data (paths as strings), for hashing and manifests."""
    if isinstance(config, BaseModel):
        return json.loads(config.model_dump_json())
    return json.loads(canonical_json(config))


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape an artifact."""
    versions = {}
    for name in TRACKED_LIBRARIES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_files(root: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file below root, by relative path."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(root).as_posix()] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return files


class ArtifactStore:
    """A folder of artifacts addressed by (stage, key)."""

    def __init__(self, url: str | Path) -> None:
        text = str(url)
        parsed = urlparse(text)
        if parsed.scheme in ("", "file"):
            self.root = Path(parsed.path if parsed.scheme == "file" else text).expanduser().resolve()
        else:
            raise StageError(
                f"store: {text!r} uses the scheme {parsed.scheme!r}; only local folders "
                "(a path or file:///abs/path) are supported."
            )
        self.url = self.root.as_uri()
        self.writable: frozenset[str] | None = None  # None: every stage may write; else only these

    def restricted_to(self, *stages: str) -> ArtifactStore:
        """A view of the same store in which only `stages` may create artifacts (the others must exist).

        Used to run one stage alone: its inputs are looked up, never recomputed behind the user's back.
        """
        view = ArtifactStore(self.url)
        view.writable = frozenset(stages)
        return view

    def path(self, stage: str, key: str) -> Path:
        """Where the artifact (stage, key) lives, whether or not it exists."""
        return self.root / stage / key

    def find(self, stage: str, key: str) -> Artifact | None:
        """The artifact if it exists (complete), else None."""
        folder = self.path(stage, key)
        manifest = folder / MANIFEST
        if not manifest.is_file():
            return None
        return Artifact(stage, key, folder, json.loads(manifest.read_text()), cached=True)

    def get(self, stage: str, key: str, fresh: bool = False) -> Artifact:
        """The artifact, or an error that says which stage should have produced it.

        `fresh=True` marks it as produced just now (not a cache hit), for the stage that wrote it.
        """
        found = self.find(stage, key)
        if found is None:
            raise StageError(
                f"no {stage} artifact with key {key} in {self.root}: run {PRODUCERS[stage]} first with the same config."
            )
        return dataclasses.replace(found, cached=False) if fresh else found

    def lookup(self, ref: str) -> Artifact:
        """Find an artifact by `stage/key`, a key or a unique key prefix."""
        stage, _, key = ref.rpartition("/")
        candidates = [
            self.path(s, p.name)
            for s in ([stage] if stage else STAGES)
            if (self.root / s).is_dir()
            for p in (self.root / s).iterdir()
            if p.name.startswith(key) and (p / MANIFEST).is_file()
        ]
        if len(candidates) != 1:
            what = "no artifact" if not candidates else f"{len(candidates)} artifacts"
            raise StageError(f"{what} in {self.root} match {ref!r}; give stage/key or a longer key prefix.")
        folder = candidates[0]
        return self.get(folder.parent.name, folder.name)

    @contextlib.contextmanager
    def create(
        self,
        stage: str,
        key: str,
        config: BaseModel | Mapping[str, Any],
        inputs: Mapping[str, Artifact],
        code: str,
        started: float | None = None,
    ) -> Iterator[Draft]:
        """Write a new artifact atomically.

        Yields a Draft whose folder is temporary; on normal exit the manifest is written last and the folder
        renamed to its final place. On an exception the temporary folder is removed and nothing is published.
        `started` (time.time() when the stage began its work, after its cache miss) dates the manifest's
        duration_s; without it the duration covers only the writing inside this block.
        """
        if self.writable is not None and stage not in self.writable:
            raise StageError(
                f"no {stage} artifact with key {key} in {self.root}: run {PRODUCERS[stage]} first with the same config."
            )
        tmp_root = self.root / ".tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        tmp = tmp_root / f"{stage}-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        draft = Draft(stage, key, tmp)
        started = time.time() if started is None else started
        try:
            yield draft
            manifest = {
                "stage": stage,
                "key": key,
                "code_version": code,
                "inputs": {name: {"stage": a.stage, "key": a.key} for name, a in inputs.items()},
                "config": config_dict(config),
                "files": hash_files(tmp),
                "metrics": draft.metrics,
                **draft.extra,
                "versions": library_versions(),
                "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "duration_s": round(time.time() - started, 2),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
            final = self.path(stage, key)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():  # another process finished the same key first; keys are content, so keep it
                shutil.rmtree(tmp)
            else:
                os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def record_run(self, run_id: str, record: Mapping[str, Any]) -> Path:
        """Write a pipeline run record (atomically) and return its path."""
        runs = self.root / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        target = runs / f"{run_id}.json"
        part = target.with_suffix(".json.part")
        part.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
        os.replace(part, target)
        return target

    def load_run(self, run_id: str) -> dict[str, Any]:
        """A run record by id or unique prefix (`latest` for the newest)."""
        runs = sorted((self.root / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)
        if run_id == "latest" and runs:
            return json.loads(runs[-1].read_text())
        matches = [p for p in runs if p.stem.startswith(run_id)]
        if len(matches) != 1:
            raise StageError(f"{len(matches)} runs in {self.root / 'runs'} match {run_id!r}.")
        return json.loads(matches[0].read_text())

    def stage_key(
        self, stage: str, source_file: str, config: BaseModel | Mapping[str, Any], inputs: Mapping[str, Any]
    ) -> tuple[str, str]:
        """(key, code version) for a stage given its config and inputs (artifacts or plain fingerprints)."""
        code = code_version(source_file)
        input_keys = {n: (a.key if isinstance(a, Artifact) else str(a)) for n, a in inputs.items()}
        return compute_key(stage, code, config_dict(config), input_keys), code
