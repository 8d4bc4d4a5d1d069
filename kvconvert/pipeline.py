"""The conversion pipeline: source -> calibrate -> solve -> write.

``convert(recipe)`` is the whole run; each stage is a function below so that the stages can be
read (and replaced) one at a time.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import report as report_mod
from .arch import AttentionAdapter, get_adapter
from .calibration.data import batches, load_documents, sample_from_model, tokenize_documents
from .calibration.stats import LayerStats, StatsCollector
from .errors import KVConvertError
from .gqa.fold import AttentionWeights
from .gqa.layer import LayerResult, LayerShape, merge_layer, to_float64
from .recipe import Recipe, parse_size
from .source import TensorSource, read_config, resolve_source
from .writer import ShardedWriter, atomic_output, check_output, copy_side_files, write_json

PROJ_KEYS = ("q", "k", "v", "o")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise KVConvertError("device: --device cuda given but no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str, fallback: torch.dtype) -> torch.dtype:
    return fallback if name == "auto" else getattr(torch, name)


# --- stage 1: source ------------------------------------------------------------------------
class Source:
    """A resolved model: its folder, raw config, adapter and lazy weights."""

    def __init__(self, recipe: Recipe, progress: bool):
        self.folder = resolve_source(
            recipe.model, recipe.revision, recipe.trust_remote_code, progress
        )
        self.config = read_config(self.folder)
        self.adapter: AttentionAdapter = get_adapter(self.config.get("model_type"))
        self.tensors = TensorSource.open(self.folder)
        c, a = self.config, self.adapter
        self.num_layers, self.num_heads = a.num_layers(c), a.num_heads(c)
        self.num_kv_heads, self.head_dim = a.num_kv_heads(c), a.head_dim(c)
        self.shape = LayerShape(self.num_heads, self.num_kv_heads, self.head_dim, a.rope_pairs(c))
        self.dtype = self.tensors.get(a.tensor_name(0, "k")).dtype

    def layer_weights(self, layer: int) -> AttentionWeights:
        a, t = self.adapter, self.tensors
        kw = {f"w{p}": t.get(a.tensor_name(layer, p)) for p in PROJ_KEYS}
        kw.update({f"b{p}": t.get_optional(a.tensor_name(layer, p, "bias")) for p in PROJ_KEYS})
        return AttentionWeights(**kw)

    def attention_tensor_names(self, layer: int) -> dict[str, str]:
        """checkpoint name -> key in AttentionWeights.items(), for tensors present."""
        out = {}
        for p in PROJ_KEYS:
            for kind in ("weight", "bias"):
                name = self.adapter.tensor_name(layer, p, kind)
                if name in self.tensors:
                    out[name] = f"{p}.{kind}"
        return out


def check_kv_heads(src: Source, kv_heads: int) -> None:
    kv = src.num_kv_heads
    if kv_heads > kv or kv % kv_heads:
        divisors = [g for g in range(1, kv + 1) if kv % g == 0]
        raise KVConvertError(
            f"--kv-heads {kv_heads} must divide the model's {kv} KV heads "
            f"(choose one of {', '.join(map(str, divisors))})"
        )


# --- stage 2: calibrate ---------------------------------------------------------------------
def load_model(folder: Path, device: torch.device, dtype: torch.dtype, trust_remote_code: bool):
    """The source model for calibration: one copy, on ``device``, in ``dtype``."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            device_map=str(device) if device.type != "cpu" else None,
        )
    except Exception as e:  # noqa: BLE001 - surface loader failures as one clear line
        raise KVConvertError(f"cannot load the model from {folder}: {e}") from e
    return model.to(device).eval()


def bos_token_id(folder: Path, config: dict[str, Any], tokenizer: Any | None) -> int:
    for cand in (config.get("bos_token_id"), _gen_config(folder).get("bos_token_id")):
        if isinstance(cand, int):
            return cand
    if tokenizer is not None and tokenizer.bos_token_id is not None:
        return int(tokenizer.bos_token_id)
    raise KVConvertError(
        "--calibration self needs a BOS token id and this model declares none; give "
        "calibration data instead (a .txt or .jsonl file)"
    )


