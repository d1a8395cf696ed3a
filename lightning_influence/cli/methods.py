"""The estimators the CLI can run (:data:`METHODS`) and how they are called."""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from lightning_influence.cli.common import UserError, progress_bar
from lightning_influence.datacheck import checked_by_caller
from lightning_influence.progress import ProgressBar
from lightning_influence.step.clipping import rows_are_projected

if TYPE_CHECKING:
    from lightning_influence.cli.context import RunContext

@dataclass(frozen=True)
class Method:
    """An estimator the CLI can run.

    Attributes:
        target: ``"package.module:function"`` returning :class:`InfluenceScores` for one window.
        needs: ``"log"`` (the log alone), ``"model"`` (architecture + query data, rebuilt from
            the log, ``--builder`` or ``--config``) or ``"model+data"`` (also the training data).
        records: what the log must hold (keys of :attr:`InfluenceLog.recorded`).
        fd_records: what it must hold besides with ``--hvp fd`` (Diff-In then reads the logged ``H_z·G_B`` rows;
            ``--hvp exact``, the default, computes them).
        summary: one line for ``--help``.
        timeline: optional ``"module:function"`` giving cumulative scores on a grid in one sweep
            (else the window function runs once per grid window).
        options: fixed keyword arguments.
        optimizers: the optimizer classes (names in :data:`lightning_influence.step.optimizers.RULES`)
            the method models; ``None``: every supported one.
        query: whether the method answers ``--query`` (self-influence answers each sample's own loss).
    """

    target: str
    needs: str
    records: tuple[str, ...]
    summary: str
    timeline: str | None = None
    options: tuple[tuple[str, Any], ...] = ()
    optimizers: tuple[str, ...] | None = None
    query: bool = True
    fd_records: tuple[str, ...] = ()

    def needed(self, hvp: str | None = None) -> tuple[str, ...]:
        """The records the log must hold for this method with ``--hvp hvp`` (``None``: the default, exact)."""
        return self.records + (self.fd_records if hvp == "fd" else ())

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
_ADAPTIVE = ("Adam", "AdamW", "RMSprop", "Adagrad")
METHODS: dict[str, Method] = {
    "dit": Method(f"{_DIT}:dit", "model+data", (), "DIT, exact adjoint sweep over [0, t2) replayed from the "
                  "checkpoints (docs/influence-math.md §3)", timeline=f"{_DIT}:timeline"),
    "dit-fd": Method(f"{_DIT}:dit", "model+data", (), "DIT with finite-difference HVPs (first-order gradients only)",
                     timeline=f"{_DIT}:timeline", options=(("hvp", "fd"),)),
    "dit-frozen": Method(f"{_DIT}:dit", "model+data", (), "DIT with the adaptive optimizer's preconditioner frozen "
                         "at its values in the run (approx., cheaper)", timeline=f"{_DIT}:timeline",
                         options=(("preconditioner", "frozen"),), optimizers=_ADAPTIVE),
    "dit-linear": Method(f"{_DIT}:dit", "model+data", (), "DIT with each removal linearised (the derivative in the "
                         "sample's weight; differs from dit for adaptive optimizers and clipping)",
                         timeline=f"{_DIT}:timeline", options=(("removal", "linear"),)),
    "dit-local": Method(f"{_DIT}:dit_local", "model+data", (), "local DIT (approx.): sweep only inside the window"),
    "dit-gn": Method(f"{_DIT}:dit_gauss_newton", "model", ("gradients",),
                     "DIT with the Gauss-Newton Hessian from the logged gradients (approx., SGD only)",
                     optimizers=("SGD",)),
    "dit-gn-local": Method(f"{_DIT}:dit_gauss_newton", "model", ("gradients",),
                           "Gauss-Newton DIT swept only inside the window (approx., SGD only)", options=(("local", True),),
                           optimizers=("SGD",)),
    "diffin": Method(f"{_DIFFIN}:diffin", "model+data", ("gradients",),
                     "Diff-In, published form at every logged step, from the logged rows of each step's batch; "
                     "H_z·G_B exact, or the logged products with --hvp fd (docs/influence-math.md §4)",
                     fd_records=("hvp",)),
    "diffin-step": Method(f"{_DIFFIN}:diffin", "model+data", ("gradients",),
                          "Diff-In per-step cumulative form (a named variant, docs/diffin.md)", options=(("form", "step"),)),
    "diffin-self": Method(f"{_DIFFIN}:diffin_self_influence", "model+data", ("gradients",),
                          "Diff-In self-influence I(z, z) for data cleaning (ignores --query)", query=False),
    "tracin": Method("lightning_influence.estimators.tracin:tracin", "model", ("gradients",),
                     "TracIn: sum over the window's steps of lr/|B| <q_t, g_j,t> (first order, "
                     "docs/influence-math.md §5)"),
    "tracin-self": Method("lightning_influence.estimators.tracin:tracin_self_influence", "log", ("gradients",),
                          "TracIn self-influence: sum of lr/|B| |g_j,t|^2 (data cleaning; ignores --query)", query=False),
}
# The Python function names name the same methods: ``-m dit_gauss_newton`` is ``-m dit-gn``.
ALIASES = {"dit-gauss-newton": "dit-gn", "diffin-self-influence": "diffin-self",
           "tracin-self-influence": "tracin-self"}
