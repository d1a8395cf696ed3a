"""The run's model and data, rebuilt for the estimators: from the log's recipe, a LightningCLI config, or a builder.

Sources, in order (the first that applies):

1. ``--builder module:function`` (or ``path/to/file.py:function``): ``function(log)`` (or
   ``function()``) returns the LightningModule, a ``(module, datamodule)`` pair, or a dict with
   ``module`` and any of ``datamodule``, ``train_data`` (a dataset by id, or the training DataLoader), ``val_data`` (one
   batch, a DataLoader, or a map-style dataset, collated as one batch), ``test_data``, ``flipped``, ``train_labels``.
2. ``--config YAML``: the LightningCLI config's ``model``/``data`` sections (classes from their
   ``class_path``, ``--model``/``--data``, or the log's recorded classes).
3. The log alone: the recorded classes (the training script's directory on the import path)
   instantiated with their recorded ``save_hyperparameters()``; ``--model``/``--data`` replace the
   classes. Data come from the datamodule, the module's ``*_dataloader`` hooks, or the sets the
   tracker stored for plain DataLoaders (``data.pt``, :mod:`lightning_influence.recipe`).

Weights always come from the log's checkpoints; the parameter shapes are checked against the log, and a model in
another floating dtype than the run's checkpoints is converted to theirs (a class rebuilt as float32, trained as float64).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import io
import logging
import sys
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_influence.data import WithCollate, by_id, collate_of
from lightning_influence.cli.common import UserError, open_log, parse_window, status, windows_of
from lightning_influence.cli.datacheck import check_training_data
from lightning_influence.cli.methods import METHODS, check_records, default_method
from lightning_influence.estimators.scores import item_label
from lightning_influence.queries import joined_batches
from lightning_influence.recipe import RecipeError, import_class, instantiate, stored_data



class RunContext:
    """The model and data of a run (see the module docstring for where they come from).

    Args:
        module: the LightningModule (architecture; weights come from the log).
        datamodule: the LightningDataModule, or ``None``.
        origin: where they came from, for messages (``"the log's recipe"``, ``"configs/x.yaml"``).
        loaders: the object whose ``train_dataloader()``/``val_dataloader()``/``test_dataloader()`` give the
            data (the datamodule, or the module when it defines the hooks), or ``None``.
        data: explicit data overriding ``loaders``: ``train`` (dataset by id), ``val`` (one batch),
            ``test`` (dataset), ``flipped``, ``train_labels``.
        no_data: why there is no data source, with the flag that fixes it.
    """

    def __init__(self, module: Any, datamodule: Any, origin: str, loaders: Any = None,
                 data: dict[str, Any] | None = None, no_data: str = "") -> None:
        self.module = module
        self.datamodule = datamodule
        self.origin = origin
        self.loaders = loaders if loaders is not None else datamodule
        self.data = {k: v for k, v in (data or {}).items() if v is not None}
        self.no_data = no_data or (f"{origin} gives no data (no datamodule, no *_dataloader hooks, no stored data); "
                                   "pass --builder module:function returning the data, or re-train with "
                                   "InfluenceTracker(store_data=True)")
        self._label_cache: dict[int, int] = {}
        self.replay_tolerance: float | None = None
        self.loss_fn: Any = None  # the per-sample loss (_loss_fn); None: the module's per_sample_loss
        # the run's precision plugin's cast of a batch ("64-true": floats to float64; step.precision), set by load_context
        self.convert_input: Callable[[Any], Any] = lambda batch: batch
        self.training_data_checked = False  # cli.datacheck: the training set went once through the model

    def loss_kwargs(self) -> dict[str, Any]:
        """``{"loss_fn": ...}`` where the run's per-sample loss is not the module's ``per_sample_loss``; else nothing
        (the estimators' and queries' default)."""
        return {} if self.loss_fn is None else {"loss_fn": self.loss_fn}

    def _loaders(self, what: str) -> Any:
        if self.loaders is None and self.data:  # data stored with the log, but not this part of it
            raise UserError(f"no {what}: {self.origin} stores data without a {what} (the fit was given none); pass "
                            f"--builder module:function returning the data, {what} included")
        if self.loaders is None:
            raise UserError(f"no {what}: {self.no_data}")
        return self.loaders

    def _call(self, hook: str, stage: str, what: str) -> Any:
        source = self._loaders(what)
        with quiet_lightning():
            if hasattr(source, "setup") and source is self.datamodule:
                source.setup(stage)
            return getattr(source, hook)()

    @cached_property
    def train_dataset(self) -> Any:
        if "train" in self.data:
            return self.data["train"]
        return by_id(self._call("train_dataloader", "fit", "training set"))

    @cached_property
    def val_batch(self) -> Any:
        """The validation set as one batch, cast as the run's precision plugin cast validation batches."""
        return self.convert_input(self._val_batch())

    def _val_batch(self) -> Any:
        if "val" in self.data:
            val = self.data["val"]
            if isinstance(val, (list, tuple, dict)) or hasattr(val, "shape"):
                return val  # one batch
            if isinstance(val, Dataset) and not isinstance(val, IterableDataset):  # map-style, as train_data: its items
                return collate_of(val)([val[i] for i in range(len(val))])  # (iterated, each item was taken for a batch)
            return joined_batches(list(val))  # a DataLoader (or any iterable of batches)
        try:
            loader = self._call("val_dataloader", "validate", "validation set")
        except UserError:
            raise
        except Exception as err:
            raise UserError(f"no validation set: {type(err).__name__}: {err}; use another --query (test:ID, pred:ID) "
                            "or pass --builder returning val_data") from err
        loaders = loader if isinstance(loader, (list, tuple)) else [loader]
        batches = [b for lo in loaders for b in lo]
        if not batches:
            raise UserError("the validation set is empty; use another --query (test:ID, pred:ID)")
        return joined_batches(batches)

    @cached_property
    def test_dataset(self) -> Any:
        if "test" in self.data:
            return self.data["test"]
        if "val" in self.data:  # the stored validation set, sample by sample
            from lightning_influence.recipe import StoredDataset

            return StoredDataset(self.val_batch)
        source = self._loaders("test set")
        with quiet_lightning():
            try:
                if source is self.datamodule:
                    source.setup("test")
                loader = source.test_dataloader()
            except Exception:  # no test set: fall back to validation
                if source is self.datamodule:
                    source.setup("validate")
                loader = source.val_dataloader()
        return by_id(loader[0] if isinstance(loader, (list, tuple)) else loader)

    @property
    def flipped(self) -> set[int] | None:
        ids = self.data.get("flipped", getattr(self.datamodule, "flipped", None))
        return None if ids is None else {int(i) for i in np.asarray(ids).reshape(-1)}

    def labels(self, ids: Sequence[int]) -> np.ndarray:
        """Training labels of ``ids`` (``-1`` where unknown)."""
        out = np.full(len(ids), -1, dtype=np.int64)
        table = self.data.get("train_labels", getattr(self.datamodule, "train_labels", None))
        try:
            dataset = self.train_dataset if table is None else None
        except UserError:
            return out
        for k, i in enumerate(ids):
            i = int(i)
            if i not in self._label_cache:
                self._label_cache[i] = _label_of(table, dataset, i)
            out[k] = self._label_cache[i]
        return out


