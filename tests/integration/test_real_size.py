"""The train stage's real-size paths, run for real on this CPU: bf16/fp16 bases under autocast, and several
training processes under torchrun (gloo), with resume, interruption and a rank that dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pipeline_fixtures import _config, _run
from test_train_variants_helper import train

from loraforge.tasks.artifacts import Artifact, ArtifactStore, sha256_file

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
WEIGHTS = "adapter/adapter_model.safetensors"


def _train(tiny_model: Path, store: ArtifactStore, *overrides: str) -> Artifact:
    return train(tiny_model, store, "train.dropout=0", *overrides)


def _history(artifact: Artifact) -> list[dict]:
    return [json.loads(line) for line in artifact.file("history.jsonl").read_text().splitlines()]


def _learning(artifact: Artifact) -> list[dict]:  # the history without wall-clock and memory figures
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "rss_mb")} for r in _history(artifact)]


def test_bf16_base_trains_fp32_adapters_and_learns_like_fp32(tiny_model: Path, tmp_path: Path) -> None:
    import torch

    from loraforge.tasks.train import TrainConfig, trainable_model

    model, _ = trainable_model(TrainConfig(precision="bf16"), tiny_model, "cpu", "bf16")
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}

    settings = ["train.max_steps=8", "train.learning_rate=0.01"]
    fp32 = _train(tiny_model, ArtifactStore(tmp_path / "fp32"), *settings)  # auto is fp32 on CPU
    bf16 = _train(tiny_model, ArtifactStore(tmp_path / "bf16"), *settings, "train.precision=bf16")
    assert (fp32.manifest["precision"], bf16.manifest["precision"]) == ("fp32", "bf16")
    assert bf16.key != fp32.key
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(bf16.path / WEIGHTS).values()} == {torch.float32}
    learned = fp32.metrics["val_loss_before"] - fp32.metrics["val_loss"]
    assert bf16.metrics["val_loss"] < bf16.metrics["val_loss_before"] - 0.5 * learned
    # bf16 keeps 8 mantissa bits: measured 0.3% apart after 8 steps on the tiny model
    assert bf16.metrics["val_loss"] == pytest.approx(fp32.metrics["val_loss"], rel=0.02)


def test_fp16_scales_the_loss_and_its_checkpoint_resumes(tiny_model: Path, tmp_path: Path) -> None:
    settings = ["train.max_steps=6", "train.precision=fp16", "train.save_every=2", "train.learning_rate=0.01"]
    assert _train_in_subprocess(tiny_model, tmp_path / "killed", 3, *settings) == 137
    saved = sorted((tmp_path / "killed" / ".checkpoints").glob("train-*/step-*"))
    import torch

    state = torch.load(saved[-1] / "state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0  # the gradient scaler's state travels with the checkpoint
    resumed = _train(tiny_model, ArtifactStore(tmp_path / "killed"), *settings)
    straight = _train(tiny_model, ArtifactStore(tmp_path / "straight"), *settings)
    assert resumed.manifest["precision"] == "fp16"
    assert sha256_file(resumed.path / WEIGHTS) == sha256_file(straight.path / WEIGHTS)
    assert resumed.metrics["val_loss"] < resumed.metrics["val_loss_before"]


# Two ranks, 24 steps of 2 rows x 4 micro-batches, a checkpoint every 6: the two-process test's run and the stopped
# tests' run never stopped are one run per sharding (same settings, same key), trained once into the module's
# `uninterrupted` store and a cache hit for the other test. One thread per rank everywhere: a "machine" of 1 process
# would give its rank every core (train.threads' default), and another thread count sums a matmul in another order
# (measured: other adapter bytes).
TWO = ["train.processes=2", "train.max_steps=24", "train.save_every=6", "train.batch_size=2", "train.grad_accum=4",
       "train.learning_rate=0.01", "train.log_every=1", "train.threads=1"]  # fmt: skip
ONE = [s if s != "train.processes=2" else "train.processes=1" for s in TWO]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> ArtifactStore:
    """The store of the module's uninterrupted two-process runs (one per sharding), shared by the tests that need
    one: each test trains it when it is not there yet, as the pipeline would."""
    return ArtifactStore(tmp_path_factory.mktemp("uninterrupted"))


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_processes_train_what_one_process_trains(
    tiny_model: Path, tmp_path: Path, uninterrupted: ArtifactStore, sharding: str
) -> None:
    """Same global batch (2 rows x 4 micro-batches), same data order: each of 2 ranks takes 2 micro-batches,
    with DDP (whole model per rank) or FSDP2 (weights sharded per decoder layer).

    Only the order of the gradient sum differs ((g1+g2)+(g3+g4) summed over ranks vs ((g1+g2)+g3)+g4), so
    the runs agree to float32 rounding, which 24 steps at learning rate 0.01 carry forward: measured the same
    logged losses, max relative differences 1e-7..1e-6 in the gradient norms after 6 steps and 6e-5 after 24,
    and 7e-6 of the largest weight after 24 (under DDP and FSDP alike, the same each run on this machine); the
    bounds (loss 1e-5, gradient norm 1e-4, weights 2e-5 of the largest) leave 1.7x and 2.8x room there and catch
    any lost micro-batch, double-counted rank or unscaled loss (those change the loss in the 2nd-3rd digit).

    With DDP, the same job on two "machines" (two parent processes here, each with train.processes=1,
    train.nnodes=2 and a c10d rendezvous on 127.0.0.1) is one job of 2 ranks whose adapter is bit for bit the
    one the single machine's 2 processes trained; both machines get the artifact from the shared store.
    """
    one = _train(tiny_model, ArtifactStore(tmp_path / "one"), *ONE)
    two = _train(tiny_model, uninterrupted, *TWO, f"train.fsdp={sharding == 'fsdp'}")
    assert (one.manifest["processes"], two.manifest["processes"]) == (1, 2)
    assert two.key != one.key  # the sum order differs in the last bits: not the same artifact
    first, second = _learning(one), _learning(two)
    assert [r["step"] for r in first] == [r["step"] for r in second] == list(range(1, 25))
    assert [r["tokens"] for r in first] == [r["tokens"] for r in second]
    for a, b in zip(first, second, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4, abs=1e-5)
    assert two.metrics["val_loss"] == pytest.approx(one.metrics["val_loss"], rel=1e-5)
    from safetensors.torch import load_file

    a, b = load_file(one.path / WEIGHTS), load_file(two.path / WEIGHTS)
    scale = max(float(t.abs().max()) for t in a.values())
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 2e-5 * scale
    assert two.metrics["val_loss"] < two.metrics["val_loss_before"]
    if sharding == "ddp":
        nodes = _start_two_machines(tiny_model, tmp_path / "shared", *ONE, "train.fsdp=false")
        outputs = [node.communicate(timeout=400)[0] for node in nodes]
        assert [node.returncode for node in nodes] == [0, 0], outputs
        assert sum("--nnodes=2" in output for output in outputs) == 2
        (trained,) = [p for p in (tmp_path / "shared" / "train").iterdir() if not p.name.startswith(".")]
        assert json.loads((trained / "manifest.json").read_text())["processes"] == 2
        assert sha256_file(trained / WEIGHTS) == sha256_file(two.path / WEIGHTS)


def _start_two_machines(tiny_model: Path, store_dir: Path, *settings: str) -> list[subprocess.Popen]:
    """Two parent processes, each with train.processes=1, joining one job of 2 ranks (train.nnodes=2) through a c10d
    rendezvous on a free port of 127.0.0.1, training into the same store."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    job = ["train.nnodes=2", f"train.rdzv_endpoint=127.0.0.1:{port}"]
    return [_start(tiny_model, store_dir, *settings, *job) for _ in range(2)]


