"""The PBRF problem of a trained network: Bregman divergences of the output-space loss, ``θ_T`` and its
outputs on the training set, the training run's L2 weight decay, the Gauss-Newton matrix at ``θ_T`` and
the objective's closure (docs/influence-math.md §6; the objective is written out in
:mod:`lightning_influence.evaluation.pbrf`).

Pure torch: no Lightning imports.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from lightning_influence.capture import call_with_params
from lightning_influence.capture.hvp import flatten, unflatten
from lightning_influence.log.reader import InfluenceLog
from lightning_influence.queries import LossFn, Query, evaluate_query, evaluation_mode, query_names
from lightning_influence.step.buffers import ParamsWithBuffers, buffers_of
from lightning_influence.step.precision import Precision
from lightning_influence.replay import (TrainData, _optimizer_spec, batch_from_ids, functional_loss, optimizer_class,
                                        parameters_at, samples_by_id_needed)

__all__ = ["BREGMAN_LOSSES", "Bregman", "InputsFn", "OutputLoss", "Problem", "bregman_divergence"]


Bregman = Callable[[Tensor, Tensor], Tensor]
"""``D(h, h_ref) -> Tensor[B]``: per-sample Bregman divergence of the loss in output space."""

OutputLoss = Union[str, Bregman]
InputsFn = Callable[[Any], Tensor]


def _kl_logits(h: Tensor, h_ref: Tensor) -> Tensor:
    logp_ref = torch.log_softmax(h_ref, dim=1)
    return (logp_ref.exp() * (logp_ref - torch.log_softmax(h, dim=1))).flatten(1).sum(1)


def _mse(h: Tensor, h_ref: Tensor) -> Tensor:
    return (h - h_ref).pow(2).flatten(1).mean(1)


def _half_sse(h: Tensor, h_ref: Tensor) -> Tensor:
    return 0.5 * (h - h_ref).pow(2).flatten(1).sum(1)


BREGMAN_LOSSES: dict[str, tuple[Bregman, str]] = {
    "cross_entropy": (_kl_logits, "softmax cross-entropy on logits (dim 1): D = KL(softmax(h_ref) ‖ softmax(h))"),
    "mse": (_mse, "F.mse_loss per sample, mean over output entries of (h − y)²: D = mean((h − h_ref)²)"),
    "squared_error": (_half_sse, "½ Σ (h − y)² per sample: D = ½ ‖h − h_ref‖²"),
}


def bregman_divergence(output_loss: OutputLoss) -> Bregman:
    """The output-space Bregman divergence ``D(h, h_ref)`` of a per-sample loss.

    Args:
        output_loss: ``"cross_entropy"`` (logits, classes on dim 1), ``"mse"`` (per-sample
            mean of squared errors, like ``F.mse_loss(..., reduction="none").mean(dims)``),
            ``"squared_error"`` (``½ Σ (h − y)²``), or a callable ``D(h, h_ref) -> Tensor[B]``
            (it must be ``≥ 0``, zero with zero gradient at ``h = h_ref``).

    Raises:
        ValueError: an unknown name.
    """
    if callable(output_loss):
        return output_loss
    if output_loss in BREGMAN_LOSSES:
        return BREGMAN_LOSSES[output_loss][0]
    known = "; ".join(f"{k!r}: {v[1]}" for k, v in BREGMAN_LOSSES.items())
    raise ValueError(f"output_loss={output_loss!r} is not supported. The PBRF needs the training loss written in "
                     f"output space to form its Bregman divergence. Supported: {known}. For another loss that is "
                     "convex in the outputs, pass a callable D(h, h_ref) -> Tensor[B].")


def _default_inputs(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise ValueError(f"the PBRF needs the model's outputs module(x), and a batch of type {type(batch).__name__} has no "
                     "first tensor to take as x: call pbrf/gap_decomposition from Python with inputs_fn=lambda batch: "
                     "<the one tensor module(x) takes> (a model taking several inputs has no PBRF here)")


def check_inputs(train_data: TrainData, ids: np.ndarray, inputs_fn: InputsFn | None = None) -> None:
    """Raise the PBRF's refusal of batches without model inputs (``ValueError``) before any work."""
    (inputs_fn or _default_inputs)(batch_from_ids(train_data, ids))


