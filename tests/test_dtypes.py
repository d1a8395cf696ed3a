"""float32 data with a float64 model (or the reverse): what works when the training step works, and a clear message
(exit code 2 in the CLI) where the data do not match the model, instead of torch's error deep inside an estimator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import TinyClassifier, fit, loader, make_data, tiny
from lightning_influence import InfluenceLog, InfluenceTracker
from lightning_influence.estimators import tracin
from lightning_influence.queries import mean_loss


@pytest.fixture
def run64(tmp_path):
    """A float64 model (``.double()`` in the script: its class rebuilds as float32) trained on float64 data."""
    log_dir = str(tmp_path / "log")
    fit(tiny(), loader(make_data(12)), InfluenceTracker(log_dir, record_gradients=True, checkpoint_every_n_steps=2),
        epochs=1)
    return log_dir


def _builder(tmp_path, val_dtype: str) -> str:
    path = tmp_path / "build.py"
    path.write_text("import torch\nfrom conftest import TinyClassifier, make_data\n"
                    "def build(log):\n"
                    f"    return {{'module': TinyClassifier(), 'val_data': make_data(4, seed=5, dtype=torch.{val_dtype}).tensors}}\n")
    return f"{path}:build"


def test_the_cli_converts_a_rebuilt_model_to_the_dtype_the_run_trained_in(run64, tmp_path, capsys):
    """The model rebuilt from its class is float32, the run's checkpoints float64: the CLI converts it (it stopped:
    'convert the module to the dtype the run trained in', which a CLI user cannot do) and the scores are the API's."""
    from lightning_influence.cli import main
    from tests._cli_run import scores_of

    code = main(["query", run64, "-m", "tracin", "--builder", _builder(tmp_path, "float64"), "-k", "0", "-f", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "is float32; the run trained it in float64: converted" in err
    expected = tracin(InfluenceLog(run64), mean_loss(make_data(4, seed=5).tensors), module=tiny()).column(0)
    np.testing.assert_allclose(scores_of(json.loads(out), 12), expected, rtol=1e-12, atol=1e-15)


def test_float32_query_data_on_a_float64_run_is_a_user_error(run64, tmp_path, capsys):
    """float32 validation data for the float64 model: one line, exit code 2, naming both dtypes and what to do (it was
    'internal error (RuntimeError: mat1 and mat2 must have the same dtype ...)', exit code 1); the API says the same."""
    from lightning_influence.cli import main

    code = main(["query", run64, "-q", "-m", "tracin", "--builder", _builder(tmp_path, "float32")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "internal error" not in err, err
    assert "mixed dtypes" in err and "parameters are float64" in err and "x.to(torch.float64)" in err, err
    with pytest.raises(ValueError, match=r"parameters are float64.*x.to\(torch.float64\)"):
        tracin(InfluenceLog(run64), mean_loss(make_data(4, seed=5, dtype=torch.float32).tensors), module=tiny())


class _Casting(TinyClassifier):
    """A model that casts its inputs: the training step works with data of either dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.dtype))


@pytest.mark.parametrize("engine", ["hooks", "vmap"])
@pytest.mark.parametrize("model, data", [(torch.float64, torch.float32), (torch.float32, torch.float64)])
def test_a_model_that_casts_its_inputs_is_tracked_and_replayed(tmp_path, model, data, engine):
    """Where the training step works (the model casts), the tracker (hooks or vmap, finite-difference HVPs), replay
    (bit-identical) and the ground truth work too; the logged rows are the per-sample gradients by autograd."""
    from lightning_influence import WithIds
    from lightning_influence.evaluation import replay_loo
    from lightning_influence.replay import replay

    ds = make_data(12, dtype=data)
    torch.manual_seed(0)
    log_dir = str(tmp_path / "log")
    fit(_Casting().to(model), loader(ds), InfluenceTracker(log_dir, record_gradients=True, record_hvp=True,
                                                           gradient_engine=engine, projection_dim=None,
                                                           checkpoint_every_n_steps=1), epochs=1)
    log = InfluenceLog(log_dir)
    module = _Casting().to(model)
    assert [rs.step for rs in replay(log, module, WithIds(ds), tolerance=0.0)][-1] == log.num_steps
    x, y = ds.tensors
    for rec in log.iter_steps(fields=("grad",)):
        with torch.no_grad():
            for n, p in module.named_parameters():
                p.copy_(torch.from_numpy(log.checkpoint(rec.step)[n]))
        rows = []
        for i in rec.ids:
            loss = module.per_sample_loss((x[i:i + 1], y[i:i + 1]))[0]
            g = torch.autograd.grad(loss, [dict(module.named_parameters())[n] for n in log.param_names])
            rows.append(torch.cat([t.reshape(-1) for t in g]).double())
        np.testing.assert_allclose(rec.grads, torch.stack(rows).numpy(), rtol=1e-5, atol=1e-6)  # float32 storage
    result = replay_loo(log, _Casting().to(model), WithIds(ds), mean_loss(make_data(4, seed=5, dtype=data).tensors),
                        sample_ids=[0])
    assert np.isfinite(result.values).all() and result.info["replay_drift"]["max"] < 1e-4  # stacked copies: round-off
