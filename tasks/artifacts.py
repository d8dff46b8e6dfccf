"""The artifact store: content-addressed, versioned stage outputs (a folder + manifest.json each).

Layout under the store root: `<stage>/<key>/` holds one artifact; `runs/<run-id>.json` records a pipeline run.
A key is the hash of the stage's code version, its resolved config and its inputs' keys, so the same inputs and
config give the same key and the stage is skipped. The code version covers the stage's module and every project
module it imports (transitively, imports inside functions included) and the versions of the libraries that shape
its bytes (`KEY_LIBRARIES`); docs/design.md says what is in and out of a key.

Artifacts are written into a temporary folder, fsynced and renamed into place only once complete: a crash never
leaves a half-written artifact under a real key. A stage builds its key under a per-key lock (`claim`), so two
runs of one key never build it twice: the second waits and takes the first's artifact as a cache hit. Every
reuse is verified against the manifest (sizes, and sha256 unless the store was opened with verify="size"); a
damaged artifact is set aside under `.damaged/` and rebuilt.

The store is addressed by URL (`file:///abs/path` or a plain path); only local folders are implemented.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import datetime as dt
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
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
# The libraries whose versions shape each stage's bytes: part of its key (a new torch retrains, a new llama.cpp
# re-quantizes). Libraries that only move data (prefect, huggingface-hub) stay out; all versions go in manifests.
KEY_LIBRARIES: dict[str, tuple[str, ...]] = {
    "base": (),  # keyed by the model folder's content, whichever library converted it (every image agrees)
    "data": ("transformers", "tokenizers", "jinja2", "datasets"),
    "train": ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors"),
    "eval": ("torch", "transformers", "peft", "bitsandbytes", "evaluate"),
    "merge": ("torch", "transformers", "peft", "bitsandbytes", "safetensors"),
    "quantize": ("llama-cpp-python", "torch", "transformers", "numpy"),  # the converter comes with llama.cpp's sdist
    "publish": (),
}
PROJECT_ROOT = Path(__file__).resolve().parent.parent  # holds the `tasks` package (a checkout or site-packages)
KEYED_PACKAGES = ("tasks",)  # flows/ only wires stages together: it never shapes an artifact's bytes
Verify = Literal["sha256", "size"]
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


def code_files(source_file: str | Path) -> list[Path]:
    """The project's source files a stage runs: its module and every `tasks` module it imports, transitively.

    Imports are read from the syntax tree (imports inside functions count: stages import heavy helpers late),
    with each package's `__init__.py`; a module that runs code loaded by path (eval's metric modules) names
    those folders in a module-level `KEYED_DIRS` tuple, and every .py file below them counts too.
    """
    todo, seen = [Path(source_file).resolve()], set[Path]()
    while todo:
        path = todo.pop()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        tree = ast.parse(path.read_bytes(), filename=str(path))
        for name in _imported_modules(tree):
            todo.extend(_module_files(name))
        for folder in _keyed_dirs(tree):
            todo.extend((path.parent / folder).rglob("*.py"))
    return sorted(seen)


def _imported_modules(tree: ast.AST) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)  # `from tasks import data`


def _module_files(name: str) -> list[Path]:
    """The files Python executes to import the project module `name` (its packages' __init__ files too)."""
    parts = name.split(".")
    if parts[0] not in KEYED_PACKAGES:
        return []
    files = [PROJECT_ROOT.joinpath(*parts[:i], "__init__.py") for i in range(1, len(parts) + 1)]
    return [*files, PROJECT_ROOT.joinpath(*parts).with_suffix(".py")]


def _keyed_dirs(tree: ast.AST) -> list[str]:
    for node in getattr(tree, "body", []):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "KEYED_DIRS" for t in node.targets):
            return list(ast.literal_eval(node.value))
    return []


