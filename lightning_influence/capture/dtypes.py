"""A forward that fails on mixed dtypes (float32 data into a float64 model, or the reverse) told as the user's mistake.

Everything that evaluates the module at given parameters (replay, the estimators' losses and queries, the tracker's
own passes) goes through :func:`~lightning_influence.capture.per_sample.call_with_params`; a dtype error torch raises
there ("mat1 and mat2 must have the same dtype", "expected scalar type Double but found Float", "Input type ... and
weight type ... should be the same") is raised again as a ``ValueError`` saying what the parameters are (the log's
dtype: the run's) and what to do (the CLI shows it as a user error, exit code 2).
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

__all__ = ["dtype_mismatch"]

_DTYPE_ERROR = re.compile(r"same dtype|scalar type|should be the same|to have the same type|dtype", re.IGNORECASE)


def dtype_mismatch(err: RuntimeError, params: Iterable[Tensor], args: Any) -> ValueError | None:
    """A ``ValueError`` explaining ``err`` when it is a dtype error (``None`` otherwise): the floating dtypes of the
    parameters and of the tensors in ``args`` (a query holds its data itself: then the parameters' only)."""
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if not _DTYPE_ERROR.search(message):
        return None
    ours = sorted({str(p.dtype).removeprefix("torch.") for p in params if p.is_floating_point()})
    theirs = sorted({str(x.dtype).removeprefix("torch.") for x in pytree.tree_leaves(args)
                     if isinstance(x, Tensor) and x.is_floating_point()})
    inputs = f", its inputs {'/'.join(theirs)}" if theirs else ""
    want = ours[0] if len(ours) == 1 else "the parameters' dtype"
    return ValueError(f"the module's forward failed on mixed dtypes ({message}): its parameters are {'/'.join(ours)} "
                      f"(as the run trained them){inputs}. Give the data (the training set, the "
                      f"query's inputs) in {want} (e.g. x.to(torch.{want}) or dataset tensors .to(torch.{want})), or "
                      "cast the inputs in the module's forward (x.to(self.dtype)) (a precision='64-true' run's training batches are "
                      "cast as Lightning cast them; a query's data are used as given)")
