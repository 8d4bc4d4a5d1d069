"""Command line: thin Click wrappers that turn flags into a Recipe and call the Python API.

``kvconvert MODEL --target gqa --kv-heads N -o OUT`` is the ``convert`` command; naming it is
optional, so other verbs (``demo``, and later ``eval``, ``heal``, ``push``) live beside it.
"""

from __future__ import annotations

import sys

import click

from .errors import KVConvertError
from .gqa.grouping import GROUPINGS
from .gqa.solve import METHODS
from .recipe import DEVICES, DTYPES, OBJECTIVES, ROPE_KEYS, TARGETS, Recipe


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


@main.command("convert")
@click.argument("model")
@click.option("-o", "--output", required=True, help="Output folder (refused if it exists).")
@click.option("--target", type=click.Choice(TARGETS), default="gqa", show_default=True,
              help="Conversion: gqa merges KV heads.")
@click.option("--kv-heads", type=int, help="KV heads per layer after merging; must divide the "
              "current count.")
@click.option("--method", type=click.Choice(METHODS), default="svd", show_default=True,
              help="mean: average the group (baseline); svd-weights: SVD of the weights, no "
              "data; svd: eigendecomposition of calibration activations.")
@click.option("--rope-keys", type=click.Choice(ROPE_KEYS), default="complex", show_default=True,
              help="complex: per-frequency complex merge that commutes with RoPE (exact fold); "
              "real: real PCA that ignores RoPE (baseline, not exact).")
@click.option("--objective", type=click.Choice(OBJECTIVES), default="output", show_default=True,
              help="output: weigh values by o_proj and keys by the queries reading them; "
              "plain: unweighted.")
@click.option("--grouping", type=click.Choice(GROUPINGS), default="adjacent", show_default=True,
              help="adjacent heads, or search the grouping that loses least per layer.")
@click.option("--calibration", default="self", show_default=True,
              help="'self' (sample from the model), a .txt file/folder, a .jsonl (text or "
              "input_ids), or a Hub dataset id.")
@click.option("--num-samples", type=int, default=32, show_default=True,
              help="Calibration sequences.")
@click.option("--seq-len", type=int, default=256, show_default=True,
              help="Tokens per calibration sequence.")
@click.option("--batch-size", type=int, default=8, show_default=True,
              help="Calibration sequences per forward pass.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed for sampling, shuffling and search.")
@click.option("--text-field", default="text", show_default=True,
              help="Field holding the text in .jsonl calibration data.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="Where calibration and solving run (auto: CUDA if available).")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="Output dtype (auto: keep the source's).")
@click.option("--max-shard-size", default="5GB", show_default=True,
              help="Largest output shard, e.g. 5GB or 500MB.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) of MODEL.")
@click.option("--trust-remote-code", is_flag=True,
              help="Allow the source model's own code to run (off by default).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def convert_cmd(quiet: bool, **options: object) -> None:
    """Convert MODEL (a local folder or a Hub id) and write the result to --output."""
    from .pipeline import command_line, convert

    recipe = Recipe(**options)  # type: ignore[arg-type]
    out = _run(lambda: convert(recipe, progress=not quiet, command=command_line()))
    if not quiet:
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
