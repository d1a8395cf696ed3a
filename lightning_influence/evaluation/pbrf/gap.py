"""The gap between replay LOO and the PBRF / influence function, stage by stage (:func:`gap_decomposition`;
the stages are described in :mod:`lightning_influence.evaluation.pbrf`).

Pure torch: no Lightning imports.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lightning_influence.capture import call_with_params
from lightning_influence.capture.hvp import flatten
from lightning_influence.estimators.signature import positional_limit
from lightning_influence.evaluation.pbrf.linear import linear_responses
from lightning_influence.evaluation.pbrf.problem import InputsFn, OutputLoss, Problem
from lightning_influence.evaluation.pbrf.result import PBRFResult
from lightning_influence.evaluation.pbrf.solve import resolve_solver, solve_samples
from lightning_influence.log.microbatches import drew_random_numbers
from lightning_influence.log.reader import InfluenceLog
from lightning_influence.queries import LossFn, Query, default_loss_fn, query_column
from lightning_influence.replay import (
    Progress,
    TrainData,
    _optimizer_spec,
    build_optimizer,
    functional_loss,
    load_optimizer_state,
    optimizer_class,
    resolve_progress,
    set_step_hyper,
)
from lightning_influence.step.precision import Precision

__all__ = ["STAGES", "GapDecomposition", "gap_decomposition"]


STAGES = ("loo", "warm", "warm_prox", "bregman", "pbrf", "linear")
_STAGE_TEXT = {
    "loo": "cold-start retraining from θ_0 without z_m (replay LOO, the ground truth)",
    "warm": "warm start: the same optimizer, schedule and batches ({K}) from θ_T without z_m",
    "warm_prox": "+ proximity (λ/2)‖θ − θ_T‖²",
    "bregman": "+ Bregman divergences instead of the losses (θ_T treated as a minimiser)",
    "pbrf": "PBRF solved to convergence (full batch)",
    "linear": "linearised PBRF (influence function: Gauss-Newton + damping)",
}
_TERMS = (
    ("warm-start (θ_0 -> θ_T)", "loo", "warm"),
    ("proximity", "warm", "warm_prox"),
    ("training non-convergence (loss -> Bregman)", "warm_prox", "bregman"),
    ("solver non-convergence (logged optimizer -> converged)", "bregman", "pbrf"),
    ("linearisation", "pbrf", "linear"),
)


@dataclass
class GapDecomposition:
    """The LOO → PBRF → influence-function gap of chosen samples, stage by stage.

    Attributes:
        samples: ``(S,)`` ids.
        stages: ``{stage: (S, Q)}`` responses (keys in :data:`STAGES` order).
        query_names: the ``Q`` query names.
        descriptions: ``{stage: text}``.
        info: settings, timings and the PBRF convergence summary.
    """

    samples: np.ndarray
    stages: dict[str, np.ndarray]
    query_names: list[str]
    descriptions: dict[str, str]
    info: dict[str, Any] = field(default_factory=dict)

    def terms(self, query: int | str = 0) -> list[dict[str, Any]]:
        """Each gap term ``stage_b − stage_a``: RMS, RMS relative to RMS(LOO) and to RMS of the total gap."""
        q = query_column(self.query_names, query)
        loo = self.stages["loo"][:, q]
        rms_loo = float(np.sqrt(np.mean(loo ** 2)))
        total = self.stages["linear"][:, q] - loo
        rms_total = float(np.sqrt(np.mean(total ** 2)))
        rows = []
        for name, a, b in _TERMS:
            d = self.stages[b][:, q] - self.stages[a][:, q]
            rms = float(np.sqrt(np.mean(d ** 2)))
            rows.append({"term": name, "from": a, "to": b, "rms": rms,
                         "rms_over_loo": rms / rms_loo if rms_loo > 0 else float("nan"),
                         "rms_over_total_gap": rms / rms_total if rms_total > 0 else float("nan")})
        rows.append({"term": "total (linear − loo)", "from": "loo", "to": "linear", "rms": rms_total,
                     "rms_over_loo": rms_total / rms_loo if rms_loo > 0 else float("nan"), "rms_over_total_gap": 1.0})
        return rows

    def correlations(self, query: int | str = 0) -> list[dict[str, Any]]:
        """Pearson/Spearman of every stage with LOO and with the converged PBRF."""
        from lightning_influence.evaluation.metrics import pearson, spearman

        q = query_column(self.query_names, query)
        loo, pb = self.stages["loo"][:, q], self.stages["pbrf"][:, q]
        return [{"stage": s, "rms": float(np.sqrt(np.mean(v[:, q] ** 2))),
                 "pearson_loo": pearson(v[:, q], loo), "spearman_loo": spearman(v[:, q], loo),
                 "pearson_pbrf": pearson(v[:, q], pb), "spearman_pbrf": spearman(v[:, q], pb)}
                for s, v in self.stages.items()]

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready values."""
        return {"samples": self.samples.tolist(), "query_names": list(self.query_names),
                "stages": {k: v.tolist() for k, v in self.stages.items()}, "descriptions": dict(self.descriptions),
                "terms": {n: self.terms(n) for n in self.query_names},
                "correlations": {n: self.correlations(n) for n in self.query_names},
                "info": {k: v for k, v in self.info.items() if isinstance(v, (int, float, str, bool, list, dict))}}

    def table(self, query: int | str = 0) -> str:
        """The gap terms of one query as printable lines."""
        q = query_column(self.query_names, query)
        lines = [f"LOO -> PBRF -> influence-function gap, query {self.query_names[q]!r}, {len(self.samples)} samples, "
                 f"damping λ={self.info.get('damping')}"]
        lines.append(f"{'stage':<10} {'RMS':>10} {'r(LOO)':>7} {'ρ(LOO)':>7} {'r(PBRF)':>7} {'ρ(PBRF)':>7}  what")
        for row in self.correlations(q):
            lines.append(f"{row['stage']:<10} {row['rms']:>10.3e} {row['pearson_loo']:>7.3f} {row['spearman_loo']:>7.3f} "
                         f"{row['pearson_pbrf']:>7.3f} {row['spearman_pbrf']:>7.3f}  {self.descriptions[row['stage']]}")
        lines.append(f"{'term':<55} {'RMS':>10} {'/RMS(LOO)':>9} {'/RMS(gap)':>9}")
        for row in self.terms(q):
            lines.append(f"{row['term']:<55} {row['rms']:>10.3e} {row['rms_over_loo']:>9.3f} {row['rms_over_total_gap']:>9.3f}")
        return "\n".join(lines)


