"""``kvconvert eval``: a converted checkpoint's numbers side by side with its original.

Fidelity (KL to the original and perplexity on the same tokens), KV cache bytes measured from
the real cache object after a prefill, prefill/decode speed (interleaved runs, median) and a
retrieval probe (passkey for models with a tokenizer, a copy task on token ids otherwise).

Nothing here reads the config to predict the cache: bytes are summed over every tensor the
cache's layers hold, so custom caches of remote-code outputs (per-layer KV heads, PoD layers
whose keys and values differ in length) are measured the same way as ``DynamicCache``.
The original stays loaded; each converted model is loaded once, measured and released.
What depends on the original alone (its sampled evaluation tokens, its retrieval scores) is
kept in a small on-disk cache (``kvconvert.evalcache``), so evaluating the next output of the
same original skips that work. Every phase shows its own bar and, when long, an estimate.
"""

from __future__ import annotations

import inspect
import json
import math
import random
import re
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .compat import cache_bytes, cache_kwargs, output_cache
from .errors import KVConvertError
from .eta import AboveBars, Estimate
from .evalcache import EvalCache, cache_dir, content_digest, files_fingerprint
from .evalsettings import EvalSettings as EvalSettings  # the options, torch-free for the CLI
from .promise import BYTES_TOLERANCE, expected_bytes
from .repetition import continuations, prompt_ids, repetition
from .report import record_fidelity
from .source import check_derived

#: Version of the ``--json`` schema (docs/evaluation.md); bumped on any incompatible change.
SCHEMA_VERSION = 1

PASSKEY_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)


# --- measurements usable on their own (tests, demo, benchmarks) ------------------------------
def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def kl_per_token(
    reference: torch.nn.Module,
    candidate: torch.nn.Module,
    tokens: torch.Tensor,
    batch_size: int = 8,
) -> float:
    """Mean KL(reference || candidate) of next-token distributions, nats per token."""
    return fidelity(reference, candidate, tokens, batch_size)["kl"]


