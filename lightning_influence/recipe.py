"""The run's recipe: what the log records so that the model and the data can be rebuilt from it alone.

Written by the tracker into ``meta.h5`` (``recipe``, format version 2, ``docs/log-format.md``):

* the LightningModule's and the datamodule's import path, the file defining them and the
  hyperparameters they saved with ``save_hyperparameters()`` (JSON-representable ones; the
  names of the others are listed, so a rebuild can say what it lacks);
* the training script (``sys.argv[0]``), its directory and the working directory, so a class
  defined in the script itself (``__main__``) is found again as a module of that name;
* the per-sample loss function given as ``InfluenceTracker(loss_fn=...)``, when the module has no
  ``per_sample_loss``: its import path (a top-level function), or why it cannot be imported again;
* where the data came from (a datamodule, the module's ``*_dataloader`` hooks, or plain
  DataLoaders given to ``fit``) and, for plain DataLoaders, the training and validation sets
  themselves (``data.pt``, when small) since nothing else can rebuild them.

The reading side (:func:`import_class`, :func:`instantiate`, :func:`stored_data`) is what the
CLI uses to answer a script-trained run without a YAML. Nothing here imports Lightning at
module level (readers stay Lightning-free).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import io
import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_influence.log.format import DATA_FILE  # the log removes it with its other files
from lightning_influence.log.segment import write_bytes
from lightning_influence.log.writer import LogWriteError, storage_error

STORE_DATA_LIMIT = 64 * 2**20  # bytes: plain-DataLoader data above this is not stored unless asked


class RecipeError(Exception):
    """The log's recipe cannot rebuild the model or the data; the message says why and what to pass."""


# ------------------------------------------------------------------------------------------ writing
def class_path(obj: Any) -> str:
    """``module.QualName`` of ``obj``'s class, importable again: a class of the script being run (``__main__``)
    is named by the script's module name (``python -m pkg.train`` → ``pkg.train``, ``python train.py`` → ``train``)."""
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{_module_name(cls.__module__)}.{cls.__qualname__}"


def _module_name(module: str) -> str:
    if module != "__main__":
        return module
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name and spec.name != "__main__":
        return spec.name
    file = getattr(main, "__file__", None)
    return Path(file).stem if file else module


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=True)
        return True
    except (TypeError, ValueError):
        return False


def describe(obj: Any) -> dict[str, Any]:
    """Import path, defining file and saved hyperparameters of a LightningModule or LightningDataModule."""
    cls = type(obj)
    file = getattr(sys.modules.get(cls.__module__), "__file__", None)
    hparams = getattr(obj, "hparams", None)
    saved = dict(hparams) if isinstance(hparams, Mapping) and len(hparams) else None
    kept = None if saved is None else {k: v for k, v in saved.items() if not str(k).startswith("_") and _jsonable(v)}
    dropped = [] if saved is None else sorted(str(k) for k in saved if not str(k).startswith("_") and k not in kept)
    return {"class": class_path(obj), "file": os.path.abspath(file) if file else None,
            "hparams": kept, "hparams_not_recorded": dropped}


def describe_function(fn: Any) -> dict[str, Any]:
    """Import path (``module.name``) and defining file of a top-level function; a lambda, closure or callable object
    has no path (``function: None``) and ``why`` says what it is."""
    name = getattr(fn, "__qualname__", None)
    module = getattr(fn, "__module__", None)
    if not inspect.isfunction(fn) or not name or not module or "<" in name or "." in name:
        what = f"{type(fn).__name__} {name or fn!r}"
        return {"function": None, "file": None, "why": f"{what} is not a top-level function, so it cannot be imported"}
    file = getattr(sys.modules.get(module), "__file__", None)
    return {"function": f"{_module_name(module)}.{name}", "file": os.path.abspath(file) if file else None, "why": None}


