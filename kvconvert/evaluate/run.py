"""``evaluate()``: the phases of ``kvconvert eval`` in order, and the ``--json`` document.

The original stays loaded; each converted model is loaded once, measured and released.
What depends on the original alone (its sampled evaluation tokens, its retrieval scores, its
continuations) is kept in a small on-disk cache (``kvconvert.evalcache``), so evaluating the
next output of the same original skips that work. The original's cached phases live here,
beside the converted models' phases, because both run the same probes (``run_retrieval``,
``continuations``). The schema is in docs/evaluation.md.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..card import record_fidelity
from ..errors import KVConvertError
from ..evalcache import EvalCache, cache_dir, content_digest, files_fingerprint
from ..evalsettings import EvalSettings
from ..promise import BYTES_TOLERANCE
from ..repetition import continuations, prompt_ids, repetition
from ..source import check_derived
from .metrics import fidelity, prefill_decode
from .models import load_eval_model, max_positions, model_entry, resolve_model
from .progress import Phase, say
from .retrieval import retrieval_tasks, run_retrieval
from .table import short_name
from .tokens import evaluation_tokens

#: Version of the ``--json`` schema (docs/evaluation.md); bumped on any incompatible change.
SCHEMA_VERSION = 1


def evaluate(
    original: str,
    converted: list[str],
    settings: EvalSettings | None = None,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Measure ``original`` and each of ``converted``; return the ``--json`` document.

    Order: the original's own work first (its tokens and retrieval, each from the eval cache
    when there), then per converted model its KL and perplexity, speed (interleaved with the
    original's) and retrieval, each phase with its own bar."""
    from ..loading import bos_token_id, load_tokenizer, quiet_libraries, resolve_device, set_threads
    from ..report import versions

    settings = (settings or EvalSettings()).validate()
    set_threads(settings.threads)
    if not converted:
        raise KVConvertError("eval needs the original and at least one converted model")
    if not progress:
        quiet_libraries()
    device = resolve_device(settings.device)
    folders = [resolve_model(name, progress) for name in (original, *converted)]
    for name, folder in zip(converted, folders[1:], strict=True):  # before any work
        check_derived(folders[0], folder, original, name)
    torch.manual_seed(settings.seed)
    orig, orig_dir = load_eval_model(
        original, device, settings.dtype, settings.trust_remote_code, progress
    )
    tokenizer = load_tokenizer(orig_dir, settings.trust_remote_code)
    cfg = json.loads((orig_dir / "config.json").read_text())
    bos = bos_token_id(orig_dir, cfg, tokenizer)
    cache = open_cache(settings, orig, orig_dir, device, progress)
    tokens = evaluation_tokens(settings, orig, orig_dir, tokenizer, bos, cache, progress)
    max_pos = max_positions(orig)
    context = settings.context
    if max_pos is not None:
        context = max(min(context, max_pos - settings.new_tokens), 2)
    gen = torch.Generator().manual_seed(settings.seed)
    text_cfg = getattr(orig.config, "get_text_config", lambda: orig.config)()
    vocab = int(text_cfg.vocab_size)
    speed_ids = torch.randint(3, vocab, (1, context), generator=gen)
    speed_ids[0, 0] = bos
    tasks = retrieval_tasks(settings, context, tokenizer, tokens.flatten(), vocab, bos)

    results: list[dict[str, Any]] = [
        model_entry(original, "original", orig, orig_dir, tokens, context)
    ]
    results[0]["retrieval"] = (
        original_retrieval(orig, tasks, tokenizer, cache, progress) if settings.trials else None
    )
    loops = prompt_ids(tokenizer, tokens) if settings.repetition_tokens else None
    if loops:
        results[0]["repetition"] = original_repetition(
            orig, loops, tokenizer, settings, cache, progress
        )
    # Warm up once, then per-model lists of timings; the original is timed next to each model.
    prefill_decode(orig, speed_ids[:, : min(context, 16)], 2)
    times: dict[int, list[tuple[float, float]]] = {0: []}
    kv_ctx: dict[int, int] = {}
    n_prompts = sum(len(row) for row in tasks["prompts"])
    for idx, name in enumerate(converted, 1):
        label = short_name(name) + (f" ({idx}/{len(converted)})" if len(converted) > 1 else "")
        conv, conv_dir = load_eval_model(
            name, device, settings.dtype, settings.trust_remote_code, progress
        )
        entry = model_entry(name, "converted", conv, conv_dir, tokens, context)
        with Phase(f"KL, perplexity: {label}", tokens.shape[0], "seq", progress) as bar:
            fid = fidelity(orig, conv, tokens, settings.batch_size, bar)
        entry["kl"], entry["nll"] = fid["kl"], fid["nll"]
        entry["top1_agreement"] = fid["top1_agreement"]
        results[0]["nll"] = fid["nll_reference"]
        prefill_decode(conv, speed_ids[:, : min(context, 16)], 2)
        times[idx] = []
        with Phase(f"speed: {label}", 2 * settings.repeats, "runs", progress) as bar:
            for _ in range(settings.repeats):  # interleaved: original, converted, original, ...
                for j, m in ((0, orig), (idx, conv)):
                    tp, td, nbytes, _ = prefill_decode(m, speed_ids, settings.new_tokens)
                    times[j].append((tp, td))
                    kv_ctx[j] = nbytes
                    bar.update(1)
        entry["retrieval"] = None
        if settings.trials:
            with Phase(f"retrieval: {label}", n_prompts, "prompts", progress) as bar:
                entry["retrieval"] = run_retrieval(conv, tasks, tokenizer, bar)
        if loops:
            with Phase(f"repetition: {label}", len(loops[1]), "prompts", progress) as bar:
                texts = continuations(conv, loops[1], settings.repetition_tokens, bar.update)
            entry["repetition"] = repetition_entry(loops[0], texts, tokenizer)
        results.append(entry)
        del conv
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ref_bytes = kv_ctx[0]  # at --context: PoD's saving depends on the context
    for j, entry in enumerate(results):
        tp = statistics.median(t[0] for t in times[j])
        td = statistics.median(t[1] for t in times[j])
        entry["kv_bytes_at_context"] = kv_ctx[j]
        promised = entry.get("kv_bytes_promised")
        entry["kv_bytes_over_promise"] = promised is not None and kv_ctx[j] > promised * (
            1 + BYTES_TOLERANCE
        )
        entry["kv_ratio"] = kv_ctx[j] / ref_bytes if ref_bytes else None
        entry["ppl"] = math.exp(entry["nll"])
        entry["prefill_tok_s"] = context / tp
        entry["decode_tok_s"] = (settings.new_tokens - 1) / td if settings.new_tokens > 1 else None
        entry["timed_runs"] = len(times[j])
    doc = {
        "kvconvert_eval": SCHEMA_VERSION,
        "command": command or "kvconvert.evaluate.evaluate(...)",
        "versions": versions(),
        "device": str(device),
        "settings": {**asdict(settings), "context": context, "eval_tokens": list(tokens.shape)},
        "models": results,
    }
    if settings.record:
        for name, folder, entry in zip(converted, folders[1:], results[1:], strict=True):
            if (folder / "kvconvert.json").is_file():
                record_fidelity(folder, fidelity_entry(doc, entry))
            elif progress:
                print(f"--record: {name} is not a kvconvert output; nothing recorded")
    return doc


