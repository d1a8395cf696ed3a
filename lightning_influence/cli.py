"""``lightning-influence``: ask a finished (or crashed) run's influence log questions after the fact.

    lightning-influence info LOG
    lightning-influence query LOG --config CONFIG --window "epoch 14:" --top 10
    lightning-influence timeline LOG --config CONFIG --grid epochs
    lightning-influence evaluate LOG --config CONFIG --samples top:10
    lightning-influence tensorboard LOG --config CONFIG --logdir runs/digits/tb

(``python -m lightning_influence ...`` is the same.) Presentation only: scores come from
``lightning_influence.estimators``, patterns and metrics from ``lightning_influence.evaluation``.

**Model and data.** Weights always come from the log's checkpoints. The architecture, the
training data and the query data come from the LightningCLI YAML the run was trained with
(``--config``): its ``model``/``data`` sections are instantiated (no trainer is built). The
classes are the config's ``class_path`` if it has one, else ``--model-class``/``--data-class``,
else the classes the log recorded (``module_class``/``datamodule_class``). Methods marked
"log only" in ``--help`` need none of that.

**Datamodule conventions** (all optional): the training set is ``train_dataloader().dataset``
(items ``(x, y, id)`` as made by :class:`~lightning_influence.WithIds`); the ``val_loss`` query
is the mean ``per_sample_loss`` over every batch of ``val_dataloader()``; ``test:ID`` /
``pred:ID`` index ``test_dataloader().dataset`` (``val_dataloader().dataset`` when there is no
test set). Labels shown in tables are ``datamodule.train_labels[id]`` when that attribute
exists, else the second element of the training item when it is an integer; known corrupted
samples are ``datamodule.flipped`` (ids).

**Adding a method** is one entry in :data:`METHODS`: where the function lives, what it needs,
which records the log must hold. The function is called as ``fn(log, query=..., **kwargs)``
with the keyword arguments it accepts among ``module``, ``train_data``, ``val_data``,
``window`` and ``progress`` (plus the entry's fixed ``options``) and returns an
:class:`~lightning_influence.InfluenceScores`; an optional ``timeline`` function (same
arguments, ``grid=`` instead of ``window=``) returns an object whose ``at(step)`` gives the
cumulative scores ``(N, Q)`` at each grid step.

Errors the user can fix print one line and exit with code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import importlib.util
import inspect
import io
import json
import logging
import sys
import textwrap
import time
import traceback
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

PROG = "lightning-influence"


class UserError(Exception):
    """Something the user can fix: shown as one line, exit code 2."""


# --------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """An estimator the CLI can run.

    Attributes:
        target: ``"package.module:function"`` returning :class:`InfluenceScores` for one window.
        needs: ``"log"`` (the log alone), ``"model"`` (architecture + query data from
            ``--config``) or ``"model+data"`` (also the training data).
        records: what the log must hold (keys of :attr:`InfluenceLog.recorded`).
        summary: one line for ``--help``.
        timeline: optional ``"module:function"`` giving cumulative scores on a grid in one sweep
            (else the window function runs once per grid window).
        options: fixed keyword arguments.
    """

    target: str
    needs: str
    records: tuple[str, ...]
    summary: str
    timeline: str | None = None
    options: tuple[tuple[str, Any], ...] = ()

    def load(self, attr: str | None = None) -> Callable[..., Any]:
        module_name, _, func = (attr or self.target).partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and module_name.startswith(err.name):
                raise UserError(f"{module_name} is not part of this installation; "
                                f"choose another --method ({', '.join(available_methods())})") from None
            raise
        return getattr(module, func)

    def available(self) -> bool:
        return importlib.util.find_spec(self.target.partition(":")[0]) is not None


_DIT = "lightning_influence.estimators.dit"
_DIFFIN = "lightning_influence.estimators.diffin"
METHODS: dict[str, Method] = {
    "dit": Method(f"{_DIT}:dit", "model+data", (), "DIT, exact adjoint sweep over [0, t2) replayed from the "
                  "checkpoints (math §3)", timeline=f"{_DIT}:timeline"),
    "dit-fd": Method(f"{_DIT}:dit", "model+data", (), "DIT with finite-difference HVPs (first-order gradients only)",
                     timeline=f"{_DIT}:timeline", options=(("hvp", "fd"),)),
    "dit-local": Method(f"{_DIT}:dit_local", "model+data", (), "local DIT (approx.): sweep only inside the window"),
    "dit-gn": Method(f"{_DIT}:dit_gauss_newton", "model", ("gradients",),
                     "DIT with the Gauss-Newton Hessian from the logged gradients (approx., SGD only)"),
    "dit-gn-local": Method(f"{_DIT}:dit_gauss_newton", "model", ("gradients",),
                           "Gauss-Newton DIT swept only inside the window (approx.)", options=(("local", True),)),
    "diffin": Method(f"{_DIFFIN}:diffin", "model+data", ("gradients", "hvp"),
                     "Diff-In, published form at every logged step, from the logged H_z·G_B rows (math §4)",
                     options=(("form", "published"), ("samples", "batch"))),
    "diffin-step": Method(f"{_DIFFIN}:diffin", "model+data", ("gradients",),
                          "Diff-In per-step cumulative form (a named variant, docs/diffin.md)", options=(("form", "step"),)),
    "diffin-self": Method(f"{_DIFFIN}:diffin_self_influence", "model+data", ("gradients",),
                          "Diff-In self-influence I(z, z) for data cleaning (ignores --query)", options=(("form", "step"),)),
    "tracin": Method("lightning_influence.estimators.tracin:tracin", "model", ("gradients",),
                     "TracIn: sum over the window's steps of lr/|B| <q_t, g_j,t> (first order, math §5)"),
}
DEFAULT_METHODS = ("dit", "tracin")  # the first one installed is the default
_RECORD_FLAGS = {"gradients": ("per-sample gradients", "record_gradients=True"),
                 "hvp": ("Hessian-gradient products (H_z·G_B)", "record_gradients=True, record_hvp=True"),
                 "losses": ("per-sample losses", "record_losses=True"),
                 "checkpoints": ("parameter checkpoints", "checkpoint_every_n_steps=1")}
_NEEDS_TEXT = {"log": "log only", "model": "needs --config (model + query data)",
               "model+data": "needs --config (model, training and query data)"}


def available_methods() -> list[str]:
    return [name for name, m in METHODS.items() if m.available()]


def default_method() -> str:
    return next((m for m in DEFAULT_METHODS if m in METHODS and METHODS[m].available()), "tracin")


def check_records(name: str, log: Any) -> None:
    """Fail early, in one line, when the log lacks what ``name`` needs."""
    method = METHODS[name]
    missing = [r for r in method.records if not log.recorded.get(r)]
    if missing:
        what = " and ".join(_RECORD_FLAGS.get(r, (r, ""))[0] for r in missing)
        flags = ", ".join(dict.fromkeys(f for r in missing for f in _RECORD_FLAGS.get(r, ("", f"record_{r}=True"))[1].split(", ")))
        usable = [m for m in available_methods() if all(log.recorded.get(r) for r in METHODS[m].records)]
        alt = f", or use a method this log supports: {', '.join(usable)}" if usable else ""
        raise UserError(f"--method {name} needs {what}, which this log did not record; re-train with "
                        f"InfluenceTracker({flags}){alt}")


# ----------------------------------------------------------------------------------- progress
class Progress:
    """``progress(done, total)`` callback writing steps swept, rate and ETA to stderr."""

    def __init__(self, label: str, enabled: bool = True, stream: Any = None) -> None:
        self.label, self.enabled = label, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self._last_print = 0.0
        self._last_frac = -1.0
        self._open = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total <= 0:
            return
        now = time.perf_counter()
        frac = done / total
        if done < total:
            if self.tty and now - self._last_print < 0.25:
                return
            if not self.tty and int(frac * 10) == int(self._last_frac * 10) and now - self._last_print < 60:
                return  # a log file gets a line per 10% (or per minute)
        self._last_print, self._last_frac = now, frac
        elapsed = now - self.start
        eta = elapsed / frac - elapsed if frac > 0 else float("nan")
        line = f"{self.label}: {done}/{total} steps ({frac:.0%}), {elapsed:.1f}s elapsed, ETA {_seconds(eta)}"
        if self.tty:
            self.stream.write("\r" + line.ljust(78))
            self._open = done < total
            if done >= total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._open:
            self.stream.write("\n")
            self._open = False


def _seconds(s: float) -> str:
    if not np.isfinite(s):
        return "?"
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.1f}min"


def _status(args: argparse.Namespace, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ log loading
def open_log(path: str):
    from lightning_influence.log import InfluenceLog, LogFormatError

    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: no such log directory; pass the log_dir given to InfluenceTracker "
                        "(e.g. runs/digits/influence)")
    if not p.is_dir():
        raise UserError(f"{path}: not a directory; an influence log is the directory InfluenceTracker(log_dir=...) wrote")
    try:
        return InfluenceLog(p)
    except LogFormatError as err:  # the reader names the file, the problem and what to do
        raise UserError(str(err)) from None


def parse_window(log: Any, spec: str | None) -> tuple[int, int]:
    try:
        return log.window(spec)
    except ValueError as err:
        epochs = log.epochs
        extent = "" if "the run has" in str(err) else \
            f"; the run has steps 0..{log.num_steps - 1} and epochs {int(epochs[0])}..{int(epochs[-1])}"
        raise UserError(f"window {spec!r}: {err}{extent} (see `{PROG} info`)") from None


def parse_grid(log: Any, spec: str, span: tuple[int, int]) -> tuple[list[tuple[int, int]], list[str]]:
    """Consecutive windows covering ``span``: ``epochs``, ``N`` equal windows, or explicit steps ``a,b,c``."""
    t1, t2 = span
    spec = spec.strip()
    if spec in ("epoch", "epochs"):
        starts = np.nonzero(np.diff(log.epochs_of_step) != 0)[0] + 1 + int(log.steps[0])
        bounds = sorted({t1, t2, *[int(s) for s in starts if t1 < s < t2]})
        windows = list(zip(bounds[:-1], bounds[1:]))
        labels = [f"e{int(log.epochs_of_step[a - int(log.steps[0])])}" for a, _ in windows]
        return windows, labels
    try:
        if "," in spec:
            bounds = sorted({int(s) for s in spec.split(",") if s.strip()})
        else:
            n = int(spec)
            if n < 1:
                raise ValueError
            bounds = sorted({int(round(b)) for b in np.linspace(t1, t2, n + 1)})
    except ValueError:
        raise UserError(f"--grid {spec!r}: use 'epochs', a number of equal windows (e.g. 10), or step "
                        "boundaries like '0,100,200,480'") from None
    if bounds[0] < 0 or bounds[-1] > log.num_steps or len(bounds) < 2:
        raise UserError(f"--grid {spec!r}: boundaries must lie in 0..{log.num_steps} (the run's steps) and be at least two")
    windows = list(zip(bounds[:-1], bounds[1:]))
    return windows, [f"{a}-{b}" for a, b in windows]


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
        with _quiet():
            dm.setup("fit")
            return dm.train_dataloader().dataset

    @cached_property
    def val_batch(self) -> Any:
        dm = self._dm("validation set")
        with _quiet():
            dm.setup("validate")
            loader = dm.val_dataloader()
        loaders = loader if isinstance(loader, (list, tuple)) else [loader]
        return _concat_batches([b for lo in loaders for b in lo])

    @cached_property
    def test_dataset(self) -> Any:
        dm = self._dm("test set")
        with _quiet():
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
def _quiet() -> Iterator[None]:
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
        with _quiet(), contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stderr):
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


# ----------------------------------------------------------------------------------- queries
@dataclass
class QuerySpec:
    """A parsed ``--query``: ``val_loss``, ``test:ID``, ``pred:ID[:CLASS]``, ``margin:ID[:CLASS]``."""

    kind: str
    index: int | None = None
    target: int | None = None
    text: str = ""

    @property
    def is_loss(self) -> bool:
        return self.kind in ("val_loss", "test")


def parse_query(text: str) -> QuerySpec:
    parts = [p.strip() for p in text.strip().split(":")]
    try:
        if parts == ["val_loss"]:
            return QuerySpec("val_loss", text="val_loss")
        if parts[0] == "test" and len(parts) == 2:
            return QuerySpec("test", int(parts[1]), text=text.strip())
        if parts[0] in ("pred", "margin") and len(parts) in (2, 3):
            return QuerySpec(parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else None, text=text.strip())
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"unknown query {text!r}: use val_loss, test:ID, pred:ID[:CLASS] or margin:ID[:CLASS]")


def build_query(specs: Sequence[QuerySpec], ctx: RunContext | None):
    """One query callable answering every spec (a vector query swept in one pass), and the names."""
    import torch

    from lightning_influence import queries

    if ctx is None:
        raise UserError("queries need the model and data: pass --config")
    parts = []
    names = []
    for spec in specs:
        if spec.kind == "val_loss":
            parts.append(queries.mean_loss(ctx.val_batch, name="val_loss"))
            names.append("val_loss")
            continue
        ds = ctx.test_dataset
        if not 0 <= spec.index < len(ds):
            raise UserError(f"--query {spec.text}: unknown test sample id {spec.index}; the test set has {len(ds)} "
                            f"samples (ids 0..{len(ds) - 1})")
        from torch.utils.data import default_collate

        batch = default_collate([ds[spec.index]])
        if spec.kind == "test":
            parts.append(queries.sample_losses(batch, names=[spec.text]))
        else:
            target = spec.target
            if target is None:
                y = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
                if y is None:
                    raise UserError(f"--query {spec.text}: the test item has no label; give the class as {spec.kind}:ID:CLASS")
                target = int(y.reshape(-1)[0])
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            parts.append(queries.prediction(x, target, margin=spec.kind == "margin", name=spec.text))
        names.append(spec.text)

    def f(module: Any) -> Any:
        return torch.cat([p(module).reshape(-1) for p in parts])

    f.query_names = names  # type: ignore[attr-defined]
    return f, names


def query_columns(result_names: Sequence[str], names: Sequence[str], specs: Sequence[QuerySpec]) -> list[tuple[int, str, bool]]:
    """``(column, name, is_loss)`` of each score column; a method may answer its own query (self-influence)."""
    if list(result_names) == list(names):
        return [(i, n, s.is_loss) for i, (n, s) in enumerate(zip(names, specs))]
    return [(i, str(n), True) for i, n in enumerate(result_names)]


# ------------------------------------------------------------------------------- computation
def call_with(fn: Callable[..., Any], log: Any, method: Method | None = None, **available: Any) -> Any:
    """Call ``fn(log, ...)`` with the keyword arguments it accepts among ``available``."""
    params = inspect.signature(fn).parameters
    kwargs = {k: (v() if isinstance(v, _Lazy) else v) for k, v in available.items() if k in params}
    return fn(log, **kwargs, **dict(method.options if method else ()))


class _Lazy:
    """A value computed only for an estimator that asks for it (e.g. the validation batch)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn

    def __call__(self) -> Any:
        return self.fn()