def _refuse_unmodelled_steps(log: InfluenceLog, steps: Sequence[int]) -> None:
    """The warm stages run plain batches through ``torch.optim``: a log whose steps clipped gradients, ran under
    mixed precision or drew random numbers (dropout) would make them differ from the logged optimizer silently."""
    why = []
    if (log.meta.get("gradient_clipping") or {}).get("algorithm"):
        why.append("gradient clipping")
    if Precision.from_meta(log.meta.get("precision")).autocast_dtype:
        why.append(f"mixed precision ({log.meta['precision'].get('name')})")
    if any(drew_random_numbers(log, t) for t in steps):
        why.append("random numbers drawn in the forward (dropout)")
    if why:
        raise ValueError(f"gap_decomposition cannot model this log's training steps ({', '.join(why)}): its warm "
                         "stages rerun the logged optimizer without them. Use pbrf() and replay_loo() separately, "
                         "or decompose a run trained without them")


class _WarmRunner:
    """The logged optimizer, learning rates and batches of ``steps``, started at θ_T with its optimizer state,
    with a modified objective; every removal is a stacked copy of the parameters (copy 0 removes nothing).
    Each step's loss is ``Σ_i w_{i,t} ℓ_i`` with the recorded per-sample weights (``step/weights.py``: accumulation,
    incomplete accumulations), like replay; a removal sets its ``w`` to 0.

    The coupled weight decay of SGD/Adam is taken out of the optimizer and put in the objective as
    ``½ Σ κ θ²`` (the same update), so the Bregman stage can use its divergence ``½ Σ κ (θ − θ_T)²``;
    AdamW keeps its decoupled weight decay in every stage.
    """

    def __init__(self, prob: Problem, steps: Sequence[int]) -> None:
        self.prob = prob
        log = prob.log
        self.steps = list(steps)
        _refuse_unmodelled_steps(log, self.steps)
        self.batches = []
        with torch.no_grad():
            for t in self.steps:
                ids = log.batch_ids(t)
                batch = prob.batch(ids)
                inputs = prob.inputs_fn(batch)
                weights = torch.as_tensor(log.weights(t), dtype=prob.dtype)  # w_{i,t}: the step's loss is Σ w ℓ
                self.batches.append((t, ids, weights, batch, inputs, prob.outputs(prob.theta, inputs).detach()))
        try:
            self.decoupled = optimizer_class(log) is torch.optim.AdamW
        except Exception:  # noqa: BLE001 - build_optimizer raises the real error below
            self.decoupled = False
        self.opt_names = [n for g in _optimizer_spec(log)["param_groups"] for n in g["params"]]
        try:
            self.state = log.optimizer_state(prob.step) if prob.step in log.checkpoint_steps else None
        except Exception:  # noqa: BLE001 - no stored state: a fresh optimizer
            self.state = None

    def run(self, removed: Sequence[int | None], kind: str, prox: bool) -> np.ndarray:
        """``f`` of every copy ``(C, Q)`` after the steps; copy ``c`` removes sample ``removed[c]`` (None: nothing)."""
        prob = self.prob
        C = len(removed)
        theta = prob.as_dict(prob.theta)
        stacked = {n: theta[n].detach().unsqueeze(0).expand(C, *theta[n].shape).clone().requires_grad_(True)
                   for n in prob.names}
        opt = build_optimizer(prob.log, stacked)
        if self.state is not None:
            load_optimizer_state(opt, self.opt_names, self.state)
        rem = np.array([-1 if r is None else int(r) for r in removed])
        kappa = prob.kappa if not self.decoupled else torch.zeros_like(prob.kappa)
        for t, ids, weights, batch, inputs, h_ref in self.batches:
            set_step_hyper(opt, prob.log, t)  # the step's learning rates (and momentum, betas under a schedule)
            if not self.decoupled:  # the coupled weight decay is κ in the objective
                for g in opt.param_groups:
                    g["weight_decay"] = 0.0
            opt.zero_grad(set_to_none=True)
            gone = torch.as_tensor(ids[None, :] == rem[:, None], dtype=prob.dtype)  # (C, B)

            def per_copy(p: dict[str, Tensor], dropped: Tensor) -> Tensor:
                x = flatten(p, prob.names)
                losses = functional_loss(prob.module, prob.loss_fn, p, batch)
                if kind == "loss":
                    obj = ((1.0 - dropped) * weights * losses).sum() + 0.5 * (kappa * x.pow(2)).sum()
                else:
                    h = call_with_params(prob.module, lambda m, a: m(a), p, inputs)
                    obj = (weights * (prob.divergence(h, h_ref) - dropped * losses)).sum() \
                        + 0.5 * (kappa * (x - prob.theta).pow(2)).sum()
                if prox:
                    obj = obj + 0.5 * prob.damping * (x - prob.theta).pow(2).sum()
                return obj

            torch.func.vmap(per_copy)(dict(stacked), gone).sum().backward()
            opt.step()
        with torch.no_grad():
            return np.stack([prob.f(flatten({n: v[c] for n, v in stacked.items()}, prob.names)).double().numpy()
                             for c in range(C)])