def _label_of(table: Any, dataset: Any, i: int) -> int:
    if table is None:
        return item_label(dataset[i])
    return item_label((None, table[i]))


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


def load_context(args: argparse.Namespace, log: Any) -> RunContext:
    """The run's model and data from ``--builder``, ``--config`` or the log (see the module docstring)."""
    try:
        if getattr(args, "builder", None):
            ctx = _from_builder(args.builder, log)
        elif args.config:
            ctx = _from_config(args, log)
        else:
            ctx = _from_recipe(args, log)
    except RecipeError as err:
        raise UserError(str(err)) from err
    _materialize_lazy(ctx, log)
    _check_shapes(ctx, log)
    _to_log_dtype(args, ctx, log)
    from lightning_influence.step.frozen import restore_frozen

    try:  # the frozen parameters the run used, which the checkpoints lack (a rebuilt module's are fresh)
        restore_frozen(log, ctx.module)
    except (ValueError, FileNotFoundError) as err:
        raise UserError(f"the model from {ctx.origin}: {err}") from err
    ctx.replay_tolerance = getattr(args, "replay_tolerance", None)  # estimators' ``tolerance`` (replay_drift.py)
    from lightning_influence.step.precision import Precision

    ctx.convert_input = Precision.from_meta(log.meta.get("precision")).convert_input
    ctx.loss_fn = _loss_fn(args, ctx, log)
    return ctx


