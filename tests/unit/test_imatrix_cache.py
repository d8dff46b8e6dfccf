"""The importance-matrix cache of the quantize stage: taken only when its bytes match the sha256 kept beside it."""

from __future__ import annotations

import json
from pathlib import Path

from loraforge.tasks.artifacts import sha256_file
from loraforge.tasks.modelfile import Sampling
from loraforge.tasks.quantize import QuantizeConfig, _cached_imatrix, _keep_imatrix, _settings, _tool_threads


def _kept(tmp_path: Path) -> tuple[Path, dict]:
    out = tmp_path / "draft" / "demo-imatrix.gguf"
    out.parent.mkdir()
    out.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    record = {"file": out.name, "sha256": sha256_file(out), "chunks": 8, "ctx": 512}
    cached = tmp_path / "cache" / "imatrix" / "0123abcd"
    _keep_imatrix(cached, out, record)
    return cached, record


def test_a_kept_matrix_is_copied_back_with_its_record(tmp_path: Path) -> None:
    cached, record = _kept(tmp_path)
    assert sorted(p.name for p in cached.parent.iterdir()) == ["0123abcd.gguf", "0123abcd.json"]  # no partials
    out = tmp_path / "rerun" / "demo-imatrix.gguf"
    out.parent.mkdir()
    assert _cached_imatrix(cached, out) == record
    assert sha256_file(out) == record["sha256"]


def test_an_edited_truncated_or_unrecorded_matrix_is_not_taken(tmp_path: Path) -> None:
    cached, record = _kept(tmp_path)
    out = tmp_path / "rerun" / "demo-imatrix.gguf"
    out.parent.mkdir()
    gguf, meta = cached.with_suffix(".gguf"), cached.with_suffix(".json")
    good = gguf.read_bytes()
    gguf.write_bytes(good[:-1] + b"\x00")  # one byte changed
    assert _cached_imatrix(cached, out) is None and not out.exists()
    gguf.write_bytes(good[:100])  # half-copied
    assert _cached_imatrix(cached, out) is None
    gguf.write_bytes(good)
    assert _cached_imatrix(cached, tmp_path / "rerun" / "other-imatrix.gguf") is None  # another model's name
    meta.write_text("{not json")
    assert _cached_imatrix(cached, out) is None
    meta.unlink()
    assert _cached_imatrix(cached, out) is None
    meta.write_text(json.dumps(record))
    assert _cached_imatrix(cached, out) == record


def test_tool_threads_do_not_change_the_key() -> None:
    sampling = Sampling(0.0, 1.0, 0, 16)
    one, every = QuantizeConfig(tool_threads=1), QuantizeConfig()
    assert _settings(one, "m", sampling, ["accuracy"]) == _settings(every, "m", sampling, ["accuracy"])
    assert _tool_threads(one) == 1 and _tool_threads(every) >= 1
    assert _settings(QuantizeConfig(imatrix_chunks=16), "m", sampling, []) != _settings(every, "m", sampling, [])