def _inputs(ctx: RunContext | None) -> dict[str, Any]:
    if ctx is None:
        return {}
    return {"module": ctx.module, "train_data": _Lazy(lambda: ctx.train_dataset), "val_data": _Lazy(lambda: ctx.val_batch)}


def run_method(name: str, log: Any, query: Any, ctx: RunContext | None, window: tuple[int, int],
               progress: Progress | None) -> Any:
    """Scores of every sample for one window, from the registered estimator."""
    method = METHODS[name]
    try:
        return call_with(method.load(), log, method, query=query, window=window, progress=progress, **_inputs(ctx))
    finally:
        if progress is not None:
            progress.close()


def compute_windows(args: argparse.Namespace, log: Any, query: Any, ctx: RunContext | None,
                    windows: list[tuple[int, int]]) -> tuple[np.ndarray, str, dict[str, Any]]:
    """``(N, Q, W)`` scores of every window of a grid, the method's name and its info."""
    method = METHODS[args.method]
    if method.timeline is not None:
        bounds = [windows[0][0]] + [t2 for _, t2 in windows]
        progress = Progress(f"{args.method} timeline", not args.quiet)
        try:
            tl = call_with(method.load(method.timeline), log, method, query=query, grid=bounds, progress=progress,
                           **_inputs(ctx))
        finally:
            progress.close()
        cumulative = np.stack([tl.at(t) for t in bounds], axis=2)  # (N, Q, G)
        return np.diff(cumulative, axis=2), tl.method, {**tl.info, "query_names": list(tl.query_names)}
    out, name, info = [], args.method, {}
    for w, (t1, t2) in enumerate(windows):
        progress = Progress(f"{args.method} window {w + 1}/{len(windows)} [{t1}, {t2})", not args.quiet)
        scores = run_method(args.method, log, query, ctx, (t1, t2), progress)
        out.append(scores.scores)
        name, info = scores.method, {**scores.info, "query_names": list(scores.query_names)}
    return np.stack(out, axis=2), name, info


