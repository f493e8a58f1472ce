"""Every code block of README.md and docs/*.md runs as written, or is allowlisted with its reason.

* A ```python block runs as a script of its own, in a fresh interpreter whose working directory is
  a new temporary directory, and must exit 0.
* A shell block (```bash, ```sh, ```shell, ```console) is either in RUN, and then runs the same
  way under ``bash -euo pipefail`` (a console block: its ``$ `` lines), or in ALLOWLIST with the
  reason it does not run here (an install, a long run). An allowlisted block is still checked:
  every ``manifold-ext`` command line (also under ``torchrun`` or ``python -m``) parses, every
  ``python -m benchmarks.X``, ``bash FILE`` and pytest path names a file of the repository, and
  every ``-e ".[extras]"`` names extras of pyproject.toml. A shell block in neither list fails,
  so a new block cannot slip in unclassified, and so does a list entry that matches no block.
* A ```toml block is a ``--config`` file: it must parse, and its settings and candidates must be valid.
* A ```text block is an output excerpt and is not run. Any other language, or none, fails.

Blocks are found in README.md and docs/*.md; a test's id is FILE-INDEX-LANGUAGE, INDEX counting
the file's blocks from 0. The blocks run single-threaded (``OMP_NUM_THREADS=1`` unless set) with
the repository first on PYTHONPATH and this interpreter's ``bin`` first on PATH.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = ("bash", "sh", "shell", "console")
# Seconds a block may run: a block that runs for minutes belongs in ALLOWLIST, and one stuck
# must fail rather than hang the test run.
TIMEOUT = 300

# Shell blocks that run: (file, a string only that block of the file contains).
RUN = {
    ("README.md", "manifold-ext compare --quick --out runs/quick"),
    ("docs/building.md", "python -m manifold_ext info"),
    ("docs/cli.md", "manifold-ext probe --help"),
    ("docs/cli.md", "manifold-ext probe barrier model0.pt"),
    ("docs/cli.md", "manifold-ext demo"),
    ("docs/compare.md", "--base model.pt --arch mlp:64-32-10"),
}

# Shell blocks that do not run here, and why: (file, a string only that block contains) -> reason.
ALLOWLIST = {
    ("README.md", '-e ".[plot]" && manifold-ext compare'):
        "installs the package (a build of minutes), then the main job",
    ("README.md", "bash scripts/ctest.sh && python -m pytest"):
        "installs the package and runs every test, this file's among them (.ci/run runs it)",
    ("README.md", "--index-url https://download.pytorch.org/whl/cpu"):
        "installs torch from the CPU wheel index",
    ("docs/building.md", "MANIFOLD_EXT_CUDA=0 pip install"):
        "rebuilds and reinstalls the package",
    ("docs/building.md", "bash scripts/ctest.sh"):
        "builds the C++ tests into the repository's build/cmake (the README's test command runs it)",
    ("docs/cli.md", "manifold-ext bench --list"):
        "bench runs the repository's scripts from its root and writes its results/",
    ("docs/compare.md", "manifold-ext compare --model gpt2"):
        "long runs (the GPT-2 benchmark alone takes 16 minutes); --quick runs in the README's block",
    ("docs/compare.md", "manifold-ext compare --suite"):
        "the suite runs for 5 to 25 minutes",
    ("docs/distributed.md", "torchrun --nproc-per-node"):
        "starts several processes for a whole compare run (tests/test_distributed.py runs 2 ranks)",
    ("docs/performance.md", "python -m benchmarks.ratios"):
        "benchmarks run for minutes each and write the repository's results/",
}


@dataclass(frozen=True)
class Block:
    file: str  # relative to the repository root
    index: int  # among the file's blocks, from 0
    line: int  # of the opening fence, from 1
    lang: str
    text: str

    @property
    def id(self) -> str:
        return f"{self.file}-{self.index}-{self.lang or 'none'}"

    def __str__(self) -> str:
        return f"{self.file}:{self.line} (block {self.index}, {self.lang or 'no language'})"


_FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")


def blocks_of(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, each dedented by its fence's indentation."""
    rel = path.relative_to(ROOT).as_posix()
    out, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = len(m.group(1)), m.group(2).lower(), i
        body = []
        i += 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            line = lines[i]
            body.append(line[indent:] if not line[:indent].strip() else line.lstrip())
            i += 1
        if i == len(lines):
            raise AssertionError(f"{rel}:{start + 1}: a code block is never closed")
        out.append(Block(rel, len(out), start + 1, lang, "\n".join(body) + "\n"))
        i += 1
    return out


