"""A PoD output: the source's weights unchanged, a config naming the remote code and the map.

The modeling files in ``kvconvert/modeling`` are copied next to the weights, so the output
loads with ``trust_remote_code=True`` on a machine without kvconvert: the architecture-free
core (``POD_FILES``) and the files of the output's own architecture that its ``auto_map``
names, so that it imports no other architecture's transformers module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..arch import AttentionAdapter

MODELING_DIR = Path(__file__).resolve().parents[1] / "modeling"
#: what every PoD output carries: the PoD config fields, the PodCache, the attention function
#: and the mixins; the architecture's own classes are in ``*_kvconvert_pod_<arch>.py``
POD_FILES = ("configuration_kvconvert_pod.py", "modeling_kvconvert_pod.py")
#: the Llama layout (llama, mistral, qwen2 sources): its config class is in the core file
AUTO_MAP = {
    "AutoConfig": "configuration_kvconvert_pod.KVConvertPodConfig",
    "AutoModelForCausalLM": "modeling_kvconvert_pod_llama.KVConvertPodForCausalLM",
}
#: source config keys replaced by resolved values (RoPE, windows) or meaningless for PoD.
DROP_KEYS = ("rope_theta", "rope_scaling", "attention_bias", "use_sliding_window", "auto_map")


def pod_config(
    source_config: dict[str, Any],
    folder: Path,
    adapter: AttentionAdapter,
    tensor_names: set[str],
    pod_map: list[list[int]],
    sink: int,
    recent: int,
    trust_remote_code: bool = False,
    distant_bias: list[list[float]] | None = None,
) -> dict[str, Any]:
    """config.json of the PoD output: the source's, plus resolved RoPE/window facts and PoD
    (``pod_distant_bias`` only where a bias was chosen, so plain PoD configs stay as before)."""
    pod: dict[str, Any] = {
        "pod_sink": int(sink),
        "pod_recent": int(recent),
        "pod_map": [[int(b) for b in row] for row in pod_map],
    }
    if distant_bias is not None:
        pod["pod_distant_bias"] = [[float(b) for b in row] for row in distant_bias]
    from transformers import AutoConfig

    stock = adapter.pod_models.get(source_config.get("model_type"))
    if stock:  # the stock config, verbatim, plus the PoD fields
        out = {k: v for k, v in source_config.items() if k != "auto_map"}
        out.update(
            model_type=f"kvconvert_pod_{source_config['model_type']}",
            architectures=[f"KVConvertPod{stock}ForCausalLM"],
            auto_map=stock_auto_map(source_config["model_type"], stock),
            source_model_type=source_config.get("model_type"),
            **pod,
        )
        return out
    resolved = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    out = {k: v for k, v in source_config.items() if k not in DROP_KEYS}
    out.update(
        model_type="kvconvert_pod",
        architectures=["KVConvertPodForCausalLM"],
        auto_map=dict(AUTO_MAP),
        source_model_type=source_config.get("model_type"),
        rope_parameters=dict(resolved.rope_parameters),
        head_dim=adapter.head_dim(source_config),
        num_key_value_heads=adapter.num_kv_heads(source_config),
        sliding_window=getattr(resolved, "sliding_window", None),
        layer_types=getattr(resolved, "layer_types", None),
        attention_qkv_bias=adapter.tensor_name(0, "q", "bias") in tensor_names,
        attention_out_bias=adapter.tensor_name(0, "o", "bias") in tensor_names,
        **pod,
    )
    return out


def stock_auto_map(model_type: str, stock: str) -> dict[str, str]:
    """``auto_map`` of a PoD output of the stock class ``stock`` (e.g. "Qwen3" for qwen3)."""
    stem = f"kvconvert_pod_{model_type}"
    return {
        "AutoConfig": f"configuration_{stem}.KVConvertPod{stock}Config",
        "AutoModelForCausalLM": f"modeling_{stem}.KVConvertPod{stock}ForCausalLM",
    }


def modeling_files(auto_map: dict[str, str]) -> list[str]:
    """The files an output with ``auto_map`` needs: the core, then those the map names."""
    named = [ref.rsplit(".", 1)[0] + ".py" for ref in auto_map.values()]
    return list(dict.fromkeys([*POD_FILES, *named]))


def copy_modeling_files(dst: Path, config: dict[str, Any] | None = None) -> list[str]:
    """Copy the PoD remote code the output's config names (``config``, else the
    ``config.json`` already written in ``dst``; see :func:`pod_config`)."""
    if config is None:
        config = json.loads((dst / "config.json").read_text())
    files = modeling_files(config["auto_map"])
    for name in files:
        shutil.copy2(MODELING_DIR / name, dst / name)
    return files
