"""YAML recipes: shipped recipes validate, recorded recipes reproduce, flags override, bad keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kvconvert.cli import convert_cmd, main, merged_recipe
from kvconvert.errors import KVConvertError
from kvconvert.recipe import (
    LOCAL_ONLY,
    Recipe,
    _check_type,
    load_recipe_file,
    recipe_keys,
    recipe_to_yaml,
)
from tests.conftest import ROOT

SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))


def test_recipes_are_shipped():
    assert len(SHIPPED) >= 7
    targets = {load_recipe_file(p)["target"] for p in SHIPPED}
    assert targets == {"gqa", "pod", "gqa,pod"}  # one or more recipes for every target


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_recipe_loads_and_validates(path):
    values = load_recipe_file(path)
    assert values["model"] and values["target"] in ("gqa", "pod", "gqa,pod")
    Recipe(**{**values, "output": "out"}).validate()
    text = path.read_text()
    assert text.startswith("# ") and "saving" in text  # says what it is for and what it saves


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text,message",
    [
        ("kv_head: 2\n", "unknown key 'kv_head' (did you mean 'kv_heads'?)"),
        ("colour: red\n", "unknown key 'colour'"),
        ("kv_heads: two\n", "kv_heads: expected an integer, got 'two'"),
        ("kv_heads: true\n", "kv_heads: expected an integer, got True"),
        ("num_samples: [1, 2]\n", "num_samples: expected an integer"),
        ("method: median\n", "method: 'median' is not one of mean, svd-weights, svd"),
        ("trust_remote_code: true\n", "'trust_remote_code' cannot be set from a recipe file"),
        ("output: somewhere\n", "'output' cannot be set from a recipe file"),
        ("- kv_heads\n", "expected a mapping of option: value"),
        ("kv_heads: [\n", "not valid YAML"),
        ("kv_heads: 2\nkv-heads: 4\n", "key 'kv-heads' given twice"),
    ],
)
def test_bad_recipes_name_the_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(KVConvertError) as err:
        load_recipe_file(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_bad_recipe_is_a_one_line_cli_error(tmp_path):
    path = write(tmp_path, "kv_heads: 2\ngrouping: nearest\n")
    result = CliRunner().invoke(main, ["m", "--recipe", str(path), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert f"Error: recipe {path}: grouping: 'nearest' is not one of" in result.output
    missing = CliRunner().invoke(main, ["m", "--recipe", str(tmp_path / "nope.yaml"), "-o", "x"])
    assert missing.exit_code == 1 and "does not exist" in missing.output


def test_dashes_and_numbers_are_read_as_the_cli_would(tmp_path):
    path = write(tmp_path, "kv-heads: 2\nrevision: 1234\nmax_shard_size: 500000\n")
    assert load_recipe_file(path) == {"kv_heads": 2, "revision": "1234", "max_shard_size": "500000"}


def test_round_trip_of_every_recipe_key():
    recipe = Recipe(model="org/m", output="o", kv_heads=2, seed=7, dtype="bfloat16", revision="v1")
    text = recipe_to_yaml(recipe, header="a comment\nover two lines")
    assert text.startswith("# a comment\n# over two lines\n")
    loaded = load_from_text(text)
    assert list(loaded) == recipe_keys() and not set(LOCAL_ONLY) & set(loaded)
    assert Recipe(**loaded, output="o") == recipe


def load_from_text(text: str) -> dict:
    from kvconvert.recipe import recipe_values

    return recipe_values(yaml.safe_load(text))


def test_generic_type_checks_for_fields_yet_to_come():
    """Per-layer lists and thresholds (fields other modules add) are checked by annotation."""
    assert _check_type([2, 1], list[int] | None, "kv") == [2, 1]
    assert _check_type(None, list[int] | None, "kv") is None
    assert _check_type(1, float, "t") == 1.0
    with pytest.raises(KVConvertError, match=r"budget\[1\]: expected an integer, got 'x'"):
        _check_type([1, "x"], list[int], "budget")
    with pytest.raises(KVConvertError, match="threshold: expected a number"):
        _check_type("high", float, "threshold")


def parse(args: list[str], recipe_file: Path | None) -> Recipe:
    ctx = convert_cmd.make_context("convert", list(args))
    options = {
        k: v
        for k, v in ctx.params.items()
        if k not in ("quiet", "recipe_file", "push_to_hub", "private", "hub_revision")
    }
    return merged_recipe(ctx, options, str(recipe_file) if recipe_file else None)


def test_only_flags_given_override_the_recipe(tmp_path):
    path = write(tmp_path, "model: org/m\nkv_heads: 2\nseed: 5\nmethod: mean\nnum_samples: 9\n")
    r = parse(["-o", "out"], path)
    assert (r.model, r.kv_heads, r.seed, r.method, r.num_samples) == ("org/m", 2, 5, "mean", 9)
    # typed flags win, even when they equal the default (--seed 0, --method svd)
    r = parse(["other/m", "-o", "out", "--seed", "0", "--method", "svd", "--kv-heads", "1"], path)
    assert (r.model, r.kv_heads, r.seed, r.method, r.num_samples) == ("other/m", 1, 0, "svd", 9)
    assert r.seq_len == Recipe.__dataclass_fields__["seq_len"].default  # absent: the default


def test_recorded_recipe_reproduces_the_weights_byte_for_byte(tiny_models, tmp_path):
    """Convert with non-default options from the CLI, then re-run only the output's recipe."""
    first, again = tmp_path / "first", tmp_path / "again"
    args = [str(tiny_models["qwen2"]), "-o", str(first), "-q", "--kv-heads", "2"]
    args += ["--grouping", "search", "--seed", "3", "--num-samples", "4", "--seq-len", "24"]
    args += ["--batch-size", "2", "--dtype", "bfloat16", "--max-shard-size", "40KB"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    recorded = first / "recipe.yaml"
    assert load_recipe_file(recorded)["grouping"] == "search"
    card = (first / "README.md").read_text()
    assert "grouping: search" in card and "kvconvert --recipe recipe.yaml" in card

    result = CliRunner().invoke(main, ["--recipe", str(recorded), "-o", str(again), "-q"])
    assert result.exit_code == 0, result.output
    weights = sorted(p.name for p in first.glob("*.safetensors"))
    assert len(weights) > 1 and weights == sorted(p.name for p in again.glob("*.safetensors"))
    for name in [*weights, "config.json", "model.safetensors.index.json"]:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    assert (again / "recipe.yaml").read_text().split("\n", 2)[2] == recorded.read_text().split(
        "\n", 2
    )[2]  # same recipe (only the recorded command line differs)


def test_python_api_takes_a_recipe_and_overrides_it(tiny_models, tmp_path):
    import json

    import kvconvert

    path = write(tmp_path, f"model: {tiny_models['llama']}\nkv_heads: 2\nmethod: mean\n")
    out = kvconvert.convert(None, str(tmp_path / "o"), recipe=path, kv_heads=1, progress=False)
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 1
    recorded = load_recipe_file(out / "recipe.yaml")
    assert (recorded["method"], recorded["kv_heads"]) == ("mean", 1)


OLD = sorted((ROOT / "tests" / "data").glob("recipe-7baca80-*.yaml"))


@pytest.mark.parametrize("path", OLD, ids=[p.name for p in OLD])
def test_recipe_written_before_the_option_groups_still_loads(path):
    """recipe.yaml files written by kvconvert before each target declared its own options
    (commit 7baca80) load into the same values, and write back the same keys."""
    old = yaml.safe_load(path.read_text())
    values = load_recipe_file(path)
    assert values == old
    recipe = Recipe(**{**values, "output": "out"}).validate()
    assert yaml.safe_load(recipe_to_yaml(recipe)) == old
