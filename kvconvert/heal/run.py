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

This file is the run's order of events; its jobs are in ``models.py`` (teacher, student, what
trains), ``data.py`` (the text), ``trainer.py`` (the loop), ``state.py`` (resuming) and
``output.py`` (the healed folder).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import report as report_mod
from ..distributed import barrier
from ..errors import KVConvertError
from ..evaluate import kl_per_token
from ..loading import quiet_libraries, set_threads
from ..source import check_derived, resolve_source
from ..writer import check_output
from .data import make_data, micro_batch, own_text
from .lora import LoRALinear
from .models import load_models, place_run
from .options import HealOptions
from .output import final_tensors, write_healed
from .state import check_leftovers, fingerprint, load_state, save_state, state_folder
from .trainer import Trainer, lr_schedule

__all__ = ["Callback", "HealRun", "heal", "lr_schedule", "state_folder"]

Callback = Callable[["HealRun", int, float], None]


class HealRun:
    """One healing run: models, data, trainable tensors, optimiser, and the loop."""

    def __init__(self, opts: HealOptions, progress: bool = True):
        self.opts = opts
        self.output = Path(opts.output).expanduser()
        self.converted = Path(opts.converted).expanduser()
        if not (self.converted / "config.json").is_file():
            raise KVConvertError(f"converted model folder {opts.converted!r} has no config.json")
        self.place = place_run(opts)
        self.progress = progress and self.place.rank == 0
        self.original = resolve_source(
            opts.original, opts.revision, opts.trust_remote_code, self.progress
        )
        check_derived(self.original, self.converted, opts.original, opts.converted)
        self.models = load_models(opts, self.original, self.converted, self.place)
        self.trainer = Trainer(opts, self.place, self.models, self.progress)
        self.kl_before: float | None = None
        self.kl_after: float | None = None
        self.tokens = self.eval_tokens = torch.empty(0, 0, dtype=torch.long)

    # what callbacks read: callback(run, step, loss)
    @property
    def student(self) -> torch.nn.Module:
        return self.models.student

    @property
    def teacher(self) -> torch.nn.Module:
        return self.models.teacher

    @property
    def lora(self) -> dict[str, LoRALinear]:
        return self.models.lora

    @property
    def step(self) -> int:
        return self.trainer.step

    def make_data(self) -> None:
        """Training and held-out token ids (rank 0 makes them, the others receive them)."""
        sampled = state_folder(self.output) / "sampled.pt"
        self.tokens, self.eval_tokens = make_data(
            self.opts, self.original, self.teacher, self.place, sampled, self.progress
        )

    def batch(self, k: int) -> torch.Tensor:
        """Micro-batch ``k`` as the loop trains on it (part the student's own text)."""
        ids = micro_batch(self.tokens, k, self.opts.batch_size, self.opts.seed)
        return own_text(self.student, ids, k, self.opts, self.place)

    def train(self, callback: Callback | None = None) -> None:
        def after_step(step: int, loss: float) -> None:
            if callback is not None:
                callback(self, step, loss)

        self.trainer.train(self.batch, self.save_state, after_step)

    def evaluate(self) -> float | None:
        """The student's KL to the teacher on the held-out text (None without held-out text)."""
        if not self.eval_tokens.numel():
            return None
        with self.place.autocast():
            return kl_per_token(
                self.teacher, self.student, self.eval_tokens, batch_size=self.opts.batch_size
            )

    # --- resumable state ------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        return fingerprint(self.opts, self.place.world, self.models.digest)

    def save_state(self) -> None:
        """Save what a --resume needs: the loop's state, the text and the KL before."""
        parts = {
            "kl_before": self.kl_before,
            "tokens": self.tokens,
            "eval_tokens": self.eval_tokens,
        }
        save_state(
            state_folder(self.output), self._fingerprint(), {**self.trainer.state_dict(), **parts}
        )

    def load_state(self) -> bool:
        """Restore a saved state if there is one; raise if it belongs to another run."""
        state = load_state(state_folder(self.output), self._fingerprint())
        if state is None:
            return False
        self.trainer.load_state_dict(state)
        self.kl_before = state["kl_before"]
        self.tokens, self.eval_tokens = state["tokens"], state["eval_tokens"]
        return True

    # --- output ---------------------------------------------------------------------------
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
        final = {} if self.worse else final_tensors(self.models)
        entry = self.report_entry(command, sorted(final))
        fidelity = None
        if self.kl_after is not None and self.kl_before is not None:
            fidelity = {
                "measured_by": "kvconvert heal's held-out check",
                "kl_nats_per_token": round(self.kl_before if self.worse else self.kl_after, 6),
                "kl_before_healing": round(self.kl_before, 6),
                "data": self.opts.calibration,
                "tokens": f"{self.eval_tokens.shape[0]} x {self.opts.seq_len}",
            }
        write_healed(self.output, self.opts.overwrite, self.models.tensors, final, entry, fidelity)
        shutil.rmtree(state_folder(self.output), ignore_errors=True)
        return self.output

    def report_entry(self, command: str | None, tensors: list[str]) -> dict[str, Any]:
        """The run as ``kvconvert.json`` records it (one entry of its ``heal`` list)."""
        o, t, place = self.opts, self.trainer, self.place
        return {
            "command": command or "kvconvert.heal(...)",
            "options": o.to_dict(),
            "versions": report_mod.versions(),
            "steps": t.step,
            "lr": t.lr,
            "final_loss": round(sum(t.losses) / len(t.losses), 6) if t.losses else None,
            "final_loss_steps": len(t.losses),
            "kl_before": self.kl_before,
            "kl_after": self.kl_after,
            "kept": "unhealed (the held-out KL did not drop)" if self.worse else "healed",
            "data": {
                "source": o.calibration,
                "sequences": int(self.tokens.shape[0]),
                "eval_sequences": int(self.eval_tokens.shape[0]),
                "seq_len": o.seq_len,
                "seed": o.seed,
                "tokens_seen": o.steps * o.grad_accum * place.world * o.batch_size * o.seq_len,
            },
            "world_size": place.world,
            "trained": {"mode": f"lora r={o.lora}" if o.lora else o.train, "tensors": tensors},
            "device": str(place.device),
            "precision": str(place.amp_dtype or torch.float32).removeprefix("torch."),
            "timing_s": {"train": round(t.elapsed, 3)},
        }

    def close(self) -> None:
        self.models.tensors.close()


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
    check_leftovers(output, opts.resume, opts.overwrite)
    sampled = state_folder(output) / "sampled.pt"  # interrupted while sampling the text
    if not progress:
        quiet_libraries()
    torch.manual_seed(opts.seed)
    run = HealRun(opts, progress)
    rank, world = run.place.rank, run.place.world
    try:
        resumed = run.load_state() if opts.resume else False
        if not resumed:
            if rank == 0 and not (opts.resume and sampled.is_file()):
                shutil.rmtree(state_folder(output), ignore_errors=True)
            run.make_data()
            run.kl_before = run.evaluate() if rank == 0 else None
        run.train(callback)
        if rank != 0:  # rank 0 alone evaluates and writes; the others wait for it
            barrier(world)
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
        barrier(world)
        return out
    finally:
        run.close()
