"""Train the tiny model with the demo config and overrides (used in a subprocess by the resume test)."""

from __future__ import annotations

from pathlib import Path

from tasks.artifacts import Artifact, ArtifactStore
from tasks.config import DEMO_CONFIG, load_config

SMALL = ["train.max_steps=3", "train.batch_size=4", "data.max_rows=24", "eval.max_rows=8", "merge.probe_rows=4"]


def train(tiny_model: Path, store: ArtifactStore, *overrides: str) -> Artifact:
    from tasks.data import prepare_data
    from tasks.models import provision_base
    from tasks.train import train_adapter

    config = load_config(DEMO_CONFIG, [f"base_model={tiny_model}", *SMALL, *overrides])
    base = provision_base(str(tiny_model), store)
    data = prepare_data(config.data, base, store)
    return train_adapter(config.train, base, data, store)
