"""The whole pipeline on `store=s3://...` against a real S3-compatible server (`rclone serve s3` on 127.0.0.1).

A "machine" is a local copy of the store (LORAFORGE_STORE_CACHE): a run on a second one sees only the bucket.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hub import s3_server
from pipeline_fixtures import _config, _ran, _run

from loraforge.tasks.artifacts import ArtifactStore
from loraforge.tasks.config import DEMO_CONFIG

pytestmark = pytest.mark.integration

URL = "s3://loraforge/pipeline"
STAGES = ("base", "data", "train", "eval", "merge", "quantize", "publish")
# Cheaper than the first run where the test is not about it: no push, no k-quants (so no importance matrix).
SMALL = ["publish.push=never", "quantize.types=[q8_0,lora_f16]", "publish.include_gguf=[q8_0]"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The server, with its AWS_* settings in this process's environment while the module runs."""
    folder = tmp_path_factory.mktemp("s3")
    with s3_server(folder / "buckets") as settings:
        names = [*settings, "LORAFORGE_STORE_CACHE"]
        saved = {name: os.environ.get(name) for name in names}
        os.environ.update(settings)
        try:
            yield {**settings, "buckets": str(folder / "buckets"), "machines": str(folder)}
        finally:
            for name, value in saved.items():
                os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)


