"""Every ``python -m ptqlib ...`` command written in the README and docs/ runs as written: its
arguments parse, and a ``run`` passes a ``--dry-run`` (the study file loads, the graph prints)."""
import re
import shlex
from pathlib import Path

import pytest

from ptqlib.cli import _parser, main

ROOT = Path(__file__).resolve().parent.parent
CMD = re.compile(r"(?:\.venv/bin/)?python -m ptqlib ([^`#\n]*)")


def _commands() -> list[tuple[str, str]]:
    out = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for m in CMD.finditer(doc.read_text()):
            args = m.group(1).strip().rstrip(".,;:")
            if not args or "<" in args or "[" in args or "..." in args:  # a placeholder
                continue
            if args.split()[0] == "run" and ".yaml" not in args:  # prose naming the command ("`ptqlib run` runs ...")
                continue
            out.append((doc.name, args))
    return out


COMMANDS = _commands()


def test_the_docs_have_commands():
    assert len(COMMANDS) >= 10, COMMANDS


@pytest.mark.parametrize("doc, args", COMMANDS, ids=[f"{d}:{a}" for d, a in COMMANDS])
def test_a_documented_command_runs_as_written(doc, args, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    argv = shlex.split(args)
    ns = _parser().parse_args(argv)  # SystemExit (exit 2) on a bad option
    if ns.cmd == "run":
        assert main([*argv, "--dry-run"] if "--dry-run" not in argv else argv) == 0, capsys.readouterr().err
