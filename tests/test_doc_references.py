"""Every ``§`` reference in the code and the docs names a section that exists in the repository's docs/.

The math reference is ``docs/influence-math.md`` (in the repository, so a user who installs or clones the package alone
can follow every citation). A reference is ``<page>.md §N`` (``docs/`` prefix, backticks, ranges ``§1-2`` and lists
``§2, §8`` allowed), or a bare ``§N`` inside a docs page, meaning that page. A bare ``§N`` in code, a page or section
that does not exist, or the old ``math §N`` wording (which names no page) fails here, so the citations cannot rot.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
_NUM = r"§\s*(\d+)(?:\s*[-–]\s*(\d+))?"
# a page, then one or more sections: "docs/influence-math.md §2", "`optimizer-adjoint.md` §2, §8", "math.md §1-2"
_CITED = re.compile(r"(?:docs/)?([\w-]+\.md)`?\s*,?\s*((?:" + _NUM + r")(?:\s*(?:,|and)\s*" + _NUM + r")*)")
_SECTION = re.compile(_NUM)
_HEADING = re.compile(r"^#{1,6}\s+(\d+)\.\s", re.M)
_UNNAMED = re.compile(r"\bmath(?:\s+reference)?'?s?\s+§|influence-math\s+§", re.I)  # "math §2": which page?


def _sources() -> list[Path]:
    """The code and the docs that cite sections: the package, its docs, the README, tests and benchmarks."""
    files = [*sorted((ROOT / "lightning_influence").rglob("*.py")), *sorted(DOCS.glob("*.md")), ROOT / "README.md",
             *sorted((ROOT / "tests").rglob("*.py")), *sorted((ROOT / "benchmarks").rglob("*.py"))]
    return [f for f in files if f.is_file() and f != Path(__file__).resolve()]


def _sections() -> dict[str, set[int]]:
    """The numbered sections (``## N. Title``) of every page in docs/."""
    return {p.name: {int(n) for n in _HEADING.findall(p.read_text(encoding="utf-8"))} for p in DOCS.glob("*.md")}


def references(path: Path, text: str) -> list[tuple[int, str | None, int]]:
    """``(line, page, section)`` of every ``§`` in ``text``: ``page`` the docs page it cites (``None``: it names none)."""
    out: list[tuple[int, str | None, int]] = []
    claimed: set[int] = set()  # positions of the "§" that a cited page owns
    own = path.name if path.parent == DOCS else None
    line = lambda pos: text.count("\n", 0, pos) + 1  # noqa: E731

    def add(page: str | None, m: re.Match[str]) -> None:
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        out.extend((line(m.start()), page, n) for n in range(a, b + 1))

    for cite in _CITED.finditer(text):
        for m in _SECTION.finditer(text, cite.start(2), cite.end(2)):
            claimed.add(m.start())
            add(cite.group(1), m)
    for m in _SECTION.finditer(text):
        if m.start() not in claimed:
            add(own, m)
    return out


def problems(paths: list[Path], sections: dict[str, set[int]]) -> list[str]:
    """What does not resolve in ``paths``, one line each, against the docs pages' ``sections``."""
    out = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        for m in _UNNAMED.finditer(text):
            out.append(f"{rel}:{text.count(chr(10), 0, m.start()) + 1}: {m.group()!r} names no page: "
                       "cite docs/influence-math.md §N")
        for line, page, n in references(path, text):
            if page is None:
                out.append(f"{rel}:{line}: §{n} names no docs page (cite e.g. docs/influence-math.md §{n})")
            elif page not in sections:
                out.append(f"{rel}:{line}: {page} §{n}: there is no docs/{page}")
            elif n not in sections[page]:
                out.append(f"{rel}:{line}: {page} §{n}: docs/{page} has no section {n} "
                           f"(its sections: {sorted(sections[page])})")
    return out


def test_every_section_reference_names_a_section_in_the_docs():
    found = problems(_sources(), _sections())
    assert not found, "section references that do not resolve:\n" + "\n".join(found)


def test_the_math_reference_is_in_the_repository_with_its_sections():
    """The definitions the code relies on: notation, removal and sign, DIT, Diff-In, TracIn, ground truth."""
    assert _sections()["influence-math.md"] >= {1, 2, 3, 4, 5, 6}


@pytest.mark.parametrize("text, page, expected", [
    ("runs the counterfactual of docs/influence-math.md §2: the loss", None, [(1, "influence-math.md", 2)]),
    ("(`docs/optimizer-adjoint.md` §2, §8)", None, [(1, "optimizer-adjoint.md", 2), (1, "optimizer-adjoint.md", 8)]),
    ("Notation of influence-math.md §1-2.", None, [(1, "influence-math.md", 1), (1, "influence-math.md", 2)]),
    ("(docs/optimizer-adjoint.md\n    §2)", None, [(2, "optimizer-adjoint.md", 2)]),
    ("the same way (§2), as in math.md §5", "diffin.md", [(1, "math.md", 5), (1, "diffin.md", 2)]),
    ("a bare §3 in code", None, [(1, None, 3)]),
])
def test_references_are_parsed_as_cited(text, page, expected):
    """The parser itself, on hand-written cases: a page owns the sections that follow it; a bare one is its page's."""
    path = DOCS / page if page else ROOT / "lightning_influence" / "x.py"
    assert sorted(references(path, text), key=lambda r: (r[0], str(r[1]), r[2])) == sorted(
        expected, key=lambda r: (r[0], str(r[1]), r[2]))


def test_a_missing_section_an_unknown_page_and_an_unnamed_one_are_reported(tmp_path):
    """The check fails on what it is for: a section a page lacks, a page that does not exist, ``math §N``, a bare ``§``;
    and passes a reference that resolves."""
    bad = tmp_path / "probe.py"
    bad.write_text('"""docs/influence-math.md §9, docs/nowhere.md §1, math §2, a bare §4; docs/influence-math.md §3."""\n',
                   encoding="utf-8")
    found = problems([bad], _sections())
    assert len(found) == 5, found  # "math §2": its wording, and its § that names no page
    assert any("influence-math.md §9: docs/influence-math.md has no section 9" in f for f in found)
    assert any("there is no docs/nowhere.md" in f for f in found)
    assert any("'math §' names no page" in f for f in found)
    assert any("§4 names no docs page" in f for f in found)