def _on(s3: dict[str, str], machine: str) -> Path:
    """Make this process a machine with a local copy of its own; returns that folder."""
    folder = Path(s3["machines"]) / machine
    os.environ["LORAFORGE_STORE_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="module")
def s3_run(s3: dict[str, str], tiny_model: Path, workdir: Path, hub: str) -> dict:
    _on(s3, "one")
    return _run(_config(tiny_model, workdir, hub, f"store={URL}", *SMALL))


def _objects(s3: dict[str, str]) -> list[str]:
    return [o.name for o in ArtifactStore(URL).remote.list("")]  # type: ignore[union-attr]


def test_the_pipeline_runs_on_s3_with_a_local_stores_keys(s3_run: dict, first_run: dict, s3: dict[str, str]) -> None:
    assert _ran(s3_run) == set(STAGES) and s3_run["store"] == URL
    same_config = ("base", "data", "train", "eval", "merge")  # quantize and publish settings differ (SMALL)
    assert {s: s3_run["stages"][s]["key"] for s in same_config} == {
        s: first_run["stages"][s]["key"] for s in same_config
    }
    names = _objects(s3)
    for stage in STAGES:
        assert f"{stage}/{s3_run['stages'][stage]['key']}/manifest.json" in names
    assert f"runs/{s3_run['run_id']}.json" in names
    assert not [n for n in names if n.startswith((".leases/", ".damaged/"))], names
    # The stages read their inputs from this machine's local copy.
    assert Path(s3_run["stages"]["train"]["path"]).is_relative_to(Path(s3["machines"]) / "one")


def test_a_rerun_on_the_same_machine_is_all_hits_and_downloads_nothing(
    s3_run: dict, s3: dict[str, str], tiny_model: Path, workdir: Path, hub: str
) -> None:
    copy = _on(s3, "one")
    before = {p: p.stat().st_mtime_ns for stage in STAGES for p in (copy / stage).rglob("*")}
    again = _run(_config(tiny_model, workdir, hub, f"store={URL}", *SMALL))
    assert _ran(again) == set()
    assert {p: p.stat().st_mtime_ns for stage in STAGES for p in (copy / stage).rglob("*")} == before


def test_a_rerun_on_another_machine_is_all_hits_from_the_bucket(
    s3_run: dict, s3: dict[str, str], tiny_model: Path, workdir: Path, hub: str
) -> None:
    copy = _on(s3, "two")
    again = _run(_config(tiny_model, workdir, hub, f"store={URL}", *SMALL))
    assert _ran(again) == set()
    assert {s: i["key"] for s, i in again["stages"].items()} == {s: i["key"] for s, i in s3_run["stages"].items()}
    adapter = copy / "train" / s3_run["stages"]["train"]["key"] / "adapter" / "adapter_model.safetensors"
    original = Path(s3_run["stages"]["train"]["path"]) / "adapter" / "adapter_model.safetensors"
    assert adapter.read_bytes() == original.read_bytes()


def test_a_tampered_object_is_detected_and_its_artifact_rebuilt(
    s3_run: dict, s3: dict[str, str], tiny_model: Path, workdir: Path, hub: str
) -> None:
    """Someone edits an object on the server's disk: a machine that downloads it sees the sha256 differ, sets the
    artifact aside and rebuilds it (the data stage is deterministic: same key, same bytes, downstream all hits)."""
    manifest = json.loads((Path(s3_run["stages"]["data"]["path"]) / "manifest.json").read_text())
    digest = manifest["files"]["train.jsonl"]["sha256"]
    blob = Path(s3["buckets"]) / "loraforge" / "pipeline" / "blobs" / digest[:2] / digest
    blob.write_bytes(blob.read_bytes().replace(b'"input_ids"', b'"input_IDs"', 1))
    _on(s3, "three")
    again = _run(_config(tiny_model, workdir, hub, f"store={URL}", *SMALL))
    assert _ran(again) == {"data"}
    (why,) = [n for n in _objects(s3) if n.startswith(f".damaged/data-{again['stages']['data']['key']}-")
              and n.endswith("/DAMAGED.txt")]  # fmt: skip
    assert b"train.jsonl has sha256" in (ArtifactStore(URL).remote.get(why) or b"")  # type: ignore[union-attr]
    _on(s3, "four")
    assert ArtifactStore(URL).get("data", again["stages"]["data"]["key"]).file("train.jsonl").is_file()


def test_a_stage_killed_mid_run_leaves_nothing_a_reader_takes_and_resumes(
    s3_run: dict, s3: dict[str, str], tiny_model: Path, workdir: Path, hub: str, prefect_api: str
) -> None:
    """kill -9 of `loraforge stage train` (a new key: another seed): nothing of it in the bucket's view; its lease
    is a dead process's, so a re-run on the same machine takes the key at once and finishes it. Both report to the
    session's Prefect server (without PREFECT_API_URL each would start a temporary one: 6-14 s of CPU)."""
    _on(s3, "five")
    items = [str(DEMO_CONFIG), f"base_model={tiny_model}", f"store={URL}", *SMALL, "train.seed=99"]
    inputs = [f"--input=data={s3_run['stages']['data']['key']}"]
    command = [sys.executable, "-m", "loraforge.flows.cli", "stage", "train", *items, *inputs]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFECT_API_URL": prefect_api}
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert child.stdout is not None
    for line in child.stdout:
        if line.startswith("[train]") and " r=" in line:  # training has started
            break
    time.sleep(2)
    child.send_signal(signal.SIGKILL)
    child.wait()
    before = [n for n in _objects(s3) if n.startswith("train/")]
    assert before == [f"train/{s3_run['stages']['train']['key']}/manifest.json"], before
    assert [n for n in _objects(s3) if n.startswith(".leases/train-")], "the killed writer held a lease"
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "being built by" not in done.stdout and time.monotonic() - started < 600
    new = [n for n in _objects(s3) if n.startswith("train/") and n not in before]
    assert len(new) == 1 and not [n for n in _objects(s3) if n.startswith(".leases/")]


def test_a_sweep_runs_on_the_bucket(s3_run: dict, s3: dict[str, str], tiny_model: Path, tmp_path: Path) -> None:
    """`loraforge sweep` on the S3 store: its training child reads and writes the bucket too; the table and the
    peak-memory record are records in the bucket, and a re-run finds every artifact there."""
    from loraforge.flows.cli import main

    _on(s3, "six")
    args = ["sweep", str(DEMO_CONFIG), f"base_model={tiny_model}", f"store={URL}", *SMALL, "eval.gate=[loss > 0]",
            "eval.max_rows=16", "--r", "2", "--json", str(tmp_path / "sweep.json")]  # fmt: skip
    assert main(args) == 0
    record = json.loads((tmp_path / "sweep.json").read_text())
    (row,) = record["rows"]
    assert row["trained_now"] and record["json"].startswith(f"{URL}/sweeps/")
    names = _objects(s3)
    assert f"train/{row['train_key']}/manifest.json" in names and f"eval/{row['eval_key']}/manifest.json" in names
    assert f"sweeps/peaks/{row['train_key']}.json" in names and f"sweeps/{record['sweep_id']}.md" in names
    _on(s3, "seven")  # another machine: every stage a hit, the peak read back from the bucket
    assert main(args) == 0
    (again,) = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert again["cached"] and not again["trained_now"] and again["peak_rss_mb"] == row["peak_rss_mb"]