def _gen_config(folder: Path) -> dict[str, Any]:
    p = folder / "generation_config.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def load_tokenizer(folder: Path, trust_remote_code: bool) -> Any | None:
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - token-id-only models have no tokenizer
        return None


def calibration_tokens(
    recipe: Recipe, model: torch.nn.Module, src: Source, progress: bool
) -> torch.Tensor:
    """Token ids (num_samples x seq_len) from the recipe's calibration source."""
    if recipe.calibration == "self":
        bos = bos_token_id(src.folder, src.config, None)
        with tqdm(
            total=recipe.num_samples, desc="sampling calibration", unit="seq", disable=not progress
        ) as bar:
            return sample_from_model(
                model, bos, recipe.num_samples, recipe.seq_len, recipe.batch_size, recipe.seed, bar
            )
    docs = load_documents(recipe.calibration, recipe.text_field)
    needs_tok = any(isinstance(d, str) for d in docs)
    tok = load_tokenizer(src.folder, recipe.trust_remote_code) if needs_tok else None
    return tokenize_documents(docs, tok, recipe.num_samples, recipe.seq_len, recipe.seed)


@torch.inference_mode()
def collect_stats(
    model: torch.nn.Module, src: Source, tokens: torch.Tensor, batch_size: int, progress: bool
) -> dict[int, LayerStats]:
    device = next(model.parameters()).device
    with StatsCollector(model, src.adapter, src.config) as col:
        n = (tokens.shape[0] + batch_size - 1) // batch_size
        for batch in tqdm(
            batches(tokens, batch_size), total=n, desc="calibrating", disable=not progress
        ):
            model(input_ids=batch.to(device), use_cache=False)
    return col.result()


