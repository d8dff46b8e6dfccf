"""The quantize stage's machine cache (the importance matrix, the base GGUF the adapter types are checked on): a
kept file is taken only when its bytes match the sha256 kept beside it."""

from __future__ import annotations

import json
from pathlib import Path

from loraforge.tasks.artifacts import sha256_file
from loraforge.tasks.modelfile import Sampling
from loraforge.tasks.quantize import QuantizeConfig, _keep, _kept, _settings, _tool_threads


def _kept_matrix(tmp_path: Path) -> tuple[Path, dict]:
    out = tmp_path / "draft" / "demo-imatrix.gguf"
    out.parent.mkdir()
    out.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    record = {"file": out.name, "chunks": 8, "ctx": 512}
    cached = tmp_path / "cache" / "imatrix" / "0123abcd"
    _keep(cached, out, record)
    return cached, {**record, "sha256": sha256_file(out)}


def test_a_kept_matrix_is_copied_back_with_its_record(tmp_path: Path) -> None:
    cached, record = _kept_matrix(tmp_path)
    assert sorted(p.name for p in cached.parent.iterdir()) == ["0123abcd.gguf", "0123abcd.json"]  # no partials
    out = tmp_path / "rerun" / "demo-imatrix.gguf"
    out.parent.mkdir()
    assert _kept(cached, out, file=out.name) == record
    assert sha256_file(out) == record["sha256"]


def test_an_edited_truncated_or_unrecorded_matrix_is_not_taken(tmp_path: Path) -> None:
    cached, record = _kept_matrix(tmp_path)
    out = tmp_path / "rerun" / "demo-imatrix.gguf"
    out.parent.mkdir()
    gguf, meta = cached.with_suffix(".gguf"), cached.with_suffix(".json")
    good = gguf.read_bytes()
    gguf.write_bytes(good[:-1] + b"\x00")  # one byte changed
    assert _kept(cached, out, file=out.name) is None and not out.exists()
    gguf.write_bytes(good[:100])  # half-copied
    assert _kept(cached, out, file=out.name) is None
    gguf.write_bytes(good)
    other = tmp_path / "rerun" / "other-imatrix.gguf"  # another model's name
    assert _kept(cached, other, file=other.name) is None
    meta.write_text("{not json")
    assert _kept(cached, out, file=out.name) is None
    meta.unlink()
    assert _kept(cached, out, file=out.name) is None
    meta.write_text(json.dumps(record))
    assert _kept(cached, out, file=out.name) == record


def test_a_kept_base_gguf_is_linked_not_copied_and_unlinking_it_keeps_the_cache(tmp_path: Path) -> None:
    """The base GGUF is only read by the adapter checks, then unlinked from the draft: a hard link each way."""
    draft = tmp_path / "draft"
    draft.mkdir()
    converted = draft / ".base-F16.gguf"
    converted.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    cached = tmp_path / "cache" / "base-gguf" / "4567cdef"
    _keep(cached, converted, {}, link=True)
    assert cached.with_suffix(".gguf").stat().st_ino == converted.stat().st_ino
    converted.unlink()  # the draft is done with it
    rerun = tmp_path / "rerun" / ".base-F16.gguf"
    rerun.parent.mkdir()
    assert _kept(cached, rerun, link=True) == {"sha256": sha256_file(rerun)}
    assert rerun.stat().st_ino == cached.with_suffix(".gguf").stat().st_ino
    rerun.unlink()
    assert cached.with_suffix(".gguf").is_file() and sorted(p.name for p in cached.parent.iterdir()) == [
        "4567cdef.gguf", "4567cdef.json"]  # fmt: skip
    cached.with_suffix(".gguf").write_bytes(b"GGUF")  # edited in the cache: converted again, not taken
    assert _kept(cached, rerun, link=True) is None and not rerun.exists()


def test_tool_threads_do_not_change_the_key() -> None:
    sampling = Sampling(0.0, 1.0, 0, 16)
    one, every = QuantizeConfig(tool_threads=1), QuantizeConfig()
    assert _settings(one, "m", sampling, ["accuracy"]) == _settings(every, "m", sampling, ["accuracy"])
    assert _tool_threads(one) == 1 and _tool_threads(every) >= 1
    assert _settings(QuantizeConfig(imatrix_chunks=16), "m", sampling, []) != _settings(every, "m", sampling, [])
