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