DISTRIBUTED = {"tracin": "tracin", "tracin-self": "tracin_self_influence"}  # --devices/--num-nodes (distributed.run)
BY_COLUMNS = ("dit", "dit-fd", "dit-frozen", "dit-linear", "dit-local", "dit-gn", "dit-gn-local", "diffin",
              "diffin-step")  # distributed.sweep: DIT and Gauss-Newton DIT by batch rows (--split batch, the default;
# Gauss-Newton DIT: each process reads only its part of every step's logged rows) or query outputs (--split columns),
# Diff-In by query outputs
BY_STEPS = ("diffin-self",)  # the estimator's sum over steps split over processes (distributed.by_steps)
SPLITS_HELP = (f"every method; the log sharded by steps: {', '.join(DISTRIBUTED)}; split by batch rows or query "
               f"output: {', '.join(BY_COLUMNS)}; split by steps: {', '.join(BY_STEPS)}")
DEFAULT_METHODS = ("dit", "tracin")  # the first one installed is the default
_RECORD_FLAGS = {"gradients": ("per-sample gradients", "record_gradients=True"),
                 "hvp": ("Hessian-gradient products (H_z·G_B)", "record_gradients=True, record_hvp=True"),
                 "losses": ("per-sample losses", "record_losses=True"),
                 "checkpoints": ("parameter checkpoints", "checkpoint_every_n_steps=1")}
NEEDS_TEXT = {"log": "log only", "model": "needs the model + query data (rebuilt from the log)",
               "model+data": "needs the model, training and query data (rebuilt from the log)"}


def canonical_method(text: str) -> str:
    """``--method`` as typed to its :data:`METHODS` key: Python's spelling (``dit_gauss_newton``) is accepted."""
    name = text.strip().replace("_", "-")
    return ALIASES.get(name, name)


def available_methods() -> list[str]:
    return [name for name, m in METHODS.items() if m.available()]


def default_method() -> str:
    return next((m for m in DEFAULT_METHODS if m in METHODS and METHODS[m].available()), "tracin")


def method_help() -> str:
    return f"estimator ({', '.join(METHODS)}; default: the first installed of {', '.join(DEFAULT_METHODS)})"


def methods_epilog() -> str:
    """The ``--help`` list of methods: what each computes and what it needs."""
    width = max(len(n) for n in METHODS) + 2
    return "\n".join(
        f"  {name:<{width}}{m.summary}\n  {'':<{width}}{NEEDS_TEXT[m.needs]}"
        + (f"; the log must hold {', '.join(m.records)}" if m.records else "")
        + (f" ({', '.join(m.fd_records)} with --hvp fd)" if m.fd_records else "") + ("" if m.available() else " (not installed)")
        for name, m in METHODS.items())


