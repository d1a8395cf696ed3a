"""One Python API: every estimator ``f(log, query, *, module=None, train_data=None, window=..., ...)`` from the
package root, the same defaults as the CLI's method of the same name, and scores as a table."""

from __future__ import annotations

import csv
import inspect
import io
import json
import re

import numpy as np
import pytest
import torch

import lightning_influence as li
from lightning_influence import InfluenceScores
from lightning_influence.cli.methods import METHODS

ESTIMATORS = ["dit", "dit_local", "dit_gauss_newton", "timeline", "diffin", "diffin_self_influence", "tracin"]


@pytest.mark.parametrize("name", ESTIMATORS)
def test_every_estimator_has_the_same_signature(name):
    fn = getattr(li, name)
    assert name in li.__all__
    params = list(inspect.signature(fn).parameters.values())
    assert [p.name for p in params[:2]] == ["log", "query"]
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params[:2])
    rest = [p for p in params[2:]]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in rest), [p.name for p in rest]
    names = [p.name for p in rest]
    where = "grid" if name == "timeline" else "window"
    expected = [n for n in ("module", "train_data", where) if n in names]
    assert names[:len(expected)] == expected  # the same order everywhere
    assert "module" in names and where in names
    for p in rest:
        if p.name in ("module", "train_data", where):
            assert p.default is None


def test_every_estimator_split_over_processes_takes_its_part_as_shard():
    """One name for this process's part (``shard``: a BatchShard of every step's rows, or the StepShard of
    diffin_self_influence, which was ``shard_``), with a default of one process; ``distributed`` passes it so."""
    from lightning_influence.distributed import BATCH_SPLIT, LOG_ROW_SPLIT, STEP_SPLIT

    for fn in BATCH_SPLIT + LOG_ROW_SPLIT + STEP_SPLIT:
        params = inspect.signature(fn).parameters
        assert "shard" in params and params["shard"].kind is inspect.Parameter.KEYWORD_ONLY, fn.__name__
        assert params["shard"].default is None or params["shard"].default.world == 1, fn.__name__
        assert not [n for n in params if n.startswith("shard") and n != "shard"], fn.__name__


@pytest.mark.parametrize("name", ["dit", "dit_local", "timeline", "diffin", "diffin_self_influence"])
def test_old_positional_forms_fail_clearly(name):
    fn = getattr(li, name)
    model = torch.nn.Linear(2, 1)
    with pytest.raises(TypeError, match=r"module=\.\.\., train_data=\.\.\."):
        fn("LOG", model, [(0, 0, 0)], lambda m: m.weight.sum())  # the old (log, module, train_data, query) form
    with pytest.raises(TypeError, match="the second argument is the query, got the model Linear"):
        fn("LOG", model)
    with pytest.raises(TypeError, match=r"got a dict; for a batch's mean loss pass .*mean_loss\(batch\)"):
        fn("LOG", {"x": torch.zeros(2, 2)})  # a batch where its query belongs (it failed comparing str and int)


def test_tracin_old_positional_module_fails_clearly():
    with pytest.raises(TypeError, match="keyword arguments"):
        li.tracin("LOG", lambda m: m.weight.sum(), torch.nn.Linear(2, 1))


@pytest.mark.parametrize("name, keywords", [("replay_loo", "sample_ids=..., grid="), ("pbrf", "samples=..., damping="),
                                            ("gap_decomposition", "samples=..., damping="),
                                            ("linear_pbrf", "samples=..., damping=")])
def test_replay_loo_and_the_trust_tools_take_their_optional_arguments_by_keyword(name, keywords):
    """replay_loo(log, module, train_data, query, [3, 7], [0, 10]) had bound ids and grid by position (an estimator
    swapped for it, or a grid given where the ids go, ran the wrong replay); pbrf/gap_decomposition/linear_pbrf took
    their samples by position where replay_loo takes sample_ids= by keyword. One rule now: four positional arguments,
    the others keywords, and the positional form says which."""
    import lightning_influence.evaluation as ev

    fn = getattr(ev, name)
    params = list(inspect.signature(fn).parameters.values())
    assert [p.name for p in params[:4]] == ["log", "module", "train_data", "query"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[4:]), [p.name for p in params[4:]]
    with pytest.raises(TypeError, match=rf"{name}\(\) takes the log, the model, the training data and the query as "
                                        rf"its only positional arguments, got 5; call {name}\(log, module, "
                                        rf"train_data, query, \*, {re.escape(keywords)}"):
        fn("LOG", torch.nn.Linear(2, 1), None, lambda m: m.weight.sum(), [0, 1])