@positional_limit(4, "the log, the model, the training data and the query",
                  "gap_decomposition(log, module, train_data, query, *, samples=..., damping=..., ...)")
def gap_decomposition(log: InfluenceLog, module: nn.Module, train_data: TrainData, query: Query, *,
                      samples: Sequence[int],
                      damping: float = 1e-3, output_loss: OutputLoss = "cross_entropy", warm_epochs: int | None = None,
                      steps: int = 100, tol: float = 1e-8, solver: str = "auto", loo: np.ndarray | None = None,
                      pbrf_result: PBRFResult | None = None,
                      weight_decay: float | Mapping[str, float] | None = None, loss_fn: LossFn = default_loss_fn,
                      inputs_fn: InputsFn | None = None, chunk_size: int | None = None, copies: int = 256,
                      max_dense_params: int = 6000, progress: Progress = None) -> GapDecomposition:
    """Split the gap between replay LOO and the PBRF / influence function into its terms.

    Computes, for every sample of ``samples``, the response of each intermediate objective
    (:data:`STAGES`); adjacent stages differ in one thing, so the terms telescope:

    - ``loo``: :func:`~lightning_influence.evaluation.ground_truth.replay_loo` (or ``loo``,
      ``(S, Q)`` precomputed in the order of ``samples``);
    - ``warm``: the logged optimizer, learning rates, batches and per-sample loss weights of the last
      ``warm_epochs`` epochs (default: the whole run, so only the starting point differs from LOO), started
      at ``θ_T`` with its optimizer state, minus the same run without the removal;
    - ``warm_prox``: the same plus ``(λ/2)‖θ − θ_T‖²``;
    - ``bregman``: the same with every loss replaced by its Bregman divergence around
      ``θ_T`` (and the removed sample's loss subtracted where it was in the batch): the
      PBRF objective run by the logged optimizer;
    - ``pbrf``: :func:`pbrf` solved to convergence (``solver``, ``steps``, ``tol``), or
      ``pbrf_result`` computed before for the same samples and damping;
    - ``linear``: :func:`linear_pbrf`.

    The warm-start stages train all samples together as stacked copies (``copies`` per pass).

    Returns:
        :class:`GapDecomposition` (``.table()``, ``.terms()``, ``.correlations()``).
    """
    from lightning_influence.evaluation.ground_truth import replay_loo

    show = resolve_progress(progress, "gap")
    t0 = time.perf_counter()
    prob = Problem(log, module, train_data, query, output_loss=output_loss, damping=damping, weight_decay=weight_decay,
                    step=None, loss_fn=loss_fn, inputs_fn=inputs_fn, chunk_size=chunk_size, epsilon=None,
                    max_dense_params=max_dense_params)
    s = prob.check_samples(samples)
    S, Q = len(s), prob.f0.numel()
    stages: dict[str, np.ndarray] = {}
    times: dict[str, float] = {}
    tic = time.perf_counter()
    if loo is None:
        res = replay_loo(log, module, train_data, query, sample_ids=s, grid=[log.num_steps], loss_fn=loss_fn, copies=copies)
        stages["loo"] = res.at(log.num_steps)
    else:
        stages["loo"] = np.asarray(loo, dtype=np.float64).reshape(S, Q)
    times["loo"] = time.perf_counter() - tic
    epochs_all = sorted(set(int(e) for e in log.epochs_of_step))
    chosen = epochs_all if warm_epochs is None else epochs_all[-int(warm_epochs):]
    warm_steps = [int(t) for t, e in zip(log.steps, log.epochs_of_step) if int(e) in chosen]
    runner = _WarmRunner(prob, warm_steps)
    drift: dict[str, float] = {}
    per = max(1, copies - 1)
    done = 0
    for name, kind, prox in (("warm", "loss", False), ("warm_prox", "loss", True), ("bregman", "bregman", True)):
        tic = time.perf_counter()
        out = np.zeros((S, Q))
        for a in range(0, S, per):
            chunk = [int(m) for m in s[a:a + per]]
            vals = runner.run([None] + chunk, kind, prox)
            out[a:a + len(chunk)] = vals[1:] - vals[0]
            drift[name] = float(np.max(np.abs(vals[0] - prob.f0.double().numpy())))
            done += len(chunk)
            if show is not None:
                show(done, 3 * S + S)
        stages[name] = out
        times[name] = time.perf_counter() - tic
    tic = time.perf_counter()
    if pbrf_result is not None:
        if not np.array_equal(pbrf_result.samples, s) or pbrf_result.damping != prob.damping:
            raise ValueError("pbrf_result must hold the same samples (same order) and damping as this call")
        res_p = pbrf_result
    else:
        res_p = solve_samples(prob, s, steps=steps, solver=resolve_solver(prob, solver), lr=None, tol=tol, record_at=(),
                              progress=(lambda k, _n: show(3 * S + k, 4 * S)) if show is not None else None)
    stages["pbrf"] = res_p.scores
    times["pbrf"] = time.perf_counter() - tic
    tic = time.perf_counter()
    res_l = linear_responses(prob, s)
    stages["linear"] = res_l.scores
    times["linear"] = time.perf_counter() - tic
    span = (f"all {len(chosen)} epochs, {len(warm_steps)} steps" if warm_epochs is None
            else f"last {len(chosen)} epoch(s), {len(warm_steps)} steps")
    desc = {k: v.format(K=span) for k, v in _STAGE_TEXT.items()}
    info = {"damping": prob.damping, "epsilon": prob.epsilon, "warm_epochs": len(chosen), "warm_steps": len(warm_steps),
            "steps": steps, "tol": tol, "N": prob.N, "p": prob.p, "output_loss": prob.output_loss,
            "weight_decay_note": prob.weight_decay_note, "baseline_drift": drift, "pbrf": res_p.summary(),
            "linear": res_l.summary(), "seconds": times, "total_seconds": time.perf_counter() - t0}
    return GapDecomposition(samples=s, stages={k: stages[k] for k in STAGES}, query_names=prob.query_names,
                            descriptions=desc, info=info)
