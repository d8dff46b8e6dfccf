"""Bytecode for the virtualenv's libraries, compiled once per library build on this machine.

    .venv/bin/python infra/pycache.py CACHE_DIR        (infra/bootstrap.sh runs it after the installs)

Python reads a module's `__pycache__/*.pyc` instead of compiling its source when the pyc records the source's
modification time and size. Without pycs, and with PYTHONDONTWRITEBYTECODE set (as on the project's machines),
every process compiles torch and transformers again (`import transformers, torch` 9 s -> 19 s), so set-up used to
compile the whole site-packages (`uv pip install --compile-bytecode`: ~24 s of a fresh clone's ~31 s set-up on 2
cores, ~45 s of CPU) for every new virtualenv.

uv hard-links each installed file from its cache, so every virtualenv made from that cache holds the very same
files (same modification times): the pycs compiled for one are valid in all of them. This script keeps them in
CACHE_DIR/<python cache tag>/<distribution>-<version>-<RECORD digest>/ and links them into the virtualenv:

* a distribution whose pycs are cached gets them linked in, after one of them is checked against its source
  (timestamp and size in the pyc's header); a mismatch (files copied rather than linked, or changed) compiles that
  distribution in place instead, leaving the cache as it is;
* a distribution not cached yet is compiled (in parallel) and its pycs saved for the next virtualenv;
* a .py file that no distribution lists (the editable install's finder, the virtualenv's own) is compiled in
  place, never cached.

The RECORD digest (the .py files' sha256) tells builds of one version apart, e.g. a locally built
llama-cpp-python wheel. Prints one summary line.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import os
import py_compile
import shutil
import struct
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

COMPLETE = "COMPLETE"  # written last in a cache entry: a crash mid-save leaves no entry that looks whole


def _sources(dist: importlib.metadata.Distribution, site: Path) -> list[Path]:
    """The distribution's .py files inside site-packages (RECORD paths; scripts under ../bin left out)."""
    found = []
    for entry in dist.files or []:
        if entry.suffix == ".py" and not str(entry).startswith(".."):
            path = site / entry
            if path.is_file():
                found.append(path)
    return found


def _key(dist: importlib.metadata.Distribution) -> str:
    """Name, version and a digest of the RECORD lines of the .py files (path and sha256): the files compiled. Not
    of the whole RECORD, which also lists the console scripts, whose first line names the virtualenv's python."""
    lines = sorted(line for line in (dist.read_text("RECORD") or "").splitlines() if line.split(",")[0].endswith(".py"))
    name = dist.metadata["Name"].lower().replace("-", "_").replace(".", "_")
    return f"{name}-{dist.version}-{hashlib.sha256(chr(10).join(lines).encode()).hexdigest()[:12]}"


def _pyc(source: Path) -> Path:
    return Path(importlib.util.cache_from_source(str(source)))


def _matches(source: Path, pyc: Path) -> bool:
    """Whether `pyc` was compiled from this very file (the timestamp and size in its header)."""
    try:
        with pyc.open("rb") as file:
            header = file.read(16)
        flags, mtime, size = struct.unpack("<4xIII", header)
        stat = source.stat()
    except (OSError, struct.error):
        return False
    return flags == 0 and mtime == int(stat.st_mtime) & 0xFFFFFFFF and size == stat.st_size & 0xFFFFFFFF


def _compile(sources: list[str]) -> None:
    timestamp = py_compile.PycInvalidationMode.TIMESTAMP
    for source in sources:
        # a library's file Python cannot compile (a template, Python 2 test data) is never imported: left as it is
        with contextlib.suppress(py_compile.PyCompileError, OSError, ValueError):
            py_compile.compile(source, doraise=True, invalidation_mode=timestamp)


def _compile_all(sources: list[Path]) -> None:
    """Compile in parallel, one chunk of files per task."""
    workers = os.cpu_count() or 1
    names = sorted(str(s) for s in sources)
    chunks = [names[i :: workers * 4] for i in range(workers * 4)]
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        list(pool.map(_compile, [c for c in chunks if c]))


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system: a copy
        shutil.copy2(source, target)


def _restore(entry: Path, site: Path) -> int:
    listed = (entry / COMPLETE).read_text().splitlines()
    for relative in listed:
        _link(entry / relative, site / relative)
    return len(listed)


def _save(entry: Path, site: Path, sources: list[Path]) -> None:
    """Copy the distribution's pycs into a new cache entry, in place at once (a rename)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    saved = []
    for source in sources:
        pyc = _pyc(source)
        if pyc.is_file():
            relative = pyc.relative_to(site)
            _link(pyc, scratch / relative)
            saved.append(str(relative))
    (scratch / COMPLETE).write_text("".join(f"{r}\n" for r in saved))
    try:
        scratch.rename(entry)
    except OSError:  # made meanwhile by another set-up
        shutil.rmtree(scratch, ignore_errors=True)


def main(cache: Path) -> None:
    started = time.monotonic()
    site = Path(sysconfig.get_paths()["purelib"])
    cache = cache / sys.implementation.cache_tag
    owned: set[Path] = set()
    restored = 0
    to_compile: list[Path] = []
    to_save: list[tuple[Path, list[Path]]] = []
    for dist in importlib.metadata.distributions(path=[str(site)]):
        sources = _sources(dist, site)
        if not sources or '"editable": true' in (dist.read_text("direct_url.json") or ""):
            continue  # an editable install's files (the project's own finder) are compiled as loose files
        owned.update(sources)
        entry = cache / _key(dist)
        if not (entry / COMPLETE).is_file():
            to_compile += sources
            to_save.append((entry, sources))
        elif _matches(sources[0], entry / _pyc(sources[0]).relative_to(site)):
            restored += _restore(entry, site)
        else:  # not the files the cache was compiled from (e.g. installed by pip): compiled here, the cache kept
            to_compile += [p for p in sources if not _matches(p, _pyc(p))]
    loose = [p for p in site.rglob("*.py") if p not in owned and not _matches(p, _pyc(p))]
    _compile_all(to_compile + loose)
    compiled = len(to_compile) + len(loose)
    for entry, sources in to_save:
        _save(entry, site, sources)
    print(f"[setup] bytecode: {restored} files from the cache ({cache}), {compiled} compiled, "
          f"{time.monotonic() - started:.1f} s")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python infra/pycache.py CACHE_DIR")
    main(Path(sys.argv[1]))