@pytest.mark.parametrize("name", ["dit", "tracin", "diffin", "replay_loo"])
def test_a_log_path_or_a_model_class_is_told_what_to_pass(name):
    """``tracin("runs/influence", q, module=...)`` failed with "AttributeError: 'str' object has no attribute 'window'",
    ``module=TinyTransformer`` (the class) with "named_modules() missing 1 required positional argument: 'self'"."""
    import lightning_influence.evaluation as ev

    fn = getattr(li, name, None) or getattr(ev, name)
    query = lambda m: m.weight.sum()  # noqa: E731
    call = (lambda log, module: fn(log, module, None, query)) if name == "replay_loo" else \
        (lambda log, module: fn(log, query, module=module))
    with pytest.raises(TypeError, match=rf"^{name}\(\): the first argument is the opened log, got the path "
                                        r"'runs/influence'; pass lightning_influence.InfluenceLog\('runs/influence'\)$"):
        call("runs/influence", torch.nn.Linear(2, 1))
    with pytest.raises(TypeError, match=rf"^{name}\(\): module= is the model .* got the class Linear; pass Linear\(\.\.\.\)"):
        call(object(), torch.nn.Linear)


def test_self_influence_takes_no_query():
    with pytest.raises(TypeError, match="takes no query"):
        li.diffin_self_influence(object(), lambda m: m.weight.sum(), module=torch.nn.Linear(2, 1))  # (a log's place)


def test_cli_methods_named_like_python_functions_use_the_python_defaults():
    """``--method diffin`` is ``diffin()`` with its defaults (and so on): no CLI-only options under the same name."""
    same = {name: m for name, m in METHODS.items() if name.replace("-", "_") in ESTIMATORS}
    assert {"dit", "diffin", "tracin"} <= set(same)
    for name, m in same.items():
        assert m.target.endswith(":" + name.replace("-", "_")) and m.options == (), name
    assert inspect.signature(li.diffin).parameters["form"].default == "published"


def _scores() -> InfluenceScores:
    return InfluenceScores(np.array([[0.5, 1.0], [-2.0, 0.0], [0.25, -3.0], [-1.0, 2.0]]), "demo", (0, 4), ["a", "b"])


def test_top_gives_ids_scores_and_labels():
    s = _scores().with_labels(np.array([7, 8, 9, 1]))
    top = s.top(2)
    assert top.ids.tolist() == [1, 3] and top.scores.tolist() == [-2.0, -1.0] and top.labels.tolist() == [8, 1]
    assert list(top) == [(1, -2.0), (3, -1.0)]
    helpful = s.top(1, harmful=False, query="b")
    assert helpful.ids.tolist() == [3] and helpful.scores.tolist() == [2.0]
    text = str(top)
    assert "most harmful for a" in text and "-2.0000e+00" in text


def test_rows_csv_and_json_tables():
    s = _scores().with_labels([(None, 7, 0), (None, 8, 1), (None, 9, 2), (None, 1, 3)])  # a dataset's (x, y, id) items
    rows = s.rows()
    assert len(rows) == 8  # one per query and rank, most harmful (most negative) first
    assert rows[4] == {"method": "demo", "query": "b", "window": "0:4", "t1": 0, "t2": 4, "rank": 1, "id": 2,
                       "score": -3.0, "label": 9}
    assert [r["id"] for r in rows[:4]] == [1, 3, 2, 0] and [r["rank"] for r in rows[:4]] == [1, 2, 3, 4]
    parsed = list(csv.DictReader(io.StringIO(s.to_csv())))
    assert list(parsed[0]) == ["method", "query", "window", "t1", "t2", "rank", "id", "score", "label"]
    assert [float(r["score"]) for r in parsed[4:]] == [-3.0, 0.0, 1.0, 2.0]  # repr: exact round trip
    assert [r["rank"] for r in s.rows(sort="abs", top=2)] == [1, 2, 1, 2]
    assert [r["id"] for r in s.rows(sort="abs", top=2)] == [1, 3, 2, 3]
    data = json.loads(s.to_json())
    assert data["method"] == "demo" and data["rows"][0]["score"] == -2.0
    single = InfluenceScores(np.array([3.0, -1.0]), "m", (0, 1), ["val"])
    assert [(r["id"], r["score"], r["rank"], r["label"]) for r in single.rows()] == [(1, -1.0, 1, None), (0, 3.0, 2, None)]
    assert single.to_csv().splitlines()[1] == "m,val,0:1,0,1,1,1,-1.0,"  # an unknown label: an empty cell
    marked = single.with_labels([4, 5], flipped=[1])
    assert [r["flipped"] for r in marked.rows()] == [True, False] and marked.to_csv().splitlines()[0].endswith(",flipped")
    with pytest.raises(ValueError, match="sort must be one of"):
        single.rows(sort="harmful")


