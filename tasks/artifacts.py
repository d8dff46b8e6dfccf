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

The store is addressed by URL: a plain path or `file:///abs/path` (a local folder), or `s3://bucket/prefix`
(S3-compatible object storage, tasks/objectstore.py). An S3 store keeps the same keys and layout of manifests
(`<stage>/<key>/manifest.json`); file contents go to `blobs/<sha256[:2]>/<sha256>` (a name that only those bytes
can have, so two writers of one key can never mix their files) and the manifest is uploaded last: it is the
commit, S3 having no rename. Stages read through a local copy of the store (`root`, under LORAFORGE_CACHE): an
artifact is downloaded once per machine, every file checked against the manifest's sha256 on the way in.
Locks, drafts and checkpoints stay on the local disk; a lease object in the bucket (`.leases/`) keeps
machines from building the same key at once (best effort: S3 has no atomic create, so two machines may rarely
both build a key; the last manifest then wins and both are complete).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import datetime as dt
import fcntl
import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel

from loraforge.tasks.errors import StageError
from loraforge.tasks.objectstore import ObjectStore
from loraforge.tasks.registry import NAMES
from loraforge.tasks.registry import STAGES as REGISTERED

MANIFEST = "manifest.json"
STAGES = NAMES  # every artifact folder's stage, in pipeline order (tasks/registry.py)
PRODUCERS = {s.name: s.producer for s in REGISTERED}  # for "run X first" messages
KEY_LIBRARIES = {s.name: s.libraries for s in REGISTERED}  # the libraries in each stage's key (tasks/registry.py)
PROJECT_ROOT = Path(__file__).resolve().parent.parent  # holds the `tasks` package (a checkout or site-packages)
KEYED_PACKAGES = ("loraforge.tasks",)  # flows/ only wires stages together: it never shapes an artifact's bytes
# Declarations that only wire stages (which function runs on what): not in any key. What they could change in
# the bytes is keyed anyway (the config values and artifacts a stage is given, the versions of its libraries).
WIRING_MODULES = ("loraforge.tasks.registry",)
Verify = Literal["sha256", "size"]
LEASE_S = 120.0  # an S3 lease not renewed for this long is a dead writer's (renewed every LEASE_S / 4)
TRACKED_LIBRARIES = (
    "torch", "transformers", "peft", "bitsandbytes", "datasets", "evaluate",
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

    @property
    def config(self) -> dict[str, Any]:
        """The stage settings it was made with (every manifest records them)."""
        return dict(self.manifest.get("config") or {})

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
    those folders in a module-level `KEYED_DIRS` tuple, and every .py file below them counts too; files a module
    reads at run time to shape what it writes (publish's model card template) are named, relative to the module,
    in a module-level `KEYED_FILES` tuple.
    """
    todo, seen = [Path(source_file).resolve()], set[Path]()
    while todo:
        path = todo.pop()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        if path.suffix != ".py":  # a KEYED_FILES file: hashed, not parsed
            continue
        stat = path.stat()
        imported, keyed_dirs, keyed_files = _parsed(path, stat.st_mtime_ns, stat.st_size)
        todo.extend(imported)
        for folder in keyed_dirs:  # listed on every call: a file added there changes the version
            todo.extend((path.parent / folder).rglob("*.py"))
        todo.extend(path.parent / name for name in keyed_files)
    return sorted(seen)


def parse_python(source: bytes, filename: str, tries: int = 5) -> ast.Module:
    """`ast.parse`, tried again on CPython 3.11's spurious `SystemError: AST constructor recursion depth mismatch`:
    the AST builder's depth counter is shared by the threads of a process, so another thread parsing at the same
    moment (Prefect's, in a stage's flow-run process) can trip it (python/cpython#106905; a deployed publish stage
    failed so on 2026-12-07). Any other error, or the same one `tries` times, is raised."""
    for attempt in range(1, tries + 1):
        try:
            return ast.parse(source, filename=filename)
        except SystemError as exc:
            if "recursion depth mismatch" not in str(exc) or attempt == tries:
                raise
            time.sleep(0.01 * attempt)
    raise AssertionError("unreachable")  # the loop returns or raises


@functools.lru_cache(maxsize=4096)
def _parsed(path: Path, mtime_ns: int, size: int) -> tuple[tuple[Path, ...], tuple[str, ...], tuple[str, ...]]:
    """What the module at `path` names (the files of its project imports, its KEYED_DIRS, its KEYED_FILES), parsed
    once per version of the file: a pipeline computes every stage's key in one process (0.2-0.7 s a key, parsing)."""
    tree = parse_python(path.read_bytes(), str(path))
    imported = tuple(file for name in _imported_modules(tree) for file in _module_files(name))
    return imported, tuple(_module_tuple(tree, "KEYED_DIRS")), tuple(_module_tuple(tree, "KEYED_FILES"))


def _imported_modules(tree: ast.AST) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)  # `from tasks import data`


def _module_files(name: str) -> list[Path]:
    """The files Python executes to import the project module `name` (its packages' __init__ files too), as
    paths under PROJECT_ROOT: `loraforge.tasks.data` is tasks/data.py (the installed package `loraforge.tasks`
    is the repository's tasks/ folder)."""
    if not any(name == p or name.startswith(f"{p}.") for p in KEYED_PACKAGES):
        return []
    if any(name == m or name.startswith(f"{m}.") for m in WIRING_MODULES):
        return []
    parts = name.split(".")[1:]  # without the `loraforge` namespace: the folders of the checkout
    files = [PROJECT_ROOT.joinpath(*parts[:i], "__init__.py") for i in range(1, len(parts) + 1)]
    return [*files, PROJECT_ROOT.joinpath(*parts).with_suffix(".py")]


def _module_tuple(tree: ast.AST, name: str) -> list[str]:
    """The value of the module-level tuple `name` (KEYED_DIRS, KEYED_FILES) in a module's syntax tree."""
    for node in getattr(tree, "body", []):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
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
        "sha256" (every file's size and hash, the default) or "size" (sizes only, for huge stores).

        For an `s3://` store, `root` is this machine's local copy of it (LORAFORGE_STORE_CACHE, default
        `$LORAFORGE_CACHE/stores/<bucket>-<hash of endpoint and URL>`).
        """
        self.verify = verify
        text = str(url)
        parsed = urlparse(text)
        self.remote: ObjectStore | None = None
        if parsed.scheme in ("", "file"):
            self.root = Path(parsed.path if parsed.scheme == "file" else text).expanduser().resolve()
            self.url = self.root.as_uri()
        elif parsed.scheme == "s3":
            self.remote = ObjectStore(text)
            self.url = self.remote.url
            self.root = _local_copy(self.remote)
        else:
            raise StageError(
                f"store: {text!r} uses the scheme {parsed.scheme!r}; supported: local folders (a path or "
                "file:///abs/path) and S3-compatible object storage (s3://bucket/prefix)."
            )
        self.writable: frozenset[str] | None = None  # None: every stage may write; else only these

    def restricted_to(self, *stages: str) -> ArtifactStore:
        """A view of the same store in which only `stages` may create artifacts (the others must exist).

        Used to run one stage alone: its inputs are looked up, never recomputed behind the user's back.
        """
        view = ArtifactStore(self.url, self.verify)
        view.writable = frozenset(stages)
        return view

    @property
    def where(self) -> str:
        """The store as users name it, for messages: its folder, or its s3:// URL."""
        return self.url if self.remote is not None else str(self.root)

    def check_writable(self) -> None:
        """Make sure artifacts can be written here (before any work), else say which folder and why.

        Raises:
            StageError: the store folder (or its local copy) cannot be created or written, or the bucket
                cannot be written with the credentials at hand.
        """
        if self.remote is not None:
            name = f".probe/{uuid.uuid4().hex}"
            self.remote.put(name, b"")
            self.remote.delete(name)
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
        for _ in range(2 if self.remote is not None else 1):  # a damaged local copy is downloaded again, once
            if self.remote is not None and not self._fetch(stage, key):
                return None
            folder = self.path(stage, key)
            if not (folder / MANIFEST).is_file():
                return None
            manifest, problems = _verified_manifest(folder, self.verify)
            if not problems:
                return Artifact(stage, key, folder, manifest, cached=True)
            self._set_aside(stage, key, problems)
        return None

    def get(self, stage: str, key: str, fresh: bool = False) -> Artifact:
        """The artifact, or an error that says which stage should have produced it.

        `fresh=True` marks it as produced just now (not a cache hit), for the stage that wrote it.
        """
        found = self.find(stage, key)
        if found is None:
            raise self._missing(stage, key)
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
                    raise self._missing(stage, key)
                if hit is not None or self.remote is None:
                    yield hit
                else:
                    with self._lease(stage, key) as hit:
                        yield hit
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _lease(self, stage: str, key: str) -> Iterator[Artifact | None]:
        """The bucket-wide counterpart of the local lock: a lease object other machines see, renewed while the
        key is built. Waits while another machine's lease is alive (then usually takes its artifact as a hit).
        """
        assert self.remote is not None
        remote, name = self.remote, f".leases/{stage}-{key}.json"
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        said = False
        while True:
            if (hit := self.find(stage, key)) is not None:
                yield hit
                return
            holder = _json_or_none(remote.get(name))
            alive = holder and float(holder.get("expires", 0)) > time.time() and not _dead_here(holder)
            if holder and alive and holder.get("owner") != owner:
                if not said:
                    print(f"[store] {stage}/{key} is being built by {holder.get('owner')} ({self.url}); waiting")
                    said = True
                time.sleep(min(5.0, LEASE_S / 8))
                continue
            remote.put(name, _lease_record(owner))
            time.sleep(1.0)  # a machine that wrote its lease at the same moment: the last write wins, both see it
            if (_json_or_none(remote.get(name)) or {}).get("owner") == owner:
                break
        stop = threading.Event()
        renew = threading.Thread(target=_renew_lease, args=(remote, name, owner, stop), daemon=True)
        renew.start()
        try:
            yield None
        finally:
            stop.set()
            renew.join()
            remote.delete(name)

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

    def _missing(self, stage: str, key: str) -> StageError:
        return StageError(
            f"no {stage} artifact with key {key} in {self.where}: run {PRODUCERS[stage]} first with the same config."
        )

    def _fetch(self, stage: str, key: str) -> bool:
        """Make the local copy of (stage, key) the bucket's artifact; False when the bucket has none (or a
        damaged one, then set aside). Downloads only what the local copy lacks: nothing when it is current."""
        assert self.remote is not None
        raw, folder = self.remote.get(f"{stage}/{key}/{MANIFEST}"), self.path(stage, key)
        if raw is None:
            shutil.rmtree(folder, ignore_errors=True)  # a copy of an artifact the bucket no longer has
            return False
        if (folder / MANIFEST).is_file() and (folder / MANIFEST).read_bytes() == raw:
            return True
        try:
            listed = {name: (e["sha256"], int(e["size"])) for name, e in json.loads(raw)["files"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self._set_aside_remote(stage, key, raw, [f"{MANIFEST} is unreadable ({type(exc).__name__}: {exc})"], [])
            return False
        tmp = self.root / ".downloads" / f"{stage}-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            problems, bad = [], []
            for name, (digest, size) in listed.items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                got = self.remote.download(blob_name(digest), tmp / name)
                if got is None:
                    problems.append(f"{name} is missing ({blob_name(digest)})")
                elif got != digest or (tmp / name).stat().st_size != size:
                    problems.append(f"{name} has sha256 {got[:12]}..., the manifest says {digest[:12]}...")
                    bad.append(blob_name(digest))
            if problems:
                self._set_aside_remote(stage, key, raw, problems, bad)
                return False
            (tmp / MANIFEST).write_bytes(raw)
            shutil.rmtree(folder, ignore_errors=True)  # an older copy: another machine's build of this key won
            folder.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):  # another process on this machine put the same copy there first
                commit_folder(tmp, folder)
            return True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _upload(self, folder: Path, stage: str, key: str) -> None:
        """Upload a finished draft: every file as a blob (skipped when the bucket has it), the manifest last."""
        assert self.remote is not None
        manifest = (folder / MANIFEST).read_bytes()
        for name, entry in json.loads(manifest)["files"].items():
            if self.remote.size(blob_name(entry["sha256"])) != entry["size"]:
                self.remote.upload(blob_name(entry["sha256"]), folder / name)
        self.remote.put(f"{stage}/{key}/{MANIFEST}", manifest)  # the commit: from here on readers see it

    def _set_aside_remote(self, stage: str, key: str, raw: bytes, problems: list[str], bad: list[str]) -> None:
        """Take a damaged artifact out of the bucket's view (its manifest moves to `.damaged/`, the objects that
        do not match are deleted so that the rebuild uploads them again) and say so."""
        assert self.remote is not None
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
        aside = f".damaged/{stage}-{key}-{stamp}-{uuid.uuid4().hex[:6]}"
        self.remote.put(f"{aside}/{MANIFEST}", raw)
        self.remote.put(f"{aside}/DAMAGED.txt", ("\n".join(problems) + "\n").encode())
        self.remote.delete(f"{stage}/{key}/{MANIFEST}")
        for name in bad:
            self.remote.delete(name)
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        print(
            f"[store] {self.url}/{stage}/{key} does not match its manifest ({shown}): manifest set aside to "
            f"{self.url}/{aside} and the artifact rebuilt. Something changed objects in the bucket; artifacts are "
            "read-only once written."
        )

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
        candidates = sorted({(s, k) for s in ([stage] if stage else STAGES) for k in self._keys(s, key)})
        if len(candidates) != 1:
            what = "no artifact" if not candidates else f"{len(candidates)} artifacts"
            raise StageError(f"{what} in {self.where} match {ref!r}; give stage/key or a longer key prefix.")
        return self.get(*candidates[0])

    def _keys(self, stage: str, prefix: str) -> list[str]:
        """The keys of the stage's finished artifacts that start with `prefix`."""
        if self.remote is not None:
            ending = f"/{MANIFEST}"
            listed = self.remote.list(f"{stage}/{prefix}")
            return [o.name.split("/")[1] for o in listed if o.name.endswith(ending) and o.name.count("/") == 2]
        folder = self.root / stage
        if not folder.is_dir():
            return []
        return [p.name for p in folder.iterdir() if p.name.startswith(prefix) and (p / MANIFEST).is_file()]

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
            raise self._missing(stage, key)
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
            if self.remote is not None:
                self._upload(tmp, stage, key)
                shutil.rmtree(final, ignore_errors=True)  # the local copy follows the bucket
            if final.exists():  # another process finished the same key first; keys are content, so keep it
                shutil.rmtree(tmp)
            else:
                commit_folder(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def write_record(self, name: str, record: Mapping[str, Any] | str) -> str:
        """Write a small record (JSON, or text as given) beside the artifacts, atomically: `runs/<id>.json`,
        `approvals/...`, `sweeps/...`. Returns where it is (a path, or an s3:// URL for an S3 store)."""
        text = record if isinstance(record, str) else json.dumps(record, indent=2, sort_keys=True, default=str)
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(f"{target.name}.{uuid.uuid4().hex[:8]}.part")
        part.write_text(text)
        fsync_tree(part)
        os.replace(part, target)
        fsync_tree(target.parent, files=False)
        if self.remote is None:
            return str(target)
        self.remote.put(name, text.encode())
        return f"{self.url}/{name}"

    def read_record(self, name: str) -> dict[str, Any] | None:
        """A JSON record written by `write_record`, or None when there is none."""
        if self.remote is not None:
            return _json_or_none(self.remote.get(name))
        path = self.root / name
        return json.loads(path.read_text()) if path.is_file() else None

    def records(self, folder: str) -> list[str]:
        """The names of the JSON records in `folder` (e.g. "runs"), oldest first."""
        if self.remote is not None:
            listed = [o for o in self.remote.list(f"{folder}/") if o.name.endswith(".json")]
            return [o.name for o in sorted(listed, key=lambda o: (o.modified, o.name))]
        found = (self.root / folder).glob("*.json") if (self.root / folder).is_dir() else []
        return [f"{folder}/{p.name}" for p in sorted(found, key=lambda p: (p.stat().st_mtime, p.name))]

    def record_run(self, run_id: str, record: Mapping[str, Any]) -> str:
        """Write a pipeline run record (atomically) and return where it is."""
        return self.write_record(f"runs/{run_id}.json", record)

    def has_run(self, run_id: str) -> bool:
        """Whether `run_id` (`latest`, an id or a prefix of one) names a recorded run."""
        names = self.records("runs")
        return bool(names) and (run_id == "latest" or any(Path(n).stem.startswith(run_id) for n in names))

    def load_run(self, run_id: str) -> dict[str, Any]:
        """A run record by id or unique prefix (`latest` for the newest)."""
        runs = self.records("runs")
        matches = runs[-1:] if run_id == "latest" else [n for n in runs if Path(n).stem.startswith(run_id)]
        record = self.read_record(matches[0]) if len(matches) == 1 else None
        if record is None:
            raise StageError(f"{len(matches)} runs in {self.where}/runs match {run_id!r}.")
        return record

    def stage_key(
        self, stage: str, source_file: str, config: BaseModel | Mapping[str, Any], inputs: Mapping[str, Any]
    ) -> tuple[str, str]:
        """(key, code version) for a stage given its config and inputs (artifacts or plain fingerprints)."""
        code = code_version(source_file, KEY_LIBRARIES[stage])
        input_keys = {n: (a.key if isinstance(a, Artifact) else str(a)) for n, a in inputs.items()}
        return compute_key(stage, code, config_dict(config), input_keys), code


def blob_name(sha256: str) -> str:
    """Where an S3 store keeps the file with these contents."""
    return f"blobs/{sha256[:2]}/{sha256}"


def _local_copy(remote: ObjectStore) -> Path:
    """This machine's folder for an S3 store's local copy (one per endpoint and URL)."""
    configured = os.environ.get("LORAFORGE_STORE_CACHE")
    if configured:
        return Path(configured).expanduser().resolve()
    cache = Path(os.environ.get("LORAFORGE_CACHE") or Path.home() / ".cache" / "loraforge").expanduser()
    tag = hashlib.sha256(f"{remote.endpoint}\0{remote.url}".encode()).hexdigest()[:10]
    return (cache / "stores" / f"{remote.bucket}-{tag}").resolve()


def _json_or_none(raw: bytes | None) -> dict[str, Any] | None:
    try:
        value = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _dead_here(holder: Mapping[str, Any]) -> bool:
    """Whether a lease's owner was a process of this machine that is gone (killed: its lease need not expire)."""
    host, _, rest = str(holder.get("owner", "")).partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _lease_record(owner: str) -> bytes:
    return json.dumps({"owner": owner, "expires": time.time() + LEASE_S}).encode()


def _renew_lease(remote: ObjectStore, name: str, owner: str, stop: threading.Event) -> None:
    while not stop.wait(LEASE_S / 4):
        with contextlib.suppress(StageError):  # a missed renewal is retried; the lease lasts 4 periods
            remote.put(name, _lease_record(owner))


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
