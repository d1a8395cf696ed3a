"""torch.optim's implementation variants (``foreach``, CPU ``fused``) and settings a user combines with param groups,
as a Lightning fit runs them: every run replays bit for bit (tolerance 0 at every checkpoint) because replay rebuilds
the optimizer with the same implementation (its param groups' ``fused``/``foreach`` flags); a fused kernel rounds
otherwise than the for-loop one, so a replay with the default implementation would drift."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from lightning_influence import InfluenceTracker
from lightning_influence.log import InfluenceLog
from lightning_influence.replay import replay
from tests.conftest import TinyClassifier, fit, loader, make_data

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _decay_groups(m: torch.nn.Module) -> list[dict[str, Any]]:
    """The transformer recipe: weight decay on the weight matrices, none on biases."""
    return [{"params": [p for n, p in m.named_parameters() if p.dim() > 1], "weight_decay": 0.01},
            {"params": [p for n, p in m.named_parameters() if p.dim() <= 1], "weight_decay": 0.0}]


VARIANTS: dict[str, Callable[[torch.nn.Module], torch.optim.Optimizer]] = {
    "AdamW fused, two groups": lambda m: torch.optim.AdamW(_decay_groups(m), lr=0.05, fused=True),
    "Adam fused amsgrad": lambda m: torch.optim.Adam(m.parameters(), lr=0.05, amsgrad=True, weight_decay=1e-3, fused=True),
    "SGD fused Nesterov": lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9, nesterov=True, fused=True),
    "Adagrad fused": lambda m: torch.optim.Adagrad(m.parameters(), lr=0.1, lr_decay=0.01, fused=True),
    "RMSprop foreach centered": lambda m: torch.optim.RMSprop(m.parameters(), lr=0.01, centered=True, momentum=0.5,
                                                              foreach=True),
    "SGD foreach dampening": lambda m: torch.optim.SGD(_decay_groups(m), lr=0.2, momentum=0.9, dampening=0.3,
                                                       foreach=True),
}


class Variant(TinyClassifier):
    def __init__(self, variant: str) -> None:
        super().__init__()
        self.variant = variant

    def configure_optimizers(self) -> Any:
        opt = VARIANTS[self.variant](self)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 0.9 ** s] * len(opt.param_groups))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_implementation_variants_replay_bit_exactly(tmp_path: Any, variant: str) -> None:
    torch.manual_seed(0)
    ds = make_data(30, dtype=torch.float32)
    fit(Variant(variant), loader(ds, 6), InfluenceTracker(str(tmp_path / "log"), checkpoint_every_n_steps=2), epochs=2)
    log = InfluenceLog(tmp_path / "log")
    flag = "fused" if "fused" in variant else "foreach"
    assert all(g[flag] is True for g in log.meta["optimizer"]["param_groups"])
    steps = [rs.step for rs in replay(log, Variant(variant), ds, loss_fn=lambda m, b: m.per_sample_loss(b),
                                      tolerance=0.0)]
    assert steps == list(range(log.num_steps + 1)) and log.num_steps == 10


class Expert(TinyClassifier):
    """An expert layer used only on batches whose labels sum to an even number (``zero``: multiplied by 0 otherwise, so it gets
    a zero gradient instead of none); ``unused``: a layer never used."""

    def __init__(self, zero: bool = False, unused: bool = False) -> None:
        super().__init__(lr=0.3, momentum=0.9, weight_decay=0.01)
        self.expert, self.zero = torch.nn.Linear(3, 3), zero
        self.spare = torch.nn.Linear(3, 3) if unused else None

    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        out = self(batch[0])
        if int(batch[1].sum()) % 2 == 0:
            out = out + self.expert(out)
        elif self.zero:
            out = out + 0 * self.expert(out)
        return torch.nn.functional.cross_entropy(out, batch[1], reduction="none")


def test_a_parameter_skipped_after_it_trained_is_refused_at_its_step(tmp_path: Any) -> None:
    """torch.optim leaves a parameter whose .grad is None out of the step (no momentum, no weight decay), the update
    rules take it as a zero gradient: DIT was 2-15% off the derivative of replay on such a run (an expert skipped on
    half the batches), silently. Refused at the first step it happens, nothing of it stored; the same expert given a
    zero gradient, and a layer never used, are accepted and replay bit for bit."""
    from lightning_influence.step.optimizers import UnsupportedOptimizerError

    ds = make_data(30, dtype=torch.float32)
    with pytest.raises(UnsupportedOptimizerError, match=r"at step (\d+) the parameters \['expert.weight', "
                                                        r"'expert.bias'\] got no gradient"):
        fit(Expert(), loader(ds, 6), InfluenceTracker(str(tmp_path / "skipped")), epochs=2)
    assert InfluenceLog(tmp_path / "skipped").num_steps > 0  # the steps before it, not the refused one
    for name, module in (("zero", Expert(zero=True)), ("unused", Expert(zero=True, unused=True))):
        fit(module, loader(ds, 6), InfluenceTracker(str(tmp_path / name), checkpoint_every_n_steps=2), epochs=2)
        log = InfluenceLog(tmp_path / name)
        steps = [rs.step for rs in replay(log, Expert(zero=True, unused=name == "unused"), ds,
                                          loss_fn=lambda m, b: m.per_sample_loss(b), tolerance=0.0)]
        assert steps == list(range(11))
