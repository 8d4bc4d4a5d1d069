"""Calibration sources -> fixed-length token batches.

Sources: ``self`` (sequences sampled from the model itself, starting at BOS, temperature 1:
the data-free default), a ``.txt`` file or a folder of them, a ``.jsonl`` file with a ``text``
field or pre-tokenized ``input_ids`` lists, or a Hub dataset id (its jsonl/txt/json/parquet
files, fetched with huggingface_hub). Text is tokenized, documents are joined into one stream
and cut into ``seq_len`` windows, so every batch is dense (no padding to mask).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from ..compat import cache_kwargs, output_cache
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
            raise KVConvertError(f"calibration folder {source} has no .txt/.jsonl/.json files")
    elif path.is_file():
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
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample ``num_samples`` sequences of ``seq_len`` tokens from ``model``, BOS first, T=1.

    A plain ancestral-sampling loop with the KV cache: EOS does not stop a sequence, so every
    sample has the full length, and a seeded generator on the model's device makes it
    reproducible. ``generator`` (instead of ``seed``): continue one that earlier calls drew
    from, so sampling in several calls gives the same text as one call.
    """
    device = next(model.parameters()).device
    gen = generator if generator is not None else torch.Generator(device=device).manual_seed(seed)
    out = []
    for start in range(0, num_samples, batch_size):
        bs = min(batch_size, num_samples - start)
        ids = torch.full((bs, 1), int(bos_token_id), dtype=torch.long, device=device)
        seq = [ids]
        cache = None
        for _ in range(seq_len - 1):
            res = model(input_ids=ids, use_cache=True, **cache_kwargs(cache))
            cache = output_cache(res)
            probs = torch.softmax(res.logits[:, -1].float(), dim=-1)
            ids = torch.multinomial(probs, 1, generator=gen)
            seq.append(ids)
            if estimate is not None:
                estimate.update()
        out.append(torch.cat(seq, dim=1))
        if progress is not None:
            progress.update(bs)
    return torch.cat(out, dim=0)


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
        n, length, batch = recipe.num_samples, recipe.seq_len, recipe.batch_size
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
