"""Train the tiny model with the demo config and overrides (used in a subprocess by the resume test)."""

from __future__ import annotations

from pathlib import Path

from loraforge.tasks.artifacts import Artifact, ArtifactStore
from loraforge.tasks.config import DEMO_CONFIG, load_config

SMALL = ["train.max_steps=3", "train.batch_size=4", "data.max_rows=24", "eval.max_rows=8", "merge.probe_rows=4"]


def train(tiny_model: Path, store: ArtifactStore, *overrides: str, kill_after_step: int = 0) -> Artifact:
    """Train; with `kill_after_step`, the process dies (exit 137, no clean-up, like SIGKILL) right after that step."""
    import os

    from loraforge.tasks.data import prepare_data
    from loraforge.tasks.models import provision_base
    from loraforge.tasks.train import train_adapter

    config = load_config(DEMO_CONFIG, [f"base_model={tiny_model}", *SMALL, *overrides])
    base = provision_base(str(tiny_model), store)
    data = prepare_data(config.data, base, store)

    def kill(record: dict, total_steps: int) -> None:
        if record["step"] == kill_after_step:
            os._exit(137)

    return train_adapter(config.train, base, data, store, on_step=kill if kill_after_step else None)
