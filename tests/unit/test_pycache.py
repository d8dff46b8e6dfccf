"""infra/pycache.py: a library's bytecode is compiled once and linked into every virtualenv that holds the same
files (as uv's hard links make them), checked against the sources it was compiled from, never cached for an
editable install."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TAG = sys.implementation.cache_tag
FILES = {"demo_lib/__init__.py": "VALUE = 1\n", "demo_lib/mod.py": "def answer():\n    return 42\n"}


def _store(folder: Path, name: str = "demo_lib", editable: bool = False) -> Path:
    """An unpacked "wheel" as uv's cache holds it: the package and its dist-info (RECORD lists every file)."""
    for relative, text in FILES.items():
        path = folder / relative.replace("demo_lib", name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    info = folder / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    if editable:
        (info / "direct_url.json").write_text('{"url": "file:///src", "dir_info": {"editable": true}}')
    listed = [p.relative_to(folder) for p in folder.rglob("*") if p.is_file()]
    (info / "RECORD").write_text("".join(f"{p},,\n" for p in listed) + f"{info.name}/RECORD,,\n")
    return folder


def _venv(path: Path, *stores: Path, link: bool = True) -> tuple[Path, Path]:
    """A virtualenv holding the stores' files: hard links (as uv installs) or copies with other timestamps."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    site = Path(purelib)
    for store in stores:
        for source in (p for p in store.rglob("*") if p.is_file()):
            target = site / source.relative_to(store)
            target.parent.mkdir(parents=True, exist_ok=True)
            if link:
                os.link(source, target)
            else:
                shutil.copyfile(source, target)
                os.utime(target, (source.stat().st_mtime + 100, source.stat().st_mtime + 100))
    # uv lists each console script in RECORD with the hash of its copy, whose first line names this venv's python
    record = next(site.glob("*.dist-info/RECORD"))
    text = record.read_text()
    record.unlink()  # a link to the store's file: replaced, not changed
    record.write_text(text + f"../../../bin/demo-tool,sha256={abs(hash(str(path)))},{len(str(path))}\n")
    return python, site


def _run(python: Path, cache: Path) -> str:
    done = subprocess.run([str(python), str(ROOT / "infra" / "pycache.py"), str(cache)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def _loaded_from_bytecode(python: Path) -> bool:
    """Whether `import demo_lib.mod` reads its pyc (python -v names the code object's file) and works."""
    code = "import demo_lib.mod as m; assert m.answer() == 42"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([str(python), "-v", "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return f"code object from '{_pyc_of(python, 'demo_lib/mod.py')}'" in done.stderr


def _pyc_of(python: Path, relative: str) -> Path:
    site = next(python.parent.parent.glob("lib/python*/site-packages"))
    return site / Path(relative).parent / "__pycache__" / f"{Path(relative).stem}.{TAG}.pyc"


def test_bytecode_is_compiled_once_and_linked_into_the_next_virtualenv(tmp_path: Path) -> None:
    store, cache = _store(tmp_path / "uv-cache" / "demo"), tmp_path / "pyc"
    first, _ = _venv(tmp_path / "one", store)
    assert "0 files from the cache" in _run(first, cache) and _loaded_from_bytecode(first)
    (entry,) = (cache / TAG).iterdir()
    assert entry.name.startswith("demo_lib-1.0-") and (entry / "COMPLETE").read_text().count(".pyc") == 2

    second, _ = _venv(tmp_path / "two", store)
    out = _run(second, cache)
    assert "2 files from the cache" in out and " 0 compiled" in out, out
    linked = _pyc_of(second, "demo_lib/mod.py")
    assert linked.stat().st_ino == (entry / "demo_lib" / "__pycache__" / linked.name).stat().st_ino
    assert _loaded_from_bytecode(second)


def test_other_files_are_compiled_in_place_and_an_editable_install_is_never_cached(tmp_path: Path) -> None:
    store, cache = _store(tmp_path / "uv-cache" / "demo"), tmp_path / "pyc"
    _run(_venv(tmp_path / "one", store)[0], cache)
    (entry,) = (cache / TAG).iterdir()
    cached = sorted((p, p.read_bytes()) for p in entry.rglob("*.pyc"))
    # Copies with other timestamps (not uv's links): the cached pycs would be stale there.
    copied, _ = _venv(tmp_path / "copied", store, link=False)
    out = _run(copied, cache)
    assert "0 files from the cache" in out and "2 compiled" in out, out
    assert _loaded_from_bytecode(copied)
    assert sorted((p, p.read_bytes()) for p in entry.rglob("*.pyc")) == cached  # the cache left as it was
    editable = _store(tmp_path / "uv-cache" / "project", name="project_lib", editable=True)
    python, site = _venv(tmp_path / "editable", editable)
    assert "2 compiled" in _run(python, cache)
    assert (site / "project_lib" / "__pycache__").is_dir()
    assert [p.name for p in (cache / TAG).iterdir()] == [entry.name]