def _prepare(args: argparse.Namespace) -> tuple[Any, RunContext | None]:
    log = open_log(args.log)
    if log.num_steps == 0:
        raise UserError(f"{args.log}: the log holds no completed step yet: {log.end_note}")
    args.method = args.method or default_method()
    check_records(args.method, log)
    method = METHODS[args.method]
    ctx = None
    if method.needs != "log" or args.config:
        _status(args, f"instantiating the model and data from {args.config} ...")
        ctx = load_context(args, log)
    return log, ctx


# ------------------------------------------------------------------------------------ output
def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Aligned plain-text table (numbers right-aligned, text left-aligned)."""
    cells = [[str(c) for c in header]] + [[_cell(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(_is_number(r[i]) for r in rows) if rows else False for i in range(len(header))]
    lines = []
    for r in cells:
        lines.append("  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric)).rstrip())
    return "\n".join(lines)


def _cell(c: Any) -> str:
    if isinstance(c, float):
        return f"{c:.4e}"
    return "" if c is None else str(c)


def _is_number(c: Any) -> bool:
    if isinstance(c, str):
        try:
            float(c)
            return True
        except ValueError:
            return c in ("", "?", "-")
    return isinstance(c, (int, float, np.integer, np.floating)) and not isinstance(c, bool)


def emit(args: argparse.Namespace, text: str) -> None:
    if getattr(args, "out", None):
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text if text.endswith("\n") else text + "\n")
        _status(args, f"wrote {args.out}")
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


def output_format(args: argparse.Namespace) -> str:
    if args.format:
        return args.format
    suffix = Path(args.out).suffix.lower() if getattr(args, "out", None) else ""
    return {".csv": "csv", ".json": "json"}.get(suffix, "table")


def _csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(["" if c is None else (repr(float(c)) if isinstance(c, (float, np.floating)) else c) for c in r])
    return buf.getvalue()


def _json(obj: Any) -> str:
    def default(o: Any) -> Any:
        if isinstance(o, np.integer):
            return int(o)
        if isinstance(o, np.floating):
            return float(o)
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, (set, tuple)):
            return list(o)
        return str(o)

    return json.dumps(obj, indent=2, default=default)


def ranked(scores: np.ndarray, sort: str, top: int | None) -> np.ndarray:
    """Ids ordered by ``sort`` (``negative``: most negative first, ``positive``, ``abs``), the first ``top``."""
    key = {"negative": scores, "positive": -scores, "abs": -np.abs(scores)}[sort]
    order = np.argsort(key, kind="stable")
    return order if not top else order[:top]


def _sign_line(is_loss: bool, name: str) -> str:
    if name == "self":
        return ("positive = removing the sample raises its own loss (it is fitted only because it is trained on: "
                "look there for mislabelled samples, --sort positive)")
    if is_loss:
        return f"negative = harmful (removing the sample lowers {name}), positive = helpful"
    return f"negative = removing the sample lowers {name} (it pushed it up), positive = it pushed it down"


def _flip_cell(ctx: RunContext | None, j: int) -> str | None:
    flipped = ctx.flipped if ctx else None
    return None if flipped is None else ("yes" if j in flipped else "")


# ---------------------------------------------------------------------------------- commands
def cmd_info(args: argparse.Namespace) -> int:
    from lightning_influence.log.format import list_segments, list_unfinished

    log = open_log(args.log)  # checks every segment's (checksummed) index; a damaged file is named
    root = Path(args.log)
    files = [p for p in root.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    meta, recorded = log.meta, log.recorded
    T, ckpts = log.num_steps, log.checkpoint_steps
    every = int(meta.get("every_n_steps", 1))
    batch_sizes = np.array([len(log.batch_ids(t)) for t in log.steps]) if T else np.zeros(1)
    ids_seen = log.all_ids()
    problems, notes = [], []
    if not log.finished:
        problems.append(log.end_note)
    unfinished = list_unfinished(root)
    if unfinished and log.finished:
        problems.append(f"unfinished segment file(s) {[str(p.relative_to(root)) for p in unfinished]}: a write was "
                        "interrupted; they are ignored (delete them)")
    if recorded.get("gradients"):
        missing = [int(t) for t in log.steps if t % every == 0 and not log.has_grads(int(t))]
        if missing:
            problems.append(f"no gradient rows at steps {missing[:10]} (expected every {every} steps)")
    if len(ids_seen) and int(ids_seen.max()) >= log.dataset_size:
        problems.append(f"sample ids up to {int(ids_seen.max())} exceed the dataset size {log.dataset_size}")
    if args.verify and T:
        bad = _verify(log, args)
        if bad:
            problems.append(f"non-finite values at steps {bad[:10]}")
        notes.append("--verify: every record read back, checksums verified")
    groups = meta.get("optimizer", {}).get("param_groups", [])
    proj_dim = (meta.get("projection") or {}).get("dim")
    cols = log.projector().out_dim if meta.get("tracked_params") else 0
    usable = [n for n, m in METHODS.items() if m.available() and all(recorded.get(r) for r in m.records)]
    unusable = {n: [r for r in m.records if not recorded.get(r)] for n, m in METHODS.items()
                if m.available() and n not in usable}
    epochs, counts = np.unique(log.epochs_of_step, return_counts=True)
    summary = {
        "log": str(root), "size_bytes": size, "files": len(files),
        "segments": sum(len(v) for v in list_segments(root).values()), "ranks": log.ranks,
        "created": meta.get("created"), "versions": meta.get("versions"),
        "module_class": meta.get("module_class"), "datamodule_class": meta.get("datamodule_class"),
        "optimizer": meta.get("optimizer", {}).get("class"),
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in groups],
        "steps": T, "epochs": [int(epochs[0]), int(epochs[-1])] if T else [],
        "steps_per_epoch": {int(e): int(c) for e, c in zip(epochs, counts)},
        "batch_size": {"mean": float(batch_sizes.mean()), "min": int(batch_sizes.min()), "max": int(batch_sizes.max())},
        "dataset_size": log.dataset_size if T else meta.get("dataset_size"), "ids_seen": int(len(ids_seen)),
        "recorded": recorded, "every_n_steps": every, "gradient_columns": cols, "projection": proj_dim,
        "storage_dtype": meta.get("storage_dtype"),
        "checkpoints": {"count": len(ckpts), "every_n_steps": meta.get("checkpoint_every_n_steps"), "final": log.finished},
        "state": log.end_note,
        "methods": {"usable": usable, "not_usable": unusable},
        "integrity": {"ok": not problems, "problems": problems, "notes": notes},
    }
    code = 2 if problems and args.strict else 0
    if output_format(args) == "json":
        emit(args, _json(summary))
        return code
    v = summary["versions"] or {}
    created = time.strftime("%Y-%m-%d %H:%M", time.localtime(summary["created"])) if summary["created"] else "?"
    hyper = "; ".join(", ".join(f"{k}={g[k]}" for k in ("lr", "momentum", "weight_decay", "betas") if k in g)
                      for g in summary["param_groups"])
    per_epoch = "/".join(str(c) for c in sorted(set(counts.tolist())))
    what = [k for k in ("ids", "lrs", "losses", "gradients", "hvp", "checkpoints") if recorded.get(k)]
    rows = [
        ("log", f"{root}  ({_size(size)} on disk, {len(files)} files, {summary['segments']} segments, ranks {log.ranks})"),
        ("created", f"{created} with lightning-influence {v.get('lightning-influence')}, torch {v.get('torch')}, "
                    f"lightning {v.get('lightning')}"),
        ("model", str(summary["module_class"]) + (f", data {summary['datamodule_class']}" if summary["datamodule_class"] else "")),
        ("optimizer", f"{summary['optimizer']} ({len(groups)} param group{'s' * (len(groups) != 1)}: {hyper})"),
        ("steps", f"{T} (0..{T - 1}), epochs {int(epochs[0])}..{int(epochs[-1])} ({per_epoch} steps per epoch), "
                  f"batch size {summary['batch_size']['mean']:.4g}" if T else "0 (no step recorded)"),
        ("samples", f"{summary['dataset_size']} training ids, {summary['ids_seen']} seen in the log"),
        ("recorded", ", ".join(what)),
        ("gradients", f"{cols} columns per sample ({f'projected, {proj_dim} per tensor' if proj_dim else 'full'}, "
                      f"{summary['storage_dtype']}), every {every} step{'s' * (every != 1)}"
                      + (", with HVP products" if recorded.get("hvp") else "") if recorded.get("gradients") else "not recorded"),
        ("checkpoints", f"{len(ckpts)} (every {meta.get('checkpoint_every_n_steps') or '-'} steps, "
                        f"{'final θ_T stored' if log.finished else 'no final θ_T'})"),
        ("state", log.end_note),
        ("methods", ", ".join(usable) + "".join(f"; not {n} (needs {', '.join(r)})" for n, r in unusable.items())),
        ("integrity", ("OK" + (f" ({'; '.join(notes)})" if notes else "")) if not problems
         else "PROBLEMS: " + "; ".join(problems)),
    ]
    width = max(len(k) for k, _ in rows)
    emit(args, "\n".join(f"{k.ljust(width)}  {val}" for k, val in rows))
    return code


def _verify(log: Any, args: argparse.Namespace) -> list[int]:
    """Read back every record (the reader verifies the fletcher32 checksums); steps with non-finite values."""
    fields = [f for f, rec in (("loss", "losses"), ("grad", "gradients"), ("hvp", "hvp")) if log.recorded.get(rec)]
    bad: set[int] = set()
    progress = Progress("verify", not args.quiet)
    T = log.num_steps
    for group in ([f for f in fields if f == "loss"], [f for f in fields if f != "loss"]):
        if not group:
            continue
        for rec in log.iter_steps(0, T, fields=group):
            for arr in (rec.losses, rec.grads, rec.hvps):
                if arr is not None and not np.all(np.isfinite(arr)):
                    bad.add(rec.step)
            if "loss" not in group:
                progress(rec.step + 1, T)
    progress.close()
    for t in log.checkpoint_steps:
        log.checkpoint(t)
    return sorted(bad)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def cmd_query(args: argparse.Namespace) -> int:
    log, ctx = _prepare(args)
    specs = args.query or [parse_query("val_loss")]
    windows = [(w, parse_window(log, w)) for w in (args.window or [None])]
    query, names = build_query(specs, ctx)
    results = []
    for spec_text, (t1, t2) in windows:
        label = spec_text or "whole run"
        progress = Progress(f"{args.method} [{t1}, {t2})", not args.quiet)
        scores = run_method(args.method, log, query, ctx, (t1, t2), progress)
        for qi, qname, is_loss in query_columns(scores.query_names, names, specs):
            s = scores.column(qi)
            ids = ranked(s, args.sort, args.top)
            labels = ctx.labels(ids) if ctx else np.full(len(ids), -1)
            rows = [{"rank": r, "id": int(j), "score": float(s[j]),
                     "label": int(lb) if lb >= 0 else None, "flipped": _flip_cell(ctx, int(j))}
                    for r, (j, lb) in enumerate(zip(ids, labels), 1)]
            results.append({"method": scores.method, "query": qname, "loss_query": is_loss, "window": label,
                            "steps": [int(t1), int(t2)], "n_samples": int(len(s)), "rows": rows,
                            "flipped_total": len(ctx.flipped) if ctx and ctx.flipped is not None else None,
                            "info": scores.info})
    fmt = output_format(args)
    if fmt == "json":
        emit(args, _json({"log": args.log, "results": results}))
    elif fmt == "csv":
        flips = any(r["flipped_total"] is not None for r in results)
        header = ["method", "query", "window", "t1", "t2", "rank", "id", "score", "label"] + (["flipped"] if flips else [])
        body = [[res["method"], res["query"], res["window"], *res["steps"], row["rank"], row["id"], row["score"], row["label"]]
                + ([row["flipped"] == "yes"] if flips else []) for res in results for row in res["rows"]]
        emit(args, _csv(header, body))
    else:
        emit(args, "\n\n".join(_query_text(res, args) for res in results))
    return 0


def _query_text(res: dict[str, Any], args: argparse.Namespace) -> str:
    t1, t2 = res["steps"]
    head = [f"{res['method']}: query {res['query']}, window {res['window']} = steps [{t1}, {t2}), "
            f"{res['n_samples']} training samples, sorted {args.sort} first",
            f"sign: {_sign_line(res['loss_query'], res['query'])}"]
    has_label = any(r["label"] is not None for r in res["rows"])
    has_flip = res["flipped_total"] is not None
    header = ["rank", "id", "score"] + (["label"] if has_label else []) + (["flipped"] if has_flip else [])
    rows = [[r["rank"], r["id"], r["score"]] + ([r["label"] if r["label"] is not None else "?"] if has_label else [])
            + ([r["flipped"]] if has_flip else []) for r in res["rows"]]
    tail = []
    if has_flip and res["rows"]:
        hits = sum(r["flipped"] == "yes" for r in res["rows"])
        tail.append(f"flipped labels among these {len(res['rows'])}: {hits} ({hits / len(res['rows']):.0%}); "
                    f"{res['flipped_total']} of {res['n_samples']} ({res['flipped_total'] / res['n_samples']:.0%}) are flipped overall")
    return "\n".join(head + [format_table(header, rows)] + tail)


def _timeline_data(args: argparse.Namespace):
    log, ctx = _prepare(args)
    span = parse_window(log, args.window)
    windows, labels = parse_grid(log, args.grid, span)
    specs = args.query or [parse_query("val_loss")]
    query, names = build_query(specs, ctx)
    scores, method_name, info = compute_windows(args, log, query, ctx, windows)
    columns = query_columns(info.pop("query_names"), names, specs)
    return log, ctx, columns, windows, labels, scores, method_name, info


def _patterns(x: np.ndarray) -> tuple[np.ndarray | None, str]:
    from lightning_influence.evaluation import classify_windows

    if x.shape[1] < 3:
        return None, f"patterns need at least 3 windows, the grid has {x.shape[1]}"
    if x.shape[0] < 2:
        return None, "patterns need at least 2 samples"
    return classify_windows(x).labels, ""


def cmd_timeline(args: argparse.Namespace) -> int:
    log, ctx, columns, windows, labels, scores, method_name, info = _timeline_data(args)
    fmt = output_format(args)
    top = args.top if args.top is not None else (20 if fmt == "table" else 0)
    results, texts = [], []
    for qi, qname, is_loss in columns:
        x = scores[:, qi, :]
        patterns, why = _patterns(x)
        total = x.sum(axis=1)
        ids = ranked(total, args.sort, None)
        if args.pattern:
            if patterns is None:
                raise UserError(f"--pattern: {why}; choose a finer --grid")
            ids = ids[patterns[ids] == args.pattern]
        ids = ids[:top] if top else ids
        lbl = ctx.labels(ids) if ctx else np.full(len(ids), -1)
        counts = {p: int(np.count_nonzero(patterns == p)) for p in ("early", "late", "fluctuating", "stable")} \
            if patterns is not None else {}
        flipped = ctx.flipped if ctx else None
        rows = [{"id": int(j), "label": int(lb) if lb >= 0 else None, "flipped": _flip_cell(ctx, int(j)),
                 "pattern": None if patterns is None else str(patterns[j]), "total": float(total[j]),
                 "windows": [float(v) for v in x[j]]} for j, lb in zip(ids, lbl)]
        results.append({"method": method_name, "query": qname, "grid": [list(w) for w in windows], "grid_labels": labels,
                        "pattern_counts": counts, "rows": rows})
        if fmt == "table":
            head = [f"{method_name}: query {qname}, {len(windows)} windows over steps [{windows[0][0]}, {windows[-1][1]}) "
                    f"({args.grid}), {x.shape[0]} samples; {_sign_line(is_loss, qname)}"]
            if patterns is None:
                head.append(f"patterns: none ({why})")
            else:
                per = []
                for p, c in counts.items():
                    extra = f" ({len(set(np.nonzero(patterns == p)[0].tolist()) & flipped)} flipped)" if flipped is not None else ""
                    per.append(f"{p} {c}{extra}")
                head.append("patterns: " + ", ".join(per))
            has_label = any(r["label"] is not None for r in rows)
            header = ["id"] + (["label"] if has_label else []) + (["flipped"] if flipped is not None else []) + \
                ["pattern", "total"] + labels
            body = [[r["id"]] + ([r["label"] if r["label"] is not None else "?"] if has_label else [])
                    + ([r["flipped"]] if flipped is not None else []) + [r["pattern"] or "-", r["total"]]
                    + [_short(v) for v in r["windows"]] for r in rows]
            texts.append("\n".join(head + [format_table(header, body)]))
    if fmt == "json":
        emit(args, _json({"log": args.log, "results": results, "info": info}))
    elif fmt == "csv":
        header = ["query", "id", "label", "flipped", "pattern", "total"] + labels
        body = [[res["query"], r["id"], r["label"], r["flipped"] == "yes" if r["flipped"] is not None else None,
                 r["pattern"], r["total"], *r["windows"]] for res in results for r in res["rows"]]
        emit(args, _csv(header, body))
    else:
        emit(args, "\n\n".join(texts))
    return 0


def _short(v: float) -> str:
    return f"{v:.2e}"


def _parse_samples(spec: str, n: int, ctx: RunContext | None, estimate: Callable[[], np.ndarray], seed: int) -> np.ndarray:
    kind, _, arg = spec.partition(":")
    try:
        if kind in ("top", "random", "flipped", "bottom"):
            k = int(arg)
            if k < 1:
                raise ValueError
            if kind == "top":
                return np.argsort(estimate(), kind="stable")[:k]
            if kind == "bottom":
                return np.argsort(-estimate(), kind="stable")[:k]
            if kind == "random":
                return np.sort(np.random.default_rng(seed).choice(n, size=min(k, n), replace=False))
            flipped = ctx.flipped if ctx else None
            if not flipped:
                raise UserError("--samples flipped:K needs the datamodule's `flipped` ids, which this run does not have")
            return np.array(sorted(flipped)[:k])
        ids = np.array([int(s) for s in spec.split(",") if s.strip()], dtype=np.int64)
    except ValueError:
        raise UserError(f"--samples {spec!r}: use ids '3,17,42', 'top:K' (most negative), 'bottom:K', 'random:K' or "
                        "'flipped:K'") from None
    bad = ids[(ids < 0) | (ids >= n)]
    if len(bad) or not len(ids):
        raise UserError(f"--samples: unknown sample id {int(bad[0]) if len(bad) else spec!r}; training ids are 0..{n - 1}")
    return ids


GROUND_TRUTH = "lightning_influence.evaluation.ground_truth:replay_loo"


def cmd_evaluate(args: argparse.Namespace) -> int:
    from lightning_influence.evaluation import auroc, precision_at_k, summarize

    methods = args.method or [default_method()]
    args.method = methods[0]
    log, ctx = _prepare(args)
    for m in methods[1:]:
        check_records(m, log)
    t1, t2 = parse_window(log, args.window)
    specs = args.query or [parse_query("val_loss")]
    query, names = build_query(specs, ctx)
    n = log.dataset_size
    estimates: dict[str, np.ndarray] = {}
    for m in methods:
        scores = run_method(m, log, query, ctx, (t1, t2), Progress(f"{m} [{t1}, {t2})", not args.quiet))
        estimates[scores.method] = scores.column(0)
        qname = query_columns(scores.query_names, names, specs)[0][1]
    first = next(iter(estimates.values()))
    samples = _parse_samples(args.samples, n, ctx, lambda: first, args.seed)
    truth = None
    if args.truth == "replay":
        fn = Method(GROUND_TRUTH, "model+data", (), "").load()
        _status(args, f"replaying training without each of {len(samples)} samples (ground truth) ...")
        progress = Progress("replay LOO", not args.quiet)
        try:
            result = call_with(fn, log, query=query, window=(t1, t2), sample_ids=samples, progress=progress,
                               in_window_only=args.in_window, **_inputs(ctx))
        finally:
            progress.close()
        truth = np.asarray(result.window(t1, t2), dtype=np.float64)  # LOO(t2) - LOO(t1), in the order of `samples`
    trust = _trust_tools(args, log, ctx, query, samples, estimates, truth, (t1, t2))
    flipped = ctx.flipped if ctx else None
    labels = ctx.labels(samples) if ctx else np.full(len(samples), -1)
    metrics: dict[str, dict[str, float]] = {}
    for name, est in estimates.items():
        row: dict[str, float] = {}
        if truth is not None and len(samples) >= 2:
            row.update(summarize(est[samples], truth, k=max(1, min(len(samples) // 2, 10))))
            row["sign_agreement"] = float(np.mean(np.sign(est[samples]) == np.sign(truth)))
        if "pbrf" in trust and len(samples) >= 2:
            versus = summarize(est[samples], trust["pbrf"].scores[:, 0])
            row.update({f"pbrf_{k}": versus[k] for k in ("pearson", "spearman")})
        if flipped:
            mask = np.isin(np.arange(n), list(flipped))
            row["flipped_auroc"] = auroc(-est, mask)
            row[f"flipped_precision@{len(flipped)}"] = precision_at_k(-est, mask, len(flipped))
        metrics[name] = row
    result = {"log": args.log, "window": args.window or "whole run", "steps": [t1, t2], "query": qname,
              "samples": [{"id": int(j), "label": int(lb) if lb >= 0 else None, "flipped": _flip_cell(ctx, int(j)),
                           "truth": None if truth is None else float(truth[k]),
                           **({"pbrf": float(trust["pbrf"].scores[k, 0])} if "pbrf" in trust else {}),
                           **{m: float(e[j]) for m, e in estimates.items()}}
                          for k, (j, lb) in enumerate(zip(samples, labels))],
              "metrics": metrics, **{k: v.to_dict() for k, v in trust.items()}}
    fmt = output_format(args)
    if fmt == "json":
        emit(args, _json(result))
        return 0
    if fmt == "csv":
        header = ["id", "label", "flipped", "truth", *estimates]
        emit(args, _csv(header, [[s["id"], s["label"], s["flipped"], s["truth"], *[s[m] for m in estimates]]
                                 for s in result["samples"]]))
        return 0
    head = [f"evaluate: query {qname}, window {result['window']} = steps [{t1}, {t2}), {len(samples)} samples "
            f"({args.samples}), ground truth: {'replay leave-one-out' if truth is not None else 'none'}"]
    extra = ["pbrf"] if "pbrf" in trust else []
    header = ["id", "label", "flipped", "truth", *extra, *estimates]
    body = [[s["id"], s["label"] if s["label"] is not None else "?", s["flipped"] or "", s["truth"],
             *[s[c] for c in extra], *[s[m] for m in estimates]] for s in result["samples"]]
    keys = sorted({k for row in metrics.values() for k in row}, key=lambda k: (k.startswith("flipped"), k))
    mtable = format_table(["method", *keys], [[m, *[f"{metrics[m].get(k, float('nan')):.3f}" for k in keys]]
                                             for m in metrics]) if keys else "no metric: no ground truth and no known flipped labels"
    emit(args, "\n".join(head + [format_table(header, body), "", mtable] + ["\n" + t.table() for t in trust.values()]))
    return 0


def _trust_tools(args: argparse.Namespace, log: Any, ctx: RunContext | None, query: Any, samples: np.ndarray,
                 estimates: dict[str, np.ndarray], truth: np.ndarray | None, window: tuple[int, int]) -> dict[str, Any]:
    """``--pbrf``/``--gap``, ``--datamodel``, ``--groups``: what the scores answer and how far to trust them."""
    if not (args.pbrf or args.gap or args.datamodel or args.groups):
        return {}
    if window != (0, log.num_steps):
        raise UserError("--pbrf, --gap, --datamodel and --groups measure the whole run; drop --window")
    from lightning_influence.evaluation import datamodel_quality, gap_decomposition, group_additivity, pbrf

    inputs = {"module": ctx.module, "train_data": ctx.train_dataset}
    out: dict[str, Any] = {}
    if args.pbrf or args.gap:
        _status(args, f"solving the proximal Bregman response for {len(samples)} samples ...")
        out["pbrf"] = pbrf(log, query=query, samples=samples, damping=args.damping, steps=args.pbrf_steps,
                           output_loss=args.output_loss, **inputs)
    if args.gap:
        _status(args, "decomposing the LOO vs PBRF gap (warm start, proximity, Bregman, linearisation) ...")
        out["gap"] = gap_decomposition(log, query=query, samples=samples, damping=args.damping, steps=args.pbrf_steps,
                                       output_loss=args.output_loss, pbrf_result=out["pbrf"],
                                       loo=None if truth is None else truth[:, None], **inputs)
    if args.datamodel:
        _status(args, f"noise stability: {args.pairs} correlated subset pairs at keep-probability {args.keep} ...")
        out["datamodel"] = datamodel_quality(log, query=query, p=args.keep, pairs=args.pairs, scores=estimates,
                                             workers=args.workers, **inputs)
    if args.groups:
        _status(args, "replaying group removals ...")
        n = log.dataset_size
        residual = {out["datamodel"].p: out["datamodel"].mass.residual} if "datamodel" in out else None
        out["groups"] = group_additivity(log, query=query, scores=estimates, fractions=args.group_sizes,
                                         kinds=args.group_kinds, labels=ctx.labels(np.arange(n)),
                                         repeats=args.group_repeats, residual=residual, **inputs)
    return out


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def cmd_tensorboard(args: argparse.Namespace) -> int:
    from lightning_influence.tensorboard import ExportData, export

    log, ctx, columns, windows, labels, scores, method_name, info = _timeline_data(args)
    run_dir = Path(args.logdir) / (args.run or args.method)
    n = scores.shape[0]
    embedding, note = None, ""
    if args.embedding and log.recorded.get("gradients"):
        embedding, note = _last_gradients(log, windows[-1], n)
    elif args.embedding:
        note = "no gradients recorded, no projector view"
    written_all: dict[str, list[str]] = {}
    train_labels = ctx.labels(np.arange(n)) if ctx else None
    for qi, qname, is_loss in columns:
        x = scores[:, qi, :]
        patterns, why = _patterns(x)
        data = ExportData(query=qname, method=method_name, windows=windows, window_labels=labels, window_scores=x,
                          loss_query=is_loss, patterns=patterns, labels=train_labels,
                          flipped=ctx.flipped if ctx else None, embedding=embedding,
                          embedding_note=note, info={"log": args.log, "grid": args.grid, **({"patterns": why} if why else {})})
        for kind, tags in export(run_dir, data, top_k=args.top or 10).items():
            written_all.setdefault(kind, []).extend(tags)
    lines = [f"wrote {method_name} scores of {n} samples over {len(windows)} windows to {run_dir}"]
    for kind, tags in written_all.items():
        if tags:
            shown = ", ".join(tags[:4]) + (f", ... ({len(tags)} tags)" if len(tags) > 4 else "")
            lines.append(f"  {kind}: {shown}")
    lines.append(f"view: tensorboard --logdir {args.logdir}")
    emit(args, "\n".join(lines))
    return 0


def _last_gradients(log: Any, window: tuple[int, int], n: int) -> tuple[np.ndarray, str]:
    """Each sample's gradient row at its last recorded step inside ``window`` (NaN where none)."""
    out = None
    for rec in log.iter_steps(window[0], window[1], fields=("grad",)):
        if out is None:
            out = np.full((n, rec.grads.shape[1]), np.nan, dtype=np.float32)
        out[rec.ids] = rec.grads
    note = (f"each sample's logged gradient at its last step in [{window[0]}, {window[1]}), reduced to its top 64 "
            "principal components")
    return out, note