# --- what depends on the original alone: measured once, cached -------------------------------
def open_cache(
    settings: EvalSettings,
    model: torch.nn.Module,
    folder: Path,
    device: torch.device,
    progress: bool,
) -> EvalCache:
    """The eval cache for this original as loaded here (off with ``--no-cache``). Its keys
    name the original's files (paths, sizes, mtimes), the dtype and device it ran in, and the
    torch and transformers versions, so that a result is only reused where it would come out
    the same."""
    import transformers

    device_type = device.type
    if device_type == "cuda":
        device_type = f"cuda:{torch.cuda.get_device_name(device)}"
    base = {
        "original": files_fingerprint(folder),
        "dtype": str(next(model.parameters()).dtype),
        "device": device_type,
        "trust_remote_code": bool(settings.trust_remote_code),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    return EvalCache(None if settings.no_cache else cache_dir(), base, progress)


def original_retrieval(
    model: torch.nn.Module,
    tasks: dict[str, Any],
    tokenizer: Any | None,
    cache: EvalCache,
    progress: bool,
) -> dict[str, Any]:
    """The original's retrieval scores: from the cache when it holds them for these very
    prompts (the key is a digest of every prompt and answer), else run and stored."""
    depths = tasks["depths"]
    key = {"retrieval": content_digest([tasks["task"], tasks["prompts"]])}

    def valid(v: Any) -> bool:
        return (
            isinstance(v, list)
            and len(v) == len(depths)
            and all(isinstance(a, (int, float)) and 0 <= a <= 1 for a in v)
        )

    hit = cache.get("retrieval", key, valid)
    if hit is not None:
        say(progress, "retrieval: the original's scores measured earlier (eval cache)")
        return {
            "task": tasks["task"],
            "metric": tasks["metric"],
            "depths": depths,
            "trials": len(tasks["prompts"][0]) if tasks["prompts"] else 0,
            "accuracy": [float(a) for a in hit],
        }
    n = sum(len(row) for row in tasks["prompts"])
    with Phase("retrieval: original", n, "prompts", progress) as bar:
        result = run_retrieval(model, tasks, tokenizer, bar)
    cache.put("retrieval", key, result["accuracy"])
    return result


def repetition_entry(what: str, texts: list[list[int]], tokenizer: Any | None) -> dict[str, Any]:
    """The repetition measure of one model, with its continuations (decoded when possible)."""
    out: dict[str, Any] = {"prompts": what, **repetition(texts)}
    out["continuations"] = [tokenizer.decode(t) for t in texts] if tokenizer else texts
    return out


def original_repetition(
    model: torch.nn.Module,
    loops: tuple[str, list[list[int]]],
    tokenizer: Any | None,
    settings: EvalSettings,
    cache: EvalCache,
    progress: bool,
) -> dict[str, Any]:
    """The original's continuations: from the eval cache when it holds them for these
    prompts and length, else generated and stored."""
    key = {"repetition": content_digest([loops[1], settings.repetition_tokens])}

    def valid(v: Any) -> bool:
        return isinstance(v, list) and len(v) == len(loops[1])

    texts = cache.get("repetition", key, valid)
    if texts is None:
        with Phase("repetition: original", len(loops[1]), "prompts", progress) as bar:
            texts = continuations(model, loops[1], settings.repetition_tokens, bar.update)
        cache.put("repetition", key, texts)
    else:
        say(progress, "repetition: the original's continuations made earlier (eval cache)")
    return repetition_entry(loops[0], texts, tokenizer)


def fidelity_entry(doc: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """What ``--record`` writes into an output: the headline figures and how they were got."""
    st, orig = doc["settings"], doc["models"][0]
    return {
        "measured_by": "kvconvert eval",
        "kl_nats_per_token": round(entry["kl"], 6),
        "top1_agreement": round(entry["top1_agreement"], 4),
        "perplexity": round(entry["ppl"], 4),
        "original_perplexity": round(orig["ppl"], 4),
        "kv_cache_ratio": round(entry["kv_ratio"], 4) if entry["kv_ratio"] is not None else None,
        **_repetition_fields(entry, orig),
        "data": st["data"],
        "tokens": f"{st['eval_tokens'][0]} x {st['eval_tokens'][1]}",
        "command": doc["command"],
    }


def _repetition_fields(entry: dict[str, Any], orig: dict[str, Any]) -> dict[str, Any]:
    """Repeated 4-grams and distinct-2 of the model and of the original, for --record."""
    mine, theirs = entry.get("repetition"), orig.get("repetition")
    if not mine or not theirs:
        return {}
    out = {}
    for key in ("repeated_4grams", "distinct_2"):
        if mine.get(key) is not None and theirs.get(key) is not None:
            out[f"greedy_{key}"] = round(mine[key], 4)
            out[f"original_greedy_{key}"] = round(theirs[key], 4)
    return out
