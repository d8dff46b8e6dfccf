"""The artifact store on S3-compatible object storage, against a real server (`rclone serve s3` on 127.0.0.1).

Each "machine" is a store object with a local copy of its own (LORAFORGE_STORE_CACHE): what one writes, another
reads through the bucket alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hub import s3_server

from loraforge.tasks.artifacts import ArtifactStore, blob_name
from loraforge.tasks.errors import StageError

URL = "s3://loraforge/team/run"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with s3_server(tmp_path_factory.mktemp("s3") / "buckets") as settings:
        yield settings


@pytest.fixture
def machine(s3: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):
    """`machine(name)`: a store on this test's own prefix, as seen from a machine with its own local copy."""
    for name, value in s3.items():
        monkeypatch.setenv(name, value)
    prefix = f"{URL}/{request.node.name}"

    def open_store(name: str) -> ArtifactStore:
        monkeypatch.setenv("LORAFORGE_STORE_CACHE", str(tmp_path / name))
        return ArtifactStore(prefix)

    return open_store


def _write(store: ArtifactStore, key: str, files: dict[str, bytes], stage: str = "data") -> None:
    with store.claim(stage, key) as hit:
        assert hit is None
        with store.create(stage, key, {"k": key}, {}, "code") as draft:
            for name, content in files.items():
                (draft.path / name).parent.mkdir(parents=True, exist_ok=True)
                (draft.path / name).write_bytes(content)


def test_an_artifact_written_on_one_machine_is_read_verified_on_another(machine) -> None:
    one, two = machine("one"), machine("two")
    _write(one, "k1", {"a.txt": b"hello", "sub/b.bin": b"x" * 3_000_000})
    assert one.root != two.root and not (two.root / "data").exists()
    found = two.find("data", "k1")
    assert found is not None and found.cached and found.path.is_relative_to(two.root)
    assert (found.path / "sub" / "b.bin").read_bytes() == b"x" * 3_000_000
    assert found.manifest == json.loads((one.path("data", "k1") / "manifest.json").read_text())
    # A second reader on the same machine downloads nothing: the local copy is current.
    before = {p: p.stat().st_mtime_ns for p in found.path.rglob("*")}
    again = two.find("data", "k1")
    assert again is not None and {p: p.stat().st_mtime_ns for p in again.path.rglob("*")} == before
    assert two.lookup("k1").key == "k1" and two.lookup("data/k").key == "k1"
    _write(one, "k2", {}, stage="base")  # an artifact of a manifest alone (the base model's)
    assert machine("three").get("base", "k2").manifest["files"] == {}
    names = [o.name for o in two.remote.list("")]  # type: ignore[union-attr]
    assert "data/k1/manifest.json" in names and blob_name(found.manifest["files"]["a.txt"]["sha256"]) in names


def test_a_tampered_object_is_detected_set_aside_and_rebuilt(machine) -> None:
    one = machine("one")
    _write(one, "k1", {"a.txt": b"hello", "b.txt": b"world"})
    sha = json.loads((one.path("data", "k1") / "manifest.json").read_text())["files"]["a.txt"]["sha256"]
    one.remote.put(blob_name(sha), b"HELLO")  # type: ignore[union-attr]
    two = machine("two")
    assert two.find("data", "k1") is None  # detected on download; nothing half-copied locally
    assert not (two.path("data", "k1")).exists()
    names = [o.name for o in two.remote.list("")]  # type: ignore[union-attr]
    assert "data/k1/manifest.json" not in names and blob_name(sha) not in names
    assert any(n.startswith(".damaged/data-k1-") and n.endswith("DAMAGED.txt") for n in names)
    _write(two, "k1", {"a.txt": b"hello", "b.txt": b"world"})  # the rebuild uploads the good bytes again
    found = machine("three").find("data", "k1")
    assert found is not None and (found.path / "a.txt").read_bytes() == b"hello"


def test_a_tampered_local_copy_is_downloaded_again(machine) -> None:
    one = machine("one")
    _write(one, "k1", {"a.txt": b"hello"})
    (one.path("data", "k1") / "a.txt").write_bytes(b"HELLO")
    found = one.find("data", "k1")
    assert found is not None and (found.path / "a.txt").read_bytes() == b"hello"


def test_two_writers_of_one_key_never_mix_their_files(machine) -> None:
    """Without the lock (as two machines racing past the lease could): each uploads its blobs, then its manifest;
    whichever manifest is last, it names only its own, complete, files."""
    one, two = machine("one"), machine("two")
    with one.create("train", "k", {}, {}, "c") as a, two.create("train", "k", {}, {}, "c") as b:
        (a.path / "w.bin").write_bytes(b"A" * 1000)
        (b.path / "w.bin").write_bytes(b"B" * 1000)
    found = machine("three").find("train", "k")
    assert found is not None and (found.path / "w.bin").read_bytes() in (b"A" * 1000, b"B" * 1000)
    # The writer whose manifest lost takes the bucket's artifact on its next read.
    mine = one.find("train", "k")
    assert mine is not None and (mine.path / "w.bin").read_bytes() == (found.path / "w.bin").read_bytes()


