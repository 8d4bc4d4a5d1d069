"""Command line: thin Click wrappers that turn flags into a Recipe and call the Python API.

``kvconvert MODEL --target gqa --kv-heads N -o OUT`` is the ``convert`` command; naming it is
optional, so other verbs (``demo``, and later ``eval``, ``heal``, ``push``) live beside it.
"""

from __future__ import annotations

import sys
from dataclasses import fields

import click

from .errors import KVConvertError
from .recipe import Recipe


class DefaultToConvert(click.Group):
    """A group whose first argument, when it is not a command name, is a model to convert."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["convert", *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultToConvert, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kvconvert")
def main() -> None:
    """Convert Hugging Face causal LMs into checkpoints with a smaller KV cache.

    \b
    kvconvert MODEL --target gqa --kv-heads N -o OUT    (same as: kvconvert convert ...)
    kvconvert demo -o DIR                               offline end-to-end demo
    """


def recipe_options(func):  # noqa: ANN001, ANN201 - decorator
    """Add one Click option per Recipe field (the Recipe is the single source of options)."""
    for f in reversed(fields(Recipe)):
        meta = f.metadata
        if meta.get("cli") == "argument":
            func = click.argument(f.name)(func)
            continue
        decls = [f"--{f.name.replace('_', '-')}"] + ([meta["short"]] if "short" in meta else [])
        kwargs: dict = {"help": meta["help"], "required": meta.get("required", False)}
        if f.default is False:
            kwargs["is_flag"] = True
        else:
            kwargs["default"] = f.default
            kwargs["show_default"] = f.default is not None
            if meta.get("choices"):
                kwargs["type"] = click.Choice(meta["choices"])
            elif "type" in meta:
                kwargs["type"] = meta["type"]
        func = click.option(*decls, **kwargs)(func)
    return func


@main.command("convert")
@recipe_options
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def convert_cmd(quiet: bool, **options: object) -> None:
    """Convert MODEL (a local folder or a Hub id) and write the result to --output."""
    from .pipeline import command_line, convert

    recipe = Recipe(**options)  # type: ignore[arg-type]
    out = _run(lambda: convert(recipe, progress=not quiet, command=command_line()))
    if not quiet and not recipe.dry_run:
        click.echo(f"wrote {out}", err=True)


@main.command("demo")
@click.option("-o", "--output", required=True, help="Folder for the demo source and outputs.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def demo_cmd(output: str, quiet: bool) -> None:
    """Offline end-to-end demo on a small seeded Llama (8 -> 4 KV heads)."""
    from .demo import run_demo

    s = _run(lambda: run_demo(output, progress=not quiet))
    click.echo(
        f"KV cache per token: {s['kv_bytes_per_token_before']} -> "
        f"{s['kv_bytes_per_token_after']} bytes\n"
        f"KL to the original (nats/token): svd {s['kl_svd']:.4f}, mean-pooling baseline "
        f"{s['kl_mean']:.4f}\n"
        f"converted model: {output}/converted"
    )


def _run(fn):  # noqa: ANN001, ANN202 - tiny helper
    try:
        return fn()
    except KVConvertError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        click.echo("interrupted; no output was written", err=True)
        sys.exit(130)
