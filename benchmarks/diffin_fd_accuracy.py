"""Finite-difference Diff-In against Diff-In with exact HVPs on float32 runs (the runs of ``fd_accuracy.py``).

    python benchmarks/diffin_fd_accuracy.py [--configs mlp-dropout,transformer] [--n-train 60] [--epochs 4]

For each run, each Diff-In variant is computed with ``hvp="exact"`` (the reference) and ``hvp="fd"``:

- ``published``: the checkpoint form with ``samples="all"`` at ``--m`` selected steps (batch products ``H_B q``
  and per-sample products ``H_z Ĝ`` of every training sample);
- ``published eval-mode``: the same with the module in eval mode: with dropout, ``samples="all"`` evaluates the
  training samples outside their steps with fresh random masks, which the exact and the finite-difference products
  draw differently (two exact runs with different seeds differ by ~0.4 on ``mlp-dropout``), so only this one
  compares the products themselves;
- ``step``: the per-step form (batch products ``H_B q`` at every step);
- ``self-step``: step-form self-influence (batch products along each sample's own gradient).

Error of the score vector ``s`` against the exact one ``s*`` over the ``N`` training samples, per window (whole
run, second half)::

    max-abs: max_j |s_j − s*_j| / max_j |s*_j|        L2: ‖s − s*‖ / ‖s*‖

and the same for the projected per-sample ``H_z Ĝ`` rows of the last step's batch (its training dropout masks),
with the seconds of each computation and the ``info`` of the finite-difference one (``fd_dtype``, kinks,
asymmetry, unreliable flag). Prints a table and writes JSON (``benchmarks/results/`` is git-ignored).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import ce_loss  # noqa: E402
from fd_accuracy import TARGET, errors, run_chosen, run_parser, train_run  # noqa: E402

from lightning_influence.estimators.diffin import diffin, diffin_self_influence  # noqa: E402
from lightning_influence.estimators.diffin_context import _Context  # noqa: E402

INFO = ("eps0", "fd_dtype", "fd_kinks", "fd_products", "fd_asymmetry", "fd_agreement", "fd_fallback", "fd_unreliable",
        "fd_blowups", "fd_checked")


def run_config(name: str, cfg: dict[str, Any], data: dict[str, Any], args: argparse.Namespace, workdir: Path
               ) -> dict[str, Any]:
    log, Net, train_ds, query = train_run(name, cfg, data, args, workdir)
    T = log.num_steps
    wins = {"whole run": (0, T), "second half": (T // 2, T)}
    variants = {
        "published": lambda w, hvp: diffin(log, query, module=Net().float(), train_data=train_ds, window=w,
                                           form="published", samples="all", steps=min(args.m, w[1] - w[0]),
                                           hvp=hvp, loss_fn=ce_loss),
        "published eval-mode": lambda w, hvp: diffin(log, query, module=Net().float().eval(), train_data=train_ds,
                                                     window=w, form="published", samples="all",
                                                     steps=min(args.m, w[1] - w[0]), hvp=hvp, loss_fn=ce_loss),
        "step": lambda w, hvp: diffin(log, query, module=Net().float(), train_data=train_ds, window=w, form="step",
                                      hvp=hvp, loss_fn=ce_loss),
        "self-step": lambda w, hvp: diffin_self_influence(log, module=Net().float(), train_data=train_ds, window=w,
                                                          hvp=hvp, loss_fn=ce_loss),
    }
    out: dict[str, Any] = {"trainer": cfg["trainer"], "T": T, "N": log.dataset_size, "errors": {}, "seconds": {},
                           "info": {}}
    for variant, compute in variants.items():
        for wname, w in wins.items():
            key = f"{variant} / {wname}"
            res = {}
            for hvp in ("exact", "fd"):
                t0 = time.perf_counter()
                torch.manual_seed(args.seed)  # the same fresh dropout masks outside the training steps in both
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)
                        res[hvp] = compute(w, hvp)
                except NotImplementedError as err:  # e.g. forward AD through CPU flash attention (exact, published)
                    out["skipped"] = {**out.get("skipped", {}), key: f"{hvp}: {str(err).splitlines()[0][:120]}"}
                    break
                out["seconds"].setdefault(key, {})[hvp] = time.perf_counter() - t0
            if len(res) < 2:
                continue
            out["errors"][key] = errors(res["fd"].column(0), res["exact"].column(0))
            out["info"][key] = {k: res["fd"].info[k] for k in INFO if k in res["fd"].info}
    out["per_sample"] = per_sample_errors(log, Net, train_ds)
    log.close()
    return out


def per_sample_errors(log: Any, Net: Any, train_ds: Any) -> dict[str, Any]:
    """The projected ``H_z Ĝ`` rows of the last step's batch (with its training dropout masks), finite differences
    against exact (reverse-over-reverse): relative max-abs and L2 over the ``(B, K)`` matrix."""
    t = log.num_steps - 1
    rows, info = {}, {}
    for hvp in ("exact", "fd"):
        ctx = _Context(log, Net().float(), train_ds, ce_loss, hvp, None, True, 512)
        (_, params), = list(ctx.params_at([t]))
        batch = ctx.step_batch(t)
        g_hat = ctx.batch_grad(params, batch, names=list(params), w=ctx.step_weights(t))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            rows[hvp] = ctx.per_sample_hvp(params, batch, g_hat).double().cpu().numpy()
        if hvp == "fd":
            info = ctx.fd.info()
    return {**errors(rows["fd"].ravel(), rows["exact"].ravel()), "step": t,
            **{k: info[k] for k in ("fd_dtype", "fd_kinks", "fd_products", "fd_asymmetry") if k in info}}


def print_table(name: str, res: dict[str, Any]) -> None:
    print(f"\n=== {name}: {res['trainer']}, float32, N={res['N']}, T={res['T']} ===")
    for key, why in res.get("skipped", {}).items():
        print(f"{key}: skipped ({why})")
    print(f"{'variant / window':<30}{'maxabs':>10}{'L2':>10}{'fd s':>8}{'exact s':>9}{'asym':>9}  fd info")
    for key, e in res["errors"].items():
        info, sec = res["info"][key], res["seconds"][key]
        flag = "ok" if e["max_abs"] <= TARGET else "MISSED"
        print(f"{key:<30}{e['max_abs']:>10.1e}{e['l2']:>10.1e}{sec['fd']:>8.1f}{sec['exact']:>9.1f}"
              f"{info.get('fd_asymmetry', float('nan')):>9.1e}  {flag} dtype={info.get('fd_dtype', '?')} "
              f"eps0={info.get('eps0'):g} kinks={info.get('fd_kinks')}/{info.get('fd_products')} "
              f"blowups={info.get('fd_blowups')}/{info.get('fd_checked')}"
              + (" [flagged unreliable]" if info.get("fd_unreliable") else "")
              + (f" [fallback: {info['fd_fallback']}]" if "fd_fallback" in info else ""))
    ps = res["per_sample"]
    print(f"{'H_z Ĝ rows, step ' + str(ps['step']):<30}{ps['max_abs']:>10.1e}{ps['l2']:>10.1e}{'':>17}"
          f"{ps.get('fd_asymmetry', float('nan')):>9.1e}  {'ok' if ps['max_abs'] <= TARGET else 'MISSED'} "
          f"dtype={ps.get('fd_dtype')} kinks={ps.get('fd_kinks')}/{ps.get('fd_products')}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = run_parser(__doc__)
    parser.add_argument("--m", type=int, default=4, help="selected steps of the published form")
    parser.add_argument("--configs", default="mlp-dropout,mlp-clip,transformer,transformer-nodrop",
                        help="comma-separated config names of fd_accuracy.py, or 'all'")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "diffin_fd_accuracy.json"))
    args = parser.parse_args(argv)
    return run_chosen(args, run_config, print_table, "li-diffin-fd-accuracy-")


if __name__ == "__main__":
    main()
