"""The text a heal trains and measures on: made once (sampled from the original or read from
``--calibration``), split into training and held-out sequences, then served as seeded
micro-batches, optionally part rewritten by the student itself (docs/heal.md)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..calibration.data import (
    continue_sequences,
    decode_batch,
    load_documents,
    sample_from_model,
    sequence_uniforms,
    tokenize_documents,
    vocab_size,
)
from ..distributed import broadcast_tokens
from ..errors import KeptProgress, KVConvertError
from ..eta import Estimate
from ..loading import bos_token_id, load_tokenizer
from ..source import read_config
from .models import Placement
from .options import HealOptions

#: Most sequences sampled together when the training text is sampled from the original (fewer
#: where their caches would not fit ``decode_batch``'s budget); also the unit Ctrl-C keeps. On
#: SmolLM2-135M (2 CPU threads) a token costs 6.1 ms at 32 per batch, 4.5 ms at 128 and 256.
SAMPLE_BATCH = 128
#: Added to --seed for the uniforms of the student's own text (--on-policy), so that they are
#: not the training text's.
ON_POLICY_SEED = 7919


def make_data(
    opts: HealOptions,
    original: Path,
    teacher: torch.nn.Module,
    place: Placement,
    sampled: Path,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out token ids from the calibration source (seeded).

    Under torchrun rank 0 makes them and broadcasts them: sampling draws every batch from
    one generator, so splitting it across ranks would change the text, and sampling on
    several GPUs is not guaranteed bit-identical; the broadcast makes the text identical
    on every rank by construction (and equal to what one process trains on). ``sampled``
    is where Ctrl-C keeps the text sampled so far.
    """
    tokens = None
    if place.rank == 0:
        n = training_sequences(opts, place.world) + opts.eval_samples
        if opts.calibration == "self":
            tokens = sample_tokens(teacher, original, n, opts, sampled, progress).cpu()
        else:
            tokens = read_tokens(opts, original, n).cpu()
    tokens = broadcast_tokens(tokens, place.world, place.device)
    cut = tokens.shape[0] - opts.eval_samples
    return tokens[:cut], tokens[cut:]


def training_sequences(opts: HealOptions, world: int) -> int:
    """Training sequences to make: ``--num-samples``, or fewer when the run reads fewer
    (every micro-batch of every step on every rank), so a short heal samples only what it
    trains on (docs/heal.md)."""
    o = opts
    return min(o.num_samples, o.steps * o.grad_accum * world * o.batch_size)


def read_tokens(opts: HealOptions, original: Path, n: int) -> torch.Tensor:
    """``n`` sequences of ``--calibration`` text, tokenized with the original's tokenizer."""
    o = opts
    docs = load_documents(o.calibration, o.text_field)
    needs_tok = any(isinstance(d, str) for d in docs)
    tok = load_tokenizer(original, o.trust_remote_code) if needs_tok else None
    vocab = vocab_size(read_config(original))
    tokens = tokenize_documents(docs, tok, n, o.seq_len, o.seed, vocab)
    if tokens.shape[0] <= o.eval_samples:
        raise KVConvertError(
            f"calibration data gives {tokens.shape[0]} sequences of {o.seq_len} tokens; "
            f"--eval-samples {o.eval_samples} leaves none to train on"
        )
    return tokens


def sample_tokens(
    teacher: torch.nn.Module,
    original: Path,
    n: int,
    opts: HealOptions,
    path: Path,
    progress: bool,
) -> torch.Tensor:
    """``n`` sequences sampled from the original, one batch at a time.

    After each batch the sequences so far are kept in memory; Ctrl-C saves them at ``path``
    (``sampled.pt`` in the state folder) and ``--resume`` continues from there. Each
    sequence's text depends only on the seed and its index (``sample_from_model``), so the
    result is the text of an uninterrupted run."""
    o = opts
    bos = bos_token_id(original, read_config(original), None)
    batch = decode_batch(teacher, bos, min(SAMPLE_BATCH, n), o.seq_len, 1)
    key = {"seed": o.seed, "seq_len": o.seq_len, "sequences": n}
    done: list[torch.Tensor] = []
    if o.resume and path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["key"] != key:
            raise KVConvertError(
                f"--resume: the text sampled in {path.parent} was for other options "
                f"({saved['key']}); rerun with the same options, or --overwrite to start over"
            )
        done = list(saved["tokens"])
    have = sum(t.shape[0] for t in done)
    steps = -(-(n - have) // batch) * (o.seq_len - 1)
    eta = Estimate("sampling training text", steps, "decode steps", enabled=progress)
    with tqdm(
        total=n,
        initial=have,
        desc="sampling training text",
        unit="seq",
        disable=not progress,
    ) as bar:
        try:
            for start in range(have, n, batch):
                bs = min(batch, n - start)
                done.append(
                    sample_from_model(
                        teacher, bos, bs, o.seq_len, bs, o.seed, bar, eta, first=start
                    ).cpu()
                )
        except KeyboardInterrupt:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"key": key, "tokens": done}, path.with_suffix(".tmp"))
            os.replace(path.with_suffix(".tmp"), path)
            have = sum(t.shape[0] for t in done)
            raise KeptProgress(
                f"interrupted while sampling; {have} of {n} sequences kept in "
                f"{path.parent}: rerun with --resume to continue"
            ) from None
    path.unlink(missing_ok=True)
    return torch.cat(done)


def micro_batch(tokens: torch.Tensor, k: int, batch_size: int, seed: int) -> torch.Tensor:
    """The k-th micro-batch: the data cycled through in a fresh seeded order each epoch.

    A pure function of k, so a resumed run sees exactly the batches it would have seen.
    """
    n, bs = tokens.shape[0], batch_size
    rows, pos = [], k * bs
    while len(rows) < bs:
        epoch, i = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        take = min(bs - len(rows), n - i)
        rows.extend(perm[i : i + take].tolist())
        pos += take
    return tokens[rows]


def own_text(
    student: torch.nn.Module, ids: torch.Tensor, k: int, opts: HealOptions, place: Placement
) -> torch.Tensor:
    """Micro-batch ``k`` with its first ``--on-policy`` share of rows rewritten by the
    student as it is now: each keeps its first quarter (the prompt) and the student
    writes the rest (at ``--on-policy-temperature``, from uniforms seeded by the row's
    place in the run, so a resumed run writes the same text). The KL on these rows
    teaches the student the original's next-token distributions after its own text,
    which teacher-written text never shows it (docs/heal.md, "--on-policy")."""
    o = opts
    n = round(o.on_policy * ids.shape[0])
    if n == 0:
        return ids
    prompt = max(1, ids.shape[1] // 4)
    draws = sequence_uniforms(o.seed + ON_POLICY_SEED, k * ids.shape[0], n, ids.shape[1])
    student.eval()
    try:
        with torch.no_grad(), place.autocast():
            own = continue_sequences(
                student,
                ids[:n, :prompt].to(place.device),
                ids.shape[1],
                draws,
                temperature=o.on_policy_temperature,
            )
    finally:
        student.train()
    return torch.cat([own.cpu(), ids[n:]])