def code_version(source_file: str | Path, libraries: Iterable[str] = ()) -> str:
    """The version of a stage's code: the hash of every project file it runs (`code_files`, by path relative
    to the project, so a checkout and an installed package agree) and of the installed versions of `libraries`.
    """
    digest = hashlib.sha256()
    for path in code_files(source_file):
        digest.update(f"{path.relative_to(PROJECT_ROOT).as_posix()}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    for name in sorted(libraries):
        digest.update(f"{name}=={_installed(name) or 'absent'}\0".encode())
    return digest.hexdigest()[:16]


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
    return {name: version for name in TRACKED_LIBRARIES if (version := _installed(name)) is not None}


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


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

    def __init__(self, url: str | Path, verify: Verify = "sha256") -> None:
        """Open the store at `url`; `verify` is how much a reused artifact is checked against its manifest:
        "sha256" (every file's size and hash, the default) or "size" (sizes only, for huge stores)."""
        self.verify = verify
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
        view = ArtifactStore(self.url, self.verify)
        view.writable = frozenset(stages)
        return view

    def check_writable(self) -> None:
        """Make sure artifacts can be written here (before any work), else say which folder and why.

        Raises:
            StageError: the store folder cannot be created or written.
        """
        try:
            (self.root / ".tmp").mkdir(parents=True, exist_ok=True)
            probe = self.root / ".tmp" / f".probe-{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StageError(
                f"store: cannot write artifacts to {self.root} ({exc.strerror or exc}); set store= to a folder you "
                "can write (it is created when missing), e.g. store=./artifacts."
            ) from None

    def path(self, stage: str, key: str) -> Path:
        """Where the artifact (stage, key) lives, whether or not it exists."""
        return self.root / stage / key

    def find(self, stage: str, key: str) -> Artifact | None:
        """The artifact if it exists, complete and intact, else None.

        Its files are checked against the manifest (`verify`); a damaged artifact is set aside under
        `.damaged/` with a message saying what was wrong, and None is returned so the stage rebuilds it.
        """
        folder = self.path(stage, key)
        if not (folder / MANIFEST).is_file():
            return None
        manifest, problems = _verified_manifest(folder, self.verify)
        if problems:
            self._set_aside(stage, key, problems)
            return None
        return Artifact(stage, key, folder, manifest, cached=True)

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

    @contextlib.contextmanager
    def claim(self, stage: str, key: str) -> Iterator[Artifact | None]:
        """Hold the key's lock while a stage looks for its artifact and, on a miss, builds it.

        Yields the existing artifact (a cache hit) or None: then this process alone builds the key until the
        block ends. A second run of the same key waits here and then gets the first's artifact as a hit. Drafts
        that killed runs left for this key are removed once the lock is held (their writers are gone).

        Raises:
            StageError: on a miss in a view where this stage may not write (its producer must run first).
        """
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with (locks / f"{stage}-{key}.lock").open("a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"[store] {stage}/{key} is being built by another run; waiting for it to finish")
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                for draft in (self.root / ".tmp").glob(f"{stage}-{key}-*"):
                    shutil.rmtree(draft, ignore_errors=True)
                hit = self.find(stage, key)
                if hit is None and self.writable is not None and stage not in self.writable:
                    raise StageError(
                        f"no {stage} artifact with key {key} in {self.root}: run {PRODUCERS[stage]} first with "
                        "the same config."
                    )
                yield hit
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def clean_drafts(self) -> list[str]:
        """Remove the drafts of runs that were killed (their key's lock is free); returns their names."""
        removed = []
        for draft in sorted((self.root / ".tmp").glob("*-*-*")) if (self.root / ".tmp").is_dir() else []:
            stage, key, _ = draft.name.rsplit("-", 2)
            lock = self.root / ".locks" / f"{stage}-{key}.lock"
            if not lock.is_file():  # drafts of a writer that took no lock (older loraforge): only stale ones
                if time.time() - draft.stat().st_mtime > 24 * 3600:
                    shutil.rmtree(draft, ignore_errors=True)
                    removed.append(draft.name)
                continue
            with lock.open("a+") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its writer is alive
                shutil.rmtree(draft, ignore_errors=True)
                removed.append(draft.name)
                fcntl.flock(handle, fcntl.LOCK_UN)
        return removed

    def _set_aside(self, stage: str, key: str, problems: list[str]) -> None:
        """Move a damaged artifact out of the way (never delete what a user may want to inspect) and say so."""
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
        target = self.root / ".damaged" / f"{stage}-{key}-{stamp}-{uuid.uuid4().hex[:6]}"
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(self.path(stage, key), target)
        except FileNotFoundError:  # another reader set it aside first
            return
        (target / "DAMAGED.txt").write_text("\n".join(problems) + "\n")
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        print(
            f"[store] {stage}/{key} does not match its manifest ({shown}): set aside to {target} and rebuilt. "
            "Something changed files inside the store; artifacts are read-only once written."
        )

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
    def scratch(self, stage: str, key: str) -> Iterator[Path]:
        """An empty folder for a stage's intermediate files (not part of any artifact), on the store's disk beside
        the drafts, removed when the block ends. Named like a draft of (stage, key), so one that a killed run left
        is removed with that key's drafts (`claim`, `clean_drafts`)."""
        tmp_root = self.root / ".tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        folder = tmp_root / f"{stage}-{key}-scratch_{uuid.uuid4().hex[:8]}"
        folder.mkdir()
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

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
                commit_folder(tmp, final)
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
        fsync_tree(part)
        os.replace(part, target)
        fsync_tree(runs, files=False)
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
        code = code_version(source_file, KEY_LIBRARIES[stage])
        input_keys = {n: (a.key if isinstance(a, Artifact) else str(a)) for n, a in inputs.items()}
        return compute_key(stage, code, config_dict(config), input_keys), code


def fsync_tree(path: Path, files: bool = True) -> None:
    """Flush a file, or a folder with (when `files`) every file and folder below it, to the disk."""
    targets = [path] if path.is_file() else [*(p for p in path.rglob("*") if files or p.is_dir()), path]
    for target in targets:
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def commit_folder(tmp: Path, final: Path) -> None:
    """Publish a finished folder: flush its files, rename it into place, flush the parent folder's entry."""
    fsync_tree(tmp)
    os.rename(tmp, final)
    fsync_tree(final.parent, files=False)


_VERIFIED: dict[Path, tuple[Any, ...]] = {}  # folder -> the file stats at its last full verification


def _verified_manifest(folder: Path, verify: Verify) -> tuple[dict[str, Any], list[str]]:
    """The folder's manifest and what does not match it: missing, resized or (sha256) changed files.

    A full hash runs once per process while the files' stats stay the same (a run reads its inputs often).
    """
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        listed: dict[str, Any] = manifest["files"]
        sizes = {name: int(entry["size"]) for name, entry in listed.items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return {}, [f"{MANIFEST} is unreadable ({type(exc).__name__}: {exc})"]
    problems, stats = [], []
    for name, size in sizes.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        stat = path.stat()
        stats.append((name, stat.st_size, stat.st_mtime_ns, stat.st_ino))
        if stat.st_size != size:
            problems.append(f"{name} has {stat.st_size} bytes, the manifest says {size}")
    extra = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    problems += [f"{name} is not in the manifest" for name in extra if name not in listed]
    if problems or verify == "size" or _VERIFIED.get(folder) == tuple(stats):
        return manifest, problems
    problems = [
        f"{name} has sha256 {digest[:12]}..., the manifest says {listed[name]['sha256'][:12]}..."
        for name in sizes
        if (digest := sha256_file(folder / name)) != listed[name]["sha256"]
    ]
    if not problems:
        _VERIFIED[folder] = tuple(stats)
    return manifest, problems
