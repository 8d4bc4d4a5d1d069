"""Calibration sources -> fixed-length token batches.

Sources: ``self`` (sequences sampled from the model itself, starting at BOS, temperature 1:
the data-free default), a ``.txt`` file or a folder of them, a ``.jsonl`` file with a ``text``
field or pre-tokenized ``input_ids`` lists, or a Hub dataset id (its jsonl/txt/json/parquet
files, fetched with huggingface_hub). Text is tokenized, documents are joined into one stream
and cut into ``seq_len`` windows, so every batch is dense (no padding to mask).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from ..compat import cache_bytes, cache_kwargs, output_cache
from ..errors import KVConvertError
from ..eta import Estimate
from ..loading import bos_token_id, load_tokenizer

if TYPE_CHECKING:
    from ..recipe import Recipe
    from ..source import Source

DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


def load_documents(source: str, text_field: str = "text") -> list[str | list[int]]:
    """Read a calibration source into documents: strings or pre-tokenized id lists."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file())
        if not files:
            raise KVConvertError(
                f"calibration folder {source} has no .txt/.jsonl/.json/.parquet files"
            )
    elif path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise KVConvertError(
                f"data file {source}: {path.suffix or 'no extension'} is not a format kvconvert "
                "reads (.txt plain text, .jsonl, .json, .parquet); for plain text, rename it "
                "to .txt"
            )
        files = [path]
    elif source.count("/") == 1 and not source.startswith((".", "/", "~")):
        files = _fetch_hub_dataset(source)
    else:
        raise KVConvertError(
            f"calibration source {source!r} not found (give 'self', a .txt/.jsonl file or "
            "folder, or a Hub dataset id)"
        )
    docs: list[str | list[int]] = []
    for f in files:
        docs.extend(_read_file(f, text_field))
    if not docs:
        raise KVConvertError(f"calibration source {source!r} holds no documents")
    return docs


def _fetch_hub_dataset(repo_id: str) -> list[Path]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        local = Path(
            snapshot_download(
                repo_id, repo_type="dataset", allow_patterns=[f"*{s}" for s in DATA_SUFFIXES]
            )
        )
    except RepositoryNotFoundError as e:
        raise KVConvertError(f"calibration dataset {repo_id!r} not found on the Hub") from e
    except LocalEntryNotFoundError as e:
        raise KVConvertError(
            f"cannot reach the Hugging Face Hub to fetch dataset {repo_id!r}"
        ) from e
    except OSError as e:
        raise KVConvertError(f"cannot fetch dataset {repo_id!r}: {e}") from e
    files = sorted(p for p in local.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file())
    train = [p for p in files if "train" in p.as_posix()]
    if not (train or files):
        raise KVConvertError(f"dataset {repo_id!r} has no .jsonl/.json/.txt/.parquet files")
    return train or files


def _read_file(f: Path, text_field: str) -> list[str | list[int]]:
    if f.suffix == ".txt":
        text = f.read_text(encoding="utf-8", errors="replace")
        return [text] if text.strip() else []
    if f.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise KVConvertError(f"{f.name} is parquet: pip install pyarrow to read it") from e
        rows = pq.read_table(f).to_pylist()
    elif f.suffix == ".json":
        data = json.loads(f.read_text())
        rows = data if isinstance(data, list) else data.get("data", [data])
    else:
        rows = []
        with f.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise KVConvertError(f"{f}:{n} is not valid JSON: {e}") from e
    docs: list[str | list[int]] = []
    for n, row in enumerate(rows, 1):
        if isinstance(row, dict) and "input_ids" in row:
            docs.append([int(t) for t in row["input_ids"]])
        elif isinstance(row, dict) and isinstance(row.get(text_field), str):
            docs.append(row[text_field])
        elif isinstance(row, str):
            docs.append(row)
        else:
            raise KVConvertError(
                f"{f.name} row {n} has neither a {text_field!r} string nor an 'input_ids' list"
            )
    return docs


def tokenize_documents(
    docs: list[str | list[int]],
    tokenizer: Any | None,
    num_samples: int,
    seq_len: int,
    seed: int,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Shuffle documents (seeded), join them into one token stream, cut ``seq_len`` windows;
    ``vocab_size``: refuse ids the model has no embedding for (pre-tokenized data made with
    another tokenizer) in one line, instead of an IndexError deep in the forward."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    stream: list[int] = []
    need = num_samples * seq_len
    for i in order:
        doc = docs[i]
        if isinstance(doc, str):
            if tokenizer is None:
                raise KVConvertError(
                    "calibration text needs a tokenizer, and this model has none; use "
                    "--calibration self or a .jsonl with pre-tokenized 'input_ids'"
                )
            doc = tokenizer(doc)["input_ids"]
        stream.extend(doc)
        if len(stream) >= need:
            break
    n = min(num_samples, len(stream) // seq_len)
    if n == 0:
        raise KVConvertError(
            f"calibration data has only {len(stream)} tokens; --seq-len {seq_len} needs at "
            "least that many per sample"
        )
    tokens = torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)
    if vocab_size is not None and tokens.numel():
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise KVConvertError(
                f"calibration data holds token id {bad}, outside the model's vocabulary (ids 0 "
                f"to {vocab_size - 1}); were its input_ids made with another tokenizer?"
            )
    return tokens


#: Memory the KV caches of sequences sampled together may take. A decode step costs about the
#: same for 1 or 32 sequences until the device's compute saturates (each step reads all the
#: weights once), so sampling decodes as many sequences together as fit in this.
SAMPLING_CACHE_BYTES = 2 * 2**30


def sequence_uniforms(seed: int, first: int, n: int, steps: int) -> torch.Tensor:
    """(n, steps) uniform draws in [0, 1): row j is sequence ``first + j``'s own stream, a
    function of (seed, first + j) only, so a sequence's text does not depend on which
    sequences were sampled with it or before it."""
    rows = []
    for index in range(first, first + n):  # torch's CPU generator keeps 32 bits of a seed
        key = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=4).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(key, "little"))
        rows.append(torch.rand(steps, generator=gen, dtype=torch.float64))
    return torch.stack(rows) if rows else torch.empty(0, steps, dtype=torch.float64)


