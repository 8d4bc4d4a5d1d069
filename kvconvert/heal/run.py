"""Healing: distil the original model into its converted copy, then write it in the same format.

The loss is KL(original || converted) of the next-token distributions at every position (plus
an optional hard-label term), with the original as a frozen teacher. By default only the
tensors the conversion changed train; everything the conversion left alone stays bit-exact,
and is shared with the teacher so that it is held once. The output is the converted folder
with only those tensors replaced: same files, names, dtypes, shards, remote code and config,
plus the run appended to ``kvconvert.json``.

A run is resumable: its state (trained tensors, optimiser, RNG, data) is saved in a work
folder beside the output every ``--save-every`` steps and on Ctrl-C, and the output itself is
only written, atomically, at the end.

Under ``torchrun`` the student is wrapped in DistributedDataParallel: every rank holds teacher
and student, rank r of W takes every W-th micro-batch (so W ranks with ``--grad-accum A`` see
the batches of one process with ``--grad-accum A*W``), DDP averages the gradients, and rank 0
alone samples the training text (broadcast to the others), evaluates, saves state and writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .. import report as report_mod
from ..calibration.data import (
    continue_sequences,
    decode_batch,
    load_documents,
    sample_from_model,
    sequence_uniforms,
    tokenize_documents,
    vocab_size,
)
from ..distributed import barrier, broadcast_tokens, dist_setup, local_device, mean_over_ranks
from ..errors import KeptProgress, KVConvertError
from ..eta import Estimate
from ..evaluate import kl_per_token
from ..loading import (
    bos_token_id,
    load_model,
    load_tokenizer,
    quiet_libraries,
    resolve_device,
    set_threads,
)
from ..source import TensorSource, check_derived, read_config, resolve_source
from ..writer import atomic_output, check_output, write_json
from .lora import LoRALinear, add_lora
from .options import HealOptions, borrowing_layers, proximal_window

STATE_VERSION = 1
#: Most sequences sampled together when the training text is sampled from the original (fewer
#: where their caches would not fit ``decode_batch``'s budget); also the unit Ctrl-C keeps. On
#: SmolLM2-135M (2 CPU threads) a token costs 6.1 ms at 32 per batch, 4.5 ms at 128 and 256.
SAMPLE_BATCH = 128
#: Added to --seed for the uniforms of the student's own text (--on-policy), so that they are
#: not the training text's.
ON_POLICY_SEED = 7919

Callback = Callable[["HealRun", int, float], None]


def state_folder(output: Path) -> Path:
    """Where an unfinished run keeps its resumable state: a hidden folder beside the output."""
    return output.parent / f".{output.name}.kvconvert-heal"


def is_kvconvert_remote_code(folder: Path) -> bool:
    """True for a kvconvert output whose config names remote code (kvconvert's own modeling
    files, copied in by the conversion), which is safe to load without --trust-remote-code."""
    if not (folder / "kvconvert.json").is_file():
        return False
    return "auto_map" in read_config(folder)


class HealRun:
    """One healing run: models, data, trainable tensors, optimiser, and the loop."""

    def __init__(self, opts: HealOptions, progress: bool = True):
        self.opts, self.progress = opts, progress
        self.output = Path(opts.output).expanduser()
        self.converted = Path(opts.converted).expanduser()
        if not (self.converted / "config.json").is_file():
            raise KVConvertError(f"converted model folder {opts.converted!r} has no config.json")
        self.device = local_device(resolve_device(opts.device))
        self.rank, self.world = dist_setup(self.device)
        if self.world > 1 and opts.resume:
            raise KVConvertError(
                "--resume is not supported under torchrun; resume in one process with "
                "--grad-accum multiplied by the number of processes"
            )
        self.progress = progress and self.rank == 0
        progress = self.progress
        self.teacher_device = self.device if opts.teacher_device == "same" else torch.device("cpu")
        self.amp_dtype = autocast_dtype(opts.precision, self.device)
        self.original = resolve_source(
            opts.original, opts.revision, opts.trust_remote_code, progress
        )
        check_derived(self.original, self.converted, opts.original, opts.converted)
        self.tensors = TensorSource.open(self.converted)
        if any(f.suffix != ".safetensors" for f in self.tensors.files):
            raise KVConvertError(f"{self.converted} must hold .safetensors weights to be healed")
        load_dtype = self.amp_dtype or torch.float32
        self.student = load_model(  # kvconvert's own modeling code, or the user's consent
            self.converted,
            self.device,
            load_dtype,
            is_kvconvert_remote_code(self.converted) or opts.trust_remote_code,
        )
        self.teacher = load_model(
            self.original,
            self.teacher_device,
            load_dtype if self.teacher_device.type == "cuda" else torch.float32,
            opts.trust_remote_code,
        )
        self.teacher.requires_grad_(False)
        opts.resolve_lengths(self.student.config)
        check_distant_tokens(self.student.config, opts.seq_len)
        self.changed = changed_parameters(self.student, self.teacher, self.tensors)
        self.scopes = converted_modules(self.student, self.changed) | borrowing_attention(
            self.student
        )
        self.lora: dict[str, LoRALinear] = {}
        self.trainable = self._select_trainable()
        self.digest = self._initial_digest()
        self._share_frozen_with_teacher()
        if opts.gradient_checkpointing and getattr(self.student.config, "pod_map", None):
            # transformers' checkpointed layers run without the cache, and PoD attention
            # reads the block bottoms' keys there
            raise KVConvertError(
                "gradient_checkpointing: not supported for PoD outputs (the recomputed layers "
                "get no cache, and upper layers read the block bottom's keys from it)"
            )
        if opts.gradient_checkpointing:
            try:
                self.student.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
            except Exception as e:  # noqa: BLE001 - models without support say so
                raise KVConvertError(f"gradient_checkpointing: not supported here: {e}") from e
        self.lr = opts.lr or default_lr(self.student.config)
        self.optimizer = self._make_optimizer()
        self.model: torch.nn.Module = self.student  # what the training forward pass calls
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # Every rank loaded the same checkpoint and seeded the same LoRA init, so the
            # initial broadcast of the whole model (init_sync) would only cost time and memory;
            # buffers (rotary tables) never change, so they are not re-sent every forward.
            no_buffers = (
                "forward_sync_buffers"  # newer torch; broadcast_buffers (deprecated) before
                if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                else "broadcast_buffers"
            )
            self.model = DistributedDataParallel(
                self.student,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                init_sync=False,
                **{no_buffers: False},
            )
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp_dtype == torch.float16 and self.device.type == "cuda"
        )
        self.step = 0
        self.losses: deque[float] = deque(maxlen=20)
        self.kl_before: float | None = None
        self.kl_after: float | None = None
        self.elapsed = 0.0
        self.tokens = self.eval_tokens = torch.empty(0, 0, dtype=torch.long)

    # --- what trains ----------------------------------------------------------------------
    def _select_trainable(self) -> dict[str, torch.nn.Parameter]:
        """name -> parameter, in a fixed order (the optimiser state depends on it)."""
        o, s = self.opts, self.student
        s.requires_grad_(False)
        if o.lora:
            linears = {
                name
                for name, mod in s.named_modules()
                if isinstance(mod, torch.nn.Linear) and in_scope(name + ".weight", self.scopes)
            }
            if not linears:
                raise KVConvertError("lora: the conversion changed no linear projection")
            self.lora = add_lora(s, sorted(linears), o.lora, o.seed)
            params = {}
            for name, mod in self.lora.items():
                params[f"{name}.lora_a"] = mod.lora_a
                params[f"{name}.lora_b"] = mod.lora_b
        else:
            params = {
                n: p
                for n, p in s.named_parameters()
                if o.train == "all" or in_scope(n, self.scopes)
            }
            for name, p in params.items():  # exact float32 master copies from the checkpoint
                src = self.tensors.get(name) if name in self.tensors else p.data
                p.data = src.to(p.device, torch.float32)
        if not params:
            raise KVConvertError(
                f"{self.converted} does not differ from the original: nothing to heal "
                "(use --train all to fine-tune every parameter)"
            )
        for p in params.values():
            p.requires_grad_(True)
        return {n: params[n] for n in sorted(params)}

    def _share_frozen_with_teacher(self) -> None:
        """Point the teacher's copies of unchanged, frozen tensors at the student's (held once)."""
        if self.opts.train == "all":
            return
        mine = dict(self.student.named_parameters())
        for name, q in self.teacher.named_parameters():
            p = mine.get(name)
            if (
                p is not None
                and not p.requires_grad
                and p.shape == q.shape
                and p.dtype == q.dtype
                and p.device == q.device
                and torch.equal(p, q)
            ):
                q.data = p.data

    def _initial_digest(self) -> str:
        """A hash of the converted tensors that train, so --resume refuses another model."""
        h = hashlib.sha256()
        names = sorted(self.lora) if self.lora else list(self.trainable)
        for name in names:
            key = f"{name}.weight" if self.lora else name
            t = self.tensors.get(key) if key in self.tensors else self.trainable[key].detach()
            h.update(name.encode())
            h.update(t.contiguous().view(torch.uint8).cpu().numpy().tobytes())
        return h.hexdigest()

    def _make_optimizer(self) -> torch.optim.Optimizer:
        o, params = self.opts, list(self.trainable.values())
        if o.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=o.weight_decay)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=o.weight_decay)

    # --- data -----------------------------------------------------------------------------
    def make_data(self) -> None:
        """Training and held-out token ids from the calibration source (seeded).

        Under torchrun rank 0 makes them and broadcasts them: sampling draws every batch from
        one generator, so splitting it across ranks would change the text, and sampling on
        several GPUs is not guaranteed bit-identical; the broadcast makes the text identical
        on every rank by construction (and equal to what one process trains on).
        """
        tokens = self._make_tokens() if self.rank == 0 else None
        tokens = broadcast_tokens(tokens, self.world, self.device)
        cut = tokens.shape[0] - self.opts.eval_samples
        self.tokens, self.eval_tokens = tokens[:cut], tokens[cut:]

    def training_sequences(self) -> int:
        """Training sequences to make: ``--num-samples``, or fewer when the run reads fewer
        (every micro-batch of every step on every rank), so a short heal samples only what it
        trains on (docs/heal.md)."""
        o = self.opts
        return min(o.num_samples, o.steps * o.grad_accum * self.world * o.batch_size)

    def _make_tokens(self) -> torch.Tensor:
        o = self.opts
        n = self.training_sequences() + o.eval_samples
        if o.calibration == "self":
            tokens = self._sample_tokens(n)
        else:
            docs = load_documents(o.calibration, o.text_field)
            needs_tok = any(isinstance(d, str) for d in docs)
            tok = load_tokenizer(self.original, o.trust_remote_code) if needs_tok else None
            vocab = vocab_size(read_config(self.original))
            tokens = tokenize_documents(docs, tok, n, o.seq_len, o.seed, vocab)
            if tokens.shape[0] <= o.eval_samples:
                raise KVConvertError(
                    f"calibration data gives {tokens.shape[0]} sequences of {o.seq_len} tokens; "
                    f"--eval-samples {o.eval_samples} leaves none to train on"
                )
        return tokens.cpu()

    def _sample_tokens(self, n: int) -> torch.Tensor:
        """``n`` sequences sampled from the original, one batch at a time.

        After each batch the sequences so far are kept in memory; Ctrl-C saves them in the
        state folder (``sampled.pt``) and ``--resume`` continues from there. Each sequence's
        text depends only on the seed and its index (``sample_from_model``), so the result is
        the text of an uninterrupted run."""
        o = self.opts
        bos = bos_token_id(self.original, read_config(self.original), None)
        batch = decode_batch(self.teacher, bos, min(SAMPLE_BATCH, n), o.seq_len, 1)
        key = {"seed": o.seed, "seq_len": o.seq_len, "sequences": n}
        done: list[torch.Tensor] = []
        path = state_folder(self.output) / "sampled.pt"
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
        eta = Estimate("sampling training text", steps, "decode steps", enabled=self.progress)
        with tqdm(
            total=n,
            initial=have,
            desc="sampling training text",
            unit="seq",
            disable=not self.progress,
        ) as bar:
            try:
                for start in range(have, n, batch):
                    bs = min(batch, n - start)
                    done.append(
                        sample_from_model(
                            self.teacher, bos, bs, o.seq_len, bs, o.seed, bar, eta, first=start
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

    def micro_batch(self, k: int) -> torch.Tensor:
        """The k-th micro-batch: the data cycled through in a fresh seeded order each epoch.

        A pure function of k, so a resumed run sees exactly the batches it would have seen.
        """
        n, bs = self.tokens.shape[0], self.opts.batch_size
        rows, pos = [], k * bs
        while len(rows) < bs:
            epoch, i = divmod(pos, n)
            perm = torch.randperm(
                n, generator=torch.Generator().manual_seed(self.opts.seed + epoch)
            )
            take = min(bs - len(rows), n - i)
            rows.extend(perm[i : i + take].tolist())
            pos += take
        return self.tokens[rows]

    def own_text(self, ids: torch.Tensor, k: int) -> torch.Tensor:
        """Micro-batch ``k`` with its first ``--on-policy`` share of rows rewritten by the
        student as it is now: each keeps its first quarter (the prompt) and the student
        writes the rest (at ``--on-policy-temperature``, from uniforms seeded by the row's
        place in the run, so a resumed run writes the same text). The KL on these rows
        teaches the student the original's next-token distributions after its own text,
        which teacher-written text never shows it (docs/heal.md, "--on-policy")."""
        o = self.opts
        n = round(o.on_policy * ids.shape[0])
        if n == 0:
            return ids
        prompt = max(1, ids.shape[1] // 4)
        draws = sequence_uniforms(o.seed + ON_POLICY_SEED, k * ids.shape[0], n, ids.shape[1])
        self.student.eval()
        try:
            with torch.no_grad(), self.autocast():
                own = continue_sequences(
                    self.student,
                    ids[:n, :prompt].to(self.device),
                    ids.shape[1],
                    draws,
                    temperature=o.on_policy_temperature,
                )
        finally:
            self.student.train()
        return torch.cat([own.cpu(), ids[n:]])

    # --- training -------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def lr_at(self, step: int) -> float:
        return lr_schedule(self.opts, self.lr, step)

    def _sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """DDP's gradient all-reduce only when ``sync`` (no-op in one process)."""
        if sync or self.model is self.student:
            return contextlib.nullcontext()
        return self.model.no_sync()

    def loss_on(self, ids: torch.Tensor) -> torch.Tensor:
        """KL(teacher || student) per token on ``ids`` (+ weighted hard-label cross-entropy)."""
        with torch.inference_mode(), self.autocast():
            t_logits = self.teacher(input_ids=ids.to(self.teacher_device), use_cache=False).logits
        lp = F.log_softmax(t_logits.float(), dim=-1).to(self.device)
        ids = ids.to(self.device)
        with self.autocast():
            s_logits = self.model(input_ids=ids, use_cache=False).logits
        lq = F.log_softmax(s_logits.float(), dim=-1)
        loss = F.kl_div(lq.flatten(0, 1), lp.flatten(0, 1), log_target=True, reduction="batchmean")
        if self.opts.hard_label_weight:
            ce = F.cross_entropy(lq[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            loss = loss + self.opts.hard_label_weight * ce
        return loss

    def train(self, callback: Callback | None = None) -> None:
        o = self.opts
        self.student.train()
        bar = tqdm(
            total=o.steps, initial=self.step, desc="healing", unit="step", disable=not self.progress
        )
        t0 = time.perf_counter() - self.elapsed
        eta = Estimate("healing", o.steps - self.step, "steps", enabled=self.progress)
        try:
            while self.step < o.steps:
                for g in self.optimizer.param_groups:
                    g["lr"] = self.lr_at(self.step)
                self.optimizer.zero_grad(set_to_none=True)
                total = torch.zeros((), device=self.device)
                for m in range(o.grad_accum):
                    # Rank r of W: micro-batches r, r+W, ... of the step's A*W (DDP averages).
                    k = (self.step * o.grad_accum + m) * self.world + self.rank
                    last = m == o.grad_accum - 1
                    with self._sync(last):  # gradients are all-reduced once, after the last
                        loss = self.loss_on(self.own_text(self.micro_batch(k), k))
                        self.scaler.scale(loss / o.grad_accum).backward()
                    total += loss.detach() / o.grad_accum
                self.scaler.step(self.optimizer)
                self.scaler.update()
                value = float(mean_over_ranks(total, self.world))  # same on every rank
                if not math.isfinite(value):
                    raise KVConvertError(
                        f"healing diverged at step {self.step + 1} (loss {value}); lower --lr"
                    )
                self.losses.append(value)
                self.step += 1
                self.elapsed = time.perf_counter() - t0
                bar.update(1)
                eta.update()
                bar.set_postfix(loss=f"{sum(self.losses) / len(self.losses):.4f}")
                if (
                    o.save_every
                    and self.step % o.save_every == 0
                    and self.step < o.steps
                    and self.rank == 0
                ):
                    self.save_state()
                if callback is not None:
                    callback(self, self.step, value)
        except KeyboardInterrupt:
            self.elapsed = time.perf_counter() - t0
            if self.rank != 0:
                raise
            self.save_state()
            raise KeptProgress(
                f"kvconvert heal: interrupted at step {self.step}/{o.steps}; state saved in "
                f"{state_folder(self.output)} (rerun with --resume to continue)"
            ) from None
        finally:
            bar.close()
            self.student.eval()

    def evaluate(self) -> float | None:
        if not self.eval_tokens.numel():
            return None
        with self.autocast():
            return kl_per_token(
                self.teacher, self.student, self.eval_tokens, batch_size=self.opts.batch_size
            )

    # --- resumable state ------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        # W ranks with --grad-accum A compute what one process with A*W does: a state saved
        # under torchrun resumes in one process with --grad-accum A*W.
        fp = {**self.opts.fingerprint(), "grad_accum": self.opts.grad_accum * self.world}
        return {**fp, "initial_digest": self.digest}

    def save_state(self) -> None:
        folder = state_folder(self.output)
        folder.mkdir(parents=True, exist_ok=True)
        state = {
            "version": STATE_VERSION,
            "fingerprint": json.dumps(self._fingerprint(), sort_keys=True),
            "step": self.step,
            "trainable": {n: p.detach().cpu() for n, p in self.trainable.items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "losses": list(self.losses),
            "kl_before": self.kl_before,
            "elapsed": self.elapsed,
            "tokens": self.tokens,
            "eval_tokens": self.eval_tokens,
        }
        tmp = folder / "state.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, folder / "state.pt")  # a second Ctrl-C never leaves a torn state

    def load_state(self) -> bool:
        """Restore a saved state if there is one; raise if it belongs to another run."""
        path = state_folder(self.output) / "state.pt"
        if not path.is_file():
            return False
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("version") != STATE_VERSION:
            raise KVConvertError(f"{path} was saved by another kvconvert version; cannot resume")
        saved = json.loads(state["fingerprint"])
        saved.setdefault("final_lr", 0.1)  # states saved before --final-lr existed used 0.1
        now = self._fingerprint()
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if diff:
            raise KVConvertError(
                f"--resume: the saved run in {path.parent} differs in {', '.join(diff)}; rerun "
                "with the same options, or without --resume to start over"
            )
        with torch.no_grad():
            for name, p in self.trainable.items():
                p.copy_(state["trainable"][name].to(p.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step = state["step"]
        self.losses.extend(state["losses"])
        self.kl_before, self.elapsed = state["kl_before"], state["elapsed"]
        self.tokens, self.eval_tokens = state["tokens"], state["eval_tokens"]
        return True

    # --- output ---------------------------------------------------------------------------
    def final_tensors(self) -> dict[str, torch.Tensor]:
        """Checkpoint name -> healed tensor, for every tensor that training changed."""
        out = {}
        if self.lora:
            for name, mod in self.lora.items():
                key = f"{name}.weight"
                base = self.tensors.get(key).float()  # the exact stored weight, not a cast copy
                out[key] = base + mod.delta_weight().cpu()
        else:
            for name, p in self.trainable.items():
                out[name] = p.detach().float().cpu()
        missing = [n for n in out if n not in self.tensors]
        if missing:
            raise KVConvertError(
                f"trained tensors {', '.join(missing[:3])} have no counterpart in "
                f"{self.converted}'s checkpoint; cannot write them back"
            )
        return out

    @property
    def worse(self) -> bool:
        """Healing did not lower the held-out KL: the output keeps the unhealed weights."""
        return (
            self.kl_before is not None
            and self.kl_after is not None
            and (self.kl_after >= self.kl_before)
        )

    def write(self, command: str | None) -> Path:
        """The converted folder with healed tensors (the unhealed ones when healing made the
        model worse): every other file copied unchanged."""
        final = {} if self.worse else self.final_tensors()
        with atomic_output(self.output, self.opts.overwrite) as work:
            weight_files = set()
            for f in self.tensors.files:
                weight_files.add(f.name)
                with safe_open(str(f), framework="pt") as h:
                    meta = h.metadata() or {"format": "pt"}
                    tensors = {}
                    for name in h.keys():
                        t = h.get_tensor(name)
                        tensors[name] = final[name].to(t.dtype) if name in final else t
                save_file(tensors, str(work / f.name), metadata=meta)
                del tensors
            for p in sorted(self.converted.iterdir()):
                if p.name in weight_files or p.name.startswith("."):
                    continue
                if p.is_dir():
                    shutil.copytree(p, work / p.name)
                elif p.name not in ("kvconvert.json",):
                    shutil.copy2(p, work / p.name)
            entry = self.report_entry(command, sorted(final))
            rep_path = self.converted / "kvconvert.json"
            rep = json.loads(rep_path.read_text()) if rep_path.is_file() else {}
            rep.setdefault("kvconvert_report", 1)
            rep.setdefault("heal", []).append(entry)
            write_json(work / "kvconvert.json", rep)
            card = work / "README.md"
            if card.is_file():
                card.write_text(card.read_text().rstrip("\n") + "\n\n" + card_section(entry))
            if self.kl_after is not None and self.kl_before is not None:  # the card agrees
                kl = self.kl_before if self.worse else self.kl_after
                report_mod.record_fidelity(
                    work,
                    {
                        "measured_by": "kvconvert heal's held-out check",
                        "kl_nats_per_token": round(kl, 6),
                        "kl_before_healing": round(self.kl_before, 6),
                        "data": self.opts.calibration,
                        "tokens": f"{self.eval_tokens.shape[0]} x {self.opts.seq_len}",
                    },
                )
            report_mod.refresh_card(work, json.loads((work / "kvconvert.json").read_text()))
        shutil.rmtree(state_folder(self.output), ignore_errors=True)
        return self.output

    def report_entry(self, command: str | None, tensors: list[str]) -> dict[str, Any]:
        o = self.opts
        return {
            "command": command or "kvconvert.heal(...)",
            "options": o.to_dict(),
            "versions": report_mod.versions(),
            "steps": self.step,
            "lr": self.lr,
            "final_loss": round(sum(self.losses) / len(self.losses), 6) if self.losses else None,
            "final_loss_steps": len(self.losses),
            "kl_before": self.kl_before,
            "kl_after": self.kl_after,
            "kept": "unhealed (the held-out KL did not drop)" if self.worse else "healed",
            "data": {
                "source": o.calibration,
                "sequences": int(self.tokens.shape[0]),
                "eval_sequences": int(self.eval_tokens.shape[0]),
                "seq_len": o.seq_len,
                "seed": o.seed,
                "tokens_seen": o.steps * o.grad_accum * self.world * o.batch_size * o.seq_len,
            },
            "world_size": self.world,
            "trained": {"mode": f"lora r={o.lora}" if o.lora else o.train, "tensors": tensors},
            "device": str(self.device),
            "precision": str(self.amp_dtype or torch.float32).removeprefix("torch."),
            "timing_s": {"train": round(self.elapsed, 3)},
        }

    def close(self) -> None:
        self.tensors.close()


def lr_schedule(opts: HealOptions, peak: float, step: int) -> float:
    """The lr of 0-based ``step``: linear warm-up to ``peak``, then constant or a cosine decay
    towards ``opts.final_lr * peak`` (reached one step after the last)."""
    warm = max(1, round(opts.warmup * opts.steps))
    if step < warm and opts.warmup > 0:
        return peak * (step + 1) / warm
    if opts.schedule == "constant":
        return peak
    t = (step - warm) / max(1, opts.steps - warm)
    return peak * (opts.final_lr + (1 - opts.final_lr) * 0.5 * (1 + math.cos(math.pi * t)))


def default_lr(config: Any) -> float:
    """0.64 / hidden_size. Adam moves every weight by about lr per step, and an update that is
    correlated along a row adds up over its fan-in, so wider models want proportionally
    smaller steps (muP's rule for hidden weights). 0.64 gives 1e-2 at width 64, the better of
    1e-3 and 1e-2 measured on stories260K; at width 4096 it gives 1.6e-4 (not measured)."""
    width = getattr(config, "hidden_size", None)
    return 0.64 / width if isinstance(width, int) and width > 0 else 1e-3


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--precision`` on ``device`` (None: plain float32)."""
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            raise KVConvertError(
                f"precision: {precision} autocast needs a CUDA device; use auto or fp32 here"
            )
        return None
    if precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def changed_parameters(
    student: torch.nn.Module, teacher: torch.nn.Module, tensors: TensorSource
) -> set[str]:
    """Names of the student's parameters the conversion changed (new, reshaped or rewritten).

    Values are compared in the converted checkpoint's dtype, so a conversion that also cast
    the model (``--dtype``) does not mark every tensor as changed.
    """
    theirs = dict(teacher.named_parameters())
    out = set()
    for name, p in student.named_parameters():
        q = theirs.get(name)
        if q is None or q.shape != p.shape:
            out.add(name)
            continue
        dt = tensors.get(name).dtype if name in tensors else p.dtype
        if not torch.equal(q.detach().to(p.device, dt), p.detach().to(dt)):
            out.add(name)
    return out


def converted_modules(model: torch.nn.Module, changed: set[str]) -> set[str]:
    """The modules the conversion touched: for a changed projection (``nn.Linear``) its parent
    (the attention block, so a layer's q/k/v/o all train), else the module owning the tensor."""
    out = set()
    for name in changed:
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        mod = model.get_submodule(owner)
        out.add(owner.rsplit(".", 1)[0] if isinstance(mod, torch.nn.Linear) else owner)
    return out


def check_distant_tokens(config: Any, seq_len: int) -> None:
    """A PoD model differs from the original only on distant tokens: training sequences no
    longer than sink + recent + 1 tokens would teach it nothing."""
    window = proximal_window(config)
    if window is None:
        return  # not PoD, or no layer borrows (nothing to heal, said later)
    sink, recent = window
    if seq_len <= sink + recent + 1:
        raise KVConvertError(
            f"seq_len: this PoD model keeps its own keys for the first {sink} and the last "
            f"{recent} tokens, so sequences of {seq_len} tokens have no distant token to learn "
            f"from; use --seq-len above {sink + recent + 1}"
        )


def borrowing_attention(model: torch.nn.Module) -> set[str]:
    """A PoD output keeps every weight: what must adapt is the attention of the layers that
    read another layer's keys, so those attention blocks train."""
    borrowing = borrowing_layers(model.config)
    if not borrowing:
        return set()
    return {
        name
        for name, mod in model.named_modules()
        if any(c.__name__ == "PodAttentionMixin" for c in type(mod).__mro__)
        and getattr(mod, "layer_idx", None) in borrowing
    }


def in_scope(name: str, scopes: set[str]) -> bool:
    return any(name.startswith(s + ".") or not s for s in scopes)


def card_section(entry: dict[str, Any]) -> str:
    kl = ""
    if entry["kl_before"] is not None:
        kl = (
            f" KL to the original on {entry['data']['eval_sequences']} held-out sequences: "
            f"{entry['kl_before']:.4f} -> {entry['kl_after']:.4f} nats/token."
        )
    kept = ""
    if entry.get("kept", "healed") != "healed":
        kept = " The held-out KL did not drop, so these weights are the unhealed ones."
    return (
        "## Healing\n\n"
        f"Distilled from the original for {entry['steps']} steps ({entry['trained']['mode']}, "
        f"training text `{entry['data']['source']}`, {entry['data']['tokens_seen']} tokens)."
        f"{kl}{kept}\n\n```\n{report_mod.reproducible_command(entry['command'])}\n```\n"
    )


def heal(
    opts: HealOptions,
    progress: bool = True,
    command: str | None = None,
    callback: Callback | None = None,
) -> Path:
    """Heal ``opts.converted`` by distillation from ``opts.original``; return the output folder.

    ``callback(run, step, loss)`` is called after every optimiser step (for logging; raising
    KeyboardInterrupt there interrupts the run like Ctrl-C).
    """
    opts.validate()
    set_threads(opts.threads)
    output = Path(opts.output).expanduser()
    check_output(output, opts.overwrite)
    saved = state_folder(output) / "state.pt"
    sampled = saved.with_name("sampled.pt")  # interrupted while sampling the training text
    if opts.resume and not (saved.is_file() or sampled.is_file()):
        raise KVConvertError(
            f"--resume: there is no interrupted heal to resume ({saved.parent} is absent)"
        )
    if (saved.is_file() or sampled.is_file()) and not opts.resume and not opts.overwrite:
        raise KVConvertError(
            f"{saved.parent} holds an interrupted heal; add --resume to continue it, or "
            "--overwrite to discard it and start over"
        )
    if not progress:
        quiet_libraries()
    torch.manual_seed(opts.seed)
    run = HealRun(opts, progress)
    try:
        resumed = run.load_state() if opts.resume else False
        if not resumed:
            if run.rank == 0 and not (opts.resume and sampled.is_file()):
                shutil.rmtree(state_folder(output), ignore_errors=True)
            run.make_data()
            run.kl_before = run.evaluate() if run.rank == 0 else None
        run.train(callback)
        if run.rank != 0:  # rank 0 alone evaluates and writes; the others wait for it
            barrier(run.world)
            return output
        run.kl_after = run.evaluate()
        if run.worse:
            print(
                f"kvconvert heal: warning: the held-out KL did not drop ({run.kl_before:.4f} -> "
                f"{run.kl_after:.4f} nats/token), so {output} keeps the unhealed model; try a "
                "lower learning rate (heal --lr, or --heal-lr when converting) or more "
                "training text (--num-samples, or --heal-num-samples)",
                file=sys.stderr,
            )
        elif run.kl_before is not None and progress:
            print(
                f"kvconvert heal: held-out KL {run.kl_before:.4f} -> {run.kl_after:.4f} "
                f"nats/token ({run.eval_tokens.shape[0]} sequences)",
                file=sys.stderr,
            )
        out = run.write(command)
        barrier(run.world)
        return out
    finally:
        run.close()
