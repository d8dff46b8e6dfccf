"""Trust on the real pipeline: a tampered artifact is not reused, publish refuses a failed gate whatever calls it,
and SIGTERM stops a run within seconds with a checkpoint that a re-run resumes from.

Each test works on a copy of the shared first run's artifacts (same keys), so the shared store stays intact.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hub import seed_prefect_home
from pipeline_fixtures import _config, copy_stages

from loraforge.flows.cli import main
from loraforge.tasks.artifacts import sha256_file
from loraforge.tasks.config import DEMO_CONFIG

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_tampered_data_artifact_is_set_aside_and_rebuilt(
    first_run: dict, tiny_model: Path, workdir: Path, hub: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, a = copy_stages(first_run, tmp_path / "store", "base", "data", "train")
    rows = a["data"].file("train.jsonl")
    original = rows.read_bytes()
    rows.write_bytes(original.replace(b'"billing"', b'"BILLING"', 1))  # same size: only the hash can tell
    assert rows.read_bytes() != original and len(rows.read_bytes()) == len(original)
    from loraforge.tasks.data import prepare_data
    from loraforge.tasks.train import train_adapter

    config = _config(tiny_model, workdir, hub)
    data = prepare_data(config.data, a["base"], store)
    train = train_adapter(config.train, a["base"], data, store)
    # the data stage was rebuilt (same key, the original bytes); train, unchanged upstream, stays a hit
    assert data.key == first_run["stages"]["data"]["key"] and not data.cached
    assert train.cached and train.key == first_run["stages"]["train"]["key"]
    assert sha256_file(rows) == sha256_file(Path(first_run["stages"]["data"]["path"]) / "train.jsonl")
    [aside] = (tmp_path / "store" / ".damaged").iterdir()
    assert "train.jsonl has sha256" in (aside / "DAMAGED.txt").read_text()
    assert "does not match its manifest" in capsys.readouterr().out


def test_stage_publish_refuses_a_failed_gate(
    first_run: dict, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # In-process: `stage NAME --input ...` calls the stage functions directly (no Prefect flow, no logging setup).
    store, a = copy_stages(first_run, tmp_path / "store", "base", "data", "train", "merge", "quantize")
    common = [str(DEMO_CONFIG), f"base_model={tiny_model}", f"store={store.root}", "eval.max_rows=4"]
    inputs = [f"--input=data={a['data'].key}", f"--input=train={a['train'].key}"]
    assert main(["stage", "eval", *common, "eval.gate=[accuracy >= 1.01]", *inputs]) == 2
    eval_key = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["key"]
    code = main(["stage", "publish", *common, "publish.push=never", *inputs, f"--input=eval={eval_key}",
                 f"--input=merge={a['merge'].key}", f"--input=quantize={a['quantize'].key}",
                 f"--input=base={a['base'].key}"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "publish refused: eval gate failed: accuracy >= 1.01" in err
    assert "Traceback" not in err
    assert not (store.root / "publish").exists()


def _watch(process: subprocess.Popen[str], seen: list[str]) -> threading.Thread:
    def read() -> None:
        assert process.stderr is not None
        for chunk in iter(lambda: process.stderr.read(64), ""):  # type: ignore[union-attr]
            seen.append(chunk)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def _prefect_servers(home: Path) -> list[int]:
    """Processes started with this PREFECT_HOME that are still alive (a temporary server left behind)."""
    alive = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if f"PREFECT_HOME={home}".encode() in (proc / "environ").read_bytes():
                    alive.append(int(proc.name))
            except OSError:
                continue
    return alive


def _train_in_process(tiny_model: Path, store_dir: Path, overrides: list[str], train: bool) -> None:
    from loraforge.tasks.artifacts import ArtifactStore
    from loraforge.tasks.config import load_config
    from loraforge.tasks.data import prepare_data
    from loraforge.tasks.models import provision_base
    from loraforge.tasks.train import train_adapter

    config = load_config(DEMO_CONFIG, overrides)
    store = ArtifactStore(store_dir)
    base = provision_base(str(tiny_model), store)
    data = prepare_data(config.data, base, store)
    if train:
        train_adapter(config.train, base, data, store)


def test_sigterm_stops_training_with_a_checkpoint_and_a_rerun_resumes(
    tiny_model: Path, tmp_path: Path, prefect_api: str
) -> None:
    home = tmp_path / "prefect-home"
    seed_prefect_home(home)
    overrides = [f"base_model={tiny_model}", "train.max_steps=60", "data.max_rows=24", "train.save_every=1000",
                 "train.threads=1"]  # fmt: skip
    settings = [str(DEMO_CONFIG), *overrides, f"store={tmp_path / 'store'}"]
    env = {**os.environ, "PREFECT_HOME": str(home), "OMP_NUM_THREADS": "1", "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("PREFECT_API_URL", None)  # the CLI's own temporary Prefect server, as a user would run it
    _train_in_process(tiny_model, tmp_path / "store", overrides, train=False)  # the data artifact
    cli = [sys.executable, "-m", "loraforge.flows.cli", "stage", "train"]
    run = subprocess.Popen([*cli, *settings], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    seen: list[str] = []
    reader = _watch(run, seen)
    deadline = time.time() + 300
    while not any(int(done) >= 1 for done in re.findall(r"(\d+)/60", "".join(seen))):  # training has begun
        assert run.poll() is None and time.time() < deadline, "".join(seen)[-3000:]
        time.sleep(0.2)
    run.send_signal(signal.SIGTERM)
    sent = time.time()
    assert run.wait(timeout=60) == 130, "".join(seen)[-3000:]
    stopped_in = time.time() - sent
    reader.join(timeout=10)
    err = "".join(seen)
    assert stopped_in < 30, stopped_in
    assert "interrupted" in err and "Traceback" not in err, err[-3000:]
    checkpoints = list((tmp_path / "store" / ".checkpoints").glob("train-*/step-*"))
    assert len(checkpoints) == 1 and not (tmp_path / "store" / "train").exists()
    deadline = time.time() + 30
    while _prefect_servers(home) and time.time() < deadline:  # the temporary server goes with the CLI
        time.sleep(0.5)
    assert _prefect_servers(home) == []

    env["PREFECT_LOGGING_LEVEL"] = "INFO"  # the stage's own lines ("resuming from ...") are Prefect log lines
    env["PREFECT_API_URL"] = prefect_api  # the rerun on the session's server: no second temporary one to start
    again = subprocess.run([*cli, *settings], cwd=ROOT, env=env,
                           capture_output=True, text=True)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {checkpoints[0].name}" in again.stdout + again.stderr
    # the same adapter bytes as a run that was never interrupted (same thread count: train.threads=1)
    _train_in_process(tiny_model, tmp_path / "straight", overrides, train=True)
    weights = "adapter/adapter_model.safetensors"
    [resumed] = (tmp_path / "store" / "train").iterdir()
    [straight] = (tmp_path / "straight" / "train").iterdir()
    assert resumed.name == straight.name and sha256_file(resumed / weights) == sha256_file(straight / weights)
