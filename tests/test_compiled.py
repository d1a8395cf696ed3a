"""``torch.compile``: a submodule compiled in place is recorded as if eager; a compile wrapper of a submodule is refused
before the first step (its parameter names, ``net._orig_mod.…``, are not the rebuilt model's); the estimators refuse a
compiled module clearly (DIT failed deep in torch: "torch.compile with aot_autograd does not currently support double
backward") and take it uncompiled (``step/compiled.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_influence import InfluenceLog, InfluenceTracker, WithIds, dit, queries, tracin
from lightning_influence.evaluation import replay_loo
from tests.conftest import fit, loader, make_data, tiny

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _fit(log_dir, compile_net=None):
    module = tiny()
    if compile_net == "in place":
        module.net.compile(backend="eager")  # dynamo traces the forward; the module and its names stay
    elif compile_net == "wrapper":
        module.net = torch.compile(module.net, backend="eager")
    tracker = InfluenceTracker(str(log_dir), record_gradients=True, projection_dim=None, checkpoint_every_n_steps=2)
    fit(module, loader(make_data(24)), tracker, epochs=1)


def test_a_compile_wrapper_of_a_submodule_is_refused_before_the_first_step(tmp_path):
    with pytest.raises(RuntimeError, match=r"submodule 'net' is a torch.compile wrapper .*'net._orig_mod.…'.*"
                                           r"self.net.compile\(\)"):
        _fit(tmp_path / "log", "wrapper")
    assert not (tmp_path / "log" / "rank-0").exists()  # nothing recorded


def test_in_place_compile_is_recorded_as_eager_and_the_estimators_take_the_module_uncompiled(tmp_path):
    _fit(tmp_path / "eager")
    _fit(tmp_path / "compiled", "in place")
    eager, compiled = InfluenceLog(tmp_path / "eager"), InfluenceLog(tmp_path / "compiled")
    assert compiled.param_names == eager.param_names
    for a, b in zip(eager.iter_steps(fields=("loss", "grad")), compiled.iter_steps(fields=("loss", "grad"))):
        np.testing.assert_array_equal(a.grads, b.grads)
        np.testing.assert_array_equal(a.losses, b.losses)
    final = compiled.checkpoint_steps[-1]
    for name, value in eager.checkpoint(final).items():
        np.testing.assert_array_equal(compiled.checkpoint(final)[name], value)

    train = WithIds(make_data(24))
    query = queries.mean_loss(make_data(8, seed=1).tensors)
    in_place, wrapped = tiny(), torch.compile(tiny())  # the default backend (compiled at a first call: none here)
    in_place.net.compile()
    for module in (in_place, wrapped):
        for run in (lambda m: dit(compiled, query, module=m, train_data=train), lambda m: tracin(compiled, query, module=m),
                    lambda m: replay_loo(compiled, m, train, query, sample_ids=[0])):
            with pytest.raises(ValueError, match=r"compiled with torch.compile .* Pass it uncompiled"):
                run(module)
    # uncompiled: the same scores as the eager run's log
    np.testing.assert_array_equal(dit(compiled, query, module=tiny(), train_data=train).scores,
                                  dit(eager, query, module=tiny(), train_data=train).scores)
