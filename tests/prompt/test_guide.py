"""The guide's `parity prompt` examples print exactly what the guide pastes.

tests/test_docs.py runs every documented command and checks its exit code, but it compares only
verdict lines of known commands; here every pasted line of a `parity prompt` command must be a
line of the real output (in any order: stdout and stderr interleave by buffering). ``...`` in a
pasted line matches anything, as in test_docs.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

GUIDE = REPO / "docs" / "guide.md"
sys.path.insert(0, str(REPO / "tests"))
from test_docs import DOCS_TMP, parse_console_commands  # noqa: E402  (tests/ is not a package)

COMMANDS = [c for c in parse_console_commands(GUIDE.read_text(encoding="utf-8"), path=GUIDE)
            if c.command.startswith("parity prompt ")]


def pasted_output(cmd) -> list[str]:
    lines = GUIDE.read_text(encoding="utf-8").splitlines()
    out, i = [], cmd.line  # cmd.line is 1-based: lines[cmd.line] is the line after the command
    while i < len(lines) and not lines[i].startswith(("$ ", "```")):
        out.append(lines[i])
        i += 1
    return out


def test_the_guide_has_prompt_examples():
    assert len(COMMANDS) >= 4
    assert {c.exit_code for c in COMMANDS} == {0, 1}


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: f"guide.md:{c.line}")
def test_pasted_output_is_real(cmd, tmp_path):
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
           "COLUMNS": "150", "NO_COLOR": "1"}
    proc = subprocess.run(["bash", "-c", cmd.command.replace(DOCS_TMP, str(tmp_path))], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == cmd.exit_code, proc.stdout + proc.stderr
    real = (proc.stdout + proc.stderr).splitlines()
    pasted = pasted_output(cmd)
    assert pasted, "no pasted output"
    def found(line: str) -> bool:
        pattern = re.compile(".*?".join(re.escape(part) for part in line.split("...")))
        return any(pattern.fullmatch(r) for r in real)

    missing = [line for line in pasted if not found(line)]
    assert not missing, "pasted lines not printed now:\n" + "\n".join(missing) + "\n--- real:\n" + "\n".join(real)
