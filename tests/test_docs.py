"""The documentation stays findable: a short README, citations that resolve, links that resolve.

- The README is the front door and stays at most 250 lines; the rest lives under ``docs/``.
- Every design document a code comment or docstring cites exists in the repository. A citation is a
  ``*.md`` path (``docs/methods/stego.md``, ``storage/README.md``, resolved from the repository root) or a
  bare upper-case document name (``METHODS.md``, resolved from the root too, so a document that lives
  elsewhere fails). Lower-case bare names (``results.md``, ``report.md``) are files usseg writes, not
  citations. ``../shared/...`` is the data beside the repository, outside it by design. When the citation
  names a section (``§3.2``, ``S8``, ``"Feature store"``), the document must have a heading with it.
- Every relative link of the README and of ``docs/`` points at an existing file, and at an existing
  heading when it has an anchor.
- The README's second quick-start command is the command ``.ci/run`` runs.
"""
from __future__ import annotations

import ast
import io
import re
import tokenize
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
README_MAX_LINES = 250
# Where comments may cite documents (the layers of usseg, its deployments, bench scripts and tests).
CODE_DIRS = ("usseg_core", "tasks", "orchestration", "flows", "commands", "deployments", "bench", "tests")
CODE_FILES = ("pyproject.toml",)
OUTSIDE_REPO = ("../shared/",)  # data and weights beside the repository (never committed)

