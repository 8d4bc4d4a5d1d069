"""Render docs/cli.md from the Click commands, so the CLI reference cannot drift.

Regenerate with ``python -m kvconvert.clidoc > docs/cli.md``; a test fails when it is stale.
"""

from __future__ import annotations

import click

from .cli import main


def render() -> str:
    ctx = click.Context(
        main,
        info_name="kvconvert",
        terminal_width=100,
        max_content_width=100,
        help_option_names=["-h", "--help"],
    )
    out = [
        "# CLI reference",
        "",
        "Generated from the Click commands by `python -m kvconvert.clidoc > docs/cli.md`.",
        "`kvconvert MODEL ...` is short for `kvconvert convert MODEL ...`.",
        "",
        "```",
        main.get_help(ctx).rstrip(),
        "```",
        "",
    ]
    for name in sorted(main.commands):
        cmd = main.commands[name]
        sub = click.Context(cmd, info_name=name, parent=ctx)
        out += [f"## kvconvert {name}", "", "```", cmd.get_help(sub).rstrip(), "```", ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(render(), end="")
