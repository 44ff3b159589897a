"""The documentation and the code speak about the software, not about how it was written: no word about
development sessions, merges, issue numbers, earlier versions of a text or the machine's load, and no
pointer to a reference document outside the repository ("SPEC"). Scans README.md, docs/*.md and every
*.py file of the repository (this file excepted: it has to name the words).

And what the documentation quotes exists: every option of a `python X.py ...` command is one X.py's parser
knows, every relative link and #anchor resolves, every section named as README, "Name" (also in the code's
comments) is a heading there, and every quoted test name is a test of tests/."""
import argparse
import functools
import re
import runpy
import shlex
from pathlib import Path
from unittest import mock

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


# ---- Commands, links and test names quoted in README.md and docs/*.md match the code ----

SCRIPTS = ("train", "eval_linear", "eval_vos", "eval_finetune", "store", "study", "synthetic")
NO_OPTIONS = ("model", "sinkhorn")  # run as they are: `python model.py`
COMMAND = re.compile(r"(?<![\w.-])(?:[\w./-]*/)?(" + "|".join(SCRIPTS + NO_OPTIONS) + r")\.py\b")
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


class _Parsed(BaseException):  # not an Exception: no script's `except` catches it
    def __init__(self, parser):
        super().__init__()
        self.parser = parser


@functools.lru_cache(maxsize=None)
def script_options(name):
    """The option strings NAME.py's command line accepts: its script runs as __main__ up to its first parse,
    where the parser it built is taken (nothing is read or run)."""
    if name in NO_OPTIONS:
        return frozenset()
    def capture(parser, *args, **kwargs):
        raise _Parsed(parser)
    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", capture):
        try:
            runpy.run_path(str(ROOT / f"{name}.py"), run_name="__main__")
        except _Parsed as parsed:
            return frozenset(parsed.parser._option_string_actions)
    raise AssertionError(f"{name}.py ran without parsing a command line")


def code_texts(text):
    """The code of a markdown text: every line of its fenced blocks (a trailing backslash joins the next line)
    and every inline `code span` (which may wrap across lines)."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    out = [line for block in fenced for line in block.replace("\\\n", " ").splitlines()]
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    return out + [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose)]


def quoted_options(code):
    """[(script, option), ...] for every `X.py --option` in a line of code; the flags of a study.py arm
    (`--arm NAME="FLAGS"`) are train.py's."""
    found, hits = [], list(COMMAND.finditer(code))
    for hit, following in zip(hits, hits[1:] + [None]):
        tail = code[hit.end():following.start() if following else None]
        tail = re.split(r"\s(?:&&|\|\|?|;|>)\s|\s#\s", tail)[0]
        try:
            words = shlex.split(tail)
        except ValueError:  # an unbalanced quote in a span cut by the markdown
            words = tail.split()
        for before, word in zip([None] + words, words):
            if word.startswith("--"):
                found.append((hit.group(1), word.split("=")[0]))
            elif before == "--arm" and "=" in word:
                arm = word.split("=", 1)[1].split()  # NAME="FLAGS": train.py flags
                found += [("train", w.split("=")[0]) for w in arm if w.startswith("--")]
    return found


def unknown_options(path):
    """['file: X.py --opt (not an option of X.py)', ...] for the commands quoted in a markdown file."""
    bad = []
    for code in code_texts(path.read_text(encoding="utf-8")):
        for script, option in quoted_options(code):
            if option not in script_options(script):
                bad.append(f"{path.relative_to(ROOT).as_posix()}: {script}.py {option} (in `{code.strip()}`)")
    return bad


