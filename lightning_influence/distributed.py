"""Log-only estimators on several processes, devices and nodes, with Lightning Fabric (docs/scaling.md).

TracIn and TracIn self-influence are sums over the logged steps. :func:`run` cuts the window's
steps into one contiguous shard per process (at segment boundaries where possible, balanced by
the number of gradient rows), every process streams its shard once with the single-process
estimator (so each byte of the log is read once, by one process, and the numbers come from the
same code), and the partial ``(N, Q)`` float64 score matrices are summed with one all-reduce.
The result equals the single-process one up to the order of float64 additions (~1e-16
relative). Query gradients at the checkpoints are taken once, before the processes start.

Processes are started the way Lightning users start them: ``strategy="ddp_spawn"`` (the
default from Python: works in scripts, notebooks and tests), ``"ddp"`` (re-runs the script or
CLI command in new processes), or launched outside (``torchrun``, ``fabric run``, SLURM: Fabric
finds the cluster environment and starts nothing). A process that dies ends the query: the
others fail their collective (``gloo`` notices the closed connection at once; ``timeout_s``
bounds every collective otherwise) and :class:`DistributedQueryError` says what happened. Every
process ends its process group before it exits (:func:`leave_process_group`), so no thread of the
query runs into the interpreter's teardown.

:func:`map_blocks` spreads independent units over the processes (contiguous blocks, gathered in order): replay
leave-one-out and group removal use it for their counterfactual runs (``replay_loo(..., processes=N)``), and
:func:`by_columns` for the query outputs of DIT, its timeline, Gauss-Newton DIT and Diff-In. :func:`by_batch` splits
the rows of every step of the DIT sweep (``dit``, ``dit_local``, ``timeline``) over the processes like DDP training:
each evaluates its rows, the step's gradient and Hessian-vector products are all-reduced, the per-sample terms stay
local (:mod:`lightning_influence.step.shard`); for Gauss-Newton DIT each process reads only its part of every step's
logged rows (:mod:`lightning_influence.estimators.gauss_newton`). :func:`by_steps` runs an estimator that splits its own sum over the
steps (Diff-In self-influence, both forms) with a :class:`~lightning_influence.estimators.sharding.StepShard` per
process. :func:`sweep` picks the split (docs/scaling.md).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import os
import pickle
import tempfile
import time
import dataclasses
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import numpy as np
import torch
from torch import nn

from lightning_influence.datacheck import caller_checked, check_estimator_data, checked_by_caller
from lightning_influence.estimators.diffin import diffin_self_influence
from lightning_influence.estimators.dit import dit, dit_local, timeline
from lightning_influence.estimators.gauss_newton import dit_gauss_newton, query_gradients_for
from lightning_influence.estimators.scores import InfluenceScores
from lightning_influence.estimators.sharding import StepShard, balanced_cuts, split_range
from lightning_influence.estimators.tracin import checkpoint_query_gradients, tracin, tracin_self_influence
from lightning_influence.log.reader import InfluenceLog
from lightning_influence.progress import process_rank
from lightning_influence.queries import Query, default_loss_fn, shared_loss
from lightning_influence.step.shard import BatchShard, Share, check_row_split

__all__ = ["BATCH_SPLIT", "DISTRIBUTED", "LOG_ROW_SPLIT", "SPLITS", "STEP_SPLIT", "DistributedQueryError", "Processes", "QueryColumns",
           "by_batch", "by_columns", "by_steps", "gather", "global_rank", "launch", "launched_outside",
           "leave_process_group", "map_blocks",
           "run", "shard_steps", "split_for", "split_of", "split_range", "sweep"]

DISTRIBUTED: dict[str, Callable[..., InfluenceScores]] = {"tracin": tracin, "tracin_self_influence": tracin_self_influence}
_LAUNCHED_OUTSIDE = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID")  # torchrun / fabric run set these in every process
BATCH_SPLIT = (dit, dit_local, timeline)  # the model sweeps whose steps' rows can be split over processes
LOG_ROW_SPLIT = (dit_gauss_newton,)  # the log sweeps that read only their part of every step's rows (log.shares)
STEP_SPLIT = (diffin_self_influence,)  # the estimators that split their sum over the steps themselves (shard=...)
SPLITS = ("auto", "batch", "columns")


ShareT = TypeVar("ShareT", bound=Share)


class DistributedQueryError(RuntimeError):
    """A process of a distributed query failed or was killed; the query has no result."""


@dataclass(frozen=True)
class Processes:
    """Where a distributed computation runs: ``devices × num_nodes`` processes, started as for :func:`run`;
    ``split``: how :func:`sweep` divides a model sweep (:data:`SPLITS`)."""

    devices: int = 1
    num_nodes: int = 1
    strategy: str = "ddp_spawn"
    accelerator: str = "cpu"
    timeout_s: float = 300.0
    split: str = "auto"

    @classmethod
    def of(cls, spec: "Processes | int | None") -> "Processes":
        """``None`` (one process), a number of local processes, or a :class:`Processes`."""
        return cls() if spec is None else cls(devices=int(spec)) if isinstance(spec, int) else spec

    def launch(self, fn: Callable[..., Any], *args: Any, what: str) -> Any:
        """:func:`launch` ``fn(fabric, *args)`` on these processes."""
        return launch(fn, *args, devices=self.devices, num_nodes=self.num_nodes, strategy=self.strategy,
                      accelerator=self.accelerator, timeout_s=self.timeout_s, what=what)

    @property
    def many(self) -> bool:
        """More than one process asked for (under an outside launcher, pass the world it starts: --devices/--num-nodes)."""
        return self.devices * self.num_nodes > 1


def map_blocks(fn: Callable[[int, int, torch.device], Any], n: int, processes: Processes | int | None, what: str
               ) -> list[tuple[int, int, Any, float]]:
    """``fn(a, b, device)`` for one contiguous block ``[a, b)`` of ``n`` independent units per process (skipped
    when empty): every block's ``(a, b, result, seconds)`` in order, on every process.

    For work whose units do not interact (the counterfactual runs of replay leave-one-out, the columns of a
    query): the result is the single-process one, each unit computed once, by one process.
    """
    procs = Processes.of(processes)
    if not procs.many:
        return [_block(None, fn, n, what)]
    return procs.launch(_map_worker, fn, n, what, what=what)


def _block(fabric: Any, fn: Callable[[int, int, torch.device], Any], n: int, what: str
           ) -> tuple[int, int, Any, float]:
    rank, world = (0, 1) if fabric is None else (fabric.global_rank, fabric.world_size)
    a, b = split_range(n, world)[rank]
    t0 = time.perf_counter()
    device = torch.device("cpu") if fabric is None else fabric.device
    return a, b, fn(a, b, device) if a < b else None, time.perf_counter() - t0


def _map_worker(fabric: Any, fn: Callable[[int, int, torch.device], Any], n: int, what: str
                ) -> list[tuple[int, int, Any, float]]:
    return gather(fabric, _block(fabric, fn, n, what), what)


def shard_steps(log: InfluenceLog, t1: int, t2: int, n: int) -> list[tuple[int, int]]:
    """``n`` contiguous step ranges covering ``[t1, t2)``, one per process, with about equal numbers of gradient rows.

    Each cut is moved to the nearest segment start of rank 0 when that keeps the shards within 25% of the
    ideal size, so two processes rarely read the same segment file (other training ranks close their
    segments by their own clocks, at nearby steps). Some ranges are empty when the window has fewer steps than processes.
    """
    rows = [log.step_column(t, "sample_count") if log.has_grads(t) else 0 for t in range(t1, t2)]
    return balanced_cuts(t1, t2, rows, n, log.segment_starts())


def run(method: str, log_path: str | os.PathLike, query: Query | Mapping[int, np.ndarray] | None = None, *,
        module: nn.Module | None = None, window: Any = None, devices: int = 1, num_nodes: int = 1,
        strategy: str = "ddp_spawn", accelerator: str = "cpu", timeout_s: float = 300.0,
        progress: Callable[[int, int], None] | None = None) -> InfluenceScores:
    """Run the log-only estimator ``method`` (a key of :data:`DISTRIBUTED`) on ``devices × num_nodes`` processes.

    Args:
        method: ``"tracin"`` or ``"tracin_self_influence"``.
        log_path: the influence log (every process opens it; on several nodes, a shared file system).
        query: TracIn's query (a callable, with ``module``) or precomputed ``{checkpoint_step: (Q, K)}``;
            ``None`` for self-influence.
        module: the architecture, for a callable query (its gradients are taken once, in this process).
        window: as for the estimator.
        devices, num_nodes: processes per node and nodes (``1, 1``: this process alone, no Fabric).
        strategy: ``"ddp_spawn"``, ``"ddp"`` (re-runs the script/command), or ``"auto"`` (= ``"ddp"``);
            ignored in processes launched outside (``torchrun``, ``fabric run``, SLURM).
        accelerator: ``"cpu"`` (``gloo``) or ``"cuda"`` (``nccl``; the all-reduce runs on the device).
        timeout_s: bound on every collective: a process that neither answers nor dies ends the query then.
        progress: ``progress(done, total)`` over each process's own shard.

    Returns:
        The scores of the whole window (on every process), ``info["per_rank"]`` holding each process's
        steps, gradient rows and seconds.

    Raises:
        ValueError: an unknown or non-distributed method.
        DistributedQueryError: a process failed or was killed.
    """
    if method not in DISTRIBUTED:
        raise ValueError(f"{method!r} is not distributed; distributed log-only estimators: {sorted(DISTRIBUTED)}. "
                         "DIT, its timeline and Diff-In run on several processes with distributed.sweep(estimator, log, "
                         "query, processes, ...), replay leave-one-out with replay_loo(..., processes=N) (docs/scaling.md)")
    if int(devices) < 1 or int(num_nodes) < 1:
        raise ValueError(f"devices and num_nodes must be >= 1, got {devices} and {num_nodes}")
    names: list[str] = []
    with InfluenceLog(log_path) as log:
        t1, t2 = log.window(window)
        if method == "tracin":
            query, names = _query_gradients(log, query, module, t1, t2)
        elif query is not None:
            raise TypeError(f"{method} answers each sample's own loss and takes no query")
    args = (method, str(Path(log_path)), query, names, (t1, t2), progress)
    if int(devices) * int(num_nodes) == 1 and not launched_outside():
        return _reduce(None, *args)
    return launch(_reduce, *args, devices=devices, num_nodes=num_nodes, strategy=strategy, accelerator=accelerator,
                  timeout_s=timeout_s, what=f"distributed {method} query")


def launch(fn: Callable[..., Any], *args: Any, devices: int = 2, num_nodes: int = 1, strategy: str = "ddp_spawn",
           accelerator: str = "cpu", timeout_s: float = 300.0, what: str = "distributed query") -> Any:
    """``fn(fabric, *args)`` on ``devices × num_nodes`` processes; rank 0's result (under ``"ddp"`` or an outside
    launcher, each process's own).

    ``fn`` and ``args`` must be picklable for ``"ddp_spawn"``. A process that fails or dies ends every process's
    collectives, and this raises :class:`DistributedQueryError` naming ``what``.
    """
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    if strategy not in ("ddp_spawn", "ddp", "auto"):
        raise ValueError(f"strategy must be 'ddp_spawn', 'ddp' or 'auto', got {strategy!r}")
    if int(devices) < 1 or int(num_nodes) < 1:
        raise ValueError(f"devices and num_nodes must be >= 1, got {devices} and {num_nodes}")
    # under an outside launcher (torchrun, SLURM) the processes exist already: none is spawned, each returns its own
    start = "spawn" if strategy == "ddp_spawn" and not launched_outside() else "popen"
    fabric = Fabric(accelerator=accelerator, devices=int(devices), num_nodes=int(num_nodes),
                    strategy=DDPStrategy(start_method=start, timeout=timedelta(seconds=float(timeout_s))))
    try:
        if start != "spawn":  # the processes go on after fn (a script, a CLI command): the group ends at their exit
            atexit.unregister(_leave_at_exit)  # registered once per process
            atexit.register(_leave_at_exit)
            return fabric.launch(fn, *args)
        with tempfile.TemporaryDirectory(prefix="influence-query-") as tmp:
            # a spawned rank 0 returns through a pipe the launcher reads only after every process exited: a result of
            # more than the pipe's 64 KiB would deadlock, so it goes through a file
            out = Path(tmp) / "result.pkl"
            fabric.launch(_to_file, str(out), caller_checked(), fn, *args)
            return pickle.loads(out.read_bytes())
    except DistributedQueryError:
        raise
    except Exception as err:  # a spawned process died (ProcessExitedException) or raised in its collective
        raise DistributedQueryError(f"the {what} on {fabric.world_size} processes failed: "
                                    f"{type(err).__name__}: {_gist(err)}") from err


def _gist(err: BaseException) -> str:
    """The first line of ``err``'s message, and for a process's traceback the error it ended with."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return "" if not lines else lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def gather(fabric: Any, obj: Any, what: str) -> list[Any]:
    """Every process's ``obj``, in rank order, on every process; a process that ended makes it
    :class:`DistributedQueryError`."""
    import torch.distributed as dist

    try:
        out: list[Any] = [None] * fabric.world_size
        dist.all_gather_object(out, obj)
    except Exception as err:
        raise _peer_error(fabric, what, err) from err
    return out


