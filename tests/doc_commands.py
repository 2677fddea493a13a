"""The commands the documentation gives a user, read from where the user reads them: the bash blocks
of README.md, every docs/*.md page, eval/README.md, data/README.md and benchmarks/README.md, and the
example lines in the header comments of configs/, launch/, eval/ and data/ scripts (`#   aimv2 ...`,
continued by `\\`). tests/test_documented_commands.py runs each one, and checks the pages' relative
links (`markdown_links`, `anchors`) and the package's files and modules they name (`code_references`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = tuple(sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")))  # the topic pages
MARKDOWN = ("README.md", *DOCS, "eval/README.md", "data/README.md", "benchmarks/README.md")
COMMENTED = ("configs/*/*.yaml", "launch/*", "eval/*.sh", "data/*.sh")
# What a command line starts with (anything else in a comment is prose).
COMMAND = re.compile(r"(aimv2 |CONFIG=|STRATEGY=|PYTHON=|launch/|eval/|data/|python3? |\.venv/)")


@dataclass(frozen=True)
class DocCommand:
    source: str  # the file, relative to the repository
    line: int  # where the command starts (1-based)
    text: str  # one line: continuations joined, trailing comment dropped

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.text}"


def _clean(text: str) -> str:
    text = re.sub(r"\s+#\s.*$", "", text)  # a trailing "# comment"
    return re.sub(r"\s+", " ", text).strip()


def _joined(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """(line number, text) with backslash continuations joined onto the line they continue."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, text in lines:
        if pending is not None:
            number, text = pending[0], pending[1] + " " + text.strip()
        if text.rstrip().endswith("\\"):
            pending = (number, text.rstrip()[:-1])
            continue
        pending = None
        out.append((number, text))
    return out


def markdown_commands(relative: str) -> list[DocCommand]:
    lines = (REPO / relative).read_text(encoding="utf-8").splitlines()
    commands, block = [], None
    for number, text in enumerate(lines, 1):
        if text.strip().startswith("```"):
            if block is None and text.strip() == "```bash":
                block = []
            elif block is not None:
                commands += [
                    DocCommand(relative, n, _clean(t))
                    for n, t in _joined(block)
                    if t.strip() and not t.strip().startswith("#")
                ]
                block = None
            continue
        if block is not None:
            block.append((number, text))
    return commands


def comment_commands(relative: str) -> list[DocCommand]:
    lines = (REPO / relative).read_text(encoding="utf-8").splitlines()
    found: list[tuple[int, str]] = []
    continuing = False
    for number, text in enumerate(lines, 1):
        match = re.match(r"#\s{2,}(\S.*)", text)
        if match and (continuing or COMMAND.match(match.group(1))):
            found.append((number, match.group(1)))
            continuing = match.group(1).rstrip().endswith("\\")
        else:
            continuing = False
    return [DocCommand(relative, n, _clean(t)) for n, t in _joined(found)]


def documented_commands() -> list[DocCommand]:
    commands = [c for name in MARKDOWN for c in markdown_commands(name)]
    for pattern in COMMENTED:
        for path in sorted(REPO.glob(pattern)):
            if path.is_file():
                commands += comment_commands(str(path.relative_to(REPO)))
    return commands


# -- links between the pages -------------------------------------------------------------------------
LINK = re.compile(r"!?\[[^\]]*\]\(([^()\s]+)\)")


def _prose(relative: str) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced code blocks."""
    out, fenced = [], False
    for number, text in enumerate((REPO / relative).read_text(encoding="utf-8").splitlines(), 1):
        if text.strip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            out.append((number, text))
    return out


def markdown_links(relative: str) -> list[tuple[int, str]]:
    """(line number, target) of every relative link and image of a page (web addresses left out)."""
    return [
        (n, target)
        for n, text in _prose(relative)
        for target in LINK.findall(re.sub(r"`[^`]*`", "", text))
        if not re.match(r"[a-z]+:", target)
    ]


# -- the package's files and modules the pages name ----------------------------------------------------
CODE_PATH = re.compile(r"(?<![\w./-])aimv2/[\w/]+\.py\b")  # aimv2/engine/logs.py
MODULE = re.compile(r"(?<![\w./-])aimv2(?:\.[a-z_][a-z0-9_]*)+")  # aimv2.models.sizes, aimv2.load_encoder
# Where the package is named in prose: the pages, the header comments, the scripts beside them.
NAMING = (*MARKDOWN, *COMMENTED, "eval/*.py", "data/*.py", "benchmarks/*.py")


def code_references() -> list[tuple[str, int, str]]:
    """(file, line, name) for every `aimv2/....py` path and dotted `aimv2.x...` name in the files of NAMING
    (eval/results/ and benchmarks/results/, historical records, are not among them)."""
    found = []
    for pattern in NAMING:
        for path in sorted(REPO.glob(pattern)):
            if not path.is_file():
                continue
            for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                for name in CODE_PATH.findall(text) + MODULE.findall(text):
                    found.append((str(path.relative_to(REPO)), number, name))
    return found


def anchors(relative: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to hyphens, a
    repeated heading suffixed -1, -2, ..."""
    seen: dict[str, int] = {}
    for _, text in _prose(relative):
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", text)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            seen[slug] = seen.get(slug, -1) + 1
            if seen[slug]:
                seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)