def slug(heading):
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def headings(path):
    """The headings of a markdown file (a `# comment` in a code block is none)."""
    text = re.sub(r"^```[^\n]*\n.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    return [h.strip() for h in re.findall(r"^#+ (.*)$", text, flags=re.M)]


def broken_links(path):
    """Relative markdown links whose file or #anchor does not exist."""
    text, bad = path.read_text(encoding="utf-8"), []
    where = path.relative_to(ROOT).as_posix()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            bad.append(f"{where}: link to a missing file: {target}")
        elif anchor and anchor not in {slug(h) for h in headings(linked)}:
            bad.append(f"{where}: no heading with the anchor #{anchor} in {file or where}")
    return bad


def unknown_sections(path):
    """Quoted section names ('README, "Quick start"', '[x.md](x.md), "Section"') that start no heading there."""
    text, bad = path.read_text(encoding="utf-8"), []
    where = path.relative_to(ROOT).as_posix()
    named = [("README.md", s) for s in re.findall(r"\bREADME(?:'s)?,? \(?\"([^\"]+)\"", text)]
    named += re.findall(r"\]\(([^)#\s]+\.md)\)\)?,? \(?\"([^\"]+)\"", text)
    for file, section in named:
        linked = ROOT / file if file == "README.md" else (path.parent / file).resolve()
        if linked.exists() and not any(h.lower().startswith(section.lower()) for h in headings(linked)):
            bad.append(f"{where}: {file} has no section \"{section}\"")
    return bad


def defined_test_names():
    return set(re.findall(r"^def (test_\w+)", "\n".join(p.read_text(encoding="utf-8")
                                                          for p in (ROOT / "tests").glob("test_*.py")), flags=re.M))


def unknown_tests(path, defined):
    """Test names quoted in `code` that no tests/test_*.py defines ('test_x_...' stands for a prefix)."""
    bad = []
    for code in code_texts(path.read_text(encoding="utf-8")):
        for name, cut in re.findall(r"(?<![\w/-])(test_\w+?)(_?\.\.\.)?(?![\w.])", code):
            if not (any(d.startswith(name) for d in defined) if cut else name in defined):
                bad.append(f"{path.relative_to(ROOT).as_posix()}: no test named {name}{cut}")
    return bad


def test_option_checker_reads_the_parsers_and_finds_a_planted_option(tmp_path):
    assert {"--dataset", "--dry_run", "--motion_objects"} <= script_options("train")
    assert "--workers" in script_options("store") and "--set" in script_options("synthetic")
    doc = tmp_path / "x.md"
    doc.write_text("Run `python train.py --datset k400` or\n```bash\n"
                   "torchrun --nproc_per_node=8 eval_vos.py --ckpt c \\\n    --vis 2 --frobnicate\n"
                   "python study.py --arm a=\"--loss sigma --sk_epz 1\" --arms a  # --x\n```\n"
                   "`store.py --prepare --codec kmeans` and `python model.py`\n")
    found = [(s, o) for code in code_texts(doc.read_text()) for s, o in quoted_options(code)]
    assert set(found) == {("train", "--datset"), ("eval_vos", "--ckpt"), ("eval_vos", "--vis"),
                          ("eval_vos", "--frobnicate"), ("study", "--arm"), ("train", "--loss"),
                          ("train", "--sk_epz"), ("study", "--arms"), ("store", "--prepare"), ("store", "--codec")}
    assert sorted(o for s, o in found if o not in script_options(s)) == ["--datset", "--frobnicate", "--sk_epz"]


def test_reference_checkers_find_planted_broken_links_and_sections(tmp_path):
    (tmp_path / "docs").mkdir()
    doc = tmp_path / "docs" / "x.md"
    doc.write_text("# Top\n## Two words\n[a](x.md#two-words) [b](#top) [c](y.md) [d](x.md#three) "
                   "[e](https://example.org/#z) [f](x.md), \"Two\" [g](x.md) (\"Nine\")\n")
    with mock.patch(f"{__name__}.ROOT", tmp_path):
        assert broken_links(doc) == ["docs/x.md: link to a missing file: y.md",
                                     "docs/x.md: no heading with the anchor #three in x.md"]
        assert unknown_sections(doc) == ["docs/x.md: x.md has no section \"Nine\""]
    (tmp_path / "README.md").write_text("# sigma\n## Quick start\n")
    code = tmp_path / "x.py"
    code.write_text('# see the README, "Quick start"; the README, "Common issues"\n')
    with mock.patch(f"{__name__}.ROOT", tmp_path):
        assert unknown_sections(code) == ['x.py: README.md has no section "Common issues"']


def test_test_name_checker_finds_a_planted_name(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("`tests/test_a.py::test_one[sigma]`, `test_two_...`, `test_three`, `--test_clips 2`\n")
    with mock.patch(f"{__name__}.ROOT", tmp_path):
        assert unknown_tests(doc, {"test_one", "test_two_things"}) == ["x.md: no test named test_three"]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_quoted_commands_use_existing_options(path):
    bad = unknown_options(path)
    assert not bad, "options the scripts do not have:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_resolve(path):
    bad = broken_links(path)
    assert not bad, "broken links:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("path", product_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_sections_exist(path):
    bad = unknown_sections(path)
    assert not bad, "sections that do not exist:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_quoted_test_names_exist(path):
    bad = unknown_tests(path, defined_test_names())
    assert not bad, "\n  ".join(bad)
