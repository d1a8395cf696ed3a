"""Progress bars: tqdm on a terminal, silent elsewhere unless asked (``progress=True``, ``--progress``)."""

from __future__ import annotations

import io

from lightning_influence.progress import ProgressBar, resolve_progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run(bar: ProgressBar, total: int = 12) -> None:
    for done in range(1, total + 1):
        bar(done, total)


def test_bar_on_a_terminal_and_silence_elsewhere():
    tty = Terminal()
    run(ProgressBar("dit", stream=tty))
    assert "dit" in tty.getvalue() and "12/12" in tty.getvalue() and "\r" in tty.getvalue()
    log = io.StringIO()
    run(ProgressBar("dit", stream=log))
    assert log.getvalue() == ""  # a log file gets nothing unless asked
    run(ProgressBar("dit", stream=log, force=True))
    assert "12/12" in log.getvalue()
    quiet = Terminal()
    run(ProgressBar("dit", enabled=False, stream=quiet))
    assert quiet.getvalue() == ""


def test_resolve_progress(monkeypatch):
    import sys

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert resolve_progress(None, "x") is None  # not a terminal: nothing by default
    assert isinstance(resolve_progress(True, "x"), ProgressBar)
    assert resolve_progress(False, "x") is None
    calls = []
    fn = resolve_progress(lambda d, t: calls.append((d, t)), "x")
    fn(1, 2)
    assert calls == [(1, 2)]
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert isinstance(resolve_progress(None, "x"), ProgressBar)  # a terminal: a bar by default


def test_under_torch_distributed_only_rank_0_draws_and_says_it_is_its_share(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    outputs = {}
    for rank in (0, 1):
        monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
        outputs[rank] = Terminal()
        run(ProgressBar("dit", stream=outputs[rank]))
    assert "dit (rank 0 of 2, its share)" in outputs[0].getvalue() and "12/12" in outputs[0].getvalue()
    assert outputs[1].getvalue() == ""