BLOCKS = [b for f in FILES for b in blocks_of(f)]


def _params(langs):
    return [pytest.param(b, id=b.id) for b in BLOCKS if b.lang in langs]


def _entry(block: Block, table) -> list:
    return [key for key in table if key[0] == block.file and key[1] in block.text]


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["MPLBACKEND"] = "Agg"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PATH"] = os.pathsep.join(p for p in (str(Path(sys.executable).parent), env.get("PATH")) if p)
    return env


def _run(block: Block, argv: list, cwd: Path) -> None:
    try:
        r = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{block} ran for more than {TIMEOUT} s\n--- output ---\n{(err.stdout or '')[-3000:]}")
    assert r.returncode == 0, (f"{block} exited with status {r.returncode}\n--- stdout ---\n"
                               f"{r.stdout[-3000:]}\n--- stderr ---\n{r.stderr[-5000:]}")


# ----------------------------------------------------------------------------- the blocks


@pytest.mark.parametrize("block", _params(("python",)))
def test_python_block_runs(block, tmp_path):
    (tmp_path / "block.py").write_text(block.text)
    _run(block, [sys.executable, "block.py"], tmp_path)


@pytest.mark.parametrize("block", _params(SHELL))
def test_shell_block_runs_or_is_allowlisted(block, tmp_path):
    run, allowed = _entry(block, RUN), _entry(block, ALLOWLIST)
    assert len(run) + len(allowed) == 1, (
        f"{block} must match exactly one entry of RUN or ALLOWLIST in {Path(__file__).name}, "
        f"matched {run + allowed}: add it to RUN (a fast command) or to ALLOWLIST with the reason it "
        f"cannot run here\n{block.text}")
    if run:
        script = block.text
        if block.lang == "console":
            script = "\n".join(line[2:] for line in block.text.splitlines() if line.startswith("$ "))
        _run(block, ["bash", "-euo", "pipefail", "-c", script], tmp_path)
    else:
        assert ALLOWLIST[allowed[0]].strip(), f"{block}: its ALLOWLIST entry gives no reason"
        for argv in commands(block):
            check_command(argv, block)


@pytest.mark.parametrize("block", _params(("toml",)))
def test_toml_block_is_a_valid_config(block):
    from manifold_ext.builtin import Candidate, benchmark
    from manifold_ext.compare import settings_for

    config = tomllib.loads(block.text)
    for key in ("model", "task"):
        config.pop(key, None)
    candidates = [Candidate.from_dict(c) for c in config.pop("candidates", [])]
    assert all(c.name for c in candidates), block
    settings_for(benchmark(), **config)


def test_every_block_has_a_known_language():
    unknown = [str(b) for b in BLOCKS if b.lang not in ("python", "toml", "text", *SHELL)]
    assert not unknown, (f"fence these as python, bash, console, toml, or text (an output excerpt, "
                         f"not run): {unknown}")


# ----------------------------------------------------------------------------- the lists and the README


def test_every_list_entry_matches_one_block():
    assert not RUN & ALLOWLIST.keys(), "an entry is in both RUN and ALLOWLIST"
    for key in [*RUN, *ALLOWLIST]:
        file, needle = key
        matched = [b for b in BLOCKS if b.lang in SHELL and b.file == file and needle in b.text]
        assert len(matched) == 1, f"{key} matches {len(matched)} shell blocks of {file}, not 1: {matched}"


