"""Command line: thin Click wrappers that turn flags into a Recipe and call the Python API.

``kvconvert MODEL --target gqa --kv-heads N -o OUT`` is the ``convert`` command; naming it is
optional, so other verbs (``demo``, ``eval``, ``inspect``, ``push``) live beside it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path

import click

from .errors import KeptProgress, KVConvertError
from .evalsettings import EvalSettings
from .heal.options import HealOptions
from .options import DEVICES
from .recipe import LOCAL_ONLY, Recipe, load_recipe_file


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
    kvconvert --recipe FILE.yaml -o OUT                 a conversion from a recipe file
    kvconvert push OUT user/name                        upload an output to the Hub
    kvconvert eval ORIGINAL CONVERTED [...]             side-by-side numbers
    kvconvert heal ORIGINAL CONVERTED -o OUT            recover quality by distillation
    kvconvert demo -o DIR                               offline end-to-end demo
    kvconvert inspect MODEL                             is MODEL supported, and how
    kvconvert check OUT                                 does OUT still work (after upgrades)
    """


def recipe_options(func):  # noqa: ANN001, ANN201 - decorator
    """Add one Click option per Recipe field (the Recipe is the single source of options)."""
    return dataclass_options(Recipe)(func)


def dataclass_options(cls: type):  # noqa: ANN201 - decorator factory
    """Add one Click option per field of ``cls``, from the fields' ``option(...)`` metadata."""
    return lambda func: _add_options(cls, func)


def _add_options(cls: type, func):  # noqa: ANN001, ANN202
    for f in reversed(fields(cls)):
        meta = f.metadata
        if meta.get("cli") == "argument":
            func = click.argument(f.name, required=meta.get("required", True))(func)
            continue
        flag = f"--{f.name.replace('_', '-')}"
        decls = [flag] + ([meta["short"]] if "short" in meta else [])
        kwargs: dict = {"help": meta["help"], "required": meta.get("required", False)}
        if f.default is False:
            kwargs["is_flag"] = True
            if f.name not in LOCAL_ONLY and meta.get("in_recipe", True):
                # a recipe may say true: the command line must be able to say false
                decls[0] = f"{flag}/--no-{flag[2:]}"
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
@click.option(
    "--recipe",
    "recipe_file",
    type=click.Path(dir_okay=False),
    help="YAML recipe holding options above (all but -o, --overwrite, --trust-remote-code and "
    "the run settings --device, --threads, --resume, --dry-run, --heal-resume, "
    "--offload-activations), e.g. an output's recipe.yaml; flags given on the command line "
    "override its values.",
)
@click.option(
    "--push-to-hub", metavar="USER/NAME", help="Upload the finished output to this Hub repo."
)
@click.option("--private", is_flag=True, help="Create the Hub repo private (with --push-to-hub).")
@click.option(
    "--hub-revision", metavar="BRANCH", help="Hub branch to push to (with --push-to-hub)."
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def convert_cmd(
    ctx: click.Context,
    quiet: bool,
    recipe_file: str | None,
    push_to_hub: str | None,
    private: bool,
    hub_revision: str | None,
    **options: object,
) -> None:
    """Convert MODEL (a local folder or a Hub id) and write the result to --output."""
    from .pipeline import command_line, convert

    if (private or hub_revision) and not push_to_hub:
        raise click.UsageError("--private and --hub-revision need --push-to-hub")
    recipe = _run(lambda: merged_recipe(ctx, options, recipe_file))
    if recipe.model is None:
        raise click.UsageError("missing MODEL (give it on the command line or in --recipe)")
    if push_to_hub:
        from .hub import check_push_target

        _run(lambda: check_push_target(push_to_hub, hub_revision))
    out = _run(lambda: convert(recipe, progress=not quiet, command=command_line()))
    if not quiet and not recipe.dry_run:
        click.echo(f"wrote {out}", err=True)
    if push_to_hub:
        from .pipeline import push

        url = _run(
            lambda: push(
                out, push_to_hub, private=private, revision=hub_revision, progress=not quiet
            )
        )
        click.echo(f"pushed to {url}", err=True)


def merged_recipe(ctx: click.Context, options: dict, recipe_file: str | None) -> Recipe:
    """Recipe defaults, then the recipe file's values, then the flags actually given.

    A flag left at its default does not override the file: click's ParameterSource tells a
    typed ``--seed 0`` (overrides) from an untouched default (does not).
    """
    values = dict(options)
    if recipe_file:
        given = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
        for key, value in load_recipe_file(recipe_file).items():
            if ctx.get_parameter_source(key) not in given:
                values[key] = value
    return Recipe(**values)  # type: ignore[arg-type]


@main.command("push")
@click.argument("folder", type=click.Path(file_okay=False))
@click.argument("repo_id", metavar="USER/NAME")
@click.option(
    "--private",
    is_flag=True,
    help="Create the repo private (an existing repo keeps its visibility).",
)
@click.option("--hub-revision", metavar="BRANCH", help="Branch to push to (created if missing).")
@click.option("-m", "--message", help="Commit message.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def push_cmd(
    folder: str,
    repo_id: str,
    private: bool,
    hub_revision: str | None,
    message: str | None,
    quiet: bool,
) -> None:
    """Upload a finished output FOLDER to the Hub repo USER/NAME (created if missing).

    The token comes from HF_TOKEN or `hf auth login`. Re-running after a failure resumes:
    files already on the Hub are not sent again.
    """
    from .pipeline import push

    url = _run(
        lambda: push(
            folder,
            repo_id,
            private=private,
            revision=hub_revision,
            commit_message=message,
            progress=not quiet,
        )
    )
    click.echo(f"pushed to {url}")


@main.command("heal")
@dataclass_options(HealOptions)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def heal_cmd(quiet: bool, **options: object) -> None:
    """Heal CONVERTED by distillation from ORIGINAL (KL on next-token distributions).

    The output keeps CONVERTED's format (files, remote code, tokenizer, card) with the trained
    tensors replaced, and the run appended to kvconvert.json.
    """
    from .pipeline import command_line, heal

    opts = HealOptions(**options)  # type: ignore[arg-type]
    out = _run(lambda: heal(opts, progress=not quiet, command=command_line()))
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
        f"converted model: {Path(output) / 'converted'}"
    )