# --- stage 3 + 4: solve and write -----------------------------------------------------------
def solved_tensors(
    src: Source,
    recipe: Recipe,
    stats: dict[int, LayerStats] | None,
    device: torch.device,
    out_dtype: torch.dtype | None,
    results: dict[int, LayerResult],
    progress: bool,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every output tensor in checkpoint order: attention layers solved lazily, one at a time.

    A layer is solved when its first attention tensor is reached and dropped once all of its
    tensors are out, so memory holds one layer's solution, not the model's.
    """
    owner = {
        name: (i, key)
        for i in range(src.num_layers)
        for name, key in src.attention_tensor_names(i).items()
    }
    pending: dict[int, dict[str, torch.Tensor | None]] = {}
    remaining: dict[int, int] = {}
    bar = tqdm(total=src.num_layers, desc="solving layers", unit="layer", disable=not progress)
    for name in src.tensors.names():
        if name not in owner:
            t = src.tensors.get(name)
            yield name, t.to(out_dtype) if out_dtype and t.is_floating_point() else t
            continue
        i, key = owner[name]
        if i not in pending:
            w = src.layer_weights(i)
            res = merge_layer(
                to_float64(w, device),
                stats.get(i) if stats else None,
                src.shape,
                recipe.kv_heads,
                recipe.method,
                recipe.rope_keys,
                recipe.objective,
                recipe.grouping,
                recipe.seed,
            )
            new = res.weights.items()
            bad = [k for k, v in new.items() if v is not None and not v.isfinite().all()]
            if bad:
                raise KVConvertError(f"layer {i}: solved {', '.join(bad)} contain NaN/inf")
            orig = w.items()
            pending[i] = {
                k: (v.to(out_dtype or orig[k].dtype) if v is not None else None)
                for k, v in new.items()
            }
            remaining[i] = len(src.attention_tensor_names(i))
            results[i] = res
            bar.update(1)
        yield name, pending[i][key]
        remaining[i] -= 1
        if remaining[i] == 0:
            del pending[i]
    bar.close()


def convert(recipe: Recipe, progress: bool = True, command: str | None = None) -> Path:
    """Run a whole conversion; return the output folder."""
    recipe.validate()
    t0 = time.perf_counter()
    output = Path(recipe.output).expanduser()
    check_output(output, recipe.overwrite)
    if not progress:
        quiet_libraries()
    src = Source(recipe, progress)
    try:
        return _convert(recipe, src, output, progress, command, t0)
    finally:
        src.tensors.close()


def quiet_libraries() -> None:
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _convert(
    recipe: Recipe, src: Source, output: Path, progress: bool, command: str | None, t0: float
) -> Path:
    check_kv_heads(src, recipe.kv_heads)
    device = resolve_device(recipe.device)
    out_dtype = None if recipe.dtype == "auto" else getattr(torch, recipe.dtype)
    torch.manual_seed(recipe.seed)
    # --- issue 7: layer-sequential engine (bounded memory, resume, dry run) -----------------
    from . import sequential

    if sequential.applies(recipe):
        return sequential.convert(recipe, src, output, device, out_dtype, progress, command, t0)
    # --- end issue 7

    stats, calib_info = None, {"source": "none (data-free method)", "sequences": 0, "seq_len": 0}
    if recipe.method == "svd":
        compute_dtype = torch.float32 if device.type == "cpu" else src.dtype
        model = load_model(src.folder, device, compute_dtype, recipe.trust_remote_code)
        tokens = calibration_tokens(recipe, model, src, progress)
        stats = collect_stats(model, src, tokens, recipe.batch_size, progress)
        calib_info = {
            "source": recipe.calibration,
            "sequences": int(tokens.shape[0]),
            "seq_len": int(tokens.shape[1]),
            "seed": recipe.seed,
        }
        del model
    t_calib = time.perf_counter() - t0

    results: dict[int, LayerResult] = {}
    with atomic_output(output, recipe.overwrite) as work:
        writer = ShardedWriter(work, parse_size(recipe.max_shard_size))
        for name, tensor in solved_tensors(
            src, recipe, stats, device, out_dtype, results, progress
        ):
            writer.add(name, tensor)
        shards = writer.finish()
        finish_output(
            work, recipe, src, results, calib_info, shards, out_dtype, command, t0, t_calib
        )
    return output


def finish_output(
    work: Path,
    recipe: Recipe,
    src: Source,
    results: dict[int, Any],
    calib_info: dict[str, Any],
    shards: list[str],
    out_dtype: torch.dtype | None,
    command: str | None,
    t0: float,
    t_calib: float,
) -> None:
    """Everything but the weights: config, side files, kvconvert.json report, model card."""
    config = src.adapter.set_kv_heads(src.config, recipe.kv_heads)
    if out_dtype is not None:
        config["dtype"] = recipe.dtype
        config.pop("torch_dtype", None)
    write_json(work / "config.json", config)
    side = copy_side_files(src.folder, work)
    final_dtype = out_dtype or src.dtype
    rep = {
        "kvconvert_report": 1,
        "command": command or "kvconvert.convert(...)",
        "recipe": recipe.to_dict(),
        "versions": report_mod.versions(),
        "source": {
            "model": recipe.model,
            "revision": recipe.revision,
            "model_type": src.config.get("model_type"),
            "num_key_value_heads": src.num_kv_heads,
            "num_attention_heads": src.num_heads,
            "head_dim": src.head_dim,
            "num_layers": src.num_layers,
        },
        "target": {"kind": "gqa", "num_key_value_heads": recipe.kv_heads},
        "calibration": calib_info,
        "layers": [
            {
                "layer": i,
                "groups": [list(g) for g in results[i].groups],
                "key_error": results[i].key_error,
                "value_error": results[i].value_error,
            }
            for i in sorted(results)
        ],
        "kv_bytes_per_token": {
            "before": report_mod.kv_bytes_per_token(
                [src.num_kv_heads] * src.num_layers, src.head_dim, src.dtype
            ),
            "after": report_mod.kv_bytes_per_token(
                [recipe.kv_heads] * src.num_layers, src.head_dim, final_dtype
            ),
            "dtype": str(final_dtype).removeprefix("torch."),
        },
        "files": {"weights": shards, "copied": side},
        "timing_s": {
            "calibration": round(t_calib, 3),
            "total": round(time.perf_counter() - t0, 3),
        },
    }
    write_json(work / "kvconvert.json", rep)
    base = recipe.model if not Path(recipe.model).expanduser().exists() else None
    (work / "README.md").write_text(report_mod.model_card(rep, base))


def command_line() -> str:
    return shlex.join(["kvconvert", *sys.argv[1:]])