def unmet_needs(name: str, log: Any, hvp: str | None = None) -> list[str]:
    """What the log lacks for ``name`` to run (with ``--hvp hvp``): unrecorded fields, or an optimizer it does not
    model."""
    method = METHODS[name]
    needs = [r for r in method.needed(hvp) if not log.recorded.get(r)]
    if method.optimizers is not None:
        spec = log.meta.get("optimizer") or {}
        used = str((spec[0] if isinstance(spec, list) and spec else spec).get("class", "?")).rpartition(".")[2]
        if used not in method.optimizers:
            needs.append(f"optimizer {'/'.join(method.optimizers)}, not {used}")
    if method.needs == "model+data" and log.meta.get("sync_batchnorm"):  # replay.load_step refuses the log
        needs.append("a run without SyncBatchNorm in train mode across processes (its batch statistics cannot be "
                     "recomputed)")
    if "gradients" in method.records and (log.meta.get("gradient_clipping") or {}).get("algorithm") == "value" \
            and rows_are_projected(log):
        needs.append("unprojected gradient rows of every parameter (the run clipped by value; projection_dim=None)")
    return needs


def check_records(name: str, log: Any, hvp: str | None = None) -> None:
    """Fail early, in one line, when the log lacks what ``name`` needs (with ``--hvp hvp``)."""
    method = METHODS[name]
    missing = [r for r in method.needed(hvp) if not log.recorded.get(r)]
    usable = [m for m in available_methods() if not unmet_needs(m, log, hvp)]
    alt = f", or use a method this log supports: {', '.join(usable)}" if usable else ""
    if missing and not [r for r in method.records if not log.recorded.get(r)]:  # only what --hvp fd reads
        raise UserError(f"--method {name} --hvp fd reads the logged Hessian-gradient products (H_z·G_B), which this "
                        f"log did not record: drop --hvp fd (exact products, computed from the model), or re-train "
                        f"with InfluenceTracker(record_gradients=True, record_hvp=True)")
    if missing:
        what = " and ".join(_RECORD_FLAGS.get(r, (r, ""))[0] for r in missing)
        flags = ", ".join(dict.fromkeys(f for r in missing for f in _RECORD_FLAGS.get(r, ("", f"record_{r}=True"))[1].split(", ")))
        raise UserError(f"--method {name} needs {what}, which this log did not record; re-train with "
                        f"InfluenceTracker({flags}){alt}")
    other = unmet_needs(name, log, hvp)
    if other:
        raise UserError(f"--method {name} needs {other[0]}{alt}")




def call_with(fn: Callable[..., Any], log: Any, method: Method | None = None, **available: Any) -> Any:
    """Call ``fn(log, ...)`` with the keyword arguments it accepts among ``available``."""
    params = inspect.signature(fn).parameters
    if method is not None and not method.query:
        available.pop("query", None)
    options = dict(method.options if method else ())
    hvp = available.pop("hvp", None)  # --hvp: for the methods that take Hessian-vector products
    if hvp is not None and "hvp" in params:
        if options.get("hvp", hvp) != hvp:
            raise UserError(f"--hvp {hvp} contradicts the method ({method.target.rpartition(':')[2]} with "
                            f"hvp={options['hvp']!r}); drop one of them")
        options["hvp"] = hvp
    kwargs = {k: (v(log) if isinstance(v, _Lazy) else v) for k, v in available.items() if k in params}
    return fn(log, **kwargs, **options)