def test_ci_runs_the_readme_test_command():
    """`.ci/run` runs exactly the README's test command, and the main-job command installs the same way."""
    readme = [b for b in BLOCKS if b.file == "README.md" and b.lang in SHELL]
    test = [b.text.strip() for b in readme if "python -m pytest" in b.text]
    assert len(test) == 1, "the README has one block with the test command"
    assert test[0] in (ROOT / ".ci" / "run").read_text().splitlines(), (
        f".ci/run must run the README's test command as one line:\n{test[0]}")
    main = [b.text.strip() for b in readme if b.text.strip().endswith("&& manifold-ext compare")]
    assert len(main) == 1, "the README has one block that installs and runs the main job"
    assert main[0].split(" && ")[0] == test[0].split(" && ")[0], "both commands install torch alike"


def test_relative_links_resolve():
    for path in FILES:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            file = target.split("#")[0]
            assert (path.parent / file).exists(), f"{path.relative_to(ROOT)}: the link {target} leads nowhere"


def test_blocks_are_found():
    """The parser sees the blocks (a broken fence would hide them all from the tests above)."""
    langs = {b.lang for b in BLOCKS if b.file == "README.md"}
    assert {"python", "bash", "text"} <= langs
    assert sum(b.lang == "python" for b in BLOCKS if b.file == "README.md") >= 4


# ----------------------------------------------------------------------------- static checks


def commands(block: Block) -> list[list[str]]:
    """The commands of a shell block as argument lists: continuation lines joined, comments and
    heredoc bodies left out, lines split at ``&&``, ``||``, ``;`` and ``|``."""
    lines = block.text.splitlines()
    if block.lang == "console":
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    out, heredoc, logical = [], None, ""
    for line in lines:
        if heredoc is not None:
            if line.strip() == heredoc:
                heredoc = None
            continue
        logical += line
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        m = re.search(r"<<-?\s*['\"]?(\w+)", logical)
        heredoc = m.group(1) if m else None
        try:
            tokens = shlex.split(logical, comments=True)
        except ValueError as err:
            pytest.fail(f"{block}: cannot split {logical!r} into words: {err}")
        logical, current = "", []
        for tok in tokens:
            if tok in ("&&", "||", ";", "|"):
                out.append(current)
                current = []
            else:
                current.append(tok)
        out.append(current)
    return [c for c in out if c]


def _parse_cli(args: list, block: Block) -> None:
    from manifold_ext.cli import _parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            _parser().parse_args(args)
    except SystemExit as exit:
        if exit.code:
            why = (err.getvalue().strip().splitlines() or [""])[-1]
            pytest.fail(f"{block}: `manifold-ext {shlex.join(args)}` does not parse: {why}")


def check_command(argv: list, block: Block) -> None:
    """What can be checked of a command without running it."""
    while argv and re.fullmatch(r"[A-Za-z_]\w*=.*", argv[0]):
        argv = argv[1:]  # VAR=value before the command
    prog, args = argv[0], argv[1:]
    if prog == "manifold-ext":
        _parse_cli(args, block)
    elif prog == "torchrun":
        assert "manifold_ext.cli" in args, f"{block}: torchrun of what? {shlex.join(argv)}"
        _parse_cli(args[args.index("manifold_ext.cli") + 1:], block)
    elif prog in ("python", "python3") and args[:1] == ["-m"]:
        module, rest = args[1], args[2:]
        if module in ("manifold_ext", "manifold_ext.cli"):
            _parse_cli(rest, block)
        elif module.startswith("benchmarks."):
            assert (ROOT / "benchmarks" / f"{module.split('.', 1)[1]}.py").is_file(), f"{block}: no module {module}"
        elif module == "pytest":
            for a in rest:
                assert a.startswith("-") or (ROOT / a.split("::")[0]).exists(), f"{block}: no path {a}"
    elif prog == "bash":
        assert (ROOT / args[0]).is_file(), f"{block}: no script {args[0]}"
    elif prog == "pip" and args[:1] == ["install"]:
        extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
        for a in args:
            m = re.fullmatch(r"\.\[([\w,-]+)\]", a)
            if m:
                unknown = set(m.group(1).split(",")) - extras
                assert not unknown, f"{block}: pyproject.toml has no extras {sorted(unknown)}"