@torch.inference_mode()
def nll_per_token(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token negative log-likelihood, nats per token (exp() is perplexity)."""
    total, count = 0.0, 0
    dev = model_device(model)
    for i in range(0, tokens.shape[0], batch_size):
        b = tokens[i : i + batch_size].to(dev)
        total += float(_nll_sum(model(input_ids=b).logits, b))
        count += b[:, 1:].numel()
    return total / max(count, 1)


#: Rows of logits turned into float64 at once: bounds the measurement's memory to a few
#: hundred MB whatever the batch, sequence length and vocabulary (a 49K vocabulary at 8 x 512
#: tokens would otherwise need about 10 GB for the KL's float64 temporaries).
CHUNK_ELEMENTS = 1 << 24


def _row_chunks(n: int, vocab: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    return [slice(i, i + step) for i in range(0, n, step)]


def _nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    lg, tgt = logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for rows in _row_chunks(lg.shape[0], lg.shape[-1]):
        total += F.cross_entropy(lg[rows].double(), tgt[rows], reduction="sum")
    return total


def _kl_sum(ref_logits: torch.Tensor, cand_logits: torch.Tensor) -> float:
    """Sum over positions of KL(softmax(ref) || softmax(cand)), in float64, chunk by chunk."""
    r, c = ref_logits.flatten(0, -2), cand_logits.flatten(0, -2)
    total = 0.0
    for rows in _row_chunks(r.shape[0], r.shape[-1]):
        lp = F.log_softmax(r[rows].double(), dim=-1)
        lq = F.log_softmax(c[rows].double(), dim=-1)
        total += float((lp.exp() * (lp - lq)).sum())
    return total


def _fidelity_sums(
    ref_logits: torch.Tensor, cand_logits: torch.Tensor, ids: torch.Tensor
) -> tuple[float, float, float]:
    """Sums over one batch of KL(ref || cand) (every position) and of both models' next-token
    NLL (every position but the last), in float64, chunk by chunk. Each row's log-softmax is
    computed once per model and serves the KL and the NLL alike (``_kl_sum`` and two
    ``_nll_sum`` calls would compute the reference's twice and the candidate's twice)."""
    b, t, v = ref_logits.shape
    r, c = ref_logits.flatten(0, 1), cand_logits.flatten(0, 1)
    target = ids.roll(-1, dims=1).flatten().unsqueeze(1)  # the next token at every position
    scored = (torch.arange(t, device=ids.device) < t - 1).repeat(b)  # the last has no next
    kl = nll_r = nll_c = torch.zeros((), dtype=torch.float64, device=r.device)
    for rows in _row_chunks(r.shape[0], v):
        lp = F.log_softmax(r[rows].double(), dim=-1)
        lq = F.log_softmax(c[rows].double(), dim=-1)
        kl = kl + (lp.exp() * (lp - lq)).sum()
        keep, tgt = scored[rows], target[rows]
        nll_r = nll_r - lp.gather(1, tgt).squeeze(1)[keep].sum()
        nll_c = nll_c - lq.gather(1, tgt).squeeze(1)[keep].sum()
    return float(kl), float(nll_r), float(nll_c)


@torch.inference_mode()
def fidelity(
    reference: torch.nn.Module,
    candidate: torch.nn.Module,
    tokens: torch.Tensor,
    batch_size: int,
    progress: Any = None,
) -> dict[str, float]:
    """KL(reference || candidate) per token, both models' NLL per token, and how often their
    most likely next tokens agree (top-1 agreement), one pass each. ``progress``: anything
    with ``update(n)`` (a bar), told the sequences done after each batch."""
    kl = nll_r = nll_c = 0.0
    n_kl = n_nll = agree = 0
    dev_r, dev_c = model_device(reference), model_device(candidate)
    for i in range(0, tokens.shape[0], batch_size):
        b = tokens[i : i + batch_size]
        lr = reference(input_ids=b.to(dev_r)).logits
        lc = candidate(input_ids=b.to(dev_c)).logits.to(lr.device)
        sums = _fidelity_sums(lr, lc, b.to(lr.device))
        kl, nll_r, nll_c = kl + sums[0], nll_r + sums[1], nll_c + sums[2]
        agree += int((lr.argmax(-1) == lc.argmax(-1)).sum())
        n_kl += b.numel()
        n_nll += b[:, 1:].numel()
        if progress is not None:
            progress.update(b.shape[0])
    return {
        "kl": kl / max(n_kl, 1),
        "nll_reference": nll_r / n_nll,
        "nll": nll_c / n_nll,
        "top1_agreement": agree / max(n_kl, 1),
    }


@torch.inference_mode()
def kv_cache_bytes(model: torch.nn.Module, input_ids: torch.Tensor) -> int:
    """Bytes held by the real cache object after a prefill of ``input_ids``."""
    out = model(input_ids=input_ids.to(model_device(model)), use_cache=True)
    cache = output_cache(out)
    if cache is None:
        raise KVConvertError("cache: a forward with use_cache=True returned no cache")
    return cache_bytes(cache)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def prefill_decode(
    model: torch.nn.Module, ids: torch.Tensor, new_tokens: int
) -> tuple[float, float, int, torch.Tensor]:
    """Greedy: prefill ``ids`` then decode ``new_tokens``.

    Returns (prefill seconds, decode seconds, cache bytes right after the prefill, new ids).
    The decode loop stays on the device (no host sync per token except on CUDA timing).
    """
    dev = model_device(model)
    ids = ids.to(dev)
    _sync(dev)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    _sync(dev)
    t1 = time.perf_counter()
    nbytes = cache_bytes(output_cache(out))
    gen = decode(model, out, new_tokens)
    _sync(dev)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, nbytes, gen


def decode(model: torch.nn.Module, out: Any, new_tokens: int) -> torch.Tensor:
    """``new_tokens`` greedy ids after a prefill's output ``out`` (its cache, its last logits),
    staying on the device: no host sync per token."""
    cache = output_cache(out)
    nxt = out.logits[:, -1:].argmax(-1)
    gen = [nxt]
    for _ in range(new_tokens - 1):
        out = model(input_ids=nxt, use_cache=True, **cache_kwargs(cache))
        cache = output_cache(out)
        nxt = out.logits[:, -1:].argmax(-1)
        gen.append(nxt)
    return torch.cat(gen, dim=1)


# --- retrieval probes ------------------------------------------------------------------------
def passkey_prompt(tokenizer: Any, context: int, depth: float, key: int) -> list[int]:
    """Filler text of about ``context`` tokens with the passkey sentence at ``depth``.

    The key goes after ``depth`` of the filler passages but the last, so that even at depth 1
    one passage stands between it and the question. Right before the question, the key
    sentence's own ending ("N is the pass key.") is what the question ends on, and a small
    model continues the pattern instead of answering: SmolLM2-135M said " the pass key." and
    found 0/4 keys there, 4/4 at every other depth; a probe the original fails measures
    nothing."""
    intro = "There is a pass key hidden inside a lot of irrelevant text. Find it and remember it. "
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    question = "What is the pass key? The pass key is"

    def n(s: str) -> int:
        return len(tokenizer(s, add_special_tokens=False)["input_ids"])

    room = context - n(intro) - n(needle) - n(question) - 4
    reps = max(room // max(n(PASSKEY_FILLER), 1), 1)
    k = round(depth * (reps - 1))
    text = intro + PASSKEY_FILLER * k + needle + PASSKEY_FILLER * (reps - k) + question
    return tokenizer(text)["input_ids"][-context:]


def copy_prompt(
    filler: torch.Tensor, context: int, depth: float, span: list[int], prefix: int, bos: int
) -> list[int]:
    """Token-id retrieval: ``span`` hidden at ``depth`` in filler, its first ``prefix`` ids
    repeated at the end; the model should continue with the rest of the span."""
    n_fill = max(context - 1 - len(span) - prefix, 1)
    reps = math.ceil(n_fill / filler.numel())
    fill = filler.repeat(reps)[:n_fill].tolist()
    k = round(depth * n_fill)
    return [bos, *fill[:k], *span, *fill[k:], *span[:prefix]]


COPY_SPAN, COPY_PREFIX = 16, 4


def retrieval_tasks(
    settings: EvalSettings,
    context: int,
    tokenizer: Any | None,
    filler: torch.Tensor,
    vocab_size: int,
    bos: int,
) -> dict[str, Any]:
    """The prompts and expected answers for every depth (the same for every model)."""
    rng = random.Random(settings.seed)
    depths = settings.depth_list()
    prompts: list[list[tuple[list[int], Any]]] = []
    for d in depths:
        row = []
        for _ in range(settings.trials):
            if tokenizer is not None:
                key = rng.randint(10000, 99999)
                row.append((passkey_prompt(tokenizer, context, d, key), key))
            else:
                span = [rng.randrange(3, vocab_size) for _ in range(COPY_SPAN)]
                row.append(
                    (copy_prompt(filler, context, d, span, COPY_PREFIX, bos), span[COPY_PREFIX:])
                )
        prompts.append(row)
    if tokenizer is not None:
        kind, metric = "passkey", "exact match of the 5-digit key"
    else:
        kind = "copy"
        metric = f"token accuracy continuing a {COPY_SPAN}-id span from its first {COPY_PREFIX}"
    return {"task": kind, "metric": metric, "depths": depths, "prompts": prompts}


def keeps_last_logits(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` by name (transformers' own rule
    for using it in ``generate``): a retrieval prompt then needs the output head for its last
    position only, not for all ``--context`` of them (a fifth of SmolLM2's prefill)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.inference_mode()
def greedy(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy continuation of one prompt: ``new_tokens`` ids (the retrieval probes' decoder;
    untimed, so the prefill computes the last position's logits only where it can)."""
    last = {"logits_to_keep": 1} if keeps_last_logits(model) else {}
    out = model(input_ids=ids.to(model_device(model)), use_cache=True, **last)
    return decode(model, out, new_tokens)[0].tolist()


#: Tokens generated after a passkey prompt; the first number in them is the answer.
PASSKEY_NEW_TOKENS = 8


@torch.inference_mode()
def run_retrieval(
    model: torch.nn.Module, tasks: dict[str, Any], tokenizer: Any | None, progress: Any = None
) -> dict:
    """Score ``model`` on every prompt of ``tasks``; ``progress`` (a bar) is told each one."""
    acc = []
    for row in tasks["prompts"]:
        scores = []
        for prompt, answer in row:
            ids = torch.tensor([prompt])
            if tasks["task"] == "passkey":
                gen = greedy(model, ids, PASSKEY_NEW_TOKENS)
                m = re.search(r"\d+", tokenizer.decode(gen))
                scores.append(float(m is not None and m.group() == str(answer)))
            else:
                got = greedy(model, ids, len(answer))
                scores.append(sum(a == b for a, b in zip(got, answer, strict=True)) / len(answer))
            if progress is not None:
                progress.update(1)
        acc.append(sum(scores) / len(scores) if scores else None)
    return {
        "task": tasks["task"],
        "metric": tasks["metric"],
        "depths": tasks["depths"],
        "trials": len(tasks["prompts"][0]) if tasks["prompts"] else 0,
        "accuracy": acc,
    }


# --- the command -----------------------------------------------------------------------------
def is_kvconvert_output(folder: Path) -> bool:
    """A kvconvert output with remote code: its own report plus an ``auto_map``."""
    cfg = folder / "config.json"
    if not ((folder / "kvconvert.json").is_file() and cfg.is_file()):
        return False
    try:
        return "auto_map" in json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return False


def resolve_model(name: str, progress: bool) -> Path:
    """Local folder for a path or Hub id (fetching *.py is harmless; running it is gated)."""
    from .source import read_config, resolve_source

    folder = resolve_source(name, None, True, progress)
    read_config(folder)
    return folder


def load_eval_model(
    name: str, device: torch.device, dtype: str, trust_remote_code: bool, progress: bool
) -> tuple[torch.nn.Module, Path]:
    from transformers import AutoModelForCausalLM

    folder = resolve_model(name, progress)
    trust = trust_remote_code or is_kvconvert_output(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype="auto" if dtype == "auto" else getattr(torch, dtype),
            trust_remote_code=trust,
            device_map=str(device) if device.type != "cpu" else None,
        )
    except Exception as e:  # noqa: BLE001 - one clear line for any loader failure
        hint = "" if trust else " (if it needs its own code, pass --trust-remote-code)"
        raise KVConvertError(f"cannot load {name}: {str(e).splitlines()[0]}{hint}") from e
    return model.to(device).eval(), folder


def _read_report(folder: Path) -> dict[str, Any] | None:
    """An output's kvconvert.json (None where the folder has none)."""
    p = folder / "kvconvert.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _conversion_info(rep: dict[str, Any] | None) -> dict[str, Any] | None:
    if rep is None:
        return None
    return {
        "target": rep.get("target"),
        "method": (rep.get("recipe") or {}).get("method"),
        "layers": rep.get("layers", []),
    }


def promised_bytes(
    model: torch.nn.Module, report: dict[str, Any] | None, tokens: int
) -> int | None:
    """The cache bytes an output's kvconvert.json promises at ``tokens`` (None: no report, or
    it cannot say)."""
    if report is None:
        return None
    dtype = next(model.parameters()).dtype
    return expected_bytes(report, model.config, tokens, dtype)[0]


def _max_positions(model: torch.nn.Module) -> int | None:
    cfg = model.config
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    v = getattr(cfg, "max_position_embeddings", None)
    return int(v) if isinstance(v, int) else None


# --- progress: one bar and one estimate per phase ---------------------------------------------
class Phase:
    """One phase of an eval: a bar on stderr, and once its first ``after`` units are done, one
    line saying what the whole phase will take (``kvconvert.eta``, when 20 s or more: a log
    keeps it where it keeps only a bar's last state). Both are off with ``progress=False``."""

    def __init__(self, desc: str, total: int, unit: str, progress: bool, after: int = 1):
        self.bar = tqdm(total=total, desc=desc, unit=unit, disable=not progress)
        self.eta = Estimate(desc, total, unit, after=after, enabled=progress, stream=AboveBars())

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        self.eta.update(n)

    def __enter__(self) -> Phase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def _say(progress: bool, line: str) -> None:
    if progress:
        tqdm.write(line, file=sys.stderr)


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

    kind = device.type
    if kind == "cuda":
        kind = f"cuda:{torch.cuda.get_device_name(device)}"
    base = {
        "original": files_fingerprint(folder),
        "dtype": str(next(model.parameters()).dtype),
        "device": kind,
        "trust_remote_code": bool(settings.trust_remote_code),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    return EvalCache(None if settings.no_cache else cache_dir(), base, progress)


def _valid_tokens(value: Any, n: int, length: int, vocab: int | None) -> bool:
    if not (isinstance(value, list) and len(value) == n):
        return False
    top = vocab if vocab is not None else 2**63
    return all(
        isinstance(row, list)
        and len(row) == length
        and all(isinstance(t, int) and 0 <= t < top for t in row)
        for row in value
    )


def evaluation_tokens(
    settings: EvalSettings,
    model: torch.nn.Module,
    folder: Path,
    tokenizer: Any | None,
    bos: int,
    cache: EvalCache | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """The evaluation tokens: sampled from ``model`` for ``--data self`` (from ``cache`` when
    it holds them: sampling is a decode loop, the slowest part after retrieval), else read and
    tokenized (fast; never cached)."""
    from .calibration.data import (
        decode_batch,
        load_documents,
        sample_from_model,
        tokenize_documents,
        vocab_size,
    )

    vocab = vocab_size(json.loads((folder / "config.json").read_text()))
    if settings.data == "self":
        n, length = settings.num_samples, settings.seq_len
        key = {
            "seed": settings.seed,
            "num_samples": n,
            "seq_len": length,
            "batch_size": settings.batch_size,
            "bos": bos,
        }
        if cache is not None:
            hit = cache.get("samples", key, lambda v: _valid_tokens(v, n, length, vocab))
            if hit is not None:
                _say(progress, f"evaluation tokens: {n} x {length} sampled earlier (eval cache)")
                return torch.tensor(hit, dtype=torch.long)
        batch = decode_batch(model, bos, n, length, settings.batch_size)
        steps = -(-n // batch) * (length - 1)
        with Phase("sampling evaluation tokens", steps, "steps", progress, after=3) as bar:
            tokens = sample_from_model(model, bos, n, length, batch, settings.seed, None, bar)
        tokens = tokens.cpu()
        if cache is not None:
            cache.put("samples", key, tokens.tolist())
        return tokens
    docs = load_documents(settings.data, settings.text_field)
    return tokenize_documents(
        docs, tokenizer, settings.num_samples, settings.seq_len, settings.seed, vocab
    )


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
        _say(progress, "retrieval: the original's scores measured earlier (eval cache)")
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
        _say(progress, "repetition: the original's continuations made earlier (eval cache)")
    return repetition_entry(loops[0], texts, tokenizer)


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
    from .loading import bos_token_id, load_tokenizer, quiet_libraries, resolve_device, set_threads
    from .report import versions

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
    max_pos = _max_positions(orig)
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
        _model_entry(original, "original", orig, orig_dir, tokens, context, settings)
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
        entry = _model_entry(name, "converted", conv, conv_dir, tokens, context, settings)
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


def _model_entry(
    name: str,
    role: str,
    model: torch.nn.Module,
    folder: Path,
    tokens: torch.Tensor,
    context: int,
    settings: EvalSettings,
) -> dict[str, Any]:
    one = tokens[:1, :1]
    report = _read_report(folder)
    return {
        "name": name,
        "role": role,
        "model_class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "kv_bytes_per_token": kv_cache_bytes(model, one),
        "kl": 0.0 if role == "original" else None,
        "top1_agreement": 1.0 if role == "original" else None,
        "nll": None,
        "conversion": _conversion_info(report),
        "kv_bytes_promised": promised_bytes(model, report, context)
        if role == "converted"
        else None,
    }


# --- presentation ----------------------------------------------------------------------------
def short_name(name: str) -> str:
    p = Path(name)
    return p.name if p.exists() else name


def format_table(doc: dict[str, Any]) -> str:
    """The terminal table: one row per model."""
    ctx = doc["settings"]["context"]
    head = [
        "model",
        "KV B/token",
        f"KV @{ctx}",
        "KV ratio",
        "KL nats/tok",
        "top-1",
        "ppl",
        "prefill tok/s",
        "decode tok/s",
        "rep-4",
        "dist-2",
        "retrieval",
    ]
    retrieval = _retrieval_score(doc["models"][0]) not in (None, 0.0)
    loops = doc["models"][0].get("repetition") is not None
    # columns that would say nothing: retrieval the original cannot do either, and the
    # repetition measure under --repetition-tokens 0
    keep = [
        (name != "retrieval" or retrieval) and (name not in ("rep-4", "dist-2") or loops)
        for name in head
    ]
    rows = [head]
    for m in doc["models"]:
        r = m.get("retrieval")
        score = _retrieval_score(m)
        rows.append(
            [
                short_name(m["name"]),
                str(m["kv_bytes_per_token"]),
                _bytes(m["kv_bytes_at_context"]),
                f"{m['kv_ratio']:.3f}" if m["kv_ratio"] is not None else "-",
                f"{m['kl']:.4f}",
                f"{m['top1_agreement']:.1%}" if m.get("top1_agreement") is not None else "-",
                f"{m['ppl']:.3f}",
                f"{m['prefill_tok_s']:.0f}",
                f"{m['decode_tok_s']:.1f}" if m["decode_tok_s"] else "-",
                _share(m, "repeated_4grams", "{:.1%}"),
                _share(m, "distinct_2", "{:.3f}"),
                f"{score:.2f} ({r['task']})" if score is not None else "-",
            ]
        )
    rows = [[c for c, k in zip(row, keep, strict=True) if k] for row in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(_cells(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for m in doc["models"]:
        if m.get("kv_bytes_over_promise"):
            over = m["kv_bytes_at_context"] / m["kv_bytes_promised"] - 1
            lines.append(
                f"FLAG: {short_name(m['name'])}: its cache holds "
                f"{_bytes(m['kv_bytes_at_context'])} at {ctx} tokens, {over:.1%} more than the "
                f"{_bytes(m['kv_bytes_promised'])} its kvconvert.json promises (every tensor "
                "the cache object keeps counts)"
            )
    if loops:
        rep = doc["models"][0]["repetition"]
        lines.append(
            f"(rep-4: share of repeated token 4-grams, dist-2: distinct bigrams, in greedy "
            f"continuations of {rep['prompts']}, up to "
            f"{doc['settings']['repetition_tokens']} tokens each; the texts are in --json)"
        )
    probe = doc["models"][0].get("retrieval")
    if not retrieval and probe:
        task = probe["task"]
        lines.append(f"(retrieval left out: the original scores 0 on the {task} task here)")
    elif probe:  # say how small the sample behind the column is
        depths = ",".join(f"{d:g}" for d in probe["depths"])
        lines.append(
            f"(retrieval: {probe['task']}, {probe['trials']} prompt(s) at each depth {depths}, "
            f"{ctx} tokens; more with --trials, per depth in --json)"
        )
    return "\n".join(lines)


def _share(m: dict[str, Any], key: str, fmt: str) -> str:
    value = (m.get("repetition") or {}).get(key)
    return fmt.format(value) if value is not None else "-"


def _retrieval_score(m: dict[str, Any]) -> float | None:
    """Mean retrieval accuracy over the depths, or None when not measured."""
    acc = [a for a in (m.get("retrieval") or {}).get("accuracy", []) if a is not None]
    return sum(acc) / len(acc) if acc else None


def _cells(row: list[str], widths: list[int]) -> list[str]:
    """The model name left-aligned, numbers right-aligned."""
    return [row[0].ljust(widths[0])] + [
        c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
    ]


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def write_plot(doc: dict[str, Any], path: str | Path) -> None:
    """Save ``plot_figure(doc)`` as an image (``--plot``)."""
    plt = require_matplotlib()
    fig = plot_figure(doc)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_figure(doc: dict[str, Any]) -> Any:
    """KL vs the KV cache measured at the evaluation context for every model (a legend names
    them, so labels never overlap; bytes at a context show savings that grow with length,
    such as PoD's), and one heatmap of per-layer values per conversion, all on one colour
    scale."""
    plt = require_matplotlib()
    models = doc["models"]
    ctx = doc["settings"]["context"]
    maps = [m for m in models if m["conversion"] and _layer_matrix(m["conversion"])[0]]
    ncols = min(max(len(maps), 1), 3)
    nrows = 1 + math.ceil(len(maps) / ncols)
    width = max(4.2 * ncols, 8.0)
    fig = plt.figure(figsize=(width, 3.8 + 2.6 * (nrows - 1)), constrained_layout=True)
    grid = fig.add_gridspec(nrows, ncols, height_ratios=[1.4] + [1] * (nrows - 1))
    ax = fig.add_subplot(grid[0, :])
    for m in models:
        orig = m["role"] == "original"
        label = short_name(m["name"]) + (" (original)" if orig else "")
        x, y = m["kv_bytes_at_context"] / 2**20, m["kl"]
        ax.scatter(x, y, s=90 if orig else 45, marker="*" if orig else "o", zorder=3, label=label)
    ax.set_xlabel(f"KV cache MiB at {ctx} tokens (measured after a prefill of {ctx})")
    ax.set_ylabel("KL(original || model)\nnats/token")
    ax.set_title("Fidelity vs KV cache size")
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    mats = [_layer_matrix(m["conversion"]) for m in maps]
    top = max((v for _, mat in mats for _, v in _cells_of(mat)), default=1.0) or 1.0
    images = []
    for k, (m, (rows, mat)) in enumerate(zip(maps, mats, strict=True)):
        a = fig.add_subplot(grid[1 + k // ncols, k % ncols])
        images.append(a.imshow(mat, aspect="auto", cmap="magma_r", vmin=0, vmax=top))
        a.set_yticks(range(len(rows)), rows, fontsize=8)
        a.set_xticks(range(len(mat[0])))
        if len(mat[0]) <= 16:
            for (r, c), v in _cells_of(mat):
                ink = "white" if v > 0.5 * top else "black"
                a.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color=ink)
        a.set_xlabel("layer")
        a.set_title(short_name(m["name"]), fontsize=9)
    if images:
        axes = [im.axes for im in images]
        fig.colorbar(images[0], ax=axes, shrink=0.8, label="per-layer value (one scale)")
    return fig


def _layer_matrix(conv: dict[str, Any]) -> tuple[list[str], list[list[float]]]:
    """Numeric per-layer fields of kvconvert.json (errors, PoD similarities) as a matrix."""
    layers = conv.get("layers") or []
    keys = sorted(
        {
            k
            for layer in layers
            for k, v in layer.items()
            if k != "layer" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
    )
    mat = [[float(layer.get(k, float("nan"))) for layer in layers] for k in keys]
    return keys, mat


def _cells_of(mat: list[list[float]]) -> list[tuple[tuple[int, int], float]]:
    return [((r, c), v) for r, row in enumerate(mat) for c, v in enumerate(row) if v == v]


def require_matplotlib() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise KVConvertError(
            "--plot needs matplotlib: pip install matplotlib (or kvconvert[plot])"
        ) from None
    return plt
