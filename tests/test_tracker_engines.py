"""The tracker's hook engine checks itself at the first recorded step: a module whose shapes look
per-sample but are not (a broadcast positional embedding with as many positions as samples) is
handed to vmap, and the recorded rows are right from that first step on."""

import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import InfluenceLog, InfluenceTracker, WithIds
from lightning_influence.cli import main

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
    assert_rows_exact(InfluenceLog(tmp_path / "log"), TinyLM().double(), tokens)


def assert_rows_exact(log, reference, tokens):
    """Every logged row equals autograd on its sample alone at the step's checkpoint, projected as logged."""
    names, projector = log.param_names, log.projector()
    for rec in log.iter_steps(fields=("grad",)):
        reference.load_state_dict({n: torch.from_numpy(v) for n, v in log.checkpoint(rec.step).items()})
        params = dict(reference.named_parameters())
        rows = []
        for i in rec.ids:
            loss = reference.per_sample_loss((tokens[int(i)][None],))[0]
            grads = torch.autograd.grad(loss, [params[n] for n in names])
            rows.append(projector.project({n: g[None] for n, g in zip(names, grads)}))
        np.testing.assert_allclose(rec.grads, torch.cat(rows).numpy(), rtol=1e-10, atol=1e-12)


class PosLM(TinyLM):
    """``T`` positions: ``wpe(arange(T))`` broadcast over the batch (demoted: by its shape when ``T != B``, by the first
    step's check against autograd when ``T == B``), or ``expanded`` to ``(B, T)`` (per-sample: stays on hooks)."""

    def __init__(self, positions: int, expanded: bool = False) -> None:
        super().__init__()
        self.wpe, self.expanded = nn.Embedding(positions, 6), expanded

    def per_sample_loss(self, batch):
        x, y = batch[0][:, :-1], batch[0][:, 1:]
        pos = torch.arange(x.shape[1])
        h = self.ln(self.tok(x) + self.wpe(pos.expand(x.shape[0], -1) if self.expanded else pos))
        return F.cross_entropy(self.head(h).transpose(1, 2), y, reduction="none").mean(1)


@pytest.mark.parametrize("positions,expanded", [(B, False), (B + 1, False), (B, True)])
def test_the_log_says_which_engine_computed_each_tensor_after_a_demotion(tmp_path, capsys, positions, expanded):
    """meta.h5 is written before the first step, whose demotion it then records (``gradient_engines``, ``demoted``)."""
    tokens = torch.randint(0, 7, (3 * B, positions + 1), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    tracker = InfluenceTracker(str(tmp_path / "log"), record_gradients=True, projection_dim=8)
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[tracker])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(PosLM(positions, expanded).double(), DataLoader(WithIds(TensorDataset(tokens)), batch_size=B))
    demoted = [str(w.message) for w in caught if "not captured by hooks" in str(w.message)]
    meta = InfluenceLog(tmp_path / "log").meta
    names = ["tok.weight", "wpe.weight", "ln.weight", "ln.bias", "head.weight", "head.bias"]
    if expanded:
        assert not demoted
        assert meta["gradient_engine"] == "hooks" and meta["demoted"] == {}
        assert meta["gradient_engines"] == {n: "hooks" for n in names}
    else:
        assert len(demoted) == 1 and "wpe.weight" in demoted[0]
        assert meta["gradient_engine"] == "mixed" and meta["demoted"] == {"wpe.weight": 0}
        assert meta["gradient_engines"] == {n: "vmap" if n == "wpe.weight" else "hooks" for n in names}
    assert main(["info", str(tmp_path / "log"), "-q"]) == 0  # the CLI says it too
    (line,) = [r for r in capsys.readouterr().out.splitlines() if r.startswith("gradients")]
    assert line.endswith("; engine hooks" if expanded else "; engines hooks, vmap for wpe.weight (from the hooks at step 0)")


def test_a_resumed_fit_that_demotes_as_the_log_did_records_no_engine_change(tmp_path):
    """The resumed fit starts on hooks and demotes ``wpe.weight`` at its first step, as the first fit did: its record
    of the resume lists no engine change once that step settled it (``log/resume.with_settled``)."""
    tokens = torch.randint(0, 7, (3 * B, B + 2), generator=torch.Generator().manual_seed(0))

    def fit(epochs, ckpt_path=None):
        torch.manual_seed(0)
        tracker = InfluenceTracker(str(tmp_path / "log"), record_gradients=True, projection_dim=8)
        saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[tracker, saver])
        with pytest.warns(UserWarning, match="wpe.weight"):
            trainer.fit(PosLM(B + 1).double(), DataLoader(WithIds(TensorDataset(tokens)), batch_size=B),
                        ckpt_path=ckpt_path)

    fit(1)
    fit(2, str(tmp_path / "ckpt" / "epoch=0-step=3.ckpt"))
    log = InfluenceLog(tmp_path / "log")
    assert log.steps.tolist() == list(range(6))
    (resume,) = log.meta["resumes"]
    assert resume["step"] == 3 and resume["changed"] == {}
    assert log.meta["gradient_engine"] == "mixed" and log.meta["demoted"] == {"wpe.weight": 0}


def test_a_demotion_at_a_later_step_is_recorded_with_its_step(tmp_path):
    """The positions expanded to the batch at steps 0 and 1 (hooks), broadcast from step 2 on (demoted by shape):
    ``demoted`` says the tensor's columns are vmap's from step 2, the steps before stay hooks' (and exact)."""
    tokens = torch.randint(0, 7, (4 * B, B + 2), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    module = PosLM(B + 1, expanded=True).double()

    class Broadcast(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            pl_module.expanded = trainer.global_step < 2

    tracker = InfluenceTracker(str(tmp_path / "log"), record_gradients=True, projection_dim=8, storage_dtype="float64",
                               checkpoint_every_n_steps=1)
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Broadcast(), tracker])
    with pytest.warns(UserWarning, match="wpe.weight"):
        trainer.fit(module, DataLoader(WithIds(TensorDataset(tokens)), batch_size=B))
    log = InfluenceLog(tmp_path / "log")
    assert log.meta["demoted"] == {"wpe.weight": 2} and log.meta["gradient_engines"]["wpe.weight"] == "vmap"
    assert_rows_exact(log, PosLM(B + 1).double(), tokens)  # whichever engine took them (the same math either way)
