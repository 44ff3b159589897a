"""The documentation and the code speak about the software, not about how it was written: no word about
development sessions, merges, issue numbers, earlier versions of a text or the machine's load, and no
pointer to a reference document outside the repository ("SPEC"). Scans README.md, docs/*.md and every
*.py file of the repository (this file excepted: it has to name the words)."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", "__pycache__", "venv", ".venv", "site-packages", "node_modules", "out"}

# name -> regex (case-insensitive unless it sets its own flags). Narrow on purpose: each one is a phrase that
# only talks about development, so that ordinary words (pytest's scope="session", subprocess's
# start_new_session, "Common issues") never match.
FORBIDDEN = {
    "SPEC reference": r"(?-i:\bSPEC\b)",
    "issue number": r"\bissues?\s*#?\d+",
    "the issue's": r"\bthe issue's\b",
    "session": r"(?<![\"'])\bsessions?\b(?!\"|'(?!s\b))",  # not a quoted "session"; "session's" counts
    "merge": r"\b(pre-?)?merg(e|ed|es|ing)\b",
    "this change": r"\b(before|after|since|with|in) this change\b|\bthis change\b",
    "earlier version": r"\bour earlier\b|\bearlier (README|version|protocol|code|study|run|text)s?\b",
    "machine load": r"\bload average\b|\bdevelopment machine\b|\bother jobs\b|\b(loaded|contended) (machine|CPU)s?\b",
    "file history": r"\bsplit (out of|from) `?[\w/]+\.py\b",
}
PATTERN = re.compile("|".join(f"(?P<g{i}>{rx})" for i, rx in enumerate(FORBIDDEN.values())), re.IGNORECASE)
NAMES = list(FORBIDDEN)


def product_files(root=ROOT):
    """README.md, docs/*.md and every *.py below root, except this file and virtualenv / cache folders."""
    py = [p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts[:-1])]
    docs = [root / "README.md"] + sorted((root / "docs").glob("*.md"))
    return sorted(p for p in py + docs if p.is_file() and p.resolve() != Path(__file__).resolve())


def findings(path):
    """['file:line: [what] matched text', ...] for every forbidden phrase in the file."""
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        for m in PATTERN.finditer(line):
            name = NAMES[int(m.lastgroup[1:])]
            out.append(f"{path.relative_to(ROOT) if ROOT in path.parents else path}:{number}: [{name}] {m.group(0)!r}")
    return out


def test_the_scanner_finds_planted_words_and_spares_ordinary_ones(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("# see SPEC §4\n# (issue 11) fixed\n# after this session's merge\n# an earlier README said 4.85\n"
                   "# chosen by the issue's criterion\n# before this change it was 8\n# load average ~20\n"
                   "# split out of eval_linear.py when it grew\n# measured on a loaded machine\n")
    assert len(findings(bad)) == 10  # "session's" and "merge" on one line
    good = tmp_path / "good.py"
    good.write_text('@pytest.fixture(scope="session")\nsubprocess.Popen(cmd, start_new_session=True)\n'
                    "## Common issues\n# the spec of a video format\n# an earlier frame of the clip\n"
                    "# INSPECT the clip\n")
    assert findings(good) == []


def test_the_scan_covers_the_product():
    names = {p.relative_to(ROOT).as_posix() for p in product_files()}
    assert {"README.md", "model.py", "train.py", "eval_linear.py", "tests/test_model.py"} <= names
    assert "tests/test_docs.py" not in names


@pytest.mark.parametrize("path", product_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_development_words(path):
    found = findings(path)
    assert not found, "development-process words or SPEC references:\n  " + "\n  ".join(found)
