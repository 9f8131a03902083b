"""User docs speak of the tool only: no issue numbers, no commit hashes, no word on how the
project is made; their links stay inside the repository and lead somewhere.

The one place a commit may appear is the provenance of a rendered result, whose form is
``omotool.demo.markdown.provenance_line``: `` `COMMAND` (DATE; omotool VERSION at COMMIT; ...)``.
A commit that follows ``omotool VERSION at`` is that line's; any other run of 7 to 40 hex
digits holding both a digit and a letter is taken for a commit hash.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
USER_DOCS = sorted(
    [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "bench" / "README.md"]
    + list((ROOT / "docs").rglob("*.md"))
)

PROVENANCE = re.compile(r"omotool \S+ at [0-9a-f]{7,40};")  # the rendered provenance line's
HEX_RUN = re.compile(r"(?<![0-9A-Za-z_])[0-9a-f]{7,40}(?![0-9A-Za-z_])")
ISSUE = re.compile(
    r"\b(?:issues?|pull requests?|PRs?|tickets?)\s*#?\d+\b"  # "issue 15", "PR #3"
    r"|(?<![\w&#/\]])#\d+\b",  # "#12" (not "&#12;", nor a link's anchor)
    re.IGNORECASE,
)
DEVELOPMENT = re.compile(  # words about how the project is made, not about the tool
    r"\bthis project\b|\bsessions?\b|\bwe (?:built|added|made|tried|found)\b|\bby us\b"
    r"|\bdevelopment machine\b|\bworkplace\b",
    re.IGNORECASE,
)


def commit_hashes(line: str) -> list[str]:
    """Runs of hex digits in ``line`` that look like commits, outside a provenance line's."""
    line = PROVENANCE.sub("", line)
    return [
        run
        for run in HEX_RUN.findall(line)
        if re.search(r"[0-9]", run) and re.search(r"[a-f]", run)
    ]


def offences(text: str, name: str) -> list[str]:
    """What ``text`` (the file ``name``) must not say, each as ``name:line: what``."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        where = f"{name}:{number}"
        found += [f"{where}: issue number {m.group(0)!r}" for m in ISSUE.finditer(line)]
        found += [f"{where}: commit hash {run!r}" for run in commit_hashes(line)]
        found += [f"{where}: {m.group(0)!r} (how it is made)" for m in DEVELOPMENT.finditer(line)]
    return found


def test_user_docs_exist() -> None:
    names = {str(p.relative_to(ROOT)) for p in USER_DOCS}
    assert {"README.md", "CHANGELOG.md", "docs/demo.md"} <= names


@pytest.mark.parametrize("path", USER_DOCS, ids=[str(p.relative_to(ROOT)) for p in USER_DOCS])
def test_user_docs_name_no_issue_or_commit(path: Path) -> None:
    found = offences(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    ("line", "kinds"),
    [
        ("as issue 15 asked", ["issue number"]),
        ("fixed in #12.", ["issue number"]),
        ("code of 48d3da4, five runs", ["commit hash"]),
        ("the 2-core machine this project runs on", ["how it is made"]),
        ("(2026-11-30; omotool 0.1.0 at 4eb649c9c553; 1 thread(s) on AMD EPYC)", []),
        ("see [Cost](#cost), 134.5M entries, 16,384 entries, 1e-7, &#12;", []),
        ("a defaced 1234567 number", []),
    ],
)
def test_the_rules_themselves(line: str, kinds: list[str]) -> None:
    found = offences(line, "x.md")
    assert all(f.startswith("x.md:1: ") for f in found)
    named = [
        kind for kind in ("issue number", "commit hash", "how it is made") if kind in str(found)
    ]
    assert named == kinds, found


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of ``markdown``'s headings: lower case, punctuation dropped, spaces to -."""
    headings = re.findall(r"^#+ (.+)$", markdown, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("path", USER_DOCS, ids=[str(p.relative_to(ROOT)) for p in USER_DOCS])
def test_links_stay_in_the_repository_and_resolve(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    broken = []
    for number, line in enumerate(text.splitlines(), 1):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):  # https:, mailto:: outside links are fine
                continue
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            where = f"{path.relative_to(ROOT)}:{number}: {target}"
            if not resolved.is_relative_to(ROOT):
                broken.append(f"{where} leaves the repository")
            elif not resolved.exists():
                broken.append(f"{where} does not exist")
            elif (
                anchor
                and resolved.suffix == ".md"
                and anchor not in anchors(resolved.read_text(encoding="utf-8"))
            ):
                broken.append(f"{where} names no heading")
    assert not broken, "\n".join(broken)


REPO_PATH = re.compile(r"`((?:omotool|scripts|bench|recipes|tests|docs)/[\w./-]*)`")


@pytest.mark.parametrize("path", USER_DOCS, ids=[str(p.relative_to(ROOT)) for p in USER_DOCS])
def test_repository_paths_named_in_docs_exist(path: Path) -> None:
    """A file or folder the docs name in backticks (`omotool/optim/kernels.py`) is there: a
    rename updates the docs with it."""
    missing = [
        f"{path.relative_to(ROOT)}:{number}: {name}"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        for name in REPO_PATH.findall(line)
        if "*" not in name and not (ROOT / name).exists()
    ]
    assert not missing, "\n".join(missing)
