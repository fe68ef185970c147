"""The README and docs/ read as documentation: links resolve, the README stays a landing page, and
neither they nor any ``--help`` text carry dates, commit hashes or talk of sessions.

docs/results.md is generated from benchmark results, which are dated as data: its links are checked,
its dates are not. Each check is a small function tested first on planted bad text, so it can fail.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = REPO / "docs"
GENERATED_DATA = {DOCS / "results.md"}  # results are dated as data
README_MAX_LINES = 300

MONTHS = ("January|February|March|April|May|June|July|August|September|October|November|December|"
          "Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec")
DATE = re.compile("|".join((
    r"\b\d{4}-\d{2}-\d{2}\b",  # 2026-12-03
    rf"\b(?:{MONTHS})\.? \d{{1,2}}(?:st|nd|rd|th)?,? \d{{4}}\b",  # Dec 3, 2026
    rf"\b\d{{1,2}}(?:st|nd|rd|th)? (?:{MONTHS})\.?,? \d{{4}}\b",  # 3 December 2026
    rf"\b(?:{MONTHS}) \d{{4}}\b",  # December 2026
)))
# 7-40 hex digits with at least one digit and one letter: a commit hash, not a word ("decade") or a number
COMMIT_HASH = re.compile(r"\b(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b")
DIARY = re.compile(r"\bsessions?\b|\bthis machine\b|\bthis project's (?:\S+ )*?machine\b", re.IGNORECASE)

LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`+[^`\n]*`+")


def doc_files() -> list[Path]:
    """README.md and every Markdown page under docs/."""
    return [README, *sorted(DOCS.rglob("*.md"))]


def prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code spans (links there are examples, not links)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"`|\*|_(?=\W)|(?<=\W)_", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors a Markdown page defines: one per heading (repeats numbered -1, -2 ... as GitHub does)."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", text).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            out.add(base if count == 0 else f"{base}-{count}")
    return out


def broken_links(page: Path, text: str | None = None) -> list[str]:
    """Every relative link of ``page`` whose file, or whose #anchor in a Markdown file, does not exist."""
    text = page.read_text() if text is None else text
    own_anchors = anchors(text)
    problems = []
    for target in LINK.findall(prose(text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto: ...
            continue
        path_part, _, anchor = target.partition("#")
        if not path_part:
            if anchor not in own_anchors:
                problems.append(f"{page.name}: {target} (no heading with that anchor)")
            continue
        goal = (page.parent / path_part).resolve()
        if not goal.exists():
            problems.append(f"{page.name}: {target} (no such file)")
        elif anchor and goal.suffix == ".md" and anchor not in anchors(goal.read_text()):
            problems.append(f"{page.name}: {target} (no heading with that anchor in {goal.name})")
    return problems


def diary_words(text: str) -> list[str]:
    """Dates, commit hashes and session/machine-diary wording found in ``text``."""
    found = [m.group(0) for m in DATE.finditer(text)]
    found += [m.group(0) for m in COMMIT_HASH.finditer(text)]
    found += [m.group(0) for m in DIARY.finditer(text)]
    return found


def help_pages() -> list[tuple[str, argparse.ArgumentParser]]:
    """``(command, parser)`` for ``preftune`` and every sub-command, nested ones included."""
    from preftune.cli.main import build_parser

    pages, todo = [], [("preftune", build_parser())]
    while todo:
        name, parser = todo.pop(0)
        pages.append((name, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += [(f"{name} {sub}", p) for sub, p in action.choices.items()]
    return pages


# ---------------------------------------------------------------------------------------------
# the checks can fail


def test_link_check_finds_a_planted_broken_link(tmp_path):
    (tmp_path / "there.md").write_text("# A page\n\n## Some `code` and words!\n")
    page = tmp_path / "index.md"
    text = ("[ok](there.md) [ok](there.md#some-code-and-words) [ok](#top) [web](https://example.com/x)\n"
            "`[code](nowhere.md)`\n```\n[block](nowhere.md)\n```\n"
            "[gone](missing.md) ![img](missing.png) [bad anchor](there.md#nope) [self](#nowhere)\n# Top\n")
    assert broken_links(page, text) == ["index.md: missing.md (no such file)",
                                        "index.md: missing.png (no such file)",
                                        "index.md: there.md#nope (no heading with that anchor in there.md)",
                                        "index.md: #nowhere (no heading with that anchor)"]


def test_diary_check_finds_planted_dates_hashes_and_sessions():
    bad = ("run on 2026-12-03 at ddd3ebc, on Dec 3, 2026, 3 December 2026 and in November 2026; "
           "the session ended; measured on this machine; on this project's 2-core machine")
    assert diary_words(bad) == ["2026-12-03", "Dec 3, 2026", "3 December 2026", "November 2026", "ddd3ebc",
                                "session", "this machine", "this project's 2-core machine"]
    fine = "DPO (Rafailov et al. 2023) at lr 5e-5, 1,468 pairs, 0.688 [0.626, 0.743], a decade of 1234567 steps"
    assert diary_words(fine) == []


def test_anchor_slugs_follow_github():
    assert slug("On a real model: `preftune quickstart --real`") == "on-a-real-model-preftune-quickstart---real"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


# ---------------------------------------------------------------------------------------------
# the docs


def test_readme_is_a_landing_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"


@pytest.mark.parametrize("page", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", [p for p in doc_files() if p not in GENERATED_DATA],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_docs_carry_no_dates_hashes_or_sessions(page):
    assert diary_words(page.read_text()) == []


def test_readme_indexes_every_docs_page():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in LINK.findall(prose(README.read_text()))}
    missing = [str(p.relative_to(REPO)) for p in DOCS.rglob("*.md") if p.resolve() not in linked]
    assert missing == []


def test_readme_names_every_method():
    """The README's methods paragraph lists every ``--loss`` name of the method table."""
    from preftune.methods.table import METHODS

    section = README.read_text().split("## Methods", 1)[1].split("\n## ", 1)[0]
    assert [m.name for m in METHODS if f"`{m.name}`" not in section] == []


def test_eval_flags_page_is_the_generated_table():
    """docs/reference/eval-flags.md's table is the one generated from EvalConfig (regenerate: python -c
    'from preftune.cli.eval import eval_flags_markdown; print(eval_flags_markdown())')."""
    from preftune.cli.eval import eval_flags_markdown

    assert eval_flags_markdown() in (DOCS / "reference" / "eval-flags.md").read_text()


def undocumented_modules(architecture: str, package: Path) -> list[str]:
    """Modules of ``package`` that no row of the architecture page names: a row names a module by its
    path (``preftune/data/load.py``), by its folder (``preftune/methods/losses/``), or by its file name
    on a line that also names its folder (``preftune/data/load.py``, ``report.py``)."""
    missing = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).as_posix()
        folder = rel.rpartition("/")[0] + "/"
        if path.name == "__init__.py" and path.parent != package:
            continue  # a layer's __init__ says what the layer holds; the page names the layer
        lines = [line for line in architecture.splitlines() if folder in line]
        covered = rel in architecture or any(f"`{folder}`" in line or f"`{path.name}`" in line for line in lines)
        if not covered:
            missing.append(rel)
    return missing


def test_module_check_finds_a_planted_module(tmp_path):
    package = tmp_path / "pkg"
    (package / "data" / "losses").mkdir(parents=True)
    for name in ("__init__.py", "api.py", "data/__init__.py", "data/load.py", "data/report.py", "data/new.py",
                 "data/losses/a.py"):
        (package / name).write_text("")
    page = ("| `pkg/__init__.py`, `api.py` | root |\n| `pkg/data/load.py`, `report.py` | data |\n"
            "| `pkg/data/losses/` | losses |\n")
    assert undocumented_modules(page, package) == ["pkg/data/new.py"]


def test_architecture_names_every_module_and_the_layers():
    """docs/ARCHITECTURE.md's module table and layer order match the package (add a row for a new module)."""
    from tests.integration.test_layers import LAYERS

    page = (DOCS / "ARCHITECTURE.md").read_text()
    assert undocumented_modules(page, REPO / "preftune") == []
    assert " < ".join(LAYERS) in " ".join(page.split())


def test_help_carries_no_dates_hashes_or_sessions(monkeypatch):
    """``preftune --help`` and every sub-command's, nested ones included."""
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside a date or a hash
    pages = help_pages()
    assert {"preftune", "preftune train", "preftune quickstart", "preftune data check"} <= {name for name, _ in pages}
    found = {name: words for name, parser in pages if (words := diary_words(parser.format_help()))}
    assert found == {}