class _Lazy:
    """A value computed only for an estimator that asks for it (e.g. the validation batch), from the log."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn

    def __call__(self, log: Any) -> Any:
        return self.fn(log)


def train_data_of(ctx: RunContext, log: Any) -> Any:
    """The training set by id; ``None`` where the run gives none but the log stores each step's inputs: the estimators
    read those (and say so when they need the samples by id)."""
    try:
        return ctx.train_dataset
    except UserError:
        if log.meta.get("inputs_stored"):
            return None
        raise




def estimator_inputs(ctx: RunContext | None, hvp: str | None = None) -> dict[str, Any]:
    """The keyword arguments an estimator may take from the run: model, data, per-sample loss and ``--hvp``."""
    out: dict[str, Any] = {} if hvp is None else {"hvp": hvp}
    if ctx is None:
        return out
    return {**out, "module": ctx.module, "train_data": _Lazy(functools.partial(train_data_of, ctx)),
            "val_data": _Lazy(lambda log: ctx.val_batch), "tolerance": ctx.replay_tolerance, **ctx.loss_kwargs()}


def run_method(name: str, log: Any, query: Any, ctx: RunContext | None, window: tuple[int, int],
               progress: ProgressBar | None, hvp: str | None = None, processes: Any = None) -> Any:
    """Scores of every sample for one window, from the registered estimator (on ``processes``: the log sharded by
    steps, :data:`DISTRIBUTED`; else by :func:`~lightning_influence.distributed.sweep`: :data:`BY_COLUMNS` by batch
    rows or query output, :data:`BY_STEPS` by steps)."""
    method = METHODS[name]
    try:
        if processes is not None and name in DISTRIBUTED:
            from lightning_influence.distributed import run

            return run(DISTRIBUTED[name], log.path, query if method.query else None,
                       module=ctx.module if ctx is not None else None, window=window, devices=processes.devices,
                       num_nodes=processes.num_nodes, strategy=processes.strategy, accelerator=processes.accelerator,
                       timeout_s=processes.timeout_s, progress=progress)
        fn = method.load()
        if processes is not None:
            from lightning_influence.distributed import split_of

            fn = split_of(fn, processes)
        with checked_by_caller():  # prepare() and build_query() checked the model and data once for the command
            return call_with(fn, log, method, query=query, window=window, progress=progress,
                             **estimator_inputs(ctx, hvp))
    finally:
        if progress is not None:
            progress.close()


def compute_windows(args: argparse.Namespace, log: Any, query: Any, ctx: RunContext | None,
                    windows: list[tuple[int, int]], processes: Any = None) -> tuple[np.ndarray, str, dict[str, Any]]:
    """``(N, Q, W)`` scores of every window of a grid, the method's name and its info (on ``processes``, by
    :func:`~lightning_influence.distributed.sweep`, for :data:`BY_COLUMNS`)."""
    method = METHODS[args.method]
    if method.timeline is not None:
        bounds = [windows[0][0]] + [t2 for _, t2 in windows]
        progress = progress_bar(args, f"{args.method} timeline")
        fn = method.load(method.timeline)
        if processes is not None:
            from lightning_influence.distributed import split_of

            fn = split_of(fn, processes)
        try:
            with checked_by_caller():  # prepare() and build_query() checked the model and data once for the command
                tl = call_with(fn, log, method, query=query, grid=bounds, progress=progress,
                               **estimator_inputs(ctx, args.hvp))
        finally:
            progress.close()
        cumulative = np.stack([tl.at(t) for t in bounds], axis=2)  # (N, Q, G)
        return np.diff(cumulative, axis=2), tl.method, {**tl.info, "query_names": list(tl.query_names)}
    out, name, info = [], args.method, {}
    for w, (t1, t2) in enumerate(windows):
        progress = progress_bar(args, f"{args.method} window {w + 1}/{len(windows)} [{t1}, {t2})")
        scores = run_method(args.method, log, query, ctx, (t1, t2), progress, args.hvp, processes)
        out.append(scores.scores)
        name, info = scores.method, {**scores.info, "query_names": list(scores.query_names)}
    return np.stack(out, axis=2), name, info


