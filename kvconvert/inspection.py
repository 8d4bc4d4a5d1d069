"""``kvconvert inspect MODEL``: whether and how kvconvert supports a model, without loading it.

Reads only ``config.json`` and the safetensors headers (tensor names, dtypes, shapes): for a
Hub id these come from the Hub's metadata API, so no weights are downloaded.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from .arch import REGISTRY, supported_model_types
from .errors import KVConvertError
from .source import _is_repo_id, read_config

#: bytes per element of safetensors dtype codes and config dtype names
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1,
    "float64": 8, "float32": 4, "bfloat16": 2, "float16": 2,
}  # fmt: skip


def read_headers(folder: Path) -> dict[str, dict[str, Any]]:
    """Tensor name -> {"dtype", "shape"} from every ``*.safetensors`` header in ``folder``."""
    out: dict[str, dict[str, Any]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with f.open("rb") as fh:
            try:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
                raise KVConvertError(f"corrupt safetensors header in {f.name}: {e}") from e
        header.pop("__metadata__", None)
        out.update({k: {"dtype": v["dtype"], "shape": v["shape"]} for k, v in header.items()})
    return out


def _hub(repo_id: str, revision: str | None) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    from huggingface_hub import get_safetensors_metadata, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, NotASafetensorsRepoError

    try:
        config = read_config(
            Path(hf_hub_download(repo_id, "config.json", revision=revision)).parent
        )
        try:
            meta = get_safetensors_metadata(repo_id, revision=revision)
        except NotASafetensorsRepoError:
            return config, {}
    except (HfHubHTTPError, OSError) as e:
        raise KVConvertError(f"cannot read {repo_id!r} from the Hugging Face Hub: {e}") from e
    headers = {
        name: {"dtype": info.dtype, "shape": list(info.shape)}
        for fm in meta.files_metadata.values()
        for name, info in fm.tensors.items()
    }
    return config, headers


def inspect_model(model: str, revision: str | None = None) -> dict[str, Any]:
    """Facts about ``model`` (folder or Hub id) and what kvconvert can do with it."""
    path = Path(model).expanduser()
    if path.is_dir():
        config, headers = read_config(path), read_headers(path)
    elif _is_repo_id(model) and not path.exists():
        config, headers = _hub(model, revision)
    else:
        raise KVConvertError(f"model folder {model!r} does not exist")
    model_type = config.get("model_type")
    info: dict[str, Any] = {"model": model, "model_type": model_type}
    adapter = REGISTRY.get(model_type)
    if adapter is None:
        info["supported"] = False
        info["supported_model_types"] = supported_model_types()
        return info
    c = adapter
    try:
        heads, kv, d = c.num_heads(config), c.num_kv_heads(config), c.head_dim(config)
        layers, rotary = c.num_layers(config), c.rotary_dim(config)
    except KeyError as e:
        raise KVConvertError(f"{model}: config.json lacks {e}") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise KVConvertError(f"{model}: config.json has an invalid head layout: {e}") from None
    k_name = c.tensor_name(0, "k")
    dtype = headers.get(k_name, {}).get("dtype") or config.get("dtype") or config.get("torch_dtype")
    elem = DTYPE_BYTES.get(str(dtype), 4)  # unknown: assume float32
    info.update(
        supported=bool(c.outputs),
        adapter=c.name,
        attention=(
            f"fused {c.qkv_proj} "
            + ("[q_h; k_h; v_h] per head" if c.qkv_layout == "per_head" else "[q; k; v]")
            if c.qkv_proj
            else f"separate {c.q_proj}/{c.k_proj}/{c.v_proj}/{c.o_proj}"
        ),
        qk_norm=(f"per-head RMSNorm ({c.q_norm}, {c.k_norm})" if c.has_qk_norm else "none"),
        num_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=d,
        rope_layout=c.rope_layout or "none",
        rotary_dims=f"{rotary} of {d}",
        kv_dtype=str(dtype or "float32 (assumed)"),
        kv_bytes_per_token=2 * layers * kv * d * elem,
        kv_bytes_per_token_by_kv_heads={
            g: 2 * layers * g * d * elem for g in range(kv, 0, -1) if kv % g == 0
        },
        targets=dict(c.outputs),
        weights_found=(k_name in headers) if headers else None,
        notes=c.notes,
    )
    return info


_KINDS = {"stock": "stock output", "kvconvert": "kvconvert output (trust_remote_code=True)"}


def format_info(info: dict[str, Any]) -> str:
    """Human-readable lines for ``kvconvert inspect``."""
    if "adapter" not in info:
        return (
            f"{info['model']}: model_type {info['model_type']!r} is not supported; "
            f"supported model types: {', '.join(info['supported_model_types'])}"
        )
    kv = info["num_key_value_heads"]
    choices = info["kv_bytes_per_token_by_kv_heads"]
    status = "supported" if info["supported"] else "recognised, but no target is available yet"
    targets = info["targets"] or {}
    lines = [
        f"{info['model']}: {status} ({info['model_type']}, adapter {info['adapter']})",
        f"  attention          {info['attention']}",
        f"  q/k norm           {info['qk_norm']}",
        f"  layers             {info['num_layers']}",
        f"  heads              {info['num_attention_heads']} query, {kv} KV, "
        f"head_dim {info['head_dim']}",
        f"  RoPE               {info['rope_layout']}, rotary dims {info['rotary_dims']}",
        f"  KV cache per token {info['kv_bytes_per_token']} bytes ({info['kv_dtype']})",
        "  --kv-heads N       " + ", ".join(f"{g}: {b} B/token" for g, b in choices.items()),
        "  targets            "
        + (
            f"\n{'':21}".join(f"--target {t} -> {_KINDS.get(k, k)}" for t, k in targets.items())
            or "none yet"
        ),
    ]
    if info["weights_found"] is False:
        lines.append("  warning            the layer-0 key projection was not found in the weights")
    return "\n".join(lines)