def script() -> dict[str, Any]:
    """The training script, its directory and the working directory at ``fit`` time."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] not in ("", "-c", "-m") else None
    path = os.path.abspath(argv0) if argv0 and os.path.exists(argv0) else None
    main = sys.modules.get("__main__")
    main_file = getattr(main, "__file__", None)
    return {"argv0": path, "dir": os.path.dirname(path) if path else None, "cwd": os.getcwd(),
            "main_module": _module_name("__main__") if main_file else None,
            "main_file": os.path.abspath(main_file) if main_file else None}


def record_recipe(trainer: Any, pl_module: Any, log_dir: str, store_data: bool | None, loss_fn: Any = None
                  ) -> dict[str, Any]:
    """The ``recipe`` meta entry; stores ``data.pt`` for plain DataLoaders (see the module docstring). ``loss_fn``:
    the tracker's, when given (else the module's ``per_sample_loss`` is the loss: nothing to record).

    ``store_data``: ``None`` stores the data of plain DataLoaders when under :data:`STORE_DATA_LIMIT`,
    ``True`` stores the data whatever its source and size, ``False`` never.
    """
    dm = getattr(trainer, "datamodule", None)
    train_source = _source_kind(getattr(getattr(trainer, "fit_loop", None), "_data_source", None))
    val_loop = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "val_loop", None)
    val_source = _source_kind(getattr(val_loop, "_data_source", None))
    data: dict[str, Any] = {"train": train_source, "val": val_source, "stored": None, "not_stored": None,
                            "collate_fn": _collate(getattr(trainer, "train_dataloader", None))}
    wanted = store_data if store_data is not None else (train_source == "dataloaders" or val_source == "dataloaders")
    if wanted:
        limit = math.inf if store_data else STORE_DATA_LIMIT
        val_loaders = _val_loaders(trainer, val_loop)
        try:
            data["stored"] = _store(Path(log_dir), trainer.train_dataloader, val_loaders, limit)
        except LogWriteError:  # a full or read-only disk: the fit stops, saying so (it is not the data's fault)
            raise
        except _TooLarge as err:
            data["not_stored"] = f"{err} (over {STORE_DATA_LIMIT // 2**20} MiB; InfluenceTracker(store_data=True) stores it anyway)"
        except Exception as err:  # e.g. items default_collate cannot stack: training goes on, the log says why
            data["not_stored"] = f"the data could not be collated for storing ({type(err).__name__}: {err})"
    elif store_data is None:
        data["not_stored"] = f"the data comes from the {'datamodule' if dm is not None else 'module'}, rebuilt from its recipe"
    else:
        data["not_stored"] = "InfluenceTracker(store_data=False)"
    return {"module": describe(pl_module), "datamodule": describe(dm) if dm is not None else None,
            "script": script(), "data": data, "loss_fn": describe_function(loss_fn) if loss_fn is not None else None}


def _collate(loader: Any) -> dict[str, Any] | None:
    """The training DataLoader's own ``collate_fn`` (:func:`describe_function`, with its ``name``), or ``None`` for
    PyTorch's default: replay rebuilds every step's batch with it (``data.WithCollate``)."""
    from lightning_influence.data import loader_collate

    fn = loader_collate(loader)
    if fn is None:
        return None
    return {**describe_function(fn), "name": getattr(fn, "__qualname__", None) or type(fn).__name__}


def _source_kind(source: Any) -> str | None:
    instance = getattr(source, "instance", None)
    if instance is None:
        return None
    import lightning.pytorch as pl

    if isinstance(instance, pl.LightningDataModule):
        return "datamodule"
    if isinstance(instance, pl.LightningModule):
        return "module" if source.is_defined() else None
    return "dataloaders"


def _val_loaders(trainer: Any, val_loop: Any) -> list[Any]:
    loaders = getattr(trainer, "val_dataloaders", None)
    if loaders is None:
        source = getattr(val_loop, "_data_source", None)
        if source is None or source.instance is None or not source.is_defined():
            return []
        loaders = source.dataloader()
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]


class _TooLarge(Exception):
    pass


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 8


def _store(log_dir: Path, train_loader: Any, val_loaders: list[Any], limit: float) -> dict[str, Any]:
    """Collate the training set (in id order) and the validation batches into ``data.pt``."""
    from torch.utils.data import default_collate

    from lightning_influence.data import loader_collate

    out: dict[str, Any] = {}
    dataset = getattr(train_loader, "dataset", None)
    if dataset is not None and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        n = len(dataset)
        if n and _nbytes(dataset[0]) * n > limit:
            raise _TooLarge(f"the training set ({n} samples, about {_nbytes(dataset[0]) * n / 2**20:.0f} MiB) is not stored")
        items = [dataset[i] for i in range(n)]  # with the loader's own collate_fn: kept as items, collated on reading
        if loader_collate(train_loader) is None:
            out["train"] = default_collate(items)
        else:
            out["train_items"] = items
    val = [b for lo in val_loaders for b in lo]
    if val:
        try:
            batch = concat_batches(val)
        except RuntimeError:  # batches padded each to its own length: kept as they are (queries.Batches)
            batch = val
        if _nbytes(batch) > limit:
            raise _TooLarge(f"the validation set (about {_nbytes(batch) / 2**20:.0f} MiB) is not stored")
        out["val" if batch is not val else "val_batches"] = batch
    if not out:
        return {}
    buffer = io.BytesIO()  # serialised first: torch.save on a full disk fails with a garbled error and leaves its file
    torch.save(out, buffer)
    try:
        write_bytes(log_dir / DATA_FILE, buffer.getbuffer())  # atomic; on a disk error nothing is left behind
    except OSError as err:
        raise storage_error(log_dir, DATA_FILE, err, "Nothing of this fit is in the log yet", started=False) from None
    sizes = {"train_items": len(out.get("train_items", [])),
             "val_batches": sum(_batch_len(b) for b in out.get("val_batches", []))}
    return {"file": DATA_FILE, **{k.split("_")[0]: sizes.get(k) or _batch_len(v) for k, v in out.items()}}


def _batch_len(batch: Any) -> int:
    from lightning_influence.data import batch_size_of

    return batch_size_of(batch)


def concat_batches(batches: list[Any]) -> Any:
    """Batches of one structure (tensor, tuple, list or dict of tensors) concatenated along the first dimension."""
    if len(batches) == 1:
        return batches[0]
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(batches)
    if isinstance(first, Mapping):
        return {k: concat_batches([b[k] for b in batches]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(concat_batches([b[i] for b in batches]) for i in range(len(first)))
    return batches


# ------------------------------------------------------------------------------------------ reading
class StoredDataset(torch.utils.data.Dataset):
    """A collated batch seen as a map-style dataset: ``ds[i]`` is its ``i``-th sample, uncollated; with ``items``,
    the stored samples themselves (those of a loader with its own ``collate_fn``)."""

    def __init__(self, batch: Any = None, items: list[Any] | None = None) -> None:
        self.batch, self.items = batch, items
        self.n = len(items) if items is not None else _batch_len(batch)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        return self.items[int(i)] if self.items is not None else _index(self.batch, int(i))


def _index(batch: Any, i: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[i]
    if isinstance(batch, Mapping):
        return {k: _index(v, i) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_index(v, i) for v in batch)
    return batch


def stored_data(log_dir: str | os.PathLike) -> dict[str, Any]:
    """``{"train": StoredDataset, "val": batch}`` from the log's ``data.pt`` (empty when the log stores none)."""
    path = Path(log_dir) / DATA_FILE
    if not path.exists():
        return {}
    try:
        data = torch.load(path, weights_only=True)
    except Exception as err:  # a damaged file fails in pickle, zipfile or the OS, each with its own exception
        data = err
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: the training and validation data stored with the log cannot be read (corrupted or "
                          f"truncated? {type(data).__name__}); restore {DATA_FILE} from a backup, or pass --builder module:function "
                          "returning the data (or --data module.DataModuleClass)")
    if "val_batches" in data:
        from lightning_influence.queries import Batches

        data["val"] = Batches(data["val_batches"])
    train = StoredDataset(data["train"]) if "train" in data else \
        StoredDataset(items=data["train_items"]) if "train_items" in data else None
    return {"train": train, "val": data.get("val")}