def _peer_error(fabric: Any, what: str, err: BaseException) -> DistributedQueryError:
    out = DistributedQueryError(
        f"rank {fabric.global_rank}: the {what} failed because another process of the query ended "
        f"(killed, out of memory, or an error there) or did not answer within the timeout: "
        f"{type(err).__name__}: {str(err).strip()[:300]}")
    out.peer = True  # another process's failure, echoed here (the CLI's first process says where to look)
    return out


def _to_file(fabric: Any, out: str, checked: bool, fn: Callable[..., Any], *args: Any) -> None:
    """A spawned process: ``fn``, rank 0's result written to ``out``, then the process group ended (also after an
    error: :func:`leave_process_group`) before the process exits. ``checked``: the launching process ran inside
    :func:`~lightning_influence.datacheck.checked_by_caller` (a CLI command that checked its model and data once), so
    the estimators here skip their own checks too."""
    try:
        with checked_by_caller() if checked else contextlib.nullcontext():
            result = fn(fabric, *args)
        if fabric.global_rank == 0:
            Path(out).write_bytes(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
    except BaseException:
        leave_process_group(ok=False)
        raise
    leave_process_group(ok=True)


def leave_process_group(ok: bool = True) -> None:
    """End this process's ``torch.distributed`` process group (if any) now, while the interpreter is whole.

    A process that exits with its group alive leaves gloo's C++ threads (the group's workers, its transport loop,
    rank 0's TCP store) running into the interpreter's teardown. A worker still holding the last collective's
    tensors frees them there, which takes the GIL of an interpreter that is finalizing: the thread is unwound
    through a C++ destructor and the runtime aborts ("terminate called without an active exception"), so a query
    whose every process finished ends with a :class:`DistributedQueryError` (SIGABRT). Destroying the group joins
    those threads first. The estimators' own threads (:mod:`lightning_influence.log.prefetch`) are joined before
    this, when their ``with`` block exits (on errors too). After an error (``ok=False``) only a ``gloo`` group is
    destroyed (it waits for nothing but this process's queued work); ``nccl``'s abort is left to the process exit.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if ok or dist.get_backend() == "gloo":
        dist.destroy_process_group()


def _leave_at_exit() -> None:
    """:func:`leave_process_group` at the exit of a process that went on after its query (``"ddp"``, an outside
    launcher); as after an error: the process may be ending on one."""
    leave_process_group(ok=False)


def launched_outside() -> bool:
    """Whether this process was started by a launcher (``torchrun``, ``fabric run``, Lightning's ``ddp``, SLURM)."""
    return any(k in os.environ for k in _LAUNCHED_OUTSIDE) or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def global_rank() -> int:
    """This process's rank in a distributed query (0 outside one)."""
    return process_rank()[0]


def _query_gradients(log: InfluenceLog, query: Any, module: nn.Module | None, t1: int, t2: int
                     ) -> tuple[dict[int, np.ndarray], list[str]]:
    """TracIn's query as projected gradients at the checkpoints the window uses (taken here, once)."""
    if not callable(query):
        return dict(query), []
    if module is None:
        raise ValueError("tracin needs `module` (the architecture) to take query gradients from the checkpoints")
    ckpts = [t for t in log.checkpoint_steps if t < t2]
    needed = sorted({max(c for c in ckpts if c <= t) for t in range(t1, t2) if ckpts and ckpts[0] <= t})
    return checkpoint_query_gradients(log, module, query, needed)


def _reduce(fabric: Any, method: str, log_path: str, query: Any, names: list[str], window: tuple[int, int],
            progress: Callable[[int, int], None] | None) -> InfluenceScores:
    """One process: its shard with the single-process estimator, then the sum over processes."""
    rank, world = (0, 1) if fabric is None else (fabric.global_rank, fabric.world_size)
    t0, cpu0 = time.perf_counter(), time.process_time()
    with InfluenceLog(log_path) as log:
        a, b = shard_steps(log, *window, world)[rank]
        kwargs: dict[str, Any] = {"progress": progress, **({"query_names_": names} if method == "tracin" else {})}
        part = DISTRIBUTED[method](log, query, window=(a, b), **kwargs) if a < b else None
        n = log.dataset_size
    width = 1 if query is None else next(iter(query.values())).shape[0]
    local = part.scores if part is not None else np.zeros((n, width))
    mine = {"rank": rank, "steps": [a, b], "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0,
            "result": None if part is None else (part.method, part.query_names, part.info)}
    scores, per_rank = (local, [mine]) if fabric is None else _all_reduce(fabric, local, mine, method)
    name, qnames, info = next(r["result"] for r in per_rank if r["result"] is not None)
    used: set[int] = set()
    for r in per_rank:
        res = r.pop("result")
        r["steps_with_gradients"] = res[2].get("steps_with_gradients", 0) if res else 0
        used.update(res[2].get("checkpoints_used", []) if res else [])
    info = {**info, "steps_with_gradients": sum(r["steps_with_gradients"] for r in per_rank), "per_rank": per_rank,
            "processes": world, **({"checkpoints_used": sorted(used)} if "checkpoints_used" in info else {})}
    return InfluenceScores(scores, name, window, qnames, info=info)


def _all_reduce(fabric: Any, local: np.ndarray, mine: dict[str, Any], method: str
                ) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Sum of every process's ``local`` scores (float64, one all-reduce) and every process's ``mine``."""
    try:
        total = fabric.all_reduce(torch.from_numpy(local).to(fabric.device), reduce_op="sum")
    except Exception as err:
        raise _peer_error(fabric, f"{method} reduction", err) from err
    return total.cpu().numpy(), gather(fabric, mine, f"{method} reduction")


# ------------------------------------------------------------------------------------ by query column
class QueryColumns:
    """Outputs ``[a, b)`` of a query, with their names: the columns one process sweeps (picklable when ``query`` is)."""

    def __init__(self, query: Query, a: int, b: int, names: list[str]) -> None:
        self.query, self.a, self.b, self.query_names = query, a, b, list(names[a:b])

    def __call__(self, module: nn.Module) -> torch.Tensor:
        return self.query(module).reshape(-1)[self.a : self.b]


def by_columns(estimator: Callable[..., Any], log: InfluenceLog, query: Query | Mapping[int, np.ndarray],
               processes: Processes | int | None, **kwargs: Any) -> Any:
    """``estimator(log, query, **kwargs)`` (:func:`~lightning_influence.estimators.dit.dit`, ``dit_local``,
    ``timeline``, ``dit_gauss_newton``, ``diffin``) with the query's outputs split over processes, one contiguous
    block of columns each (for Gauss-Newton DIT's precomputed ``{checkpoint_step: (Q, K)}``, a block of its rows).

    The sweeps of different query outputs do not interact (the adjoint's columns, Diff-In's stacked directions), so
    the result is the single-process one (to float64 round-off: the products are batched over fewer columns). Every
    process replays the whole trajectory; the saving is the per-column work (the HVPs), so it pays with several
    queries (``Q ≥`` processes) and does nothing for one. Returns :class:`InfluenceScores` (or a ``Timeline``) with
    ``info["per_rank"]``. ``query``, ``module`` and ``train_data`` must be picklable for ``ddp_spawn``. Gauss-Newton
    DIT reads the whole log in every process (docs/scaling.md).
    """
    module = kwargs.get("module")
    if isinstance(query, Mapping):  # precomputed query gradients: the rows of every checkpoint's (Q, K)
        width = int(np.asarray(next(iter(query.values()))).shape[0])
        names = list(kwargs.pop("query_names_", None) or [f"q{i}" for i in range(width)])
    elif module is None or not callable(query):
        raise ValueError(f"{getattr(estimator, '__name__', estimator)} on several processes needs a callable query and "
                         "`module`, or precomputed query gradients (the query's outputs are split over the processes)")
    else:
        with torch.no_grad():  # the number of outputs, on a copy (a module in train mode may update its buffers)
            width = int(torch.as_tensor(query(copy.deepcopy(module))).numel())
        from lightning_influence.queries import query_names

        names = query_names(query, width)
    block = functools.partial(_column_block, estimator, str(log.path), query, names, kwargs)
    return _merge_columns(map_blocks(block, width, processes, f"distributed {getattr(estimator, '__name__', 'sweep')}"))


def _column_block(estimator: Callable[..., Any], log_path: str, query: Query, names: list[str], kwargs: dict[str, Any],
                  a: int, b: int, device: torch.device) -> Any:
    kwargs = _on_device(kwargs, device)
    if isinstance(query, Mapping):
        part: Any = {k: np.asarray(v)[a:b] for k, v in query.items()}
        kwargs = {**kwargs, "query_names_": names[a:b]}
    else:
        part = QueryColumns(query, a, b, names)
    with InfluenceLog(log_path) as log:
        return estimator(log, part, **kwargs)


def _merge_columns(parts: list[tuple[int, int, Any, float]]) -> Any:
    """The blocks' scores side by side (the query axis), the first block's method and info, and each process's."""
    done = [r for _, _, r, _ in parts if r is not None]
    first = done[0]
    per_rank = [{"rank": i, "columns": [a, b], "seconds": sec} for i, (a, b, _, sec) in enumerate(parts)]
    info = {**first.info, "processes": len(parts), "per_rank": per_rank,
            **({"hvp_products": sum(r.info["hvp_products"] for r in done)} if "hvp_products" in first.info else {})}
    names = [n for r in done for n in r.query_names]
    if isinstance(first, InfluenceScores):
        return InfluenceScores(np.concatenate([r.scores for r in done], axis=1), first.method, first.window, names,
                               info=info)
    return dataclasses.replace(first, values=np.concatenate([r.values for r in done], axis=2), query_names=names,
                               info=info)


# ------------------------------------------------------------------------------------ by batch rows
def sweep(estimator: Callable[..., Any], log: InfluenceLog, query: Query, processes: Processes | int | None,
          split: str | None = None, **kwargs: Any) -> Any:
    """``estimator(log, query, **kwargs)`` on ``processes``, divided by ``split`` (default ``processes.split``):
    ``"batch"`` (:func:`by_batch`: every step's rows; DIT, local DIT, the timeline, Gauss-Newton DIT), ``"columns"``
    (:func:`by_columns`: the query's outputs; also Diff-In), ``"auto"``: by batch where the estimator and the module
    allow it (no train-mode BatchNorm; Gauss-Newton DIT always), else by column. An estimator of :data:`STEP_SPLIT`
    (Diff-In self-influence: no query to split by column) always splits by steps (:func:`by_steps`). One process:
    the estimator itself."""
    procs = Processes.of(processes)
    split = procs.split if split is None else split
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not procs.many:
        return estimator(log, query, **kwargs)
    _check_once(estimator, log, query, kwargs)
    with checked_by_caller():  # the processes skip their estimator's check (launch passes the fact to them)
        if estimator in STEP_SPLIT:
            return by_steps(estimator, log, query, procs, **kwargs)
        if split_for(estimator, kwargs.get("module"), split, log.meta) == "columns":
            return by_columns(estimator, log, query, procs, **kwargs)
        return by_batch(estimator, log, query, procs, **kwargs)


def _check_once(estimator: Callable[..., Any], log: InfluenceLog, query: Any, kwargs: dict[str, Any]) -> None:
    """The estimator's data check (:func:`~lightning_influence.datacheck.check_estimator_data`, with its loss as the
    estimator shares it), here, once, before any process starts: a mistake is its ``DataMismatchError``, not every
    process's failure. A model passed as the query is left to the estimator's own ``TypeError``."""
    module = kwargs.get("module")
    if module is None or isinstance(query, nn.Module):
        return
    loss_fn, query = shared_loss(module, query, kwargs.get("loss_fn", default_loss_fn))
    check_estimator_data(log, module, query, kwargs.get("train_data"), loss_fn, training=estimator not in LOG_ROW_SPLIT)


def split_for(estimator: Callable[..., Any], module: nn.Module | None, split: str = "auto",
              meta: Mapping[str, Any] | None = None) -> str:
    """``"batch"`` or ``"columns"``: ``split`` itself, or for ``"auto"`` the batch split where the estimator has one
    and ``module``'s rows can be evaluated apart (:func:`~lightning_influence.step.shard.check_row_split`, with the modes
    the log's ``meta`` records)."""
    if split != "auto":
        return split
    if estimator in LOG_ROW_SPLIT:  # the logged rows: the module only takes the query's gradients
        return "batch"
    if estimator not in BATCH_SPLIT:
        return "columns"
    try:
        if module is not None:
            check_row_split(module, meta)
    except ValueError:
        return "columns"
    return "batch"


def split_of(estimator: Callable[..., Any], processes: Processes | int | None) -> Callable[..., Any]:
    """``estimator`` run by :func:`sweep` on ``processes`` (the same signature, for callers that inspect it)."""

    @functools.wraps(estimator)
    def split(log: InfluenceLog, query: Query | None = None, **kwargs: Any) -> Any:
        return sweep(estimator, log, query, processes, **kwargs)

    return split


def by_batch(estimator: Callable[..., Any], log: InfluenceLog, query: Query, processes: Processes | int | None,
             **kwargs: Any) -> Any:
    """``estimator(log, query, **kwargs)`` (one of :data:`BATCH_SPLIT` or :data:`LOG_ROW_SPLIT`) with every step's rows
    split over processes.

    Each process replays the trajectory and evaluates its rows of every step (a micro-batch that drew dropout masks
    whole, on process ``(step + k) mod P``); the step's gradient and Hessian-vector products are summed with one
    all-reduce each, the per-sample terms stay with their process and the ``(N, ·)`` scores are summed at the end
    (:mod:`lightning_influence.step.shard`). All query outputs are swept together on every process. The result is
    the single-process one up to the order of float64 additions; ``info["per_rank"]`` holds each process's rows,
    seconds and CPU seconds. ``query``, ``module`` and ``train_data`` must be picklable for ``ddp_spawn``.

    Gauss-Newton DIT (:data:`LOG_ROW_SPLIT`) replays nothing: its query gradients are taken here, once, and each process
    reads only its part of every step's logged rows (``per_rank`` adds the row bytes each read), all-reducing the
    step's ``K·Q`` sums (:mod:`lightning_influence.estimators.gauss_newton`).

    Raises:
        ValueError: an estimator without a batch split, or a module with train-mode BatchNorm.
        DistributedQueryError: a process failed or was killed.
    """
    if estimator not in BATCH_SPLIT + LOG_ROW_SPLIT:
        raise ValueError(f"{getattr(estimator, '__name__', estimator)} has no batch split (estimators with one: "
                         f"{', '.join(e.__name__ for e in BATCH_SPLIT + LOG_ROW_SPLIT)}); use split='columns'")
    procs = Processes.of(processes)
    if not procs.many:
        return estimator(log, query, **kwargs)
    if estimator in LOG_ROW_SPLIT and callable(query):  # the query's gradients at the checkpoints, once
        module = kwargs.pop("module", None)
        if module is None:
            raise ValueError(f"{estimator.__name__} needs `module` to take query gradients, or precomputed ones")
        query, names = query_gradients_for(log, module, query, kwargs.get("window"))
        kwargs["query_names_"] = names
    elif estimator not in LOG_ROW_SPLIT and kwargs.get("module") is not None:
        check_row_split(kwargs["module"], log.meta)  # before any process starts
    what = f"distributed {estimator.__name__} (batch split)"
    return procs.launch(_batch_worker, estimator, str(log.path), query, kwargs, what, what=what)


def _batch_worker(fabric: Any, estimator: Callable[..., Any], log_path: str, query: Query, kwargs: dict[str, Any],
                  what: str) -> Any:
    shard = _share(BatchShard, fabric, what)
    kwargs = _on_device(kwargs, fabric.device)
    t0, cpu0 = time.perf_counter(), time.process_time()
    with InfluenceLog(log_path) as log:
        res = estimator(log, query, shard=shard, **kwargs)
    mine = {"rank": fabric.global_rank, "rows": res.info["rows_evaluated"], "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - cpu0,
            **({"bytes_read": res.info["bytes_read"]} if "bytes_read" in res.info else {})}
    per_rank = gather(fabric, mine, what)
    return dataclasses.replace(res, info={**res.info, "processes": fabric.world_size, "per_rank": per_rank,
                                          "rows_evaluated": sum(r["rows"] for r in per_rank),
                                          **({"bytes_read": sum(r["bytes_read"] for r in per_rank)}
                                             if "bytes_read" in mine else {})})


def _on_device(kwargs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """An estimator's keyword arguments with its ``module`` (if any) on this process's device."""
    module = kwargs.get("module")
    return kwargs if module is None or device.type == "cpu" else {**kwargs, "module": module.to(device)}


def _share(cls: type[ShareT], fabric: Any, what: str) -> ShareT:
    """This Fabric process's :class:`~lightning_influence.step.shard.Share` (``cls``) with its collectives."""
    return cls(fabric.global_rank, fabric.world_size, functools.partial(_sum_over, fabric, what),
               functools.partial(gather, fabric, what=what))


def _sum_over(fabric: Any, what: str, x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over the processes (on the process's device for the collective: ``nccl`` needs CUDA tensors), in a
    copy: ``x`` is left as it was. One ``all_reduce``, without the barrier Fabric's ``all_reduce`` adds to each."""
    import torch.distributed as dist

    try:
        y = x.to(fabric.device, copy=True)
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y.to(x.device)
    except Exception as err:
        raise _peer_error(fabric, what, err) from err


# ------------------------------------------------------------------------------------------ by steps
def by_steps(estimator: Callable[..., Any], log: InfluenceLog, query: Query | None, processes: Processes | int | None,
             **kwargs: Any) -> Any:
    """``estimator(log, query, shard=..., **kwargs)`` on ``processes``, each with its
    :class:`~lightning_influence.estimators.sharding.StepShard`: for an estimator that splits its own sum over the
    steps (:func:`~lightning_influence.estimators.diffin.diffin_self_influence`, both forms).

    Each process computes its steps' terms and the estimator combines them with the shard's collectives, so the
    result is the single-process one up to the order of float64 additions, and ``info["per_rank"]`` holds each
    process's steps and seconds. ``module`` and ``train_data`` must be picklable for ``ddp_spawn``.
    """
    procs = Processes.of(processes)
    if not procs.many:
        return estimator(log, query, **kwargs)
    what = f"distributed {getattr(estimator, '__name__', 'estimator')} query"
    return procs.launch(_steps_worker, estimator, str(log.path), query, kwargs, what, what=what)


def _steps_worker(fabric: Any, estimator: Callable[..., Any], log_path: str, query: Query | None,
                  kwargs: dict[str, Any], what: str) -> Any:
    kwargs = _on_device(kwargs, fabric.device)
    shard = _share(StepShard, fabric, what)
    with InfluenceLog(log_path) as log:
        return estimator(log, query, shard=shard, **kwargs)
