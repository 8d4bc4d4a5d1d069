"""A PoD output: the source's weights unchanged, a config naming the remote code and the map.

The modeling files in ``kvconvert/modeling`` are copied next to the weights, so the output
loads with ``trust_remote_code=True`` on a machine without kvconvert.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ..arch import AttentionAdapter

MODELING_DIR = Path(__file__).resolve().parents[1] / "modeling"
#: one pair of files for every architecture: the PodCache and each stock class with PoD attention
POD_FILES = ("configuration_kvconvert_pod.py", "modeling_kvconvert_pod.py")
AUTO_MAP = {
    "AutoConfig": "configuration_kvconvert_pod.KVConvertPodConfig",
    "AutoModelForCausalLM": "modeling_kvconvert_pod.KVConvertPodForCausalLM",
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
            auto_map={
                "AutoConfig": f"configuration_kvconvert_pod.KVConvertPod{stock}Config",
                "AutoModelForCausalLM": f"modeling_kvconvert_pod.KVConvertPod{stock}ForCausalLM",
            },
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


def copy_modeling_files(dst: Path) -> list[str]:
    """Copy the PoD remote code the output's config names (see :func:`pod_config`)."""
    for name in POD_FILES:
        shutil.copy2(MODELING_DIR / name, dst / name)
    return list(POD_FILES)