def import_class(path: str, recipe: Mapping[str, Any] | None = None, what: str = "model", flag: str = "--model",
                 kind: str = "class") -> Any:
    """Import ``package.module.ClassName`` (``kind="function"``: ``package.module.function``), with the recorded script
    and working directories on the import path.

    Raises:
        RecipeError: the class cannot be imported (the message keeps the import error's cause), or its module
            is a script that would train again when imported.
    """
    module_name, _, name = path.rpartition(".")
    if "<locals>" in path:  # never imported: its module may be a script that trains when imported
        raise RecipeError(f"the {what} {kind} {path!r} was defined inside a function, so it cannot be imported again; "
                          f"define it at module level (with the training under `if __name__ == \"__main__\":`), or pass "
                          f"{flag} {_spelling(kind)} or --builder")
    if not module_name or module_name == "__main__":
        raise RecipeError(f"the {what} {kind} was recorded as {path!r} (an old log of a script run), which cannot be "
                          f"imported; pass {flag} {_spelling(kind)} with the script's directory on PYTHONPATH, or --builder")
    for d in _search_dirs(recipe):
        if d not in sys.path:
            sys.path.append(d)
    trains = [f for f in _module_files(module_name, recipe) if _trains_on_import(f)]
    file = trains[0] if trains else None
    if file and module_name not in sys.modules:
        raise RecipeError(f"importing {module_name} ({file}) would train again: its fit() call is not under "
                          f"`if __name__ == \"__main__\":`; move it there, or pass --builder module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # the real cause, in one line
        raise RecipeError(f"cannot import the {what} {kind} {path!r}: {type(err).__name__}: {err} (searched "
                          f"{', '.join(_search_dirs(recipe)) or 'sys.path'}); pass {flag} {_spelling(kind)} or --builder") from err
    try:
        return getattr(module, name)
    except AttributeError:
        raise RecipeError(f"cannot import the {what} {kind} {path!r}: module {module_name} ({getattr(module, '__file__', '?')}) "
                          f"has no {name!r}; pass {flag} {_spelling(kind)} or --builder") from None


def _spelling(kind: str) -> str:
    return "module:function" if kind == "function" else "module.ClassName"


def _search_dirs(recipe: Mapping[str, Any] | None) -> list[str]:
    if not recipe:
        return []
    s = recipe.get("script") or {}
    dirs = [s.get("dir"), s.get("cwd")]
    for part, key in (("module", "class"), ("datamodule", "class"), ("loss_fn", "function")):
        entry = recipe.get(part) or {}
        file, cls = entry.get("file"), entry.get(key) or ""
        if file:  # the directory the module's top package lives in
            depth = cls.count(".") - 1 + (Path(file).name == "__init__.py")  # a.b.C in .../a/b.py: root is .../
            dirs.append(str(Path(file).resolve().parents[depth]))
    return [d for d in dict.fromkeys(dirs) if d and os.path.isdir(d)]


def _module_files(module_name: str, recipe: Mapping[str, Any] | None) -> list[str]:
    """The recorded files of ``module_name``: of the module of a recorded class or function, and of the training script,
    also of the script module a name lies in (``train.Outer`` for a class nested in ``train``'s ``Outer``)."""
    recipe = recipe or {}
    script = recipe.get("script") or {}
    known = [(script.get("main_module"), script.get("main_file"))]
    for part, key in (("module", "class"), ("datamodule", "class"), ("loss_fn", "function")):
        entry = recipe.get(part) or {}
        known.append(((entry.get(key) or "").rpartition(".")[0], entry.get("file")))
    return list(dict.fromkeys(file for module, file in known
                              if module and file and (module_name == module or module_name.startswith(module + "."))))


def _trains_on_import(file: str) -> bool:
    """Whether a script's top level (outside functions, classes and ``if __name__ == "__main__"``) calls ``.fit(``,
    itself or through a function of the script (``main()``)."""
    try:
        tree = ast.parse(Path(file).read_text())
    except (OSError, SyntaxError, ValueError):
        return False
    functions = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}

    def trains(node: ast.AST, seen: frozenset[str]) -> bool:
        for sub in ast.walk(node):
            if not isinstance(sub, ast.Call):
                continue
            if isinstance(sub.func, ast.Attribute) and sub.func.attr == "fit":
                return True
            if isinstance(sub.func, ast.Name) and sub.func.id in functions and sub.func.id not in seen \
                    and trains(functions[sub.func.id], seen | {sub.func.id}):
                return True
        return False

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test):
            continue
        if trains(node, frozenset()):
            return True
    return False


def instantiate(cls: type, entry: Mapping[str, Any] | None, what: str) -> Any:
    """``cls(**hparams)`` with the recorded hyperparameters (those its ``__init__`` accepts).

    Raises:
        RecipeError: a required argument was not recorded (not saved, or not JSON-representable), or the
            constructor failed (with its error).
    """
    hparams = dict((entry or {}).get("hparams") or {})
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        hparams = {k: v for k, v in hparams.items() if k in params}
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in hparams
               and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    if missing:
        dropped = set((entry or {}).get("hparams_not_recorded") or [])
        why = ("not JSON-representable, so not recorded" if set(missing) <= dropped else
               "not saved: call self.save_hyperparameters() in __init__" if (entry or {}).get("hparams") is None else
               "not among the saved hyperparameters")
        raise RecipeError(f"cannot rebuild the {what} {cls.__name__}: argument(s) {', '.join(missing)} ({why}); "
                          "pass --builder module:function returning the model (and data)")
    try:
        return cls(**hparams)
    except Exception as err:
        raise RecipeError(f"cannot rebuild the {what} {cls.__name__}({', '.join(f'{k}={v!r}' for k, v in hparams.items())}): "
                          f"{type(err).__name__}: {err}; pass --builder module:function") from err