def _loss_fn(args: argparse.Namespace, ctx: RunContext, log: Any) -> Any:
    """The per-sample loss: ``--loss-fn``, a builder's ``loss_fn``, the function the log's recipe names (the run's
    ``InfluenceTracker(loss_fn=...)``), else ``None`` (the module's ``per_sample_loss``)."""
    if getattr(args, "loss_fn", None):
        return load_function(args.loss_fn, "--loss-fn")
    if ctx.loss_fn is not None:
        return ctx.loss_fn
    recipe = log.meta.get("recipe") or {}
    entry = recipe.get("loss_fn")
    if entry:
        return _recorded_function(entry, recipe, "loss", "--loss-fn",
                                  f"the run's per-sample loss was InfluenceTracker(loss_fn=...), and {entry.get('why')}; "
                                  "pass --loss-fn module:function (or a --builder returning loss_fn)")
    if not callable(getattr(ctx.module, "per_sample_loss", None)):
        raise UserError(f"the model {type(ctx.module).__name__} has no per_sample_loss(batch) and the log names no loss "
                        "function; pass --loss-fn module:function (loss_fn(module, batch) -> per-sample losses [B])")
    return None


def _materialize_lazy(ctx: RunContext, log: Any) -> None:
    """Lazy layers (``nn.LazyLinear``) of a freshly built model have no shapes until a forward: give them the log's
    (their values come from the checkpoints, as every parameter's)."""
    import torch

    lazy = [(n, p) for n, p in getattr(ctx.module, "named_parameters", lambda: [])()
            if isinstance(p, torch.nn.parameter.UninitializedParameter)]
    for name, p in lazy:
        if name in log.param_shapes:
            p.materialize(tuple(log.param_shapes[name]))


def _check_shapes(ctx: RunContext, log: Any) -> None:
    import torch

    if not callable(getattr(ctx.module, "named_parameters", None)):
        raise UserError(f"the model from {ctx.origin} is a {type(ctx.module).__name__}, not a LightningModule; pass "
                        "--model package.module.ClassName of the LightningModule the run trained")
    shapes = {n: None if isinstance(p, torch.nn.parameter.UninitializedParameter) else tuple(p.shape)
              for n, p in ctx.module.named_parameters()}
    for name, shape in log.param_shapes.items():
        if shapes.get(name) != tuple(shape):
            raise UserError(f"the model from {ctx.origin} does not match the log: parameter {name!r} has shape "
                            f"{shapes.get(name)} in the model and {tuple(shape)} in the log; pass the config, classes "
                            "or builder the run was trained with")


def _to_log_dtype(args: argparse.Namespace, ctx: RunContext, log: Any) -> None:
    """The model in the floating dtype the run trained in (its checkpoints'): a class rebuilt from its hyperparameters
    is float32 where the training script made it float64 (``model.double()``), and the weights would not load."""
    if not log.checkpoint_steps:
        return
    stored = {np.dtype(v.dtype) for v in log.checkpoint(log.checkpoint_steps[0]).values() if v.dtype.kind == "f"}
    ours = {p.dtype for p in ctx.module.parameters() if p.is_floating_point()}
    if len(stored) == 1 and len(ours) == 1:
        import torch

        dtype = getattr(torch, str(stored.pop()))
        if dtype not in ours:
            status(args, f"the model from {ctx.origin} is {str(ours.pop()).removeprefix('torch.')}; the run trained it in "
                         f"{str(dtype).removeprefix('torch.')}: converted")
            ctx.module.to(dtype)


def _from_recipe(args: argparse.Namespace, log: Any) -> RunContext:
    """The recorded classes with their recorded hyperparameters; data as the run got it (module docstring, 3)."""
    meta = log.meta
    recipe = meta.get("recipe") or {}
    entry = recipe.get("module") or {}
    path = args.model_class or entry.get("class") or meta.get("module_class")
    if not path:
        raise UserError("the log recorded no model class; pass --model module.ClassName, --config or --builder")
    with quiet_lightning():
        module = instantiate(import_class(path, recipe, "model", "--model"), entry, "model")
        dm_entry = recipe.get("datamodule") or {}
        dm_path = args.data_class or dm_entry.get("class") or meta.get("datamodule_class")
        datamodule = instantiate(import_class(dm_path, recipe, "datamodule", "--data"), dm_entry, "datamodule") \
            if dm_path else None
    data_info = recipe.get("data") or {}
    stored = _stored(log) if data_info.get("stored") else {}
    loaders = datamodule if datamodule is not None else (module if data_info.get("train") == "module" else None)
    origin = "the log's recipe" + (f" ({path})" if path else "")
    if stored or loaders is not None or not recipe:
        no_data = "" if recipe else ("this log predates recorded recipes (format version 1); pass --config, --data "
                                     "or --builder")
        return RunContext(module, datamodule, origin, loaders, stored, no_data)
    why = data_info.get("not_stored") or "the tracker stored no data"
    return RunContext(module, None, origin, None, {}, f"the run was trained with plain DataLoaders and its log holds no "
                      f"copy of them ({why}); pass --builder module:function returning the data (or --data "
                      "module.DataModuleClass), or re-train with InfluenceTracker(store_data=True)")


