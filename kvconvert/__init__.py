"""kvconvert: convert Hugging Face causal LMs into checkpoints with a smaller KV cache.

Python API::

    import kvconvert
    kvconvert.convert("org/model", "out/", kv_heads=8)            # options as in the CLI
    kvconvert.convert(None, "out2/", recipe="out/recipe.yaml")    # re-run a recorded recipe
    kvconvert.push("out/", "user/model-kv8")                      # upload to the Hub
    kvconvert.inspect_model("org/model")                          # is it supported, and how
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .errors import KVConvertError
from .recipe import Recipe
from .version import __version__

__all__ = ["KVConvertError", "Recipe", "__version__", "convert", "inspect_model", "push"]


def convert(
    model: str | None,
    output: str,
    *,
    recipe: str | Path | None = None,
    progress: bool = True,
    **options: Any,
) -> Path:
    """Convert ``model`` (folder or Hub id) into ``output``; options are Recipe fields.

    ``recipe`` is a YAML recipe file (e.g. an output's ``recipe.yaml``): its values are used
    where ``options`` do not say otherwise, and ``model=None`` takes the recipe's model.
    Returns the output folder. Raises :class:`KVConvertError` on bad input.
    """
    from .pipeline import convert as _convert
    from .recipe import load_recipe_file

    unknown = set(options) - set(Recipe.field_names())
    if unknown:
        raise KVConvertError(f"unknown option(s): {', '.join(sorted(unknown))}")
    values = load_recipe_file(recipe) if recipe else {}
    values.update(options)
    if model is not None:
        values["model"] = model
    try:
        return _convert(Recipe(**{**values, "output": output}), progress=progress)
    except KVConvertError as e:
        raise KVConvertError(in_python_terms(str(e))) from None


#: ``--kv-heads 3`` / ``--kv-heads N`` / ``--resume`` in a message, with the next word.
_FLAG = re.compile(r"--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)(?: ([^\s;:()]+))?")
_VALUE = re.compile(r"\d[\w.,]*|[A-Z][A-Z_]*|'[^']*'")


def in_python_terms(message: str) -> str:
    """An error message written for the command line, in the Python API's terms: a flag that
    is a Recipe field (``--kv-heads 3``) becomes its keyword (``kv_heads=3``)."""
    fields = Recipe.__dataclass_fields__

    def keyword(m: re.Match[str]) -> str:
        name, word = m.group(1).replace("-", "_"), m.group(2)
        if name not in fields:
            return m.group(0)
        tail = ""
        if word and word[-1] in ",.":  # punctuation after the word is the sentence's
            word, tail = word[:-1], word[-1]
        rest = f" {word}{tail}" if word else ""
        if fields[name].default is False:
            return f"{name}=True{rest}"
        choices = fields[name].metadata.get("choices") or ()
        if word and word in choices:
            return f"{name}={word!r}{tail}"
        if word and _VALUE.fullmatch(word):
            return f"{name}={word}{tail}"
        return f"{name}{rest}"

    return _FLAG.sub(keyword, message)


def push(folder: str | Path, repo_id: str, **kwargs: Any) -> str:
    """Upload a finished output folder to the Hub, its card, recipe and report without local
    paths (docs/publishing.md); see :func:`kvconvert.hub.push` for the options."""
    from .pipeline import push as _push

    return _push(folder, repo_id, **kwargs)


def inspect_model(model: str, revision: str | None = None) -> dict[str, Any]:
    """What ``kvconvert inspect`` prints, as a dict (config and safetensors headers only)."""
    from .pipeline import inspect_model as _inspect

    return _inspect(model, revision)