@main.command("inspect")
@click.argument("model")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON.")
def inspect_cmd(model: str, revision: str | None, as_json: bool) -> None:
    """Whether and how MODEL is supported: attention layout, KV heads, head_dim, RoPE, KV bytes.

    Reads only config.json and the safetensors headers. Exits 1 for an unsupported model.
    """
    import json

    from .inspection import format_info
    from .pipeline import inspect_model

    info = _run(lambda: inspect_model(model, revision))
    click.echo(json.dumps(info, indent=2) if as_json else format_info(info))
    if not info["supported"]:
        sys.exit(1)


@main.command("eval")
@click.argument("original")
@click.argument("converted", nargs=-1, required=True)
@dataclass_options(EvalSettings)
@click.option("--json", "json_path", default=None, help="Also write the results to this JSON file.")
@click.option("--plot", "plot_path", default=None, help="Also draw a PNG (needs matplotlib).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def eval_cmd(
    original: str,
    converted: tuple[str, ...],
    json_path: str | None,
    plot_path: str | None,
    quiet: bool,
    **options: object,
) -> None:
    """Compare CONVERTED model(s) with ORIGINAL: KL, perplexity, measured KV bytes, speed,
    retrieval. See docs/evaluation.md for what each number means and the JSON schema."""
    from .evaluate import format_table, require_matplotlib, write_plot
    from .pipeline import command_line, evaluate

    if plot_path:
        _run(require_matplotlib)
    settings = EvalSettings(**options)  # type: ignore[arg-type]
    doc = _run(
        lambda: evaluate(
            original, list(converted), settings, progress=not quiet, command=command_line()
        )
    )
    click.echo(format_table(doc))
    if json_path:
        Path(json_path).write_text(json.dumps(doc, indent=2) + "\n")
        click.echo(f"wrote {json_path}", err=True)
    if plot_path:
        _run(lambda: write_plot(doc, plot_path))
        click.echo(f"wrote {plot_path}", err=True)


