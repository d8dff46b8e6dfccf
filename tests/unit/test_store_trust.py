"""The store's promises: keys cover all the code a stage runs, reuse is verified, one builder per key, fsync."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import loraforge.tasks.artifacts as artifacts
from loraforge.tasks.artifacts import Artifact, ArtifactStore, code_files, code_version
from loraforge.tasks.errors import GateFailed, StageError

ROOT = Path(__file__).resolve().parents[2]
STAGE_MODULES = {
    "base": "models.py", "data": "data.py", "train": "train.py", "eval": "evaluate.py", "merge": "merge.py",
    "quantize": "quantize.py", "publish": "publish.py",
}  # fmt: skip


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the project's `tasks` package, keyed as the real one is (to edit helpers safely)."""
    shutil.copytree(ROOT / "tasks", tmp_path / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(artifacts, "PROJECT_ROOT", tmp_path)
    return tmp_path


def _versions(project: Path) -> dict[str, str]:
    return {
        stage: code_version(project / "tasks" / module, artifacts.KEY_LIBRARIES[stage])
        for stage, module in STAGE_MODULES.items()
    }


# Which stages run each helper (imports inside functions included); what a reader of the code expects. A stage
# that reads an upstream artifact through that stage's typed reader (read_data, read_train, read_gate) runs that
# module too: its key moves with it, as it would anyway through the upstream artifact's own key.
HELPER_USERS = {
    "batching.py": {"train", "eval", "merge", "quantize", "publish"},  # publish runs eval's gate reader
    "modelfile.py": {"quantize", "publish"},  # publish reads the quantize artifact (read_quantize)
    "hubclient.py": {"data", "train", "eval", "merge", "quantize", "publish"},  # data fetches Hub datasets
    "data.py": {"data", "train", "eval", "merge", "quantize", "publish"},  # train and quantize use read_data
    "train.py": {"train", "eval", "merge", "quantize", "publish"},  # eval, merge, quantize use read_train
    "merge.py": {"merge", "quantize", "publish"},  # quantize checks its inputs are the merge's (read_merge)
    "quantize.py": {"quantize", "publish"},
    # loaded by path (evaluate.KEYED_DIRS, quantize.KEYED_DIRS): quantize's probe scores with the eval's metrics
    "metrics/accuracy/accuracy.py": {"eval", "quantize", "publish"},
    "metrics/entity_f1/entity_f1.py": {"eval", "quantize", "publish"},
    "evaluate.py": {"eval", "quantize", "publish"},  # quantize scores with score_answers, publish reads read_gate
    "models.py": {"base", "data", "train", "eval", "merge", "quantize", "publish"},
    "registry.py": set(),  # wiring only (artifacts.WIRING_MODULES): the stage flows, CLI and pipeline follow it
    "templates/model_card.md.j2": {"publish"},  # read by path: publish.KEYED_FILES
}


@pytest.mark.parametrize("helper", sorted(HELPER_USERS))
def test_editing_a_helper_changes_exactly_the_keys_of_the_stages_that_run_it(project: Path, helper: str) -> None:
    before = _versions(project)
    path = project / "tasks" / helper
    path.write_text(path.read_text() + "\n# an edit\n")
    after = _versions(project)
    assert {stage for stage in before if before[stage] != after[stage]} == HELPER_USERS[helper]


def test_code_files_follow_imports_inside_functions() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in code_files(ROOT / "tasks" / "train.py")}
    assert {
        "tasks/train.py",
        "tasks/batching.py",
        "tasks/models.py",
        "tasks/artifacts.py",
        "tasks/__init__.py",
    } <= names
    assert "tasks/quantize.py" not in names and not any(n.startswith("flows/") for n in names)


def test_library_versions_are_part_of_the_code_version(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    source = ROOT / "tasks" / "merge.py"
    before, torch_only = code_version(source, ("torch", "peft")), code_version(source, ("torch",))
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda n: "9.9.9" if n == "peft" else real(n))
    assert code_version(source, ("torch", "peft")) != before
    assert code_version(source, ("torch",)) == torch_only  # peft not in it: unchanged
    assert set(artifacts.KEY_LIBRARIES) == set(STAGE_MODULES)


def _artifact(store: ArtifactStore, stage: str = "data", key: str = "k1") -> Artifact:
    with store.create(stage, key, {}, {}, "c") as draft:
        (draft.path / "train.jsonl").write_text('{"text": "hello"}\n')
        (draft.path / "sub").mkdir()
        (draft.path / "sub" / "w.bin").write_bytes(b"\1" * 64)
    return store.get(stage, key)