_DOC = re.compile(r"(?<![\w./-])((?:\.\.?/)*(?:[\w.-]+/)*[\w.-]+\.md)\b")
_BARE_DESIGN_DOC = re.compile(r"[A-Z][A-Z0-9_-]*\.md")
# A cited section: "§3.2", "§5 S8", "S7", or a quoted heading name ("Feature store").
_SECTION = re.compile(r"[\s,]*(?:(§\s*\d+(?:\.\d+)*)(?:\s+(S\d+)\b)?|\b(S\d+)\b|\"([^\"\n]+)\")")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^(```|~~~)")


# ---------------------------------------------------------------- reading comments and markdown

def _code_files() -> list[Path]:
    files = [REPO / f for f in CODE_FILES if (REPO / f).is_file()]
    for d in CODE_DIRS:
        root = REPO / d
        if root.is_dir():
            files += sorted(p for p in root.rglob("*") if p.suffix in (".py", ".yaml", ".yml", ".toml", ".sh")
                            and p.is_file() and "__pycache__" not in p.parts)
    return [f for f in files if f.resolve() != Path(__file__).resolve()]


def _comment_texts(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring-like string statement of a file."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix != ".py":
        return [(i, line.split("#", 1)[1]) for i, line in enumerate(text.splitlines(), 1) if "#" in line]
    out: list[tuple[int, str]] = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.COMMENT:
                out.append((tok.start[0], tok.string))
        tree = ast.parse(text)
    except (SyntaxError, tokenize.TokenError):  # a file another change is half-way through: its own tests fail
        return out
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            out.append((node.lineno, node.value.value))
    return sorted(out)


def _without_code_blocks(text: str) -> list[str]:
    lines, inside = [], False
    for line in text.splitlines():
        if _FENCE.match(line.strip()):
            inside = not inside
            continue
        if not inside:
            lines.append(line)
    return lines


@lru_cache(maxsize=None)
def _headings(path: Path) -> tuple[str, ...]:
    return tuple(line.lstrip("#").strip() for line in _without_code_blocks(path.read_text(encoding="utf-8"))
                 if line.startswith("#"))


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation (§, ×, –, backticks, ...) dropped, spaces -> -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@lru_cache(maxsize=None)
def _anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    for h in _headings(path):
        s = _slug(h)
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return frozenset(out)


def _has_section(doc: Path, section: re.Match) -> bool:
    number, stage_of_number, stage, name = section.groups()
    if name:
        return any(name.lower() in h.lower() for h in _headings(doc))
    tokens = [re.sub(r"\s+", "", number), stage_of_number] if number else [stage]
    for token in filter(None, tokens):
        pattern = re.compile(re.escape(token) + r"(?!\.?\d)")
        if not any(pattern.search(h) for h in _headings(doc)):
            return False
    return True


def _citations(files: list[Path] | None = None, repo: Path = REPO) -> list[tuple[str, str, Path, re.Match | None]]:
    """(where, cited name, resolved path, section match or None) of every document citation in ``files``
    (default: the code of the repository), paths resolved from ``repo``."""
    found = []
    for path in _code_files() if files is None else files:
        for line, text in _comment_texts(path):
            for m in _DOC.finditer(text):
                name = m.group(1)
                if name.startswith(OUTSIDE_REPO):
                    continue
                if "/" not in name and not _BARE_DESIGN_DOC.fullmatch(name):
                    continue  # an output file name (results.md, report.md), not a citation
                section = _SECTION.match(text, m.end())
                found.append((f"{path.relative_to(repo)}:{line}", name, (repo / name).resolve(), section))
    return found


def _markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))] if DOCS.is_dir() else [README]


# ---------------------------------------------------------------- the tests

def test_readme_is_a_front_door_of_at_most_250_lines():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, (f"README.md has {n} lines (at most {README_MAX_LINES}): move reference "
                                   "material into docs/ and link it")


def test_every_document_a_code_comment_cites_exists_in_the_repository():
    missing = [f"{where}: {name}" for where, name, path, _ in _citations()
               if not (path.is_file() and REPO in path.parents)]
    assert not missing, ("code comments cite documents that are not in the repository (cite them by their "
                         "repository path, e.g. docs/methods/stego.md §3.2):\n" + "\n".join(missing))


def test_every_cited_section_has_a_heading():
    citations = _citations()
    assert any(section for *_, section in citations), "no section citation found: has the pattern changed?"
    bad = [f"{where}: {name} {section.group(0).strip(' ,')}" for where, name, path, section in citations
           if section and path.is_file() and not _has_section(path, section)]
    assert not bad, "cited sections without a heading in their document:\n" + "\n".join(bad)


def test_relative_links_of_readme_and_docs_resolve():
    bad = []
    for md in _markdown_files():
        for line in _without_code_blocks(md.read_text(encoding="utf-8")):
            for target in _LINK.findall(line):
                if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                    continue
                path_part, _, anchor = target.partition("#")
                dest = (md.parent / path_part).resolve() if path_part else md
                where = f"{md.relative_to(REPO)}: ({target})"
                if not dest.exists():
                    bad.append(f"{where}: no such file")
                elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                    bad.append(f"{where}: no heading with anchor #{anchor}")
    assert not bad, "broken links:\n" + "\n".join(bad)


def _quick_start_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_readme_quick_start_command_2_is_what_ci_runs():
    commands = _quick_start_commands()
    assert len(commands) == 2, f"the README's quick start should hold two commands, found: {commands}"
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert "README command 2" in ci, ".ci/run no longer marks the README's command 2"
    ci_lines = [line for line in ci.split("README command 2", 1)[1].splitlines()[1:]
                if line.strip() and not line.lstrip().startswith("#")]
    assert ci_lines and ci_lines[0] == commands[1], (
        f".ci/run runs {ci_lines[:1]} but the README's command 2 is {commands[1]!r}: keep them identical")


@pytest.mark.parametrize("name", ["METHODS.md", "docs/no-such-page.md"])
def test_the_check_catches_a_document_that_is_not_in_the_repository(name, tmp_path):
    (tmp_path / "docs").mkdir()
    module = tmp_path / "mod.py"
    module.write_text(f'"""See {name} §2.2; results.md is an output."""\n# and {name} S8\n', encoding="utf-8")
    found = _citations([module], repo=tmp_path)
    assert [(where, cited) for where, cited, _, _ in found] == [("mod.py:1", name), ("mod.py:2", name)]
    assert not any(path.is_file() for _, _, path, _ in found)
    assert [section.group(0).strip(" ,") for *_, section in found] == ["§2.2", "S8"]
