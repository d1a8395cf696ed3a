"""The tracker's hook engine checks itself at the first recorded step: a module whose shapes look
per-sample but are not (a broadcast positional embedding with as many positions as samples) is
handed to vmap, and the recorded rows are right from that first step on."""

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import InfluenceLog, InfluenceTracker, WithIds

B = T = 4


class TinyLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.tok, self.wpe = nn.Embedding(7, 6), nn.Embedding(T, 6)
        self.ln, self.head = nn.LayerNorm(6), nn.Linear(6, 7)

    def per_sample_loss(self, batch):
        x, y = batch[0][:, :-1], batch[0][:, 1:]
        h = self.ln(self.tok(x) + self.wpe(torch.arange(x.shape[1])))  # (T, d) broadcast over the batch
        return F.cross_entropy(self.head(h).transpose(1, 2), y, reduction="none").mean(1)

    def training_step(self, batch, batch_idx):
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_broadcast_embedding_is_demoted_at_the_first_step_and_rows_are_exact(tmp_path):
    tokens = torch.randint(0, 7, (3 * B, T + 1), generator=torch.Generator().manual_seed(0))
    data = DataLoader(WithIds(TensorDataset(tokens)), batch_size=B)
    torch.manual_seed(0)
    module = TinyLM().double()
    tracker = InfluenceTracker(str(tmp_path / "log"), record_gradients=True, projection_dim=8, storage_dtype="float64",
                               checkpoint_every_n_steps=1)
    pending = []

    class Pending(pl.Callback):  # the vmap pass for the demoted tensor leaves the hooks nothing (they are off)
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            pending.append(tracker._capture.pending)

    trainer = pl.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[tracker, Pending()])
    with pytest.warns(UserWarning, match="wpe.weight"):
        trainer.fit(module, data)
    assert pending == [0, 0, 0]
    log = InfluenceLog(tmp_path / "log")
    names = log.param_names
    projector = log.projector()
    reference = TinyLM().double()
    for rec in log.iter_steps(fields=("grad",)):
        reference.load_state_dict({n: torch.from_numpy(v) for n, v in log.checkpoint(rec.step).items()})
        params = dict(reference.named_parameters())
        rows = []
        for i in rec.ids:
            loss = reference.per_sample_loss((tokens[int(i)][None],))[0]
            grads = torch.autograd.grad(loss, [params[n] for n in names])
            rows.append(projector.project({n: g[None] for n, g in zip(names, grads)}))
        np.testing.assert_allclose(rec.grads, torch.cat(rows).numpy(), rtol=1e-10, atol=1e-12)