@pytest.mark.parametrize(
    ("damage", "verify", "phrase"),
    [
        (lambda p: (p / "train.jsonl").write_text('{"text": "HELLO"}\n'), "sha256", "train.jsonl has sha256"),
        (lambda p: (p / "train.jsonl").write_text("{}\n"), "size", "train.jsonl has 3 bytes, the manifest says 18"),
        (lambda p: (p / "sub" / "w.bin").unlink(), "size", "sub/w.bin is missing"),
        (lambda p: (p / "extra.txt").write_text("x"), "sha256", "extra.txt is not in the manifest"),
        (lambda p: (p / "manifest.json").write_text("{"), "sha256", "manifest.json is unreadable"),
    ],
)
def test_damaged_artifact_is_set_aside_and_not_reused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage, verify: str, phrase: str
) -> None:
    store = ArtifactStore(tmp_path, verify=verify)  # type: ignore[arg-type]
    art = _artifact(store)
    damage(art.path)
    assert store.find("data", "k1") is None
    assert not art.path.exists()
    aside = list((tmp_path / ".damaged").iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("data-k1-")
    assert phrase in (aside[0] / "DAMAGED.txt").read_text()
    out = capsys.readouterr().out
    assert "data/k1 does not match its manifest" in out and phrase in out and str(aside[0]) in out
    _artifact(store)  # the key can be built again
    assert store.find("data", "k1") is not None


def test_size_only_verification_misses_a_same_size_edit(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, verify="size")
    art = _artifact(store)
    (art.path / "train.jsonl").write_text('{"text": "HELLO"}\n')
    assert store.find("data", "k1") is not None  # the documented trade-off of store_verify=size


def test_get_of_a_damaged_input_names_its_producer(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    (_artifact(store, "train", "t1").path / "train.jsonl").write_text("tampered")
    with pytest.raises(StageError, match="no train artifact with key t1 .*run the train stage"):
        store.get("train", "t1")


def test_verification_is_rerun_when_a_file_changes_after_a_hit(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    art = _artifact(store)
    assert store.find("data", "k1") is not None  # verified once (and remembered while the stats are the same)
    time.sleep(0.01)
    (art.path / "train.jsonl").write_text('{"text": "HELLO"}\n')
    assert store.find("data", "k1") is None


CLAIMER = """
import sys, time
from pathlib import Path
from loraforge.tasks.artifacts import ArtifactStore
store = ArtifactStore(sys.argv[1])
started = time.time()
with store.claim("data", "k1") as hit:
    waited = time.time() - started
    if hit is None:
        Path(sys.argv[2]).write_text("locked")
        with store.create("data", "k1", {}, {}, "c") as draft:
            (draft.path / "out.txt").write_text("built by " + sys.argv[3])
            time.sleep(float(sys.argv[4]))
print(f"{sys.argv[3]} cached={hit is not None} waited={waited:.2f}")
"""


def _claimer(store: Path, flag: Path, name: str, hold: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CLAIMER, str(store), str(flag), name, str(hold)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_second_run_of_a_key_waits_and_takes_the_first_result_as_a_hit(tmp_path: Path) -> None:
    flag = tmp_path / "first-has-lock"
    first = _claimer(tmp_path / "store", flag, "first", 2.0)
    deadline = time.time() + 60
    while not flag.exists():
        assert time.time() < deadline and first.poll() is None, first.communicate()
        time.sleep(0.05)
    second = _claimer(tmp_path / "store", tmp_path / "unused", "second", 0.0)
    out_first, err_first = first.communicate(timeout=60)
    out_second, err_second = second.communicate(timeout=60)
    assert first.returncode == 0 and second.returncode == 0, err_first + err_second
    assert "first cached=False" in out_first
    assert "second cached=True" in out_second, out_second + err_second
    assert float(out_second.split("waited=")[1]) > 0.5  # it waited for the first instead of building
    assert "being built by another run; waiting" in out_second
    assert (tmp_path / "store" / "data" / "k1" / "out.txt").read_text() == "built by first"
    assert not (tmp_path / "unused").exists()


def test_claim_removes_drafts_of_killed_runs_and_clean_drafts_spares_live_ones(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    (tmp_path / ".tmp" / "train-k1-deadbeef").mkdir(parents=True)
    (tmp_path / ".tmp" / "train-k1-deadbeef" / "half.bin").write_bytes(b"0" * 10)
    with store.claim("train", "k1") as hit:
        assert hit is None
        assert not (tmp_path / ".tmp" / "train-k1-deadbeef").exists()
        (tmp_path / ".tmp" / "train-k1-live0001").mkdir()  # this (live) claim's own draft
        (tmp_path / ".tmp" / "merge-k2-dead0002").mkdir()
        (tmp_path / ".locks" / "merge-k2.lock").touch()  # its writer took the lock and died
        # from another process: the live claim's draft is kept, the dead one removed
        out = subprocess.run(
            [sys.executable, "-c", f"from tasks.artifacts import ArtifactStore; "
             f"print(ArtifactStore({str(tmp_path)!r}).clean_drafts())"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert "merge-k2-dead0002" in out and "train-k1-live0001" not in out
        assert (tmp_path / ".tmp" / "train-k1-live0001").exists()
    assert store.clean_drafts() == ["train-k1-live0001"]  # the claim ended without committing it


def test_claim_in_a_restricted_view_fails_before_any_work(tmp_path: Path) -> None:
    view = ArtifactStore(tmp_path).restricted_to("base", "eval")
    with pytest.raises(StageError, match="run the train stage"), view.claim("train", "k"):
        pytest.fail("a stage that may not write got to build")


def test_commit_fsyncs_files_and_folder_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_rename, real_open = os.fsync, os.rename, os.open
    names: dict[int, str] = {}

    def track_open(path, flags, *args):  # type: ignore[no-untyped-def]
        fd = real_open(path, flags, *args)
        names[fd] = Path(path).name
        return fd

    monkeypatch.setattr(os, "open", track_open)
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(f"fsync {names.get(fd)}"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(f"rename {Path(b).name}"), real_rename(a, b))[1])
    _artifact(ArtifactStore(tmp_path), "data", "k9")
    renamed = events.index("rename k9")
    before = set(events[:renamed])
    assert {"fsync manifest.json", "fsync train.jsonl", "fsync w.bin", "fsync sub"} <= before
    assert any(e.startswith("fsync data-k9-") for e in before)  # the draft folder itself
    assert "fsync data" in events[renamed:]  # the parent's new entry


def test_unwritable_store_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StageError, match=r"store: cannot write artifacts to /proc/loraforge.*set store="):
        ArtifactStore("/proc/loraforge").check_writable()
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "ro"
        locked.mkdir(mode=0o500)
        with pytest.raises(StageError, match="cannot write artifacts"):
            ArtifactStore(locked / "store").check_writable()


def _fake(stage: str, tmp_path: Path, **manifest: object) -> Artifact:
    return Artifact(stage, f"{stage}-key", tmp_path, {"stage": stage, **manifest})


def test_publish_refuses_a_failed_gate_and_an_unapproved_run(tmp_path: Path) -> None:
    from loraforge.tasks.publish import PublishConfig, approval, publish_model, record_approval

    store = ArtifactStore(tmp_path / "store")
    failed = {"passed": False, "checks": [{"check": "accuracy >= 0.9", "value": 0.5, "passed": False}]}
    passed = {"passed": True, "checks": [{"check": "accuracy >= 0.9", "value": 0.95, "passed": True}]}
    a = {s: _fake(s, tmp_path) for s in ("base", "data", "train", "merge", "quantize")}

    def publish(gate: dict, approval_required: bool) -> None:
        eval_ = _fake("eval", tmp_path, gate=gate)
        publish_model(PublishConfig(), "x", approval_required, a["base"], a["data"], a["train"], eval_, a["merge"],
                      a["quantize"], store)  # fmt: skip

    with pytest.raises(GateFailed, match=r"publish refused: eval gate failed: accuracy >= 0.9 \(got 0.5\)"):
        publish(failed, approval_required=False)
    with pytest.raises(GateFailed, match="publish refused: orchestration.approval is on and no reviewer approved"):
        publish(passed, approval_required=True)
    eval_ = _fake("eval", tmp_path, gate=passed)
    assert approval(store, eval_, a["quantize"]) is None
    record_approval(store, eval_, a["quantize"], {"approved": True, "reason": "looks good"})
    assert approval(store, eval_, a["quantize"]) == {
        "approved": True, "reason": "looks good", "eval": "eval-key", "quantize": "quantize-key",
    }  # fmt: skip
    assert not list((tmp_path / "store").glob("publish/*"))
    json.loads((tmp_path / "store" / "approvals" / "eval-key-quantize-key.json").read_text())