def _stored(log: Any) -> dict[str, Any]:
    """The data the log stored (``recipe.stored_data``), its training set collated by the run's DataLoader's own
    ``collate_fn`` where it had one (imported again)."""
    recipe = log.meta.get("recipe") or {}
    stored = stored_data(log.path)
    entry = (recipe.get("data") or {}).get("collate_fn")
    if stored.get("train") is not None and entry:
        stored["train"] = WithCollate(stored["train"], _recorded_function(
            entry, recipe, "collate function", "--builder",
            f"the run's DataLoader collated its batches with {entry.get('name')}, and {entry.get('why')}; pass --builder "
            "module:function returning train_data=lightning_influence.WithCollate(train_set, collate_fn) (and val_data)"))
    return stored


def _recorded_function(entry: dict[str, Any], recipe: dict[str, Any], what: str, flag: str, unnamed: str) -> Any:
    """A function the recipe names (``recipe.describe_function``: the run's ``loss_fn``, its DataLoader's
    ``collate_fn``), imported again; ``unnamed``: what to do when it has no import path (a lambda, a closure)."""
    if entry.get("function") is None:
        raise UserError(unnamed)
    try:
        return import_class(entry["function"], recipe, what, flag, kind="function")
    except RecipeError as err:
        raise UserError(str(err)) from err


