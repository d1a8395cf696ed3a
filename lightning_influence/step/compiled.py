"""Modules compiled with ``torch.compile``: which, and why the log and the estimators take them uncompiled.

``torch.compile(submodule)`` returns a wrapper whose parameters are named ``<name>._orig_mod.<...>``: a log recording
them would name parameters that the model the CLI and the estimators rebuild lacks, so the tracker refuses such a
wrapper before the first step (``nn.Module.compile()`` compiles in place and keeps the names; a whole LightningModule
compiled before ``Trainer.fit`` is unwrapped by Lightning). The estimators differentiate through the module twice
(DIT's Hessian products, the per-sample passes' vmap), which compiled code does not support ("torch.compile with
aot_autograd does not currently support double backward"), so they refuse a compiled module and ask for it uncompiled:
the same parameters give the same scores.
"""

from __future__ import annotations

from torch import nn

__all__ = ["compiled_parts", "compiled_wrappers", "uncompiled_message"]


def compiled_wrappers(module: nn.Module) -> list[str]:
    """Names of the ``torch.compile`` wrappers (``OptimizedModule``) in ``module`` (``""``: the module itself)."""
    return [n for n, m in module.named_modules() if isinstance(getattr(m, "_orig_mod", None), nn.Module)]


def compiled_parts(module: nn.Module) -> list[str]:
    """Names of the compiled modules in ``module``: wrappers, and modules compiled in place (``m.compile()``)."""
    return [n for n, m in module.named_modules()
            if isinstance(getattr(m, "_orig_mod", None), nn.Module) or getattr(m, "_compiled_call_impl", None) is not None]


def uncompiled_message(module: nn.Module, parts: list[str]) -> str:
    """Why a compiled module is refused by the estimators, and what to pass instead."""
    where = ", ".join(repr(n) if n else "the module itself" for n in parts[:3])
    return (f"the module given is compiled with torch.compile ({where}): the estimators and replay differentiate "
            "through it twice, which compiled code does not support. Pass it uncompiled (a freshly built "
            f"{type(getattr(module, '_orig_mod', module)).__name__}(...), or the module before torch.compile): the "
            "weights come from the log, the scores are the same")
