"""The README's Python snippet runs as written (in a temporary working directory)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    blocks = python_blocks()
    assert len(blocks) == 1, "the README has one Python snippet; this test runs it"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    exec(compile(blocks[0], str(README), "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    table = out[out.index("most harmful for mean_loss:"):].splitlines()
    assert table[1].split() == ["rank", "id", "score", "label"] and len(table) == 7  # header + 5 rows
    rows = list(csv.DictReader((tmp_path / "runs" / "influence-scores.csv").open()))
    assert len(rows) == 600 and list(rows[0]) == ["method", "query", "window", "t1", "t2", "rank", "id", "score", "label"]
    by_rank = sorted(rows, key=lambda r: int(r["rank"]))
    for line, row in zip(table[2:], by_rank):  # the printed top 5 are the CSV's ranks 1..5
        rank, i, score, label = line.split()
        assert (i, label) == (row["id"], row["label"]) and float(score) == pytest.approx(float(row["score"]), rel=1e-4)
    assert float(by_rank[0]["score"]) < 0  # the most harmful sample raises the validation loss
