"""A stand-in target, added the way docs/architecture.md's "Adding a target" says, runs
through both engines: the abstract ``Target`` is all the engines call, and what a target
returns (tensors, per-layer records) reaches the output the same way from either engine."""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import MappingProxyType

import pytest
import torch

import kvconvert
from kvconvert import recipe as recipe_mod
from kvconvert import targets as targets_mod
from kvconvert.arch import get_adapter
from kvconvert.recipe import Recipe
from kvconvert.report import report_header
from kvconvert.target import LayerContext, RunInfo, SolvedLayer, Target
from kvconvert.writer import cast_float, copy_side_files, write_json
from tests.conftest import FAST, logits, tensors, token_ids

SCALE = 2.0


class ScaleValues(Target):
    """Values x2, output projection x0.5: new tensors, the same function (no biases)."""

    name = "standin"

    def __init__(self, src, recipe):  # noqa: ANN001
        super().__init__(src, recipe)
        self.tokens = 0

    def needs_data(self) -> bool:
        return True

    def scaled(self, role: str, t: torch.Tensor) -> torch.Tensor:
        factor = {"v.weight": SCALE, "o.weight": 1 / SCALE}.get(role, 1.0)
        return t * factor

    # whole-model engine
    def observe(self, model, tokens, device, progress) -> None:  # noqa: ANN001
        self.tokens = int(tokens.numel())

    def tensors(self, device, out_dtype, progress) -> Iterator[tuple[str, torch.Tensor]]:  # noqa: ANN001
        roles = {}
        for i in range(self.src.num_layers):
            roles.update(self.src.attention_tensor_names(i))
        for name in self.src.tensors.names():
            t = self.src.tensors.get(name)
            yield name, cast_float(self.scaled(roles.get(name, ""), t), out_dtype)

    # layer-sequential engine
    def why_not_layer_by_layer(self) -> str | None:
        return None

    def solve_layer(self, ctx: LayerContext) -> SolvedLayer:
        roles = self.src.attention_tensor_names(ctx.layer)
        new = {name: self.scaled(roles[name], t) for name, t in ctx.read.items()}
        return SolvedLayer(new, {"tokens": ctx.stats.count})

    def finish(self, run: RunInfo) -> None:
        write_json(run.work / "config.json", dict(self.src.config))
        copy_side_files(self.src.folder, run.work)
        layers = run.layers or {i: {"tokens": self.tokens} for i in range(self.src.num_layers)}
        rep = {
            **report_header(self.recipe, self.src, run.command),
            "target": {"kind": self.name, "engine": "sequential" if run.layers else "whole"},
            "layers": [{"layer": i, **layers[i]} for i in sorted(layers)],
            "files": {"weights": run.shards},
        }
        write_json(run.work / "kvconvert.json", rep)


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Step 2 of "Adding a target": one line in targets.py, the name in the adapters' outputs
    and in recipe.py's --target choices."""
    monkeypatch.setitem(targets_mod.TARGETS, "standin", ScaleValues)
    monkeypatch.setitem(get_adapter("llama").outputs, "standin", "stock")
    field = Recipe.__dataclass_fields__["target"]
    choices = (*recipe_mod.TARGETS, "standin")
    monkeypatch.setattr(field, "metadata", MappingProxyType({**field.metadata, "choices": choices}))


@pytest.mark.parametrize("pipeline", ["whole", "sequential"])
def test_standin_target_runs_through_both_engines(standin, tiny_models, tmp_path, pipeline):
    src = tiny_models["llama"]
    out = kvconvert.convert(
        str(src), str(tmp_path / "out"), target="standin", pipeline=pipeline, **FAST
    )
    before, after = tensors(src), tensors(out)
    assert before.keys() == after.keys()
    v, o = "model.layers.1.self_attn.v_proj.weight", "model.layers.1.self_attn.o_proj.weight"
    torch.testing.assert_close(after[v], SCALE * before[v])  # the target's tensors were written
    torch.testing.assert_close(after[o], before[o] / SCALE)
    ids = token_ids(2, 24)
    torch.testing.assert_close(logits(out, ids), logits(src, ids), rtol=1e-4, atol=1e-5)
    report = json.loads((out / "kvconvert.json").read_text())
    n = FAST["num_samples"] * FAST["seq_len"]
    assert report["layers"] == [{"layer": i, "tokens": n} for i in range(len(report["layers"]))]
    assert report["target"]["engine"] == pipeline


def test_a_target_missing_a_method_is_refused_at_once(tiny_models):
    class Incomplete(Target):  # no finish
        name = "gqa"

        def needs_data(self) -> bool:
            return False

    with pytest.raises(TypeError, match="finish"):
        Incomplete(None, Recipe())  # type: ignore[arg-type]
