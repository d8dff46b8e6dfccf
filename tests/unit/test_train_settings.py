"""Train settings for real sizes: precision resolution, QLoRA's compute dtype, how several processes share a
step, the torchrun command line and how a failed rank is reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraforge.tasks.config import DEMO_CONFIG, load_config
from loraforge.tasks.distributed import _failure, torchrun_command
from loraforge.tasks.errors import ConfigError
from loraforge.tasks.train import TrainConfig, compute_dtype, resolve_precision


@pytest.mark.parametrize(
    ("wanted", "device", "cuda_bf16", "expected"),
    [
        ("auto", "cuda", True, "bf16"),  # Ampere and later
        ("auto", "cuda", False, "fp16"),  # T4, V100
        ("auto", "cpu", False, "fp32"),  # measured faster on CPU (docs/bench.md)
        ("bf16", "cpu", False, "bf16"),
        ("fp32", "cuda", True, "fp32"),
    ],
)
def test_precision_resolves_per_device(wanted: str, device: str, cuda_bf16: bool, expected: str) -> None:
    assert resolve_precision(wanted, device, cuda_bf16) == expected


def test_qlora_compute_dtype_follows_the_precision_unless_set() -> None:
    assert compute_dtype(TrainConfig(), "bf16") == "bfloat16"
    assert compute_dtype(TrainConfig(), "fp32") == "float32"
    assert compute_dtype(TrainConfig(compute_dtype="float16"), "bf16") == "float16"


def test_processes_must_share_every_step_and_nodes_need_a_rendezvous() -> None:
    with pytest.raises(ConfigError) as error:
        load_config(DEMO_CONFIG, ["train.processes=4", "train.grad_accum=2", "train.nnodes=2"])
    message = str(error.value)
    assert "grad_accum=2 micro-batches per step cannot be shared by 8 training processes" in message
    assert "set grad_accum to a multiple of 8" in message
    with pytest.raises(ConfigError, match="nnodes > 1 needs rdzv_endpoint"):
        load_config(DEMO_CONFIG, ["train.nnodes=2", "train.grad_accum=2"])
    with pytest.raises(ConfigError, match="fsdp shards the model over several training processes"):
        load_config(DEMO_CONFIG, ["train.fsdp=true"])
    assert load_config(DEMO_CONFIG, ["train.processes=2", "train.grad_accum=4"]).train.processes == 2


def test_torchrun_command_one_machine_and_several(tmp_path: Path) -> None:
    one = torchrun_command(tmp_path, 2, 1, None, "abc")
    module = "loraforge.tasks.distributed"
    assert one[1:] == ["-m", module, "--launch", str(tmp_path), "--nproc-per-node=2", "--standalone",
                       "--nnodes=1", "-m", module, str(tmp_path)]  # fmt: skip
    several = torchrun_command(tmp_path, 8, 4, "head:29400", "abc")
    assert "--nnodes=4" in several and "--rdzv-endpoint=head:29400" in several and "--rdzv-id=abc" in several
    assert "--standalone" not in several


def test_the_first_failed_rank_is_named_with_its_own_message_or_its_signal(tmp_path: Path) -> None:
    (tmp_path / "error-rank0.txt").write_text("RuntimeError: Connection reset by peer")  # a consequence
    (tmp_path / "failure.json").write_text(json.dumps({"rank": 1, "exitcode": -9, "signal": "SIGKILL"}))
    message = _failure(tmp_path, "", 1)
    assert message.startswith("train: rank 1 died (killed by signal 9, SIGKILL) and torchrun stopped the others")
    assert "lower train.batch_size or train.processes" in message
    (tmp_path / "error-rank1.txt").write_text("training diverged at step 3; lower train.learning_rate")
    (tmp_path / "failure.json").write_text(json.dumps({"rank": 1, "exitcode": 1, "signal": ""}))
    assert _failure(tmp_path, "", 1) == "train: rank 1 failed: training diverged at step 3; lower train.learning_rate"
