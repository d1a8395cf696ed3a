"""``--query``: what the scores explain, parsed and turned into one query callable."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Sequence

from lightning_influence.cli.common import UserError
from lightning_influence.cli.context import RunContext

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


def build_query(specs: Sequence[QuerySpec], ctx: RunContext | None) -> tuple[Any, list[str]]:
    """One query callable answering every spec (a vector query swept in one pass), and the names."""
    import torch

    from lightning_influence import queries
    from lightning_influence.cli.datacheck import check_query_data

    if ctx is None:
        raise UserError("queries need the model and data: pass --builder or --config")
    parts = []
    names = []
    for spec in specs:
        if spec.kind == "val_loss":
            parts.append(queries.mean_loss(ctx.val_batch, name="val_loss", **ctx.loss_kwargs()))
            names.append("val_loss")
            continue
        ds = ctx.test_dataset
        if not 0 <= spec.index < len(ds):
            raise UserError(f"--query {spec.text}: unknown test sample id {spec.index}; the test set has {len(ds)} "
                            f"samples (ids 0..{len(ds) - 1})")
        from lightning_influence.data import collate_of

        batch = ctx.convert_input(collate_of(ds)([ds[spec.index]]))
        if spec.kind == "test":
            parts.append(queries.sample_losses(batch, names=[spec.text], **ctx.loss_kwargs()))
        else:
            x, y = _inputs_and_label(batch, spec)
            target = spec.target
            if target is None:
                if y is None:
                    raise UserError(f"--query {spec.text}: the test item has no label; give the class as {spec.kind}:ID:CLASS")
                target = int(y.reshape(-1)[0])
            parts.append(queries.prediction(x, target, margin=spec.kind == "margin", name=spec.text))
        names.append(spec.text)

    def f(module: Any) -> Any:
        return torch.cat([p(module).reshape(-1) for p in parts])

    f.query_names = names  # type: ignore[attr-defined]
    check_query_data(f, ctx.module)  # data the model cannot take: one line now, not an error inside a sweep
    return f, names


def _inputs_and_label(batch: Any, spec: QuerySpec) -> tuple[Any, Any]:
    """The model input and the label (or ``None``) of a collated test item: ``(x, y, ...)``, a dict with one
    input entry besides its label (``y``, ``label``, ...) and ``ids``, or a bare input."""
    from lightning_influence.estimators.scores import LABEL_KEYS

    if isinstance(batch, (list, tuple)):
        return batch[0], batch[1] if len(batch) > 1 else None
    if isinstance(batch, dict):
        label = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        inputs = [k for k in batch if k not in LABEL_KEYS and k != "ids"]
        if len(inputs) != 1:
            raise UserError(f"--query {spec.text}: the test items are dicts with inputs {inputs}, so which one the model "
                            "takes is unknown; use test:ID (the item's loss through per_sample_loss) or --builder")
        return batch[inputs[0]], label
    return batch, None


def query_columns(result_names: Sequence[str], names: Sequence[str], specs: Sequence[QuerySpec]) -> list[tuple[int, str, bool]]:
    """``(column, name, is_loss)`` of each score column; a method may answer its own query (self-influence)."""
    if list(result_names) == list(names):
        return [(i, n, s.is_loss) for i, (n, s) in enumerate(zip(names, specs))]
    return [(i, str(n), True) for i, n in enumerate(result_names)]