# ------------------------------------------------------------------------------------ parser
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    width = max(len(n) for n in METHODS) + 2
    methods = "\n".join(
        f"  {name:<{width}}{m.summary}\n  {'':<{width}}{_NEEDS_TEXT[m.needs]}"
        + (f"; the log must hold {', '.join(m.records)}" if m.records else "") + ("" if m.available() else " (not installed)")
        for name, m in METHODS.items())
    notes = ("Model and data: weights come from the log's checkpoints; the architecture and the data come from the "
             "LightningCLI config the run was trained with (--config), its model and data classes from the config's "
             "class_path, --model-class/--data-class, or the classes the log recorded. 'log only' methods and `info` "
             "read nothing but the log.")
    parser = _Parser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
                     description="Ask an influence log (written by InfluenceTracker) which training samples shaped "
                                 "the model, and when.",
                     epilog=f"methods (--method):\n{methods}\n\n{textwrap.fill(notes, 100)}\n\n"
                            "Errors print one line and exit with code 2; --debug shows the traceback.")
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    common = _Parser(add_help=False)
    common.add_argument("log", metavar="LOG", help="the influence log directory (InfluenceTracker's log_dir)")
    common.add_argument("--debug", action="store_true", help="show the traceback on errors")
    common.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    common.add_argument("--out", "-o", metavar="FILE", help="write the result to FILE (format from its extension)")
    common.add_argument("--format", "-f", choices=("table", "csv", "json"), help="output format (default: table)")

    model = _Parser(add_help=False)
    g = model.add_argument_group("model and data (for methods that need them)")
    g.add_argument("--config", "-c", metavar="YAML", help="the LightningCLI config the run was trained with")
    g.add_argument("--model-class", metavar="CLASS", help="LightningModule class, when the config has no class_path")
    g.add_argument("--data-class", metavar="CLASS", help="LightningDataModule class, when the config has no class_path")

    qparent = _Parser(add_help=False)
    qg = qparent.add_argument_group("query")
    qg.add_argument("--query", action="append", type=parse_query, metavar="Q",
                    help="what the scores explain (repeatable): val_loss (mean validation loss, default), test:ID (loss "
                         "of test sample ID), pred:ID[:CLASS] (logit of CLASS, default its label), margin:ID[:CLASS]")
    qg.add_argument("--sort", choices=("negative", "positive", "abs"), default="negative",
                    help="order of the rows: most negative first (default; for a loss query: most harmful), most "
                         "positive, or largest magnitude")

    method_help = f"estimator ({', '.join(METHODS)}; default: the first installed of {', '.join(DEFAULT_METHODS)})"

    p = sub.add_parser("info", parents=[common], help="run metadata, steps, epochs, records, size, integrity",
                       description="Run metadata, steps and epochs, what was recorded, size on disk, integrity checks "
                                   "and which methods the log supports. Reads only the log.")
    p.add_argument("--verify", action="store_true", help="read back every record and check it (slow on big logs)")
    p.add_argument("--strict", action="store_true", help="exit with code 2 when an integrity problem is found")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("query", parents=[common, model, qparent], help="top samples for a query over windows",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Score every training sample for a query over one or more windows and list the top.",
                       epilog="examples:\n"
                              f"  {PROG} query runs/digits/influence --config configs/digits.yaml --window 'epoch 14:'\n"
                              f"  {PROG} query LOG -c CONFIG --window 100:500 --window 0.8:1.0 --query test:3 -o top.csv")
    p.add_argument("--method", "-m", choices=list(METHODS), metavar="METHOD", help=method_help)
    p.add_argument("--window", "-w", action="append", metavar="W",
                   help="steps '100:500', fractions '0.8:1.0' or epochs 'epoch 3:5' (epochs 3 and 4); empty ends mean "
                        "start/end; repeatable; default: the whole run")
    p.add_argument("--top", "-k", type=int, default=10, help="rows per window and query (0: all samples; default 10)")
    p.set_defaults(func=cmd_query)

    for name, func, summary in (("timeline", cmd_timeline, "scores on a grid of windows and each sample's temporal pattern"),
                                ("tensorboard", cmd_tensorboard, "export a query's results to TensorBoard")):
        p = sub.add_parser(name, parents=[common, model, qparent], help=summary, description=summary + ".")
        p.add_argument("--method", "-m", choices=list(METHODS), metavar="METHOD", help=method_help)
        p.add_argument("--grid", "-g", default="epochs",
                       help="windows: 'epochs' (default), a number of equal windows, or boundaries '0,100,200,480'")
        p.add_argument("--window", "-w", metavar="W", help="restrict the grid to this span (default: the whole run)")
        p.set_defaults(func=func)
    timeline, tb = sub.choices["timeline"], sub.choices["tensorboard"]
    timeline.add_argument("--top", "-k", type=int, default=None,
                          help="rows shown (default: 20 in a table, all samples in CSV/JSON; 0: all)")
    timeline.add_argument("--pattern", choices=("early", "late", "fluctuating", "stable"), help="only samples of this pattern")
    tb.add_argument("--logdir", required=True, help="TensorBoard log directory to write into")
    tb.add_argument("--run", help="run name (sub-directory of --logdir; default: the method)")
    tb.add_argument("--top", "-k", type=int, default=10, help="rows of the top-k tables (default 10)")
    tb.add_argument("--no-embedding", dest="embedding", action="store_false", help="skip the projector view")

    p = sub.add_parser("evaluate", parents=[common, model, qparent], help="ground truth on chosen samples, and metrics",
                       description="Replay training without each chosen sample (leave-one-out ground truth, math §6), "
                                   "compare with the estimators, and print agreement metrics; with known flipped labels, "
                                   "also their detection AUROC and precision.")
    p.add_argument("--method", "-m", choices=list(METHODS), action="append", metavar="METHOD",
                   help=method_help + "; repeatable")
    p.add_argument("--window", "-w", metavar="W", help="the window (default: the whole run)")
    p.add_argument("--samples", "-s", default="top:10",
                   help="ids '3,17,42', 'top:K' (K most negative by the first method), 'bottom:K', 'random:K', "
                        "'flipped:K' (default top:10)")
    p.add_argument("--truth", choices=("replay", "none"), default="replay",
                   help="ground truth: replay leave-one-out (default) or none (detection metrics only)")
    p.add_argument("--in-window", action="store_true",
                   help="ground truth drops the samples only inside the window (the counterpart of dit-local)")
    p.add_argument("--seed", type=int, default=0, help="seed of random:K")
    t = p.add_argument_group("how far to trust the scores (whole run only; see docs/trust.md)")
    t.add_argument("--pbrf", action="store_true", help="proximal Bregman response of removing each chosen sample")
    t.add_argument("--gap", action="store_true", help="decompose the LOO vs PBRF gap into its terms (implies --pbrf)")
    t.add_argument("--damping", type=float, default=1e-2, help="PBRF proximity damping λ (default 0.01)")
    t.add_argument("--pbrf-steps", type=int, default=100, help="PBRF solver steps (default 100)")
    t.add_argument("--output-loss", default="cross_entropy", choices=("cross_entropy", "mse", "squared_error"),
                   help="the training loss in output space, for the Bregman divergence (default cross_entropy)")
    t.add_argument("--datamodel", action="store_true",
                   help="noise-stability estimate of the best linear datamodel's residual and the correlation ceiling")
    t.add_argument("--keep", type=float, default=0.5, help="keep-probability p of the random subsets (default 0.5)")
    t.add_argument("--pairs", type=int, default=100, help="correlated subset pairs per ρ (default 100)")
    t.add_argument("--workers", type=int, default=1, help="processes for the retraining runs (default 1)")
    t.add_argument("--groups", action="store_true", help="sum of single scores vs replayed group removal")
    t.add_argument("--group-sizes", type=_floats, default=[0.01, 0.05, 0.1, 0.2],
                   help="group sizes as fractions of N (default 0.01,0.05,0.1,0.2)")
    t.add_argument("--group-kinds", type=lambda x: x.split(","), default=["random", "same_class", "top"],
                   help="random,same_class,top,bottom (default random,same_class,top)")
    t.add_argument("--group-repeats", type=int, default=1, help="groups drawn per kind and size (default 1)")
    p.set_defaults(func=cmd_evaluate)
    return parser


def _version() -> str:
    try:
        from lightning_influence import __version__

        return __version__
    except Exception:  # pragma: no cover
        return "?"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-influence``; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exit_:  # --help, --version, or a usage error (already printed, one line)
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    debug = getattr(args, "debug", False)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line unless --debug
        user = isinstance(err, (UserError, ValueError, OSError))
        if debug:
            traceback.print_exc()
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if not user:
            message = f"internal error ({type(err).__name__}: {message}); rerun with --debug and report it"
        elif not debug:
            message += " (--debug for details)" if not isinstance(err, UserError) else ""
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return 2 if user else 1


if __name__ == "__main__":
    sys.exit(main())