def _train_in_subprocess(tiny_model: Path, store_dir: Path, kill_after: int, *overrides: str) -> int:
    return _start(tiny_model, store_dir, *overrides, kill_after=kill_after).wait(timeout=600)


def _start(tiny_model: Path, store_dir: Path, *overrides: str, kill_after: int = 0) -> subprocess.Popen:
    code = (
        "import sys; sys.path.insert(0, 'tests'); from pathlib import Path;"
        "from tasks.artifacts import ArtifactStore; from test_train_variants_helper import train;"
        f"train(Path({str(tiny_model)!r}), ArtifactStore({str(store_dir)!r}), 'train.dropout=0', *sys.argv[1:], "
        f"kill_after_step={kill_after})"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", code, *overrides]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _wait_for(path_glob: tuple[Path, str], process: subprocess.Popen, timeout: float = 300) -> Path:
    folder, pattern = path_glob
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(folder.glob(pattern))
        if found:
            return found[-1]
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        time.sleep(0.1)
    raise AssertionError(f"nothing matched {pattern} in {timeout} s")


# The signal or the kill comes at the step-6 checkpoint of TWO's 24 steps, 18 steps (seconds) before the run would
# end. The SIGTERM row runs under FSDP and the dead-rank row under DDP, so each sharding's checkpoint is resumed (and
# compared with the run never stopped, the two-process test's) once.


def _resumes_exactly(tiny_model: Path, tmp_path: Path, uninterrupted: ArtifactStore, *settings: str) -> None:
    """The stopped run's store ("stopped") holds a checkpoint of both ranks; a re-run resumes from it and trains the
    adapter, and the learning, of the run never stopped (`uninterrupted`)."""
    last = sorted((tmp_path / "stopped" / ".checkpoints").glob("train-*/step-*"))[-1]
    meta = json.loads((last / "meta.json").read_text())
    assert 6 <= meta["step"] < 24
    import torch

    assert len(torch.load(last / "state.pt", weights_only=True)["rank_rngs"]) == 2  # every rank's RNG state

    resumed = _train(tiny_model, ArtifactStore(tmp_path / "stopped"), *settings)
    straight = _train(tiny_model, uninterrupted, *settings)
    assert sha256_file(resumed.path / WEIGHTS) == sha256_file(straight.path / WEIGHTS)
    assert _learning(resumed) == _learning(straight)


def test_sigterm_stops_every_rank_at_one_step_and_a_rerun_resumes_exactly(
    tiny_model: Path, tmp_path: Path, uninterrupted: ArtifactStore
) -> None:
    settings = [*TWO, "train.fsdp=true"]
    run = _start(tiny_model, tmp_path / "stopped", *settings)
    _wait_for((tmp_path / "stopped" / ".checkpoints", "train-*/step-0000006"), run)
    run.send_signal(signal.SIGTERM)
    output, _ = run.communicate(timeout=120)
    assert run.returncode != 0, output
    assert "stopping after this step" in output and "the ranks saved a checkpoint" in output
    assert not (tmp_path / "stopped" / "train").exists() or not any((tmp_path / "stopped" / "train").iterdir())
    _resumes_exactly(tiny_model, tmp_path, uninterrupted, *settings)


def test_a_rank_that_dies_fails_the_stage_naming_it_and_a_rerun_resumes_exactly(
    tiny_model: Path, tmp_path: Path, uninterrupted: ArtifactStore
) -> None:
    settings = [*TWO, "train.fsdp=false"]
    run = _start(tiny_model, tmp_path / "stopped", *settings)
    _wait_for((tmp_path / "stopped" / ".checkpoints", "train-*/step-0000006"), run)
    os.kill(_rank_pid(tmp_path / "stopped", 1), signal.SIGKILL)
    started = time.monotonic()
    output, _ = run.communicate(timeout=180)
    assert run.returncode != 0
    assert time.monotonic() - started < 120  # torchrun stops the surviving rank: no hang
    assert "rank 1 died (killed by signal 9, SIGKILL) and torchrun stopped the others" in output
    assert "a re-run resumes from the last one" in output
    assert not (tmp_path / "stopped" / "train").exists() or not any((tmp_path / "stopped" / "train").iterdir())
    _resumes_exactly(tiny_model, tmp_path, uninterrupted, *settings)


def test_qlora_shards_under_fsdp_with_its_storage_dtype(tiny_model: Path, tmp_path: Path) -> None:
    """QLoRA under FSDP stores the packed 4-bit weights in the precision's dtype (bitsandbytes quant_storage), so
    every weight of a layer shards as one dtype; it trains in 2 processes."""
    import torch

    from loraforge.tasks.models import load_base_as_trained

    base = load_base_as_trained(tiny_model, {"quantization": "4bit", "precision": "bf16", "fsdp": True})
    packed = base.model.layers[0].self_attn.q_proj.weight
    assert type(packed).__name__ == "Params4bit" and packed.dtype == torch.bfloat16
    settings = ["train.processes=2", "train.fsdp=true", "train.quantization=4bit", "train.precision=bf16",
                "train.max_steps=4", "train.learning_rate=0.01"]  # fmt: skip
    trained = _train(tiny_model, ArtifactStore(tmp_path / "store"), *settings)
    assert trained.manifest["processes"] == 2 and trained.manifest["compute_dtype"] == "bfloat16"
    assert trained.metrics["val_loss"] < trained.metrics["val_loss_before"]


def _rank_pid(store_dir: Path, rank: int) -> int:
    """The process of `rank` among the ranks training into this store (found through /proc)."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        mine = b"loraforge.tasks.distributed" in cmdline and any(str(store_dir).encode() in part for part in cmdline)
        if mine and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    raise AssertionError(f"no rank {rank} process found")


def test_pipeline_passes_with_bf16_in_two_processes(tiny_model: Path, tmp_path: Path, hub: str) -> None:
    """data -> train (bf16, 2 processes) -> eval -> merge -> quantize -> publish bundle: every gate passes."""
    config = _config(tiny_model, tmp_path, hub, "train.precision=bf16", "train.processes=2", "publish.push=never",
                     "data.max_rows=64", "eval.max_rows=8", "quantize.types=[f16,q8_0]", "quantize.imatrix=off",
                     "publish.include_gguf=[q8_0]")  # fmt: skip
    record = _run(config)
    assert set(record["stages"]) >= {"data", "train", "eval", "merge", "quantize", "publish"}
    train_stage = ArtifactStore(tmp_path / "store").get("train", record["stages"]["train"]["key"])
    assert train_stage.manifest["precision"] == "bf16" and train_stage.manifest["processes"] == 2
    merge = ArtifactStore(tmp_path / "store").get("merge", record["stages"]["merge"]["key"])
    assert merge.metrics["fp32_max_abs_logit_diff"] <= 1e-3  # still merged in fp32 from the original weights
    assert "vs_trained_top1_agreement" in merge.metrics  # and compared with the bf16 model as trained
