"""Train checkpoints: resume restores optimizer, scheduler and RNG states for every optimizer the stage offers,
and a state file planted in the store is never unpickled as code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from loraforge.tasks.errors import StageError
from loraforge.tasks.train import (
    TrainConfig,
    _last_checkpoint,
    _load_checkpoint,
    _optimizer,
    _save_checkpoint,
    _scheduler,
)

OPTIMIZERS = [
    pytest.param("adamw", "cpu", id="adamw"),
    pytest.param("adamw_8bit", "cpu", id="adamw_8bit"),
    pytest.param("paged_adamw", "cuda", id="paged_adamw", marks=pytest.mark.gpu),
    pytest.param("paged_adamw_8bit", "cuda", id="paged_adamw_8bit", marks=pytest.mark.gpu),
]


def _training(optimizer: str, device: str, seed: int, scheduler: str = "cosine") -> tuple[dict[str, Any], Any, Any]:
    """Two adapter-like matrices (8,192 values each: above bitsandbytes' 4,096 minimum for 8-bit states), their
    optimizer and scheduler, as the train stage builds them."""
    import torch

    torch.manual_seed(seed)
    params = {
        "lora_A": torch.nn.Parameter(torch.randn(64, 128, device=device)),
        "lora_B": torch.nn.Parameter(torch.randn(128, 64, device=device)),
    }
    config = TrainConfig(optimizer=optimizer, scheduler=scheduler, learning_rate=1e-2, warmup_ratio=0.2)  # type: ignore[arg-type]
    optim = _optimizer([{"params": list(params.values())}], config)
    return params, optim, _scheduler(optim, config, total_steps=10)


def _steps(params: dict[str, Any], optimizer: Any, scheduler: Any, count: int) -> list[float]:
    """`count` optimizer steps on random gradients (drawn from torch's RNG, so a resume must restore it too)."""
    import torch

    rates = []
    for _ in range(count):
        for param in params.values():
            param.grad = torch.randn(param.shape, generator=None).to(param.device)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        rates.append(scheduler.get_last_lr()[0])
    return rates


@pytest.mark.parametrize(("optimizer", "device"), OPTIMIZERS)
@pytest.mark.parametrize("scheduler", ["cosine", "linear", "constant"])
def test_resume_continues_exactly_like_an_uninterrupted_run(
    tmp_path: Path, optimizer: str, device: str, scheduler: str
) -> None:
    import torch

    params, optim, sched = _training(optimizer, device, seed=0, scheduler=scheduler)
    _steps(params, optim, sched, 3)
    state = {"step": 3, "tokens": 30, "seconds": 1.0, "history": [{"step": 3, "loss": 1.0}], "best": None}
    _save_checkpoint(tmp_path, state, params, optim, sched, keep=2)
    rates = _steps(params, optim, sched, 2)
    expected = {name: p.detach().clone() for name, p in params.items()}

    resumed, optim2, sched2 = _training(optimizer, device, seed=1, scheduler=scheduler)  # other weights, fresh states
    checkpoint = _last_checkpoint(tmp_path)
    assert checkpoint is not None and checkpoint.name == "step-0000003"
    restored = _load_checkpoint(checkpoint, resumed, optim2, sched2)
    assert restored["step"] == 3 and restored["history"] == state["history"]
    assert _steps(resumed, optim2, sched2, 2) == rates
    for name, weights in expected.items():
        assert torch.equal(resumed[name], weights), name


class _RunsCode:
    """Unpickles into a call of open(marker, 'w'): harmless, but proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_a_planted_state_file_is_refused_not_executed(tmp_path: Path) -> None:
    import torch

    params, optim, sched = _training("adamw", "cpu", seed=0)
    _steps(params, optim, sched, 1)
    _save_checkpoint(tmp_path / "checkpoints", {"step": 1, "history": []}, params, optim, sched, keep=2)
    checkpoint = _last_checkpoint(tmp_path / "checkpoints")
    assert checkpoint is not None
    marker = tmp_path / "code-ran"
    torch.save({"optimizer": _RunsCode(marker), "scheduler": {}, "torch_rng": torch.get_rng_state()},
               checkpoint / "state.pt")  # fmt: skip

    with pytest.raises(StageError) as error:
        _load_checkpoint(checkpoint, params, optim, sched)
    assert not marker.exists(), "resuming ran code stored in the checkpoint"
    message = str(error.value)
    assert f"{checkpoint / 'state.pt'} cannot be loaded safely" in message
    assert "(it calls io.open)" in message and "It was not executed" in message
    assert f"Delete {checkpoint.parent}" in message and "train.resume=false" in message