@torch.inference_mode()
def decode_batch(
    model: torch.nn.Module, bos_token_id: int, n: int, seq_len: int, least: int
) -> int:
    """Sequences to sample together: all ``n`` if their caches at ``seq_len`` tokens fit in
    ``SAMPLING_CACHE_BYTES``, else as many as fit, never fewer than ``least``. The cache's
    size per token is measured on one BOS token (any architecture, any cache layout)."""
    device = next(model.parameters()).device
    ids = torch.full((1, 1), int(bos_token_id), dtype=torch.long, device=device)
    per_token = cache_bytes(output_cache(model(input_ids=ids, use_cache=True)))
    fit = SAMPLING_CACHE_BYTES // max(1, per_token * seq_len)
    return max(1, min(n, max(least, fit)))


@torch.inference_mode()
def sample_from_model(
    model: torch.nn.Module,
    bos_token_id: int,
    num_samples: int,
    seq_len: int,
    batch_size: int,
    seed: int,
    progress: Any = None,
    estimate: Estimate | None = None,
    first: int = 0,
) -> torch.Tensor:
    """Sample ``num_samples`` sequences of ``seq_len`` tokens from ``model``, BOS first, T=1.

    A plain ancestral-sampling loop with the KV cache, ``batch_size`` sequences decoding
    together: EOS does not stop a sequence, so every sample has the full length. Each token
    is drawn by inverting the cumulative distribution at the sequence's own seeded uniform
    (``sequence_uniforms``), so the text depends on (seed, sequence index) and not on the batch
    size; ``first`` is the index of the first sequence (sampling in several calls gives the
    same text as one call).
    """
    device = next(model.parameters()).device
    out = []
    for start in range(0, num_samples, batch_size):
        bs = min(batch_size, num_samples - start)
        draws = sequence_uniforms(seed, first + start, bs, seq_len - 1).to(device)
        bos = torch.full((bs, 1), int(bos_token_id), dtype=torch.long, device=device)
        out.append(continue_sequences(model, bos, seq_len, draws, estimate))
        if progress is not None:
            progress.update(bs)
    return torch.cat(out, dim=0)


def continue_sequences(
    model: torch.nn.Module,
    prefix: torch.Tensor,
    seq_len: int,
    draws: torch.Tensor,
    estimate: Estimate | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``prefix`` (batch, p) continued by ``model`` to ``seq_len`` tokens with the KV cache:
    token ``p + t`` of row j inverts the cumulative distribution (at ``temperature``) at
    ``draws[j, t]`` (uniforms, (batch, >= seq_len - p)); temperature 0 is greedy. EOS does not
    stop a row. Call it without gradients."""
    ids, seq, cache = prefix, [prefix], None
    draws = draws.to(prefix.device)
    for t in range(seq_len - prefix.shape[1]):
        res = model(input_ids=ids, use_cache=True, **cache_kwargs(cache))
        cache = output_cache(res)
        logits = res.logits[:, -1].double()
        if temperature == 0:
            ids = logits.argmax(-1, keepdim=True)
        else:
            cdf = torch.softmax(logits / temperature, dim=-1).cumsum(-1)
            u = (draws[:, t] * cdf[:, -1]).unsqueeze(-1)
            ids = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)
        seq.append(ids)
        if estimate is not None:
            estimate.update()
    return torch.cat(seq, dim=1)


def batches(tokens: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, tokens.shape[0], batch_size):
        yield tokens[i : i + batch_size]


def calibration_tokens(
    recipe: Recipe, model: torch.nn.Module | None, src: Source, progress: bool
) -> torch.Tensor:
    """Token ids (num_samples x seq_len) from the recipe's calibration source; ``model`` is
    only used (and only needed) for ``--calibration self``."""
    if recipe.calibration == "self":
        if model is None:
            raise ValueError("--calibration self samples from the model: pass it")
        bos = bos_token_id(src.folder, src.config, None)
        n, length = recipe.num_samples, recipe.seq_len
        batch = decode_batch(model, bos, n, length, recipe.batch_size)
        steps = -(-n // batch) * (length - 1)
        eta = Estimate("sampling calibration", steps, "decode steps", enabled=progress)
        with tqdm(total=n, desc="sampling calibration", unit="seq", disable=not progress) as bar:
            return sample_from_model(model, bos, n, length, batch, recipe.seed, bar, eta)
    docs = load_documents(recipe.calibration, recipe.text_field)
    needs_tok = any(isinstance(d, str) for d in docs)
    tok = load_tokenizer(src.folder, recipe.trust_remote_code) if needs_tok else None
    vocab = vocab_size(src.config)
    return tokenize_documents(docs, tok, recipe.num_samples, recipe.seq_len, recipe.seed, vocab)


def vocab_size(config: dict[str, Any]) -> int | None:
    """The model's vocabulary size from its raw config (multimodal: the text config's)."""
    for c in (config, config.get("text_config") or {}):
        if isinstance(c.get("vocab_size"), int):
            return c["vocab_size"]
    return None


def calibration_info(recipe: Recipe, tokens: torch.Tensor) -> dict[str, Any]:
    """kvconvert.json "calibration": where the tokens came from and how many."""
    return {
        "source": recipe.calibration,
        "sequences": int(tokens.shape[0]),
        "seq_len": int(tokens.shape[1]),
        "seed": recipe.seed,
    }