class Problem:
    """Everything the response objectives need, computed once: θ_T, data chunks, h(θ_T, x_i), κ
    (built by :func:`pbrf`, :func:`linear_pbrf` and :func:`gap_decomposition` from their arguments)."""

    def __init__(self, log: InfluenceLog, module: nn.Module, train_data: TrainData, query: Query, *,
                 output_loss: OutputLoss, damping: float, weight_decay: float | Mapping[str, float] | None,
                 step: int | None, loss_fn: LossFn, inputs_fn: InputsFn | None, chunk_size: int | None,
                 epsilon: float | None, max_dense_params: int = 6000) -> None:
        if not (isinstance(damping, (int, float)) and damping >= 0 and math.isfinite(damping)):
            raise ValueError(f"damping must be a finite float >= 0, got {damping!r}")
        if train_data is None:  # the objective is over the training set, sample by sample, not the steps' batches
            raise samples_by_id_needed("the PBRF (pbrf, linear_pbrf, gap_decomposition) evaluates every training "
                                       "sample's outputs and loss at θ_T")
        self.log, self.module, self.train_data, self.query = log, module, train_data, query
        self.precision = Precision.from_meta(log.meta.get("precision"))  # "64-true": batches cast as Lightning cast them
        self.loss_fn, self.inputs_fn = loss_fn, inputs_fn or _default_inputs
        self.divergence = bregman_divergence(output_loss)
        self.output_loss = output_loss if isinstance(output_loss, str) else getattr(output_loss, "__name__", "custom")
        self.damping = float(damping)
        self.max_dense_params = int(max_dense_params)
        self._gn: Tensor | None = None
        self._chol: Tensor | None = None
        self.step = log.num_steps if step is None else int(step)
        params = parameters_at(log, module, train_data, self.step)
        self.buffers = buffers_of(params)  # the module's at that step (running statistics): with every evaluation
        self.names = list(params)
        self.shapes = {n: tuple(t.shape) for n, t in params.items()}
        self.theta = flatten({n: t.detach() for n, t in params.items()}, self.names)
        self.dtype = self.theta.dtype
        self.p = self.theta.numel()
        self.ids = log.all_ids()
        self.N = len(self.ids)
        if self.N == 0:
            raise ValueError(f"{log.path}: the log holds no training step")
        self.epsilon = -1.0 / self.N if epsilon is None else float(epsilon)
        self.kappa, self.weight_decay_note = self._weight_decay(weight_decay)
        self.mu = self.damping + self.kappa  # (p,) proximity weight of the PBRF
        cs = self.N if chunk_size is None else int(chunk_size)
        if cs < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
        self.chunks: list[tuple[Any, Tensor, Tensor]] = []  # (batch, inputs, h(θ_T))
        with torch.no_grad():
            for a in range(0, self.N, cs):
                batch = self.batch(self.ids[a:a + cs])
                x = self.inputs_fn(batch)
                self.chunks.append((batch, x, self.outputs(self.theta, x).detach()))
        with torch.no_grad():
            f0 = self.f(self.theta)
        self.f0 = f0
        self.query_names = query_names(query, f0.numel())

    # --- weight decay = the training run's L2 regulariser (its Bregman divergence joins the proximity)
    def _weight_decay(self, weight_decay: Any) -> tuple[Tensor, str]:
        vec = torch.zeros(self.p, dtype=self.dtype)
        offsets, start = {}, 0
        for n in self.names:
            k = math.prod(self.shapes[n])
            offsets[n] = slice(start, start + k)
            start += k
        if isinstance(weight_decay, Mapping):
            for n, v in weight_decay.items():
                if n not in offsets:
                    raise ValueError(f"weight_decay names {n!r}, not a trainable parameter of the module")
                vec[offsets[n]] = float(v)
            return vec, "given per parameter"
        if weight_decay is not None:
            vec[:] = float(weight_decay)
            return vec, "given"
        try:
            cls = optimizer_class(self.log)
            groups = _optimizer_spec(self.log)["param_groups"]
        except Exception as err:  # noqa: BLE001 - no optimizer metadata: no regulariser known
            return vec, f"not known ({err}); 0 used"
        if cls is torch.optim.AdamW or any(g.get("decoupled_weight_decay") for g in groups):
            return vec, ("AdamW's decoupled weight decay is not the gradient of an L2 loss term; not included "
                         "(pass weight_decay= to include an L2 term)")
        # a weight-decay schedule: the value of the step that reached θ_step (docs/log-format.md, version 3)
        last = self.log.hyper(self.step - 1) if self.log.first_step < self.step <= self.log.num_steps else None
        decay = last.get("weight_decay") if last is not None else None
        for gi, g in enumerate(groups):
            for n in g["params"]:
                if n in offsets:
                    vec[offsets[n]] = float(g.get("weight_decay", 0.0)) if decay is None else float(decay[gi])
        return vec, f"coupled L2 weight decay of the logged {cls.__name__} param groups" + (
            f" (as at step {self.step - 1}: the run scheduled its hyperparameters)" if decay is not None else "")

    # --- evaluation at a flat parameter vector
    def as_dict(self, x: Tensor) -> ParamsWithBuffers:
        return ParamsWithBuffers(unflatten(x, self.shapes), self.buffers)

    # The PBRF is a function of θ, as the query: dropout off (queries.evaluation_mode), else each evaluation draws new
    # masks (and vmap refuses the random draws)
    def outputs(self, x: Tensor, inputs: Tensor) -> Tensor:
        with evaluation_mode(self.module):
            return call_with_params(self.module, lambda m, a: m(a), self.as_dict(x), inputs)

    def losses(self, x: Tensor, batch: Any) -> Tensor:
        with evaluation_mode(self.module):
            return functional_loss(self.module, self.loss_fn, self.as_dict(x), batch)

    def f(self, x: Tensor) -> Tensor:
        return evaluate_query(self.module, self.query, self.as_dict(x)).reshape(-1)

    def batch(self, ids: Sequence[int] | np.ndarray) -> Any:
        """The training samples ``ids`` as training's forwards took them: collated, then cast by the run's precision
        plugin (a ``precision="64-true"`` run's float32 training set in float64, as :func:`~lightning_influence.replay.load_step`)."""
        return self.precision.convert_input(batch_from_ids(self.train_data, np.asarray(ids, dtype=np.int64)))

    def sample_batch(self, m: int) -> Any:
        return self.batch([m])

    def check_samples(self, samples: Sequence[int] | np.ndarray) -> np.ndarray:
        s = np.asarray(samples, dtype=np.int64).reshape(-1)
        missing = np.setdiff1d(s, self.ids)
        if len(missing):
            raise ValueError(f"samples {missing[:10].tolist()} never appear in the log's batches (training ids "
                             f"{self.ids.min()}..{self.ids.max()}, {self.N} distinct)")
        return s

    # --- the dense Gauss-Newton matrix G = (1/N) Σ_i J_iᵀ ∇²_h D_i J_i at θ_T (small models)
    def gauss_newton_matrix(self) -> Tensor:
        if self._gn is not None:
            return self._gn
        if self.p > self.max_dense_params:
            raise ValueError(f"the dense Gauss-Newton matrix needs p <= max_dense_params={self.max_dense_params}, "
                             f"the module has p={self.p}")
        G = torch.zeros(self.p, self.p, dtype=self.dtype)
        for _, inputs, h_ref in self.chunks:
            K = h_ref[0].numel()
            step = max(1, (1 << 24) // max(1, K * self.p))  # Jacobian rows per pass: <= 128 MiB in float64
            for a in range(0, h_ref.shape[0], step):
                x_in, hr = inputs[a:a + step], h_ref[a:a + step]
                jac = torch.func.jacrev(lambda z: self.outputs(z, x_in))(self.theta).reshape(hr.shape[0], K, self.p)

                hess = self.output_hessians(hr, hr)
                G += jac.reshape(-1, self.p).T @ torch.einsum("nkl,nlp->nkp", hess, jac).reshape(-1, self.p)
        self._gn = (G + G.T) / (2 * self.N)
        return self._gn

    def gauss_newton_cholesky(self) -> Tensor:
        """Cholesky factor of ``G + diag(λ + κ)``."""
        if self._chol is None:
            A = self.gauss_newton_matrix() + torch.diag(self.mu)
            L, info = torch.linalg.cholesky_ex(A)
            if int(info) != 0:  # singular without damping: add the smallest jitter that factors
                jitter = 1e-12 * float(A.diagonal().abs().max())
                while int(info) != 0:
                    L, info = torch.linalg.cholesky_ex(A + jitter * torch.eye(self.p, dtype=self.dtype))
                    jitter *= 10
            self._chol = L
        return self._chol

    def indefinite(self, m: int, epsilon: float) -> bool:
        """Whether the Hessian of sample ``m``'s objective at ``θ_T``, ``G + diag(μ) + ε ∇²ℓ_m(θ_T)``, has a negative
        eigenvalue (its Cholesky factorisation fails): exact, dense (``p <= max_dense_params``). The data term's Hessian
        at ``θ_T`` is ``G`` exactly (a Bregman divergence has zero gradient at ``h = h_ref``); ``∇²ℓ_m`` is the whole
        Hessian of the sample's loss, the network's second derivatives included, which the Gauss-Newton matrix
        leaves out: where ``ε ∇²ℓ_m`` outweighs ``G + μ`` along a direction, ``θ_T`` is a saddle of the objective."""
        b = self.sample_batch(m)
        hess = torch.func.jacrev(torch.func.grad(lambda x: self.losses(x, b).sum()), chunk_size=256)(self.theta)
        A = self.gauss_newton_matrix() + torch.diag(self.mu) + epsilon * (hess + hess.T) / 2
        return int(torch.linalg.cholesky_ex(A).info) != 0

    def output_hessians(self, h: Tensor, h_ref: Tensor) -> Tensor:
        """``(B, K, K)`` Hessians of ``D(·, h_ref)`` in output space at ``h`` (= the loss's output Hessian)."""
        def one(a: Tensor, r: Tensor) -> Tensor:
            return self.divergence(a.unsqueeze(0), r.unsqueeze(0)).sum()

        K = h[0].numel()
        return torch.func.vmap(torch.func.hessian(one))(h, h_ref).reshape(h.shape[0], K, K)

    def sample_preconditioner(self, m: int, epsilon: float) -> Callable[[Tensor], Tensor]:
        """``g ↦ (G + μ + ε J_mᵀ H_m J_m)⁻¹ g``: the Gauss-Newton matrix of the whole PBRF objective of
        sample ``m`` at θ_T, by a Woodbury update of the Cholesky factor of ``G + μ`` (rank ``K``)."""
        chol = self.gauss_newton_cholesky()
        x_m = self.inputs_fn(self.sample_batch(m))
        with torch.no_grad():
            h_m = self.outputs(self.theta, x_m).detach()
        K = h_m[0].numel()
        Jm = torch.func.jacrev(lambda z: self.outputs(z, x_m))(self.theta).reshape(K, self.p)
        Hm = self.output_hessians(h_m, h_m)[0]
        AU = torch.cholesky_solve(Jm.T.contiguous(), chol)  # (p, K)
        core = torch.eye(K, dtype=self.dtype) + epsilon * Hm @ (Jm @ AU)
        try:
            core_inv = torch.linalg.inv(core)
        except RuntimeError:  # singular update: precondition with G + μ alone
            core_inv = None

        def apply(g: Tensor) -> Tensor:
            y = torch.cholesky_solve(g.unsqueeze(1), chol).squeeze(1)
            if core_inv is None:
                return y
            return y - AU @ (core_inv @ (epsilon * (Hm @ (Jm @ y))))

        return apply

    # --- the PBRF objective J(x) = (1/N) Σ D + ε ℓ_m + ½ Σ μ (x − θ_T)², gradient accumulated chunk by chunk
    def pbrf_closure(self, x: Tensor, sample_batch: Any, epsilon: float) -> Callable[[], Tensor]:
        def closure() -> Tensor:
            if x.grad is not None:
                x.grad = None
            total = 0.0
            for _, inputs, h_ref in self.chunks:
                part = self.divergence(self.outputs(x, inputs), h_ref).sum() / self.N
                part.backward()
                total += float(part.detach())
            rest = epsilon * self.losses(x, sample_batch).sum() + 0.5 * (self.mu * (x - self.theta).pow(2)).sum()
            rest.backward()
            return torch.as_tensor(total + float(rest.detach()), dtype=self.dtype)

        return closure