@main.command("check")
@click.argument("output")
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    type=click.Choice(DEVICES),
    help="Where the model runs (auto: CUDA if available).",
)
@click.option(
    "--new-tokens",
    default=32,
    show_default=True,
    type=click.IntRange(min=1),
    help="Tokens to generate and compare with the uncached forward.",
)
@click.option(
    "--trust-remote-code",
    is_flag=True,
    help="Run the model code a Hub repo or a folder not written by kvconvert ships (a local "
    "kvconvert output's own code runs without it).",
)
@click.option(
    "--engine",
    default="transformers",
    show_default=True,
    type=click.Choice(["transformers", "vllm", "llama.cpp"]),
    help="Run OUTPUT in this engine and compare it with transformers: greedy tokens, prompt "
    "log-probs, and the KV cache (vllm: capacity in tokens; llama.cpp: bytes). An output the "
    "engine cannot serve must be refused with the reason.",
)
@click.option(
    "--llama-cpp",
    "llama_cpp",
    type=click.Path(file_okay=False, exists=True),
    help="With --engine llama.cpp: a llama.cpp source tree, whose convert_hf_to_gguf.py "
    "converts OUTPUT (e.g. vendor/llama.cpp of the llama-cpp-python sdist).",
)
@click.option(
    "--python",
    "python",
    type=click.Path(dir_okay=False),
    help="Interpreter of the environment where the engine is installed, e.g. "
    "vllm-env/bin/python (default: this one). It needs the engine only (llama.cpp: the "
    "llama_cpp bindings and the converter's requirements), not kvconvert.",
)
@click.option(
    "--kv-space",
    default=2,
    show_default=True,
    type=click.IntRange(min=1),
    help="With --engine vllm: GiB of KV cache it gets (VLLM_CPU_KVCACHE_SPACE on CPU, "
    "kv_cache_memory_bytes on GPU); its capacity in tokens is checked against kvconvert.json.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def check_cmd(
    output: str,
    device: str,
    new_tokens: int,
    trust_remote_code: bool,
    engine: str,
    llama_cpp: str | None,
    python: str | None,
    kv_space: int,
    as_json: bool,
) -> None:
    """Does OUTPUT still work with the installed transformers or serving engine?

    OUTPUT is a kvconvert output folder (or any causal LM folder or Hub id). Loads it as a user
    would, checks greedy generate() against an uncached forward, and the cache bytes after a
    prefill against the conversion report. With --engine vllm or llama.cpp, runs it in that
    engine instead (in --python's environment) and compares it with transformers on the same
    token ids. Prints one line, ok: or FAILED:, and exits 1 on failure. See docs/check.md.
    """
    from .pipeline import check, check_engine

    if engine == "transformers" and python:
        raise click.UsageError("--python names the interpreter of --engine vllm or llama.cpp")
    if llama_cpp and engine != "llama.cpp":
        raise click.UsageError("--llama-cpp goes with --engine llama.cpp")
    trust = trust_remote_code or None
    res = _run(
        lambda: (
            check(output, device=device, new_tokens=new_tokens, trust_remote_code=trust)
            if engine == "transformers"
            else check_engine(
                output,
                engine,
                python=python,
                device=device,
                new_tokens=new_tokens,
                kv_space_gib=kv_space,
                llama_cpp=llama_cpp,
                trust_remote_code=trust,
            )
        )
    )
    click.echo(json.dumps(res.to_dict(), indent=2) if as_json else res.line())
    if not res.ok:
        sys.exit(1)


def _run(fn):  # noqa: ANN001, ANN202 - tiny helper
    try:
        return fn()
    except KVConvertError as e:
        raise click.ClickException(str(e)) from None
    except KeptProgress as e:  # the run kept its progress: say where, not "nothing written"
        click.echo(str(e).lstrip("\n"), err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted; no output was written", err=True)
        sys.exit(130)
