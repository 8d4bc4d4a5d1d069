"""The remote code an output ships is its own architecture's only: a PoD output of qwen3 must
not break because transformers moved gemma2's module. Checked on the files as copied into an
output (no model is built): their imports, parsed."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import transformers

from kvconvert.arch import REGISTRY, get_adapter
from kvconvert.modeling import DECI_FILES, FILES, FOLDER
from kvconvert.modeling.export import copy_model_files
from kvconvert.pod.checkpoint import POD_FILES, copy_modeling_files, pod_config

#: every source model_type with a PoD output: the Llama layout and each stock-class PoD model
POD_TYPES = sorted(
    {*REGISTRY["llama"].model_types, *(mt for a in REGISTRY.values() for mt in a.pod_models)}
)
#: the GQA outputs of architectures whose stock class has no GQA, by the output's model_type
GQA_FAMILIES = {
    a.remote_family.model_type: a.remote_family for a in REGISTRY.values() if a.remote_family
}


def imports(path: Path) -> tuple[set[str], set[str], set[str]]:
    """(absolute modules, names imported from the top-level ``transformers``, relatively
    imported modules) of one file."""
    absolute, top_level, relative = set(), set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            absolute |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level:
            relative.add(node.module)
        elif isinstance(node, ast.ImportFrom):
            absolute.add(node.module)
            if node.module == "transformers":
                top_level |= {a.name for a in node.names}
    return absolute, top_level, relative


def architectures(folder: Path) -> dict[str, set[str]]:
    """Per shipped .py file, the transformers architectures (``transformers.models.<arch>``) it
    imports, directly or through a name of the top-level ``transformers`` package. Also checks
    that the files stand alone: no kvconvert import, every relative import shipped."""
    shipped = {p.name for p in folder.glob("*.py")}
    found: dict[str, set[str]] = {}
    for name in sorted(shipped):
        absolute, top_level, relative = imports(folder / name)
        assert not any(m.split(".")[0] == "kvconvert" for m in absolute), name
        assert {f"{m}.py" for m in relative} <= shipped, f"{name} imports unshipped {relative}"
        modules = absolute | {getattr(transformers, n).__module__ for n in top_level}
        found[name] = {m.split(".")[2] for m in modules if m.startswith("transformers.models.")}
    return found


def source_config(model_type: str, folder: Path) -> dict:
    """A small stock config of ``model_type``, saved in ``folder`` (pod_config reads it)."""
    cfg = transformers.AutoConfig.for_model(model_type, num_hidden_layers=2)
    cfg.save_pretrained(folder)
    return json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize("model_type", POD_TYPES)
def test_pod_output_ships_its_own_architecture_only(model_type, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    out.mkdir()
    cfg = source_config(model_type, src)
    adapter = get_adapter(model_type)
    kv = adapter.num_kv_heads(cfg)
    conf = pod_config(cfg, src, adapter, set(), [[0] * kv, [1] * kv], 4, 8)
    (out / "config.json").write_text(json.dumps(conf))
    copied = copy_modeling_files(out)
    own = model_type if adapter.pod_models.get(model_type) else "llama"
    assert sorted(copied) == sorted(p.name for p in out.glob("*.py"))
    assert set(POD_FILES) <= set(copied)
    for module in conf["auto_map"].values():
        assert f"{module.rsplit('.', 1)[0]}.py" in copied
    found = architectures(out)
    for name in POD_FILES:  # the core names no architecture
        assert found[name] == set(), (name, found[name])
    assert set().union(*found.values()) == {own}, found


@pytest.mark.parametrize("model_type", sorted(GQA_FAMILIES))
def test_gqa_family_output_imports_its_architecture_and_llama(model_type, tmp_path):
    """A GQA output of gpt2/opt/gpt_neox: its own module, plus Llama's for the grouped eager
    attention (``repeat_kv``), which the families' own modules lack."""
    copy_model_files(tmp_path, GQA_FAMILIES[model_type].files)
    found = architectures(tmp_path)
    arch = model_type.removeprefix("kvconvert_")
    assert set().union(*found.values()) == {arch, "llama"}, found
    assert found[f"modeling_{model_type}.py"] - {"llama"} == {arch}


@pytest.mark.parametrize("files", [FILES, DECI_FILES], ids=["kvconvert", "deci"])
def test_llama_layout_outputs_import_llama_only(files, tmp_path):
    copy_model_files(tmp_path, files)
    assert set().union(*architectures(tmp_path).values()) <= {"llama"}
    assert all((FOLDER / name).is_file() for name in files)


def _looks_up_the_interface(node: ast.AST) -> bool:
    """``ALL_ATTENTION_FUNCTIONS.get_interface(...)`` or ``ALL_ATTENTION_FUNCTIONS[...]``."""
    if isinstance(node, ast.Call):
        node = node.func
    target = node.value if isinstance(node, (ast.Attribute, ast.Subscript)) else None
    return isinstance(target, ast.Name) and target.id == "ALL_ATTENTION_FUNCTIONS"


@pytest.mark.parametrize("model_type", sorted(GQA_FAMILIES))
def test_family_attention_dispatches_where_vllm_looks(model_type):
    """vLLM's Transformers backend serves these outputs only if each attention module's own
    ``forward`` assigns the ``ALL_ATTENTION_FUNCTIONS`` lookup to a name and calls it once (it
    parses the forward's source; a lookup in a helper function reads as none: "Layer 0 does not
    dispatch through the Transformers attention interface")."""
    tree = ast.parse((FOLDER / GQA_FAMILIES[model_type].files[1]).read_text())
    forwards = [
        f
        for c in tree.body
        if isinstance(c, ast.ClassDef) and c.name.endswith("Attention")
        for f in c.body
        if isinstance(f, ast.FunctionDef) and f.name == "forward"
    ]
    assert forwards, "no attention class with a forward"
    for forward in forwards:
        names = {
            t.id
            for n in ast.walk(forward)
            if isinstance(n, ast.Assign) and _looks_up_the_interface(n.value)
            for t in n.targets
            if isinstance(t, ast.Name)
        }
        calls = [
            n
            for n in ast.walk(forward)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in names
        ]
        assert len(calls) == 1, f"{model_type}: {len(calls)} interface calls in forward"
