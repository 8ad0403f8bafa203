"""Every flag of every subcommand says what it does, and shows its default, in `--help` (no model needed)."""

from __future__ import annotations

import argparse
import subprocess
import sys

from qwen2vl_edge.cli import build_parser


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"": parser, **sub.choices}


def undocumented(parser: argparse.ArgumentParser) -> list[str]:
    """Flags and positionals without a help line, and flags whose default `--help` does not show."""
    text = "".join(parser.format_help().split())  # help wraps at spaces and hyphens: compare without them
    missing = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = "/".join(action.option_strings) or action.dest
        if not (action.help or "").strip():
            missing.append(f"{name}: no help")
        elif action.option_strings and action.default not in (None, False, []) and (
                f"(default:{''.join(str(action.default).split())})" not in text):
            missing.append(f"{name}: default {action.default!r} not shown")
    return missing


def test_every_flag_has_help_and_shows_its_default():
    found = {name or "qwen2vl-edge": undocumented(p) for name, p in commands().items()}
    assert not any(found.values()), {k: v for k, v in found.items() if v}
    assert len(commands()) > 10  # the walk saw the subcommands


def test_the_walk_finds_a_flag_without_help():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bare", type=int, default=3)
    parser.add_argument("--quiet", type=int, default=3, help="says what it does")
    assert undocumented(parser) == ["--bare: no help", "--quiet: default 3 not shown"]


def test_top_level_help_says_what_the_tool_does():
    result = subprocess.run([sys.executable, "-m", "qwen2vl_edge", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "edge devices" in result.stdout and "sits above" not in result.stdout
    assert all(command in result.stdout for command in ("run", "chat", "serve", "export", "quickstart"))
