"""The run's model and data, instantiated for the estimators (see the package docstring)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import logging
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from lightning_influence.cli.common import UserError, open_log, status
from lightning_influence.cli.methods import METHODS, check_records, default_method

# ---------------------------------------------------------------------------------- run context
class RunContext:
    """The model architecture and data of a run, instantiated from its LightningCLI config."""

    def __init__(self, module: Any, datamodule: Any, config: str) -> None:
        self.module = module
        self.datamodule = datamodule
        self.config = config
        self._label_cache: dict[int, int] = {}

    def _dm(self, what: str) -> Any:
        if self.datamodule is None:
            raise UserError(f"{self.config} defines no datamodule (no `data:` section), so there is no {what}; "
                            "add the data section the run was trained with, or pass --data-class")
        return self.datamodule

    @cached_property
    def train_dataset(self) -> Any:
        dm = self._dm("training set")
        with quiet_lightning():
            dm.setup("fit")
            return dm.train_dataloader().dataset

    @cached_property
    def val_batch(self) -> Any:
        dm = self._dm("validation set")
        with quiet_lightning():
            dm.setup("validate")
            loader = dm.val_dataloader()
        loaders = loader if isinstance(loader, (list, tuple)) else [loader]
        return _concat_batches([b for lo in loaders for b in lo])

    @cached_property
    def test_dataset(self) -> Any:
        dm = self._dm("test set")
        with quiet_lightning():
            try:
                dm.setup("test")
                loader = dm.test_dataloader()
            except Exception:  # no test set: fall back to validation
                dm.setup("validate")
                loader = dm.val_dataloader()
        loader = loader[0] if isinstance(loader, (list, tuple)) else loader
        return loader.dataset

    @property
    def flipped(self) -> set[int] | None:
        ids = getattr(self.datamodule, "flipped", None) if self.datamodule is not None else None
        return None if ids is None else {int(i) for i in np.asarray(ids).reshape(-1)}

    def labels(self, ids: Sequence[int]) -> np.ndarray:
        """Training labels of ``ids`` (``-1`` where unknown)."""
        out = np.full(len(ids), -1, dtype=np.int64)
        if self.datamodule is None:
            return out
        table = getattr(self.datamodule, "train_labels", None)
        for k, i in enumerate(ids):
            i = int(i)
            if i not in self._label_cache:
                self._label_cache[i] = _label_of(table, self.train_dataset, i)
            out[k] = self._label_cache[i]
        return out


def _label_of(table: Any, dataset: Any, i: int) -> int:
    try:
        value = table[i] if table is not None else dataset[i][1]
        value = value.item() if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1 else value
        return int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else -1
    except Exception:
        return -1


def _concat_batches(batches: list[Any]) -> Any:
    import torch

    if len(batches) == 1:
        return batches[0]
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(batches)
    if isinstance(first, dict):
        return {k: _concat_batches([b[k] for b in batches]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_concat_batches([b[i] for b in batches]) for i in range(len(first)))
    return batches


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's info chatter (seed, GPU banner) while instantiating."""
    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def _import_class(path: str | None, what: str, flag: str) -> Any:
    if not path:
        return None
    module_name, _, name = path.rpartition(".")
    if module_name == "__main__" or not module_name:
        raise UserError(f"the log recorded the {what} class as {path!r} (the run was started as a script), which "
                        f"cannot be imported; pass {flag} package.module.ClassName or add class_path to the config")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise UserError(f"cannot import the {what} class {path!r} ({err}); pass {flag} package.module.ClassName") from None


def load_context(args: argparse.Namespace, log: Any) -> RunContext:
    """Instantiate the run's model and datamodule from ``--config`` (see the module docstring)."""
    import yaml

    config = args.config
    if not config:
        raise UserError(f"--method {args.method} needs the model and data of the run: pass --config CONFIG.yaml, "
                        "the LightningCLI config the run was trained with")
    path = Path(config)
    if not path.is_file():
        raise UserError(f"--config {config}: no such file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"--config {config}: not valid YAML ({str(err).splitlines()[0]})") from None
    model_cfg, data_cfg = raw.get("model"), raw.get("data")
    model_sub = isinstance(model_cfg, dict) and "class_path" in model_cfg
    data_sub = isinstance(data_cfg, dict) and "class_path" in data_cfg
    model_cls = None if model_sub else _import_class(args.model_class or log.meta.get("module_class"), "model", "--model-class")
    if not model_sub and model_cls is None:
        raise UserError(f"cannot tell the model class: {config} has no model.class_path and the log recorded none; "
                        "pass --model-class package.module.ClassName")
    data_cls = None
    if not data_sub:
        data_cls = _import_class(args.data_class or log.meta.get("datamodule_class"), "datamodule", "--data-class")
        if data_cls is None and data_cfg is not None:
            raise UserError(f"cannot tell the datamodule class: {config} has no data.class_path and the log recorded "
                            "none; pass --data-class package.module.ClassName")
    from lightning.pytorch.cli import LightningCLI

    class _NoTrainerCLI(LightningCLI):
        def instantiate_trainer(self, **kwargs: Any) -> Any:
            return None

    stderr = io.StringIO()
    try:
        with quiet_lightning(), contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stderr):
            cli = _NoTrainerCLI(model_cls, data_cls, subclass_mode_model=model_sub,
                                subclass_mode_data=data_sub and data_cls is None, run=False,
                                args=["--config", str(path)], save_config_callback=None, auto_configure_optimizers=False,
                                parser_kwargs={"exit_on_error": False})
    except (argparse.ArgumentError, SystemExit, TypeError, ValueError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else stderr.getvalue().strip().splitlines()[-1:]
        raise UserError(f"--config {config}: cannot instantiate the run's model and data: {detail}") from None
    module, datamodule = cli.model, getattr(cli, "datamodule", None)
    shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}
    for name, shape in log.param_shapes.items():
        if shapes.get(name) != tuple(shape):
            raise UserError(f"the model from {config} does not match the log: parameter {name!r} has shape "
                            f"{shapes.get(name)} in the model and {tuple(shape)} in the log; pass the config the run "
                            "was trained with")
    return RunContext(module, datamodule, config)




def prepare(args: argparse.Namespace) -> tuple[Any, RunContext | None]:
    log = open_log(args.log)
    if log.num_steps == 0:
        raise UserError(f"{args.log}: the log holds no completed step yet: {log.end_note}")
    args.method = args.method or default_method()
    check_records(args.method, log)
    method = METHODS[args.method]
    ctx = None
    if method.needs != "log" or args.config:
        status(args, f"instantiating the model and data from {args.config} ...")
        ctx = load_context(args, log)
    return log, ctx


