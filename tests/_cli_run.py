"""Test helper for the CLI and TensorBoard tests: a tiny digits run trained through LightningCLI.

Mirrors the demo (``configs/digits.yaml``: no ``class_path``, the classes come from the
log), scaled down to 12 steps so it trains in a few seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

CONFIG = {
    "seed_everything": 0,
    "trainer": {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 3,
        "deterministic": True,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "log_every_n_steps": 2,
        "callbacks": [{
            "class_path": "lightning_influence.InfluenceTracker",
            "init_args": {"record_losses": True, "record_gradients": True, "record_hvp": True, "projection_dim": None,
                          "checkpoint_every_n_steps": 1, "storage_dtype": "float32", "overwrite": True,
                          "flush_every_n_steps": 4},
        }],
    },
    "model": {"hidden": 8, "lr": 0.2, "weight_decay": 0.0001},
    "data": {"n_train": 60, "n_val": 40, "flip_fraction": 0.1, "batch_size": 16, "seed": 0},
}


@dataclass
class TinyRun:
    root: Path
    log: str  # influence log directory
    config: str  # the LightningCLI config it was trained with
    tb_dir: str  # the trainer's TensorBoardLogger directory (live tracker signals)


_TRAINED: list[TinyRun] = []


def train_tiny_run(root: Path) -> TinyRun:
    """Train the tiny digits run under ``root`` with the InfluenceTracker (and the default TensorBoardLogger).

    Trained once per test session: later calls return the first run (its directory lives until the
    session ends; the tests only read it).
    """
    if _TRAINED:
        return _TRAINED[0]
    from lightning.pytorch.cli import LightningCLI

    from lightning_influence.examples.digits import DigitsClassifier, DigitsDataModule

    root.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load(yaml.safe_dump(CONFIG))
    cfg["trainer"]["default_root_dir"] = str(root)
    tracker = cfg["trainer"]["callbacks"][0]["init_args"]
    tracker["log_dir"] = str(root / "influence")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cli = LightningCLI(DigitsClassifier, DigitsDataModule, run=False, args=["--config", str(config)],
                       save_config_kwargs={"overwrite": True})
    cli.trainer.fit(cli.model, cli.datamodule)
    _TRAINED.append(TinyRun(root, tracker["log_dir"], str(config), cli.trainer.logger.log_dir))
    return _TRAINED[0]


def scores_of(result: dict, n: int) -> np.ndarray:
    """Scores of samples ``0..n-1`` from a ``--format json`` answer's first result (NaN where not listed)."""
    out = np.full(n, np.nan)
    for row in result["results"][0]["rows"]:
        out[row["id"]] = row["score"]
    return out
