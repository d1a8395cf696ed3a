"""The overhead benchmark's models (small sizes): training with the tracker is bit-identical to training
without it, and the rows the hooks record from the training step equal vmap per-sample gradients."""

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from benchmarks.overhead_models import make
from lightning_influence import InfluenceLog, InfluenceTracker
from lightning_influence.capture import per_sample_grads_vmap


def _fit(factory, data, tracker=None):
    pl.seed_everything(0, verbose=False)
    module = factory()
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[tracker] if tracker else [])
    trainer.fit(module, data)
    return module


# the CNN without HVP products: its first convolution keeps its input and makes its columns in the gradient hook
@pytest.mark.parametrize("name,hvp", [("mlp", True), ("cnn", True), ("gpt", True), ("cnn", False), ("gpt-param", True),
                                      ("decoder", True), ("mlp-wn", True)])
def test_tracked_training_is_bit_identical_and_rows_equal_vmap(tmp_path, name, hvp):
    factory, ds, batch_size = make(name, 3, small=True)
    loader = lambda: DataLoader(ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    plain = _fit(factory, loader())
    tracker = InfluenceTracker(str(tmp_path / "log"), record_gradients=True, record_hvp=hvp, projection_dim=8,
                               checkpoint_every_n_steps=1)
    tracked = _fit(factory, loader(), tracker)
    for (n, a), (_, b) in zip(plain.named_parameters(), tracked.named_parameters()):
        assert torch.equal(a, b), n
    log = InfluenceLog(tmp_path / "log")
    assert log.meta["gradient_engine"] == "hooks"
    projector = log.projector()
    module = factory()
    for rec in log.iter_steps(fields=("grad",)):
        module.load_state_dict({n: torch.from_numpy(v) for n, v in log.checkpoint(rec.step).items()}, strict=False)
        batch = [torch.stack([ds[int(i)][j] for i in rec.ids]) for j in range(len(ds[0]) - 1)]
        expected = per_sample_grads_vmap(module, type(module).per_sample_loss, batch, log.param_names, projector)
        np.testing.assert_allclose(rec.grads, expected.numpy(), rtol=1e-4, atol=1e-6)