def test_to_pandas():
    pd = pytest.importorskip("pandas")
    df = _scores().to_pandas()
    assert isinstance(df, pd.DataFrame) and list(df.columns) == ["method", "query", "window", "t1", "t2", "rank", "id",
                                                                  "score", "label"]
    assert df[(df["query"] == "b") & (df["id"] == 2)]["rank"].item() == 1


def test_to_pandas_without_pandas_says_what_to_use(monkeypatch):
    import builtins

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__",
                        lambda name, *a, **k: (_ for _ in ()).throw(ImportError()) if name == "pandas" else real(name, *a, **k))
    with pytest.raises(ImportError, match="to_csv"):
        _scores().to_pandas()


def test_the_query_helpers_pickle():
    """ddp_spawn processes (replay_loo(processes=N), distributed.sweep/run) pickle the query: the helpers were closures
    ('Can't pickle local object mean_loss.<locals>.f'), so docs/scaling.md's examples failed with them."""
    import pickle

    from lightning_influence.queries import eval_mode, mean_loss, prediction, sample_losses

    class Module(torch.nn.Linear):
        def per_sample_loss(self, batch):
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[1], reduction="none")

    torch.manual_seed(0)
    module, batch = Module(4, 3), (torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
    for q in (mean_loss(batch), sample_losses(batch, names=list("abcde")), sample_losses(batch),
              prediction(batch[0][:1], 2, margin=True), eval_mode(mean_loss(batch, name="val"))):
        again = pickle.loads(pickle.dumps(q))
        assert torch.equal(again(module), q(module)) and getattr(again, "query_names", None) == getattr(q, "query_names", None)
    assert not hasattr(sample_losses(batch), "query_names")  # unnamed: q0, q1, ... (query_names)


# ------------------------------------------------------------------ data the model cannot take, from Python
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The CLI tests' tiny digits run, its model and data built by hand (as a Python user has them)."""
    import yaml
    from pathlib import Path

    from lightning_influence.examples.digits import DigitsClassifier, DigitsDataModule
    from tests._cli_run import train_tiny_run

    run = train_tiny_run(tmp_path_factory.mktemp("api") / "run")
    cfg = yaml.safe_load(Path(run.config).read_text())
    dm = DigitsDataModule(**cfg["data"])
    return li.InfluenceLog(run.log), DigitsClassifier(**cfg["model"]), dm


def _calls():
    seen = []
    return seen, lambda done, total: seen.append(done)


@pytest.mark.parametrize("name", ["dit", "dit_local", "diffin", "timeline"])
def test_training_data_the_model_cannot_take_is_refused_before_the_sweep(tiny, name):
    """dit/diffin/... from Python had raised torch's 'mat1 and mat2 shapes cannot be multiplied' from deep inside the
    sweep; the CLI said it in one line. Now the one check (lightning_influence.datacheck) runs before the sweep."""
    from torch.utils.data import TensorDataset

    from lightning_influence.datacheck import DataMismatchError

    log, model, dm = tiny
    (xt, yt), (xv, yv) = dm.splits["train"], dm.splits["val"]
    narrow = li.WithIds(TensorDataset(xt[:, :32], yt))
    seen, progress = _calls()
    with pytest.raises(DataMismatchError, match=r"training data rebuilt for step \d+ \(ids .*batch \(float32\[\d+, 32\], "
                                                r"int64\[\d+\], .*\): RuntimeError: mat1 and mat2 shapes .*pass train_data="):
        getattr(li, name)(log, _val_loss(xv, yv),
                          module=model, train_data=narrow, progress=progress)
    assert seen == []
    with pytest.raises(ValueError, match=r"IndexError: Target 1\d is out of bounds"):  # labels beyond the outputs
        getattr(li, name)(log, _val_loss(xv, yv), module=model, train_data=li.WithIds(TensorDataset(xt, yt + 10)),
                          progress=progress)
    assert seen == []


def _val_loss(x, y):
    from lightning_influence.queries import mean_loss

    return mean_loss((x, y))


@pytest.mark.parametrize("name", ["dit", "tracin", "dit_gauss_newton", "diffin"])
def test_a_query_the_model_cannot_take_is_refused_before_the_sweep(tiny, name):
    log, model, dm = tiny
    (xt, yt), (xv, yv) = dm.splits["train"], dm.splits["val"]
    kwargs = {"train_data": dm.train_dataset} if name in ("dit", "diffin") else {}
    with pytest.raises(ValueError, match=r"the query fails on the model: RuntimeError: mat1 and mat2 shapes .*"
                                         r"build the query from data the model takes"):
        getattr(li, name)(log, _val_loss(xv[:, :32], yv), module=model, **kwargs)
    with pytest.raises(ValueError, match=r"forward failed on mixed dtypes .*Give the data .* in float32"):
        getattr(li, name)(log, _val_loss(xv.double(), yv), module=model, **kwargs)


def test_training_data_in_another_order_than_the_logged_ids_is_refused(tiny):
    """A training set whose ids do not index the samples the run logged (shuffled, re-split) runs without error and
    gives other scores; the logged losses at the last checkpoint show it, as the CLI's check did."""
    from torch.utils.data import TensorDataset

    log, model, dm = tiny
    (xt, yt), (xv, yv) = dm.splits["train"], dm.splits["val"]
    perm = torch.randperm(len(xt), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="do not reproduce the run's logged losses at step .*pass the model and "
                                         "training data the run trained"):
        li.dit(log, _val_loss(xv, yv), module=model, train_data=li.WithIds(TensorDataset(xt[perm], yt[perm])))
    scores = li.tracin(log, _val_loss(xv, yv), module=model)  # the right data pass (tracin takes none)
    assert scores.scores.shape == (len(xt), 1)


def test_train_data_that_cannot_give_samples_by_id_keeps_its_own_message(tiny):
    """The data check had wrapped replay's 'train_data must be a map-style Dataset ... got DataLoader' into a data
    mismatch with a second piece of advice; a train_data that cannot give samples by id (the batches of a loader, where
    the loader itself is its dataset by id: tests/test_builder_data.py) says so itself."""
    from torch.utils.data import DataLoader

    log, model, dm = tiny
    batches = (b for b in DataLoader(dm.train_dataset, batch_size=4))
    with pytest.raises(TypeError, match=r"^train_data must be a map-style Dataset or a callable ids -> batch, got "
                                        r"generator$"):
        li.dit(log, _val_loss(*dm.splits["val"]), module=model, train_data=batches)


def test_every_result_takes_a_query_by_name_or_index_and_refuses_an_unknown_name_naming_the_queries():
    """Scores, a timeline, replay leave-one-out and a PBRF result pick a query column the same way
    (``queries.query_column``); a misspelled name was a bare ``ValueError: 'x' is not in list``."""
    from lightning_influence.estimators.dit import Timeline
    from lightning_influence.evaluation.ground_truth import LOOResult
    from lightning_influence.evaluation.pbrf.result import PBRFResult

    values = np.arange(24, dtype=np.float64).reshape(4, 3, 2)  # (N, G, Q)
    grid, names = np.array([0, 5, 10]), ["val_loss", "margin"]
    scores = InfluenceScores(values[:, 1, :], "dit", (0, 5), names)
    timeline = Timeline(values, grid, names, "dit")
    loo = LOOResult(np.arange(4), values, grid, np.zeros((3, 2)), names)
    pbrf = PBRFResult.__new__(PBRFResult)
    pbrf.scores, pbrf.query_names = values[:, 2, :], names
    assert scores.column("margin").tolist() == scores.column(1).tolist() == values[:, 1, 1].tolist()
    assert timeline.increments("margin").tolist() == np.diff(values[:, :, 1], axis=1).tolist()
    assert loo.window(5, 10, "margin").tolist() == (values[:, 2, 1] - values[:, 1, 1]).tolist()
    assert pbrf.column("margin").tolist() == values[:, 2, 1].tolist()
    for get in (scores.column, timeline.increments, lambda q: loo.window(0, 10, q), pbrf.column):
        with pytest.raises(ValueError, match=r"no query named 'marign': the queries are \['val_loss', 'margin'\]"):
            get("marign")
    with pytest.raises(ValueError, match=r"step 7 is not on the timeline grid \[0, 5, 10\]"):
        timeline.at(7)
    with pytest.raises(ValueError, match=r"step 7 is not on the LOO grid \[0, 5, 10\]"):
        loo.at(7)


def test_a_model_without_per_sample_loss_is_told_to_pass_loss_fn_not_other_data(tiny):
    """A module trained with InfluenceTracker(loss_fn=...) has no per_sample_loss; a query built without loss_fn had
    been reported as data the model cannot take ('build the query from data the model takes')."""
    from lightning_influence.queries import MissingLossError

    log, model, dm = tiny

    class Plain(type(model)):
        per_sample_loss = None

    plain = Plain(**dict(model.hparams))
    for fn, kwargs in ((li.tracin, {}), (li.dit, {"train_data": dm.train_dataset})):
        with pytest.raises(MissingLossError, match=r"^Plain has no per_sample_loss\(batch\): pass loss_fn=") as info:
            fn(log, _val_loss(*dm.splits["val"]), module=plain, **kwargs)
        assert isinstance(info.value, TypeError) and "data the model takes" not in str(info.value)


def test_the_training_tensors_as_a_tuple_are_told_to_be_a_dataset(tiny):
    """train_data=(x, y), the training set as its tensors, was read as a dataset of 2 samples: 'train_data has 2 samples
    but the log holds sample id 59: pass the whole training set' -- which it was."""
    log, model, dm = tiny
    with pytest.raises(TypeError, match=r"train_data is 2 tensors of 60 rows .*WithIds\(TensorDataset\(\*tensors\)\)"):
        li.dit(log, _val_loss(*dm.splits["val"]), module=model, train_data=tuple(dm.splits["train"]))
    with pytest.raises(ValueError, match="train_data has 3 samples but the log holds sample id"):  # a short dataset
        li.dit(log, _val_loss(*dm.splits["val"]), module=model, train_data=[dm.train_dataset[i] for i in range(3)])


def test_a_validation_dataloader_is_a_query_over_all_its_batches(tiny):
    """``mean_loss(val_loader)`` (the loader where its batch goes) was refused by the data check with "TypeError:
    'DataLoader' object is not subscriptable"; it is now the query over all of the loader's batches, joined where they
    concatenate and batch by batch where each is padded to its own length (as the CLI joins a validation loader)."""
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_influence.queries import Batches, mean_loss, sample_losses

    log, model, dm = tiny
    xv, yv = dm.splits["val"]
    loader = DataLoader(TensorDataset(xv, yv), batch_size=7)  # an uneven last batch
    got = li.tracin(log, mean_loss(loader), module=model).column(0)
    np.testing.assert_allclose(got, li.tracin(log, mean_loss((xv, yv)), module=model).column(0), rtol=1e-5, atol=1e-12)

    class Pooled(torch.nn.Module):  # token sequences padded per batch, as an NLP validation loader gives them
        def __init__(self):
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(9, 4, padding_idx=0), torch.nn.Linear(4, 2)

        def per_sample_loss(self, batch):
            h = (self.emb(batch["tokens"]) * (batch["tokens"] > 0).unsqueeze(-1)).sum(1)
            return torch.nn.functional.cross_entropy(self.head(h), batch["label"], reduction="none")

    def pad(items):
        toks = torch.nn.utils.rnn.pad_sequence([t for t, _ in items], batch_first=True)
        return {"tokens": toks, "label": torch.tensor([y for _, y in items])}

    g = torch.Generator().manual_seed(0)
    seqs = [(torch.randint(1, 9, (int(n),), generator=g), i % 2) for i, n in enumerate(torch.randint(2, 7, (10,), generator=g))]
    padded = DataLoader(seqs, batch_size=3, collate_fn=pad)
    m = Pooled()
    by_hand = torch.cat([m.per_sample_loss(pad([s])) for s in seqs])  # each sample alone, unpadded
    assert isinstance(mean_loss(padded).batch, Batches)
    torch.testing.assert_close(mean_loss(padded)(m), by_hand.mean())
    torch.testing.assert_close(sample_losses(padded)(m), by_hand)


def test_top_shows_the_flipped_labels_it_was_given():
    """``with_labels(ds, flipped=ids).top(k)``, printed, left the flipped labels out (the CLI's table marks them, and
    the CSV has the column): a user who passed them to find the mislabelled samples could not see which were."""
    s = _scores().with_labels(np.array([7, 8, 9, 1]), flipped=[3, 0])
    top = s.top(3)
    assert top.flipped.tolist() == [False, True, False]  # ids 1, 3, 2: only 3 among them flipped
    lines = str(top).splitlines()
    assert lines[1].split() == ["rank", "id", "score", "label", "flipped"]
    assert lines[2].split() == ["1", "1", "-2.0000e+00", "8"] and lines[3].split() == ["2", "3", "-1.0000e+00", "1", "yes"]
    assert lines[-1] == "flipped labels among these 3: 1 (33%); 2 of 4 (50%) are flipped overall"
    assert _scores().top(2).flipped is None and "flipped" not in str(_scores().with_labels([1, 2, 3, 4]).top(2))
