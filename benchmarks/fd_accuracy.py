"""Finite-difference DIT against the exact-HVP sweep on float32 runs (issue 11, item 8).

    python benchmarks/fd_accuracy.py [--n-train 60] [--epochs 4] [--configs all] [--eps0 1e-6]

Trains the float32 runs of issue 11's benchmark with a real ``lightning.Trainer`` and the tracker
(the digits setup of ``benchmarks/random_runs.py``: tanh MLP 64-32-10 with dropout 0.2, or the tiny
transformer: Embedding + positions, LayerNorm, one ``TransformerEncoderLayer`` with a ReLU feed-forward;
SGD with weight decay and a step schedule, a checkpoint every step, query = mean validation loss):

- ``mlp-dropout``, ``mlp-clip`` (norm clipping ``--clip``), ``mlp-accum2`` (``accumulate_grad_batches=2``, batch
  24: every epoch ends on an incomplete accumulation), ``mlp-bf16`` (``precision="bf16-mixed"``);
- ``transformer`` (dropout 0.1), ``transformer-nodrop`` (dropout 0), ``transformer-clip-accum2``.

For each run: one DIT timeline sweep with exact HVPs (the reference), one with finite-difference HVPs as
DIT takes them now (float64 evaluation, ``estimators/fd.py``) and one as before (the parameters' dtype,
``ε_0`` 3e-2 in float32, 0.2 under bf16 autocast: ``fd.native_eps0``), and for each window (whole run,
first epoch, second half, last epoch) the error of the DIT score vector ``s`` against the exact one
``s*``, over the ``N`` training samples:

    max-abs: max_j |s_j − s*_j| / max_j |s*_j|        L2: ‖s − s*‖ / ‖s*‖

Also: the sweep seconds (each a whole timeline: replay + products; ratios within one run), one step's
products timed alone (exact against finite differences, 1 and 4 columns, alternating), the products
that crossed a kink, and the float64-vs-native gradient gap at the first step. Prints a table and writes
JSON (``benchmarks/results/`` is git-ignored).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import ce_loss, quiet_setup, train, windows_of  # noqa: E402
from random_runs import digits_data, eval_query, inputs, make_net  # noqa: E402
from step_runs import run_all  # noqa: E402

from lightning_influence.estimators import fd as fd_module  # noqa: E402
from lightning_influence.estimators import timeline  # noqa: E402
from lightning_influence.estimators.sweep import _Context, _products_exact  # noqa: E402
from lightning_influence.replay import checkpoint_params, load_step  # noqa: E402
from lightning_influence.step.precision import Precision  # noqa: E402
from lightning_influence.step.weights import step_summary  # noqa: E402

TARGET = 1e-3  # issue 11: DIT with FD HVPs within 1e-3 of the exact sweep (max-abs, every window)


@contextlib.contextmanager
def native_products() -> Iterator[None]:
    """The products as DIT took them before: in the parameters' dtype, with :func:`fd.native_eps0`."""
    saved = fd_module.FD_DTYPE
    fd_module.FD_DTYPE = torch.float32
    try:
        yield
    finally:
        fd_module.FD_DTYPE = saved


