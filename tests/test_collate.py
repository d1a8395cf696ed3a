"""Training batches made by the DataLoader's own ``collate_fn`` (padding variable-length sequences, dict batches with
masks): replay, the estimators and the CLI rebuild every step's batch with that function (``data.WithCollate``), and
what they could not rebuild is refused at the first training step.

Before, replay collated the samples with ``default_collate``: a padded text run stopped in every estimator with
"internal error (RuntimeError: stack expects each tensor to be equal size ...)", and a collate function that
changed the samples some other way would have trained replay on other inputs.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_influence import InfluenceLog, InfluenceTracker, WithCollate, queries
from lightning_influence.cli import main
from lightning_influence.estimators import dit
from lightning_influence.evaluation import replay_loo
from lightning_influence.log.format import read_meta
from lightning_influence.replay import replay
from tests._cli_run import scores_of
from tests.conftest import TinyClassifier, fit, make_data, no_engine_layer
from tests.test_script_runs import load_script, train_script

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return train_script("padded_text", tmp_path_factory.mktemp("padded"), "plain")


def _in_process(script):
    mod = load_script(script)
    torch.set_default_dtype(torch.float64)
    try:
        data = mod.TextData()
        data.setup()
        module = mod.Bag()
    finally:
        torch.set_default_dtype(torch.float32)
    return mod, data, module


def test_stored_samples_replay_with_the_loaders_collate_and_the_cli_scores_them(plain, tmp_path, monkeypatch, capsys):
    script, log_dir = plain
    meta = read_meta(log_dir)
    assert meta["recipe"]["data"]["collate_fn"]["function"] == "padded_text.pad"
    assert meta["recipe"]["data"]["stored"] == {"file": "data.pt", "train": 36, "val": 11}
    mod, data, module = _in_process(script)
    log = InfluenceLog(log_dir)
    train = WithCollate(data.train, mod.pad)

    # replay with the loader's collate function retrains the logged run bit for bit
    final = None
    for point in replay(log, module, train, tolerance=0.0):
        final = point
    expected = log.checkpoint(log.checkpoint_steps[-1])
    for name, value in final.params.items():
        np.testing.assert_array_equal(value.detach().numpy(), expected[name])

    # a plain dataset (default_collate) is refused by name, before any step is replayed
    with pytest.raises(ValueError, match=r"padded_text.pad, not default_collate: pass train_data=WithCollate\(train_set, pad\)"):
        dit(log, queries.mean_loss(data.val_dataloader().__iter__().__next__()), module=module, train_data=data.train)

    # the CLI: the stored samples collated by the imported function, the validation batches (padded each to its own
    # length) as one query over all of them; the oracle: the same in-process, the query a mean over every sample
    val = queries.Batches(list(data.val_dataloader()))
    assert len({b["tokens"].shape[1] for b in val}) > 1  # the batches' lengths differ: no single batch holds them
    monkeypatch.chdir(tmp_path)
    assert main(["info", str(log_dir)]) == 0
    assert "batches collated by padded_text.pad" in capsys.readouterr().out
    assert main(["query", str(log_dir), "-m", "dit", "--top", "0", "-f", "json", "-q"]) == 0
    got = scores_of(json.loads(capsys.readouterr().out), 36)
    want = dit(log, queries.mean_loss(val), module=module, train_data=train).column(0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
    assert np.abs(want).max() > 1e-4


def test_the_pbrf_of_dict_batches_is_refused_before_any_replay(plain, tmp_path, monkeypatch, capsys):
    """The PBRF needs the outputs ``module(x)``; a dict batch has no ``x`` to take: exit 2 before the leave-one-out
    replays (it was "internal error (TypeError: cannot find the model inputs ...)" after them)."""
    _, log_dir = plain
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", str(log_dir), "--pbrf", "-s", "1,2", "-q"]) == 2
    err = capsys.readouterr().err
    assert "a batch of type dict has no first tensor to take as x" in err and "inputs_fn=" in err
    assert "internal error" not in err


def test_a_datamodule_with_its_own_collate_through_the_cli(tmp_path, monkeypatch, capsys):
    script, log_dir = train_script("padded_text", tmp_path / "dm", "datamodule")
    assert read_meta(log_dir)["recipe"]["data"]["stored"] is None
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", str(log_dir), "-m", "dit", "-s", "2,11,30", "-f", "json", "-q"]) == 0
    rows = {r["id"]: r for r in json.loads(capsys.readouterr().out)["samples"]}
    mod, data, module = _in_process(script)
    log, train = InfluenceLog(log_dir), WithCollate(data.train, mod.pad)
    query = queries.mean_loss(queries.Batches(list(data.val_dataloader())))
    truth = replay_loo(log, module, train, query, sample_ids=[2, 11, 30]).window(*log.window(None))
    scores = dit(log, query, module=module, train_data=train)
    got = {i: (rows[i]["truth"], rows[i]["dit"]) for i in (2, 11, 30)}
    np.testing.assert_allclose([got[i][0] for i in (2, 11, 30)], truth, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose([got[i][1] for i in (2, 11, 30)], scores.column(0)[[2, 11, 30]], rtol=1e-6,
                               atol=1e-12)
    np.testing.assert_allclose([got[i][1] for i in (2, 11, 30)], truth, rtol=0.2)  # DIT's exact removal: near LOO


def test_mean_loss_over_batches_is_the_mean_over_every_sample():
    torch.manual_seed(0)
    model = TinyClassifier().double()
    ds = make_data(10)
    x, y = ds.tensors
    batches = queries.Batches([(x[:3], y[:3]), (x[3:], y[3:])])
    each = torch.stack([F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]) for i in range(10)])  # one sample at a time
    torch.testing.assert_close(queries.mean_loss(batches)(model), each.mean(), rtol=1e-14, atol=0)
    torch.testing.assert_close(queries.sample_losses(batches)(model), each, rtol=1e-14, atol=0)


class _Items(torch.utils.data.Dataset):
    def __init__(self, n: int = 12):
        self.ds = make_data(n)

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        x, y = self.ds[i]
        return x, y, i


def _stack(items):
    return [torch.stack([it[0] for it in items]), torch.tensor([int(it[1]) for it in items]),
            torch.tensor([it[2] for it in items])]


def _noisy(items):  # a random collate: noise drawn at every call
    x, y, ids = _stack(items)
    return [x + 0.1 * torch.randn_like(x), y, ids]


class _Shifts(TinyClassifier):
    def on_after_batch_transfer(self, batch, dataloader_idx):
        return [batch[0] * 2, *batch[1:]]


def _noisy_dataclass(items):  # the same, inside a dataclass batch
    return _Batch(*_noisy(items))


class _OnDataclassesPlain(TinyClassifier):
    def per_sample_loss(self, batch):
        return F.cross_entropy(self(batch.x), batch.y, reduction="none")


@pytest.mark.parametrize("collate, module, match", [
    (_noisy, TinyClassifier, r"collate_fn '_noisy' applied to ds\[i\] .* Make the collate function deterministic"),
    (_noisy_dataclass, _OnDataclassesPlain, r"collate_fn '_noisy_dataclass' applied to ds\[i\]"),
    (_stack, _Shifts, r"changes batches in on_after_batch_transfer\. .* Do what on_after_batch_transfer does"),
])
def test_batches_that_cannot_be_rebuilt_are_refused_at_the_first_step(collate, module, match, log_dir):
    data = torch.utils.data.DataLoader(_Items(), batch_size=4, shuffle=True, collate_fn=collate)
    ids = {"ids_fn": _batch_ids} if collate is _noisy_dataclass else {}
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match=match):
        fit(module().double(), data, InfluenceTracker(log_dir, **ids))
    torch.manual_seed(0)
    fit(module().double(), data, InfluenceTracker(log_dir, store_inputs=True, overwrite=True, **ids))  # stored: accepted
    assert InfluenceLog(log_dir).num_steps == 6


def test_a_deterministic_collate_and_the_precision_cast_are_accepted(log_dir):
    data = torch.utils.data.DataLoader(_Items(), batch_size=4, shuffle=True, collate_fn=_stack)
    torch.manual_seed(0)
    fit(TinyClassifier().double(), data, InfluenceTracker(log_dir))
    assert read_meta(log_dir)["recipe"]["data"]["collate_fn"]["function"].endswith("test_collate._stack")
    f32 = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*make_data(12, dtype=torch.float32).tensors,
                                                                     torch.arange(12)), batch_size=4)
    fit(TinyClassifier(), f32, InfluenceTracker(log_dir, overwrite=True), precision="64-true")  # inputs cast to float64
    assert InfluenceLog(log_dir).num_steps == 6


def test_an_iterable_dataset_is_refused_by_name():
    from lightning_influence.replay import batch_from_ids

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from range(3)

    with pytest.raises(TypeError, match=r"iterable-style dataset \(Stream\), whose samples cannot be read by id"):
        batch_from_ids(Stream(), np.array([0, 1]))
    batch = batch_from_ids(WithCollate(_Items(), _stack), np.array([3, 0]))  # the collate function, in the ids' order
    torch.testing.assert_close(batch[0], torch.stack([_Items()[3][0], _Items()[0][0]]), rtol=0, atol=0)
    assert batch[2].tolist() == [3, 0]


@dataclasses.dataclass
class _Batch:
    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor


def _to_batch(items):
    return _Batch(*_stack(items))


def _batch_ids(batch):
    return batch.idx


class _OnDataclasses(TinyClassifier):
    """A Linear model (hook engine) with a layer no engine covers (its parameters go through vmap) on dataclass batches."""

    def __init__(self):
        super().__init__(extra=no_engine_layer())

    def per_sample_loss(self, batch):
        return F.cross_entropy(self(batch.x), batch.y, reduction="none")


def test_dataclass_batches_through_the_hooks_vmap_and_replay(log_dir):
    """Before, the first step's hook self-check met no tensor in the dataclass (an opaque pytree leaf) and its
    StopIteration ended Lightning's epoch silently: epoch 0 trained without a single step logged."""
    data = torch.utils.data.DataLoader(_Items(), batch_size=4, shuffle=True, collate_fn=_to_batch,
                                       generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    module = _OnDataclasses().double()
    fit(module, data, InfluenceTracker(log_dir, record_gradients=True, projection_dim=None, ids_fn=_batch_ids, storage_dtype="float64",
                                       checkpoint_every_n_steps=1), epochs=2)
    log = InfluenceLog(log_dir)
    assert [b.epoch for b in log.iter_steps(fields=())] == [0, 0, 0, 1, 1, 1]
    first = next(log.iter_steps(0, 1))
    torch.manual_seed(0)
    ref = _OnDataclasses().double()
    ref.load_state_dict({n: torch.from_numpy(v) for n, v in log.checkpoint(0).items()}, strict=False)
    items = _Items()
    each = {n: [] for n, _ in ref.named_parameters()}
    for i in first.ids:  # brute force: every sample's own autograd gradient at θ_0
        x, y, _ = items[int(i)]
        loss = ref.per_sample_loss(_Batch(x[None], torch.tensor([int(y)]), torch.tensor([int(i)])))[0]
        for (n, p), g in zip(ref.named_parameters(), torch.autograd.grad(loss, list(ref.parameters()))):
            each[n].append(g)
    expected = log.projector().project({n: torch.stack(g) for n, g in each.items()})
    np.testing.assert_allclose(first.grads, expected.numpy(), rtol=1e-10, atol=1e-12)
    final = None
    for final in replay(log, _OnDataclasses().double(), WithCollate(items, _to_batch), tolerance=0.0):
        pass
    for name, value in final.params.items():
        np.testing.assert_array_equal(value.detach().numpy(), log.checkpoint(6)[name])


def test_stored_dataclass_batches_are_read_back_and_replayed(log_dir):
    """``store_inputs=True`` of dataclass batches: ``torch.load(weights_only=True)`` opens no user class, so the
    stored inputs are marked dicts rebuilt by importing the class (before: "internal error (UnpicklingError)")."""
    from lightning_influence.log.inputs import decode_batch, encode_batch

    batch = {"main": _Batch(torch.ones(2, 3), torch.tensor([0, 1]), torch.tensor([4, 5])), "names": ("a", "b"), "k": [3]}
    back = decode_batch(encode_batch(batch))
    assert type(back["main"]) is _Batch and back["names"] == ("a", "b") and back["k"] == [3]
    for f in ("x", "y", "idx"):
        torch.testing.assert_close(getattr(back["main"], f), getattr(batch["main"], f), rtol=0, atol=0)
    data = torch.utils.data.DataLoader(_Items(), batch_size=4, shuffle=True, collate_fn=_to_batch,
                                       generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    fit(_OnDataclasses().double(), data, InfluenceTracker(log_dir, ids_fn=_batch_ids, store_inputs=True,
                                                           checkpoint_every_n_steps=2), epochs=2)
    log = InfluenceLog(log_dir)
    final = None
    for final in replay(log, _OnDataclasses().double(), None, tolerance=0.0):  # no dataset: the stored inputs alone
        pass
    for name, value in final.params.items():
        np.testing.assert_array_equal(value.detach().numpy(), log.checkpoint(6)[name])


BUILDER = '''
import sys
sys.path.insert(0, {code!r})
import padded_text


def build():
    data = padded_text.TextData()
    data.setup()
    return {{"module": padded_text.Bag(), "val_data": data.val_dataloader()}}
'''


def test_a_builder_without_training_data_takes_the_stored_set_with_the_runs_collate(plain, tmp_path, capsys):
    """A --builder giving the model and the validation loader, not the training set, falls back to the samples the
    log stored; on a run whose DataLoader padded with its own collate_fn that fallback lacked it, and DIT stopped with
    "pass train_data=WithCollate(train_set, pad)", which a builder that returns no training set cannot act on. The
    stored set is now collated by the recorded function, as without a builder: the scores are the in-process ones."""
    script, log_dir = plain
    builder = tmp_path / "build_padded.py"
    builder.write_text(BUILDER.format(code=str(script.parent)))
    code = main(["query", str(log_dir), "-m", "dit", "--top", "0", "-f", "json", "-q", "--builder", f"{builder}:build"])
    out, err = capsys.readouterr()
    assert code == 0, err
    got = scores_of(json.loads(out), 36)
    mod, data, module = _in_process(script)
    want = dit(InfluenceLog(log_dir), queries.mean_loss(queries.Batches(list(data.val_dataloader()))), module=module,
               train_data=WithCollate(data.train, mod.pad)).column(0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
    assert np.abs(want).max() > 1e-4


def test_a_builder_without_training_data_is_told_to_return_it_where_the_collate_cannot_be_imported(plain, tmp_path,
                                                                                                  capsys):
    """Where the recorded collate function cannot be imported again, the refusal advised "pass --builder", which had
    been passed: it now says the builder returns no train_data and what to return."""
    import shutil

    from lightning_influence.log.writer import write_meta

    script, log_dir = plain
    copy = tmp_path / "log"
    shutil.copytree(log_dir, copy)
    meta = read_meta(copy)
    meta["recipe"]["data"]["collate_fn"]["function"] = "no_such_module_here.pad"
    write_meta(copy, meta)
    builder = tmp_path / "build_padded.py"
    builder.write_text(BUILDER.format(code=str(script.parent)))
    code = main(["query", str(copy), "-m", "dit", "-q", "--builder", f"{builder}:build"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--builder {builder}:build returns no train_data" in err and "no_such_module_here" in err
    assert err.strip().endswith("Return train_data=lightning_influence.WithCollate(train_set, collate_fn) from the builder")


def test_stored_inputs_with_a_plain_training_set_are_told_train_data_none(plain, tmp_path):
    """A run with stored inputs (store_inputs=True: a random collate, token masking) needs no training set for DIT; a
    plain dataset given anyway was told only to wrap it in the run's collate function (the random one)."""
    script, _ = plain
    mod, data, module = _in_process(script)
    torch.set_default_dtype(torch.float64)
    try:
        trained = mod.Bag()
    finally:
        torch.set_default_dtype(torch.float32)
    fit(trained, data.train_dataloader(), InfluenceTracker(str(tmp_path / "log"), store_inputs=True,
                                                           checkpoint_every_n_steps=4), epochs=1)
    log = InfluenceLog(tmp_path / "log")
    query = queries.mean_loss(data.val_dataloader())
    with pytest.raises(ValueError, match=r"WithCollate\(train_set, pad\) .*\(or train_data=None: this log stores every "
                                         r"step's inputs"):
        dit(log, query, module=module, train_data=data.train)
    np.testing.assert_array_equal(dit(log, query, module=module, train_data=None).column(0),
                                  dit(log, query, module=module, train_data=WithCollate(data.train, mod.pad)).column(0))