def test_a_second_machine_waits_for_the_first_and_takes_its_artifact(machine, capsys) -> None:
    one, two = machine("one"), machine("two")
    built, took = [], []

    def build() -> None:
        with one.claim("train", "k") as hit:
            assert hit is None
            built.append(time.monotonic())
            time.sleep(4)
            with one.create("train", "k", {}, {}, "c") as draft:
                (draft.path / "w.bin").write_bytes(b"w")

    first = threading.Thread(target=build)
    first.start()
    while not built:
        time.sleep(0.05)
    with two.claim("train", "k") as hit:
        took.append(hit)
    first.join()
    assert took[0] is not None and took[0].cached
    assert "is being built by" in capsys.readouterr().out
    assert not [o for o in two.remote.list(".leases/")]  # type: ignore[union-attr]


CHILD = """
import os, sys, time
from loraforge.tasks.artifacts import ArtifactStore
from loraforge.tasks.objectstore import ObjectStore

# The kill must land between the blobs and the manifest on any machine, however fast its disk and network: after
# the first blob is up, this writer reports it and stalls there (it is the test's process; the store is the real one).
upload = ObjectStore.upload
def upload_then_stall(self, name, path):
    upload(self, name, path)
    print("one blob up", flush=True)
    time.sleep(3600)
ObjectStore.upload = upload_then_stall

store = ArtifactStore(sys.argv[1])
with store.create("merge", "big", {}, {}, "c") as draft:
    for i in range(6):
        (draft.path / f"part-{i}.bin").write_bytes(os.urandom(1 << 20))
"""


def test_a_writer_killed_mid_upload_leaves_nothing_a_reader_takes(machine, s3, tmp_path: Path) -> None:
    one = machine("one")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, one.url], env=env, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "one blob up"
    assert any(o.name.startswith("blobs/") for o in one.remote.list(""))  # type: ignore[union-attr]
    child.send_signal(signal.SIGKILL)
    child.wait()
    names = [o.name for o in one.remote.list("")]  # type: ignore[union-attr]
    assert "merge/big/manifest.json" not in names, "the kill came too late to test anything"
    assert machine("two").find("merge", "big") is None
    with pytest.raises(StageError, match="no artifact"):
        machine("three").lookup("merge/big")
    _write(machine("four"), "big", {"part-0.bin": b"again"}, stage="merge")  # the key builds normally afterwards
    assert machine("five").find("merge", "big") is not None


def test_run_records_and_show_work_on_the_bucket(machine, capsys) -> None:
    one = machine("one")
    _write(one, "k1", {"a.txt": b"hello"})
    one.record_run("run-a", {"run_id": "run-a", "stages": {"data": {"key": "k1"}}})
    two = machine("two")
    assert two.has_run("run-") and two.load_run("latest")["run_id"] == "run-a"
    from loraforge.flows.cli import main

    assert main(["show", "run-a", "--store", two.url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stages"]["data"]["key"] == "k1"
    assert main(["show", "run-a", "--store", two.url]) == 0  # readable by default
    readable = capsys.readouterr().out
    assert "loraforge run run-a" in readable and "k1" in readable and "{" not in readable
    assert main(["show", "data/k1", "--store", two.url]) == 0
    assert "data/k1" in capsys.readouterr().out


def test_unusable_settings_are_clear_errors(machine, monkeypatch: pytest.MonkeyPatch) -> None:
    store = machine("one")
    with monkeypatch.context() as patched:
        patched.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        with pytest.raises(StageError, match=r"store s3://loraforge/.* cannot write .*Set AWS_ACCESS_KEY_ID"):
            ArtifactStore(store.url).check_writable()
        patched.delenv("AWS_ACCESS_KEY_ID")
        patched.delenv("AWS_SECRET_ACCESS_KEY")
        patched.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        with pytest.raises(StageError, match="NoCredentialsError: Unable to locate credentials. Set AWS_ACCESS_KEY"):
            ArtifactStore(store.url).check_writable()
    with pytest.raises(StageError, match="create the bucket 'nobucket' first"):
        ArtifactStore("s3://nobucket/x").check_writable()
    with pytest.raises(StageError, match=r"'s3://\*\*\*@bucket/x': it carries credentials") as caught:
        ArtifactStore("s3://AKIA:hunter2@bucket/x")
    assert "hunter2" not in str(caught.value)


def test_transient_server_failures_are_retried_and_a_dead_server_is_a_clear_error(
    machine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flaky import DROP, Flaky

    one = machine("one")
    server = os.environ["AWS_ENDPOINT_URL"]
    with Flaky(server, [503, 500, DROP]) as flaky:
        monkeypatch.setenv("AWS_ENDPOINT_URL", flaky.url)
        _write(ArtifactStore(one.url), "k1", {"a.txt": b"hello", "b.bin": b"b" * 100_000})
    assert len(flaky.seen) >= 3 + 4, flaky.seen  # the three failures were tried again
    monkeypatch.setenv("AWS_ENDPOINT_URL", server)
    found = machine("two").find("data", "k1")
    assert found is not None and (found.path / "b.bin").read_bytes() == b"b" * 100_000
    monkeypatch.setenv("LORAFORGE_S3_ATTEMPTS", "2")
    with Flaky(server, [503] * 10) as down:
        monkeypatch.setenv("AWS_ENDPOINT_URL", down.url)
        with pytest.raises(StageError, match=rf"store {one.url} \({down.url}\): cannot read data/k1/manifest.json"):
            machine("three").find("data", "k1")
    assert len(down.seen) == 2


def test_version_names_the_installed_package(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    from loraforge.flows.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"loraforge {version('loraforge')}"