def errors(est: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Relative max-abs and relative L2 error of a score vector against the reference."""
    scale = max(float(np.abs(ref).max()), 1e-300)
    return {"max_abs": float(np.abs(est - ref).max() / scale),
            "l2": float(np.linalg.norm(est - ref) / max(float(np.linalg.norm(ref)), 1e-300))}


def product_cost(log: Any, Net: Any, train_ds: Any, columns: int, reps: int) -> dict[str, float]:
    """Seconds of one step's products (the last step, ``columns`` random directions), exact and finite-difference
    (after the one-time float64 check), alternating, median of ``reps``; and their ratio."""
    module = Net().float()
    ctx = _Context(log, module, train_ds, ce_loss, False, float("inf"), 2**30)
    t = log.num_steps - 1
    params, batch = checkpoint_params(log, module, t), load_step(log, train_ds, t)
    w = torch.as_tensor(log.weights(t), dtype=ctx.dtype)
    R = torch.randn(ctx.p, columns, generator=torch.Generator().manual_seed(0))
    precision = Precision.from_meta(log.meta.get("precision"))
    fd = fd_module.FiniteDifferenceProducts(module, ce_loss, ctx.names, ctx.shapes, ctx.dtype, precision)
    fd(params, batch, R, w)  # the float64 copy and the check at θ, once per sweep
    with native_products():
        before = fd_module.FiniteDifferenceProducts(module, ce_loss, ctx.names, ctx.shapes, ctx.dtype, precision)
    runs = {"exact": lambda: _products_exact(ctx, params, batch, R, w), "fd": lambda: fd(params, batch, R, w),
            "fd_before": lambda: before(params, batch, R, w)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(reps):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    out = {k: float(np.median(v)) for k, v in times.items()}
    return {**out, "fd_over_exact": out["fd"] / out["exact"], "before_over_exact": out["fd_before"] / out["exact"]}


def run_configs(clip: float) -> dict[str, dict[str, Any]]:
    """The float32 runs of the benchmark by name (``clip``: gradient_clip_val of the clipping runs)."""
    accum = {"gradient_clip_val": clip, "accumulate_grad_batches": 2}
    return {
        "mlp-dropout": {"kind": "mlp", "trainer": {}},
        "mlp-clip": {"kind": "mlp", "trainer": {"gradient_clip_val": clip}},
        "mlp-accum2": {"kind": "mlp", "batch_size": 24, "trainer": {"accumulate_grad_batches": 2}},
        "mlp-bf16": {"kind": "mlp", "trainer": {"precision": "bf16-mixed"}},
        "transformer": {"kind": "transformer", "trainer": {}},
        "transformer-nodrop": {"kind": "transformer", "dropout": 0.0, "trainer": {}},
        "transformer-clip-accum2": {"kind": "transformer", "batch_size": 24, "trainer": accum},
    }


def train_run(name: str, cfg: dict[str, Any], data: dict[str, Any], args: argparse.Namespace, workdir: Path
              ) -> tuple[Any, Any, Any, Any]:
    """``(log, Net, train_ds, query)`` of one float32 run, trained with the tracker."""
    sgd = {"lr": 0.1 if cfg["kind"] == "mlp" else 0.05, "weight_decay": 1e-3, "step_epochs": 3, "gamma": 0.5}
    Net = make_net(cfg["kind"], **sgd, dropout=cfg.get("dropout"))
    train_ds, val = inputs(cfg["kind"], data, torch.float32)
    log = train(str(workdir / name), Net, train_ds, args.epochs, cfg.get("batch_size", args.batch_size), args.seed,
                dtype=torch.float32, **cfg["trainer"])
    return log, Net, train_ds, eval_query(val)


def run_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser with the arguments of the runs (data, training, clipping) for a benchmark with docstring ``doc``."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    parser.add_argument("--n-train", type=int, default=60)
    parser.add_argument("--n-val", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clip", type=float, default=0.1, help="gradient_clip_val (norm) of the clipping runs")
    return parser


def run_chosen(args: argparse.Namespace, run_config: Any, print_table: Any, prefix: str) -> dict[str, Any]:
    """``run_config(name, cfg, data, args, workdir)`` for each of ``args.configs`` (names of :func:`run_configs` or
    'all'), each table printed as it comes (``print_table``), all results written to ``args.out``."""
    quiet_setup(args.threads)
    configs = run_configs(args.clip)
    chosen = list(configs) if args.configs == "all" else args.configs.split(",")
    data = digits_data(args.n_train, args.n_val, args.seed)
    return run_all(args, chosen, lambda name, work: run_config(name, configs[name], data, args, work), print_table,
                   prefix)


def run_config(name: str, cfg: dict[str, Any], data: dict[str, Any], args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    log, Net, train_ds, query = train_run(name, cfg, data, args, workdir)
    wins = windows_of(log)
    grid = sorted({t for w in wins.values() for t in w})
    out: dict[str, Any] = {"trainer": cfg["trainer"], "T": log.num_steps, "N": log.dataset_size,
                           "step": step_summary(log), "seconds": {}, "info": {}, "errors": {}}
    variants = [("exact", "exact", None, contextlib.nullcontext)]
    variants += [(f"fd float64 eps0={e:g}", "fd", e, contextlib.nullcontext) for e in args.eps0]
    variants += [("fd before (native)", "fd", None, native_products)]
    scores = {}
    for label, hvp, eps0, ctx in variants:
        timer = time.perf_counter()
        with ctx():
            tl = timeline(log, query, module=Net().float(), train_data=train_ds, grid=grid, loss_fn=ce_loss, hvp=hvp,
                          eps0=eps0, tolerance=float("inf"))
        out["seconds"][label] = time.perf_counter() - timer
        out["info"][label] = {k: tl.info[k] for k in ("eps0", "fd_dtype", "fd_kinks", "fd_products", "fd_agreement",
                                                       "fd_asymmetry", "fd_fallback", "fd_unreliable") if k in tl.info}
        scores[label] = {w: tl.window(t1, t2).column(0) for w, (t1, t2) in wins.items()}
    out["cost"] = {f"C={c}": product_cost(log, Net, train_ds, c, args.reps) for c in (1, 4)}
    for label in scores:
        if label != "exact":
            out["errors"][label] = {w: errors(scores[label][w], scores["exact"][w]) for w in wins}
    log.close()
    return out


def print_table(name: str, res: dict[str, Any]) -> None:
    st = res["step"]
    extra = (f"; clipping bound on {st['clip_bound_fraction']:.0%} of steps" if st["clipping"] else "")
    print(f"\n=== {name}: {res['trainer']}, float32, N={res['N']}, T={res['T']}{extra} ===")
    wins = list(next(iter(res["errors"].values())))
    print(f"{'fd variant':<24}" + "".join(f"{w + ' maxabs':>20}{'L2':>9}" for w in wins) + f"{'asym':>8}{'s':>7}{'x exact':>8}  kinks")
    for label, errs in res["errors"].items():
        worst = max(e["max_abs"] for e in errs.values())
        flag = "ok" if worst <= TARGET else "MISSED"
        info = res["info"][label]
        print(f"{label:<24}" + "".join(f"{e['max_abs']:>20.1e}{e['l2']:>9.1e}" for e in errs.values())
              + f"{info.get('fd_asymmetry', 0):>8.1e}{res['seconds'][label]:>7.1f}{res['seconds'][label] / res['seconds']['exact']:>8.2f}"
              + f"  {info.get('fd_kinks')}/{info.get('fd_products')} {flag}"
              + (" [flagged unreliable]" if info.get("fd_unreliable") else "")
              + (f" [fallback: {info['fd_fallback']}]" if "fd_fallback" in info else ""))
    agree = [i["fd_agreement"] for i in res["info"].values() if "fd_agreement" in i]
    if agree:
        print(f"float64 vs native gradient at the first step (relative L2): {agree[0]:.1e}")
    print(f"exact sweep {res['seconds']['exact']:.1f}s; one step's products, fd / exact time: "
          + ", ".join(f"{k} {v['fd_over_exact']:.2f} (before {v['before_over_exact']:.2f}; "
                      f"{v['fd'] * 1e3:.1f} / {v['exact'] * 1e3:.1f} ms)"
                      for k, v in res["cost"].items()))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = run_parser(__doc__)
    parser.add_argument("--eps0", type=lambda s: [float(x) for x in s.split(",")], default=[fd_module.FD_EPS0],
                        help="comma-separated ε_0 of the float64 products")
    parser.add_argument("--reps", type=int, default=7, help="repetitions of the per-step product timing")
    parser.add_argument("--configs", default="all", help="comma-separated config names, or 'all'")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "fd_accuracy.json"))
    args = parser.parse_args(argv)
    return run_chosen(args, run_config, print_table, "li-fd-accuracy-")


if __name__ == "__main__":
    main()