def load_function(spec: str, flag: str) -> Any:
    """The function ``module:function`` or ``path/to/file.py:function`` (the file's directory goes on the import path)."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise UserError(f"{flag} {spec!r}: use module:function or path/to/file.py:function")
    try:
        if target.endswith(".py"):
            file = Path(target)
            if not file.is_file():
                raise UserError(f"{flag} {spec!r}: no such file {target}")
            sys.path.insert(0, str(file.resolve().parent))
            mod_spec = importlib.util.spec_from_file_location(file.stem, file)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[file.stem] = module
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        return getattr(module, name)
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"{flag} {spec!r}: cannot load it: {type(err).__name__}: {err}") from err


def _what_builder_returned(returned: str, out: Any) -> str:
    """What a --builder returned instead of a LightningModule: its type, or what its module is."""
    if not isinstance(out, dict):
        return f"a {returned}"
    if "module" not in out:
        return f"a dict without 'module' (keys: {', '.join(map(str, out))})"
    module = out["module"]
    kind = " (a torch.nn.Module, not a LightningModule)" if isinstance(module, torch.nn.Module) else ""
    where = "whose first item is" if returned == "tuple" else "whose 'module' is"
    return f"a {returned} {where} a {type(module).__name__}{kind}"


def _from_builder(spec: str, log: Any) -> RunContext:
    """``--builder module:function`` or ``path/to/file.py:function`` (module docstring, 1)."""
    fn = load_function(spec, "--builder")
    try:
        with quiet_lightning():
            out = fn(log) if inspect.signature(fn).parameters else fn()
    except Exception as err:
        raise UserError(f"--builder {spec!r} failed: {type(err).__name__}: {err}") from err
    import lightning.pytorch as pl

    returned = type(out).__name__
    if isinstance(out, pl.LightningModule):
        out = {"module": out}
    elif isinstance(out, tuple):
        out = dict(zip(("module", "datamodule"), out))
    if not isinstance(out, dict) or not isinstance(out.get("module"), pl.LightningModule):
        raise UserError(f"--builder {spec!r} must return a LightningModule, (module, datamodule) or a dict with 'module'; "
                        f"it returned {_what_builder_returned(returned, out)}")
    data = {k: out.get(k) for k in ("train", "val", "test", "flipped", "train_labels")}
    data.update({k: out[f"{k}_data"] for k in ("train", "val", "test") if out.get(f"{k}_data") is not None})
    if isinstance(data.get("train"), DataLoader):  # the training DataLoader: its dataset by id, with its collate_fn
        data["train"] = by_id(data["train"])
    dm = out.get("datamodule")
    if dm is None and not data.get("train"):  # fall back to what the log stored
        try:
            stored = _stored(log)
        except UserError as err:  # its advice (pass --builder) is taken: say what the builder lacks
            raise UserError(f"--builder {spec} returns no train_data, and the training set the log stored needs the "
                            f"run's collate function: {err}. Return train_data=lightning_influence.WithCollate(train_set, "
                            "collate_fn) from the builder") from err
        data = {**stored, **{k: v for k, v in data.items() if v is not None}}
    ctx = RunContext(out["module"], dm, f"--builder {spec}", dm, data,
                     f"--builder {spec} returned no data and the log stores none; return train_data/val_data too")
    ctx.loss_fn = out.get("loss_fn")
    return ctx


def _from_config(args: argparse.Namespace, log: Any) -> RunContext:
    """The LightningCLI config's ``model``/``data`` sections (module docstring, 2)."""
    import yaml

    config = args.config
    path = Path(config)
    if not path.is_file():
        raise UserError(f"--config {config}: no such file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"--config {config}: not valid YAML ({str(err).splitlines()[0]})") from None
    recipe = log.meta.get("recipe") or {}
    model_cfg, data_cfg = raw.get("model"), raw.get("data")
    model_sub = isinstance(model_cfg, dict) and "class_path" in model_cfg
    data_sub = isinstance(data_cfg, dict) and "class_path" in data_cfg
    for section in (model_cfg, data_cfg):  # a class_path of the training script: put its directory on the path
        if isinstance(section, dict) and isinstance(section.get("class_path"), str) and "." in section["class_path"]:
            _importable(section["class_path"], recipe)
    model_cls = None
    if not model_sub:
        model_path = args.model_class or (recipe.get("module") or {}).get("class") or log.meta.get("module_class")
        if not model_path:
            raise UserError(f"cannot tell the model class: {config} has no model.class_path and the log recorded none; "
                            "pass --model package.module.ClassName")
        model_cls = import_class(model_path, recipe, "model", "--model")
    data_cls = None
    if not data_sub:
        data_path = args.data_class or (recipe.get("datamodule") or {}).get("class") or log.meta.get("datamodule_class")
        if data_path:
            data_cls = import_class(data_path, recipe, "datamodule", "--data")
        elif data_cfg is not None:
            raise UserError(f"cannot tell the datamodule class: {config} has no data.class_path and the log recorded "
                            "none; pass --data package.module.ClassName")
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
    except (argparse.ArgumentError, SystemExit, TypeError, ValueError, ImportError) as err:
        raise UserError(f"--config {config}: cannot instantiate the run's model and data: "
                        f"{_one_line(str(err) or stderr.getvalue())}") from err
    datamodule = getattr(cli, "datamodule", None)
    return RunContext(cli.model, datamodule, config, datamodule, {},
                      f"{config} defines no datamodule (no `data:` section); add the data section the run was trained "
                      "with, or pass --data")


def _importable(class_path: str, recipe: dict[str, Any]) -> None:
    """Import a config's ``class_path`` up front, so a failure shows its real cause (not jsonargparse's summary)."""
    import_class(class_path, recipe, "--config", "--config")


def _one_line(text: str) -> str:
    """A multi-line error (jsonargparse nests the cause under ``Parser key ...:``) folded into one line."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " ".join(lines) if lines else "unknown error"


def prepare(args: argparse.Namespace, model: bool = False) -> tuple[Any, RunContext | None]:
    """The log and the run's model and data (``None`` where the method reads the log alone and nothing asks for them;
    ``model``: always, e.g. for ``evaluate``'s query and ground truth whatever the first method)."""
    log = open_log(args.log)
    if log.num_steps == 0:
        raise UserError(f"{args.log}: the log holds no completed step yet: {log.end_note}")
    if not log.finished:  # a crashed, killed or running fit: the answers cover its complete steps only
        status(args, f"note: {log.end_note}; the answers cover these steps only")
    args.method = args.method or default_method()
    check_records(args.method, log, getattr(args, "hvp", None))
    for spec in windows_of(args):  # a bad window fails before the model and the data are loaded
        parse_window(log, spec)
    method = METHODS[args.method]
    ctx = None
    if model or method.needs != "log" or args.config or getattr(args, "builder", None):
        source = args.builder or args.config or "the log's recipe"
        status(args, f"rebuilding the model and data from {source} ...")
        ctx = load_context(args, log)
        if model or method.needs != "log":  # model-only methods too, where the run gives its data (a stale log)
            check_training_data(log, ctx, required=method.needs == "model+data")
    return log, ctx
