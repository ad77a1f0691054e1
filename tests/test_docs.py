"""Every command in README.md and docs/*.md runs, and exits as the docs say, so the docs cannot rot.

The convention (docs/guide.md follows it, and so must any new page):

- A command is a line starting with ``$ `` inside a ```console fenced block; a line ending in
  ``\\`` continues onto the next. It may end with ``  # exit N``, the exit status it must return
  (default 0).
- The lines after it, up to the next ``$ `` line or the end of the block, are its pasted output.
  A pasted line starting with one of VERDICT_PREFIXES (``no divergence``, ``DIVERGENCE:``,
  ``bisect:``, ...) must appear in the real output (stdout and stderr together, whitespace
  collapsed, so terminal wrapping does not matter; ``...`` in the pasted line matches anything, for
  numbers that depend on the machine). That is a cheap guard against stale pasted output. Every
  other pasted line (progress, tables, trimmed parts) is illustration and is not checked.
- Commands run with bash, one after another in document order, because a later command may read
  what an earlier one wrote (``parity report`` reads an earlier ``--json``). So the test of one
  command first runs whatever of its file comes before it (once per session; each file in its
  own directories), and any one test can run alone or in any order. The venv's bin comes first
  on PATH; PARITY_CACHE_DIR is the session's compile cache (tests/conftest.py); COLUMNS=150, no
  colour.
- Whatever the docs write goes under ``/tmp/parity-docs/`` or ``reports/``, and neither is the
  real one: commands run in a view of the checkout (a temporary directory of symlinks to every
  top-level entry but ``reports/``, which is a fresh empty directory there), with
  ``/tmp/parity-docs`` rewritten to a directory of the same session. So a test never writes into
  the checkout, and a command that refuses to overwrite (``parity convert``) finds a clean place.
- Commands in ```bash / ```sh / ```shell blocks are not run; each must also appear as a ``$ ``
  command somewhere (README's first two lines do: ``./scripts/demo`` in the guide's quick start),
  so no command can hide from this test in a differently fenced block.

Excluded: ``./scripts/test``. It runs every test, this file included, so running it here would
recurse; CI runs it anyway, and that run is its test.

Run ``python tests/test_docs.py [FILE ...]`` to print every command's real output, for refreshing
what the docs paste.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml  # pyyaml: a declared test dependency

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
DOCS_TMP = "/tmp/parity-docs"  # the docs' scratch directory; rewritten per session (module doc)
EXCLUDED = {"./scripts/test": "runs this test (recursion); CI runs it anyway"}
VERDICT_PREFIXES = (
    "no divergence", "DIVERGENCE:", "bisect:", "first divergence:",
    "tokenizers agree", "TOKENIZERS DIFFER", "parity: error:",
)
TIMEOUT_S = 600

_EXIT = re.compile(r"\s+#\s*exit\s+(\d+)\s*$")
_FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)")


@dataclass(frozen=True)
class DocCommand:
    path: Path
    line: int  # 1-based line of the ``$ `` line, for the test id
    command: str  # continuation lines joined, ``# exit N`` removed
    exit_code: int
    verdicts: tuple[str, ...]  # pasted output lines that must appear in the real output

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(info word, 1-based line of the first content line, content lines) of every fenced block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = _FENCE.match(lines[i].strip())
        if not m:
            i += 1
            continue
        fence, info, start = m.group(1), m.group(2).lower(), i + 1
        end = start
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        blocks.append((info, start + 1, lines[start:end]))
        i = end + 1
    return blocks


def _join_continuations(lines: list[str], first: int) -> tuple[str, int]:
    """The command starting at lines[first] with its ``\\`` continuations, and the index after it."""
    parts, i = [lines[first]], first
    while parts[-1].rstrip().endswith("\\") and i + 1 < len(lines):
        parts[-1] = parts[-1].rstrip()[:-1]
        i += 1
        parts.append(lines[i].lstrip().removeprefix("> "))
    return " ".join(p.strip() for p in parts), i + 1


def parse_console_commands(text: str, *, path: Path) -> list[DocCommand]:
    out = []
    for info, first_line, lines in fenced_blocks(text):
        if info != "console":
            continue
        i = 0
        while i < len(lines):
            if not lines[i].startswith("$ "):
                i += 1
                continue
            line_no = first_line + i
            raw, i = _join_continuations(lines, i)
            command, exit_code = raw[2:].strip(), 0
            m = _EXIT.search(command)
            if m:
                exit_code, command = int(m.group(1)), command[: m.start()].rstrip()
            verdicts = []
            while i < len(lines) and not lines[i].startswith("$ "):
                if lines[i].startswith(VERDICT_PREFIXES):
                    verdicts.append(lines[i].strip())
                i += 1
            out.append(DocCommand(path=path, line=line_no, command=command, exit_code=exit_code, verdicts=tuple(verdicts)))
    return out


def shell_block_commands(text: str) -> list[str]:
    """Commands written in ```bash/sh/shell blocks (not run), comments stripped."""
    out = []
    for info, _, lines in fenced_blocks(text):
        if info not in ("bash", "sh", "shell"):
            continue
        i = 0
        while i < len(lines):
            command, i = _join_continuations(lines, i)
            command = re.sub(r"(^|\s+)#.*$", "", command).strip()
            if command:
                out.append(command)
    return out


def normalise(text: str) -> str:
    return " ".join(text.split())


def verdict_pattern(pasted: str) -> re.Pattern:
    return re.compile(".*?".join(re.escape(part) for part in normalise(pasted).split("...")))


def all_commands() -> list[DocCommand]:
    return [c for path in DOC_FILES for c in parse_console_commands(path.read_text(encoding="utf-8"), path=path)]


COMMANDS = all_commands()


def docs_env(*, scratch: Path, cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FORCE_COLOR"}
    bin_dir = str(Path(sys.executable).parent)
    env.update(PATH=bin_dir + os.pathsep + env.get("PATH", ""), PARITY_CACHE_DIR=str(cache), COLUMNS="150", NO_COLOR="1")
    if sys.prefix != sys.base_prefix:
        # ./scripts/demo installs into and runs from $PARITY_VENV (default .venv): the same venv as this test.
        env["PARITY_VENV"] = sys.prefix
    scratch.mkdir(parents=True, exist_ok=True)
    return env


def checkout_view(root: Path) -> Path:
    """A directory that looks like the checkout (symlinks to its top-level entries) but has an empty
    ``reports/`` of its own: what the documented commands write lands here, not in the checkout."""
    view = root / "checkout"
    view.mkdir(parents=True, exist_ok=True)
    for entry in REPO.iterdir():
        if entry.name not in ("reports", ".git") and not (view / entry.name).exists():
            (view / entry.name).symlink_to(entry)
    (view / "reports").mkdir(exist_ok=True)
    return view


def venv_is_current() -> bool:
    """scripts/setup's stamp matches pyproject.toml, so ./scripts/* will not reinstall (which, run
    from the view, would install the project from a temporary directory)."""
    import hashlib

    stamp = Path(sys.prefix) / ".parity-installed"
    want = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:16]
    return stamp.is_file() and stamp.read_text().strip() == want


def run_doc_command(cmd: DocCommand, *, env: dict[str, str], scratch: Path, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", cmd.command.replace(DOCS_TMP, str(scratch))], cwd=cwd, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_S,
    )


class DocFileRun:
    """One doc file's commands, each run once, in document order, in the file's own view and scratch."""

    def __init__(self, path: Path, *, root: Path, cache: Path):
        self.commands = [c for c in COMMANDS if c.path == path and c.command not in EXCLUDED]
        self.scratch = root / "parity-docs"
        self.env = docs_env(scratch=self.scratch, cache=cache)
        self.view = checkout_view(root)
        self.done: dict[int, subprocess.CompletedProcess] = {}

    def run_through(self, cmd: DocCommand) -> subprocess.CompletedProcess:
        for earlier in self.commands[: self.commands.index(cmd) + 1]:
            if earlier.line not in self.done:
                if "./scripts/" in earlier.command and not venv_is_current():
                    pytest.fail(f"{earlier.id}: the venv is older than pyproject.toml; run ./scripts/setup first "
                                "(else the script would reinstall the project from this test's temporary view)")
                self.done[earlier.line] = run_doc_command(earlier, env=self.env, scratch=self.scratch, cwd=self.view)
        return self.done[cmd.line]


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def doc_runs(tmp_path_factory, compile_cache):
    runs: dict[Path, DocFileRun] = {}

    def get(path: Path) -> DocFileRun:
        if path not in runs:
            runs[path] = DocFileRun(path, root=tmp_path_factory.mktemp(f"docs-{path.stem}"), cache=compile_cache)
        return runs[path]

    return get


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c.command not in EXCLUDED], ids=lambda c: c.id)
def test_documented_command(cmd: DocCommand, doc_runs):
    run = doc_runs(cmd.path)
    proc = run.run_through(cmd)
    shown = f"$ {cmd.command}\n{proc.stdout[-6000:]}"
    assert proc.returncode == cmd.exit_code, f"{cmd.id}: exit {proc.returncode}, the docs say {cmd.exit_code}\n{shown}"
    real = normalise(proc.stdout.replace(str(run.scratch), DOCS_TMP))
    for pasted in cmd.verdicts:
        assert verdict_pattern(pasted).search(real), f"{cmd.id}: stale pasted output, not printed now:\n  {pasted}\n{shown}"


def test_documented_commands_leave_the_checkout_alone(tmp_path):
    view = checkout_view(tmp_path)
    assert (view / "reports").is_dir() and not (view / "reports").is_symlink()
    assert not any((view / "reports").iterdir())
    assert (view / "fixtures").resolve() == REPO / "fixtures"


def test_every_doc_has_runnable_commands():
    by_file = {c.path.name for c in COMMANDS}
    assert {"README.md", "guide.md"} <= by_file
    assert "./scripts/demo" in {c.command for c in COMMANDS}


def test_no_command_hides_outside_console_blocks():
    documented = {normalise(c.command) for c in COMMANDS}
    hidden = [
        f"{path.relative_to(REPO)}: {command}"
        for path in DOC_FILES
        for command in shell_block_commands(path.read_text(encoding="utf-8"))
        if normalise(command) not in documented and command not in EXCLUDED
    ]
    assert not hidden, "commands in ```bash/sh blocks that no ```console block runs (write them as `$ ` lines):\n" + "\n".join(hidden)


def test_every_subcommand_is_documented():
    import argparse

    from parity.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = "\n".join(c.command for c in COMMANDS)
    missing = [name for name in sub.choices if not re.search(rf"(^|[\s;&|(]){re.escape('parity ' + name)}\b", text, re.M)]
    assert not missing, f"subcommands no documented command runs: {missing}"


def test_ci_example_does_what_the_guide_says():
    # An example, never run (no GitHub here): at least it must parse and keep the promised steps.
    text = (REPO / "docs" / "ci-example.yml").read_text(encoding="utf-8")
    steps = [step for job in yaml.safe_load(text)["jobs"].values() for step in job["steps"]]
    runs = "\n".join(step.get("run", "") for step in steps)
    assert "torch==2.13.0" in runs and runs.index("torch==2.13.0") < runs.index("pip install -e")
    assert "pytest parity/ --parity-report-dir reports" in runs
    assert "--markdown" in runs and "gh pr comment" in runs and "--body-file" in runs
    upload = next(step for step in steps if str(step.get("uses", "")).startswith("actions/upload-artifact"))
    assert upload["if"] == "always()" and upload["with"]["path"].rstrip("/") == "reports"


def test_parser_reads_the_convention():
    text = "\n".join([
        "# t", "```console", "$ parity run --checkpoint x \\", "    --ids ones:3  # exit 1", "progress",
        "DIVERGENCE: first divergence: prefill", "$ parity diff a b", "no divergence (5 records; worst logits error ...)",
        "```", "```bash", "parity demo  # the demo", "```", "```console", "$ echo hi", "```",
    ])
    cmds = parse_console_commands(text, path=REPO / "x.md")
    assert [(c.command, c.exit_code, c.line) for c in cmds] == [
        ("parity run --checkpoint x --ids ones:3", 1, 3), ("parity diff a b", 0, 7), ("echo hi", 0, 14),
    ]
    assert cmds[0].verdicts == ("DIVERGENCE: first divergence: prefill",)
    assert verdict_pattern(cmds[1].verdicts[0]).search("no divergence (5 records; worst logits error 1.2e-05)")
    assert not verdict_pattern(cmds[1].verdicts[0]).search("no divergence (6 records; worst logits error 1e-05)")
    assert shell_block_commands(text) == ["parity demo"]


if __name__ == "__main__":
    import tempfile

    wanted = {Path(a).resolve() for a in sys.argv[1:]}
    with tempfile.TemporaryDirectory(prefix="parity-docs-") as tmp:
        for path in DOC_FILES:
            if wanted and path not in wanted:
                continue
            run = DocFileRun(path, root=Path(tmp) / path.stem,
                             cache=Path(os.environ.get("PARITY_CACHE_DIR", Path(tmp) / "cache")))
            for c in run.commands:
                proc = run.run_through(c)
                print(f"==== {c.id}  (exit {proc.returncode}, docs say {c.exit_code})\n$ {c.command}")
                print(proc.stdout.replace(str(run.scratch), DOCS_TMP), flush=True)
