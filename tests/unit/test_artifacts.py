"""Artifact store: content keys, manifests, atomic writes, restricted views."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraforge.tasks.artifacts import ArtifactStore, compute_key, sha256_file
from loraforge.tasks.errors import StageError


def test_keys_depend_on_code_config_and_inputs() -> None:
    key = compute_key("train", "c1", {"r": 8}, {"data": "k1"})
    assert key == compute_key("train", "c1", {"r": 8}, {"data": "k1"})
    assert len({
        key,
        compute_key("train", "c2", {"r": 8}, {"data": "k1"}),
        compute_key("train", "c1", {"r": 16}, {"data": "k1"}),
        compute_key("train", "c1", {"r": 8}, {"data": "k2"}),
        compute_key("merge", "c1", {"r": 8}, {"data": "k1"}),
    }) == 5  # fmt: skip


def test_key_ignores_dict_order() -> None:
    assert compute_key("s", "c", {"a": 1, "b": 2}, {}) == compute_key("s", "c", {"b": 2, "a": 1}, {})


def test_create_writes_manifest_with_hashes_and_inputs(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    with store.create("base", "k0", {}, {}, "c0"):
        pass
    base = store.get("base", "k0")
    with store.create("data", "k1", {"x": 1}, {"base": base}, "c1") as draft:
        (draft.path / "a.txt").write_text("hello")
        (draft.path / "sub").mkdir()
        (draft.path / "sub" / "b.bin").write_bytes(b"\0" * 10)
        draft.metrics["rows"] = 3
    art = store.get("data", "k1")
    m = json.loads((art.path / "manifest.json").read_text())
    assert m["stage"] == "data" and m["key"] == "k1" and m["code_version"] == "c1"
    assert m["inputs"] == {"base": {"stage": "base", "key": "k0"}}
    assert m["config"] == {"x": 1}
    assert m["files"]["a.txt"] == {"sha256": sha256_file(art.path / "a.txt"), "size": 5}
    assert m["files"]["sub/b.bin"]["size"] == 10
    assert m["metrics"] == {"rows": 3}
    assert "torch" in m["versions"] and m["created_at"]


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    with pytest.raises(RuntimeError), store.create("data", "k1", {}, {}, "c") as draft:
        (draft.path / "half.txt").write_text("partial")
        raise RuntimeError("crash mid-write")
    assert store.find("data", "k1") is None
    assert not store.path("data", "k1").exists()
    assert list((tmp_path / ".tmp").iterdir()) == []


def test_folder_without_manifest_is_not_an_artifact(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    store.path("train", "k").mkdir(parents=True)
    assert store.find("train", "k") is None
    with pytest.raises(StageError, match="run the train stage"):
        store.get("train", "k")


def test_restricted_view_refuses_upstream_writes(tmp_path: Path) -> None:
    view = ArtifactStore(tmp_path).restricted_to("base", "eval")
    with (
        pytest.raises(StageError, match="no train artifact with key k in .*: run the train stage"),
        view.create("train", "k", {}, {}, "c"),
    ):
        pass
    with view.create("eval", "k", {}, {}, "c"):
        pass
    assert view.find("eval", "k") is not None


def test_store_url_forms(tmp_path: Path) -> None:
    assert ArtifactStore(tmp_path.as_uri()).root == tmp_path.resolve()
    with pytest.raises(StageError, match="scheme 'gs'; supported: local folders .* and S3-compatible"):
        ArtifactStore("gs://bucket/x")


def test_lookup_by_prefix_and_run_records(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    with store.create("train", "abc123", {}, {}, "c"):
        pass
    assert store.lookup("abc").key == "abc123"
    assert store.lookup("train/abc123").stage == "train"
    with pytest.raises(StageError, match="no artifact"):
        store.lookup("zzz")
    store.record_run("r1", {"run_id": "r1"})
    assert store.load_run("latest") == {"run_id": "r1"}


def test_scratch_folder_is_removed_after_the_block_and_after_a_killed_run(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(RuntimeError), store.scratch("merge", "k1") as scratch:
        (scratch / "0.pt").write_bytes(b"logits")
        assert scratch.parent == store.root / ".tmp"
        raise RuntimeError("the check failed")
    assert not scratch.exists()
    # One a killed run left (no cleanup ran) is named like a draft of its key: the next claim removes it.
    left = store.root / ".tmp" / f"merge-k1-{scratch.name.rsplit('-', 1)[1]}"
    left.mkdir()
    with store.claim("merge", "k1"):
        assert not left.exists()


def test_a_spurious_ast_recursion_depth_error_is_parsed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPython 3.11's AST builder trips on another thread's parse ("recursion depth mismatch"): that SystemError
    is tried again; any other error is raised at once, and so is the same one on the last try."""
    import ast

    from loraforge.tasks import artifacts

    real, calls = ast.parse, []

    def flaky(source: bytes, filename: str) -> ast.Module:
        calls.append(filename)
        if len(calls) <= 2:
            raise SystemError("AST constructor recursion depth mismatch (before=54, after=76)")
        return real(source, filename=filename)

    monkeypatch.setattr(ast, "parse", flaky)
    tree = artifacts.parse_python(b"import os\n", "m.py")
    assert isinstance(tree.body[0], ast.Import) and len(calls) == 3
    calls.clear()
    with pytest.raises(SystemError, match="recursion depth mismatch"):
        artifacts.parse_python(b"import os\n", "m.py", tries=2)
    assert len(calls) == 2

    def broken(source: bytes, filename: str) -> ast.Module:
        calls.append(filename)
        raise SystemError("something else")

    calls.clear()
    monkeypatch.setattr(ast, "parse", broken)
    with pytest.raises(SystemError, match="something else"):
        artifacts.parse_python(b"import os\n", "m.py")
    assert len(calls) == 1
