"""The optimisation of a heal: the loss, the lr schedule, the optimiser and the loop.

The loss is KL(original || converted) of the next-token distributions at every position (plus
an optional hard-label term), with the original as a frozen teacher. Under ``torchrun`` the
student is wrapped in DistributedDataParallel: rank r of W takes every W-th micro-batch (so W
ranks with ``--grad-accum A`` see the batches of one process with ``--grad-accum A*W``) and
DDP averages the gradients (docs/heal.md).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..distributed import mean_over_ranks
from ..errors import KeptProgress, KVConvertError
from ..eta import Estimate
from .models import Models, Placement
from .options import HealOptions
from .state import state_folder


class Trainer:
    """The student's optimiser and the loop's progress (step, recent losses, time spent)."""

    def __init__(self, opts: HealOptions, place: Placement, models: Models, progress: bool):
        self.opts, self.place, self.progress = opts, place, progress
        self.student, self.teacher = models.student, models.teacher
        self.trainable = models.trainable
        self.lr = opts.lr or default_lr(self.student.config)
        self.optimizer = make_optimizer(opts, list(self.trainable.values()), self.lr)
        self.model = wrap_ddp(self.student, place)  # what the training forward pass calls
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=place.amp_dtype == torch.float16 and place.device.type == "cuda"
        )
        self.step = 0
        self.losses: deque[float] = deque(maxlen=20)
        self.elapsed = 0.0

    def lr_at(self, step: int) -> float:
        return lr_schedule(self.opts, self.lr, step)

    def _sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """DDP's gradient all-reduce only when ``sync`` (no-op in one process)."""
        if sync or self.model is self.student:
            return contextlib.nullcontext()
        return self.model.no_sync()

    def loss_on(self, ids: torch.Tensor) -> torch.Tensor:
        """KL(teacher || student) per token on ``ids`` (+ weighted hard-label cross-entropy)."""
        autocast, device = self.place.autocast, self.place.device
        with torch.inference_mode(), autocast():
            t_logits = self.teacher(
                input_ids=ids.to(self.place.teacher_device), use_cache=False
            ).logits
        lp = F.log_softmax(t_logits.float(), dim=-1).to(device)
        ids = ids.to(device)
        with autocast():
            s_logits = self.model(input_ids=ids, use_cache=False).logits
        lq = F.log_softmax(s_logits.float(), dim=-1)
        loss = F.kl_div(lq.flatten(0, 1), lp.flatten(0, 1), log_target=True, reduction="batchmean")
        if self.opts.hard_label_weight:
            ce = F.cross_entropy(lq[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            loss = loss + self.opts.hard_label_weight * ce
        return loss

    def train(
        self,
        batch: Callable[[int], torch.Tensor],
        save: Callable[[], None],
        after_step: Callable[[int, float], None],
    ) -> None:
        """Run to ``--steps``: ``batch(k)`` gives micro-batch k, ``save()`` saves the run's
        state (rank 0, every ``--save-every`` steps and on Ctrl-C), ``after_step(step, loss)``
        follows every optimiser step."""
        o, rank, world = self.opts, self.place.rank, self.place.world
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
                total = torch.zeros((), device=self.place.device)
                for m in range(o.grad_accum):
                    # Rank r of W: micro-batches r, r+W, ... of the step's A*W (DDP averages).
                    k = (self.step * o.grad_accum + m) * world + rank
                    last = m == o.grad_accum - 1
                    with self._sync(last):  # gradients are all-reduced once, after the last
                        loss = self.loss_on(batch(k))
                        self.scaler.scale(loss / o.grad_accum).backward()
                    total += loss.detach() / o.grad_accum
                self.scaler.step(self.optimizer)
                self.scaler.update()
                value = float(mean_over_ranks(total, world))  # same on every rank
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
                    and rank == 0
                ):
                    save()
                after_step(self.step, value)
        except KeyboardInterrupt:
            self.elapsed = time.perf_counter() - t0
            if rank != 0:
                raise
            save()
            raise KeptProgress(
                f"kvconvert heal: interrupted at step {self.step}/{o.steps}; state saved in "
                f"{state_folder(Path(o.output).expanduser())} (rerun with --resume to continue)"
            ) from None
        finally:
            bar.close()
            self.student.eval()

    def state_dict(self) -> dict[str, Any]:
        """The loop's part of the resumable state (docs/heal.md)."""
        return {
            "step": self.step,
            "trainable": {n: p.detach().cpu() for n, p in self.trainable.items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "losses": list(self.losses),
            "elapsed": self.elapsed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for name, p in self.trainable.items():
                p.copy_(state["trainable"][name].to(p.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.losses.extend(state["losses"])
        self.elapsed = state["elapsed"]


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


def make_optimizer(
    opts: HealOptions, params: list[torch.nn.Parameter], lr: float
) -> torch.optim.Optimizer:
    """``--optimizer`` over ``params`` (their order fixes the saved optimiser state's)."""
    if opts.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=opts.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=opts.weight_decay)


def wrap_ddp(student: torch.nn.Module, place: Placement) -> torch.nn.Module:
    """The student in DistributedDataParallel under torchrun; the student itself otherwise."""
    if place.world <= 1:
        return student
    from torch.nn.parallel import DistributedDataParallel

    # Every rank loaded the same checkpoint and seeded the same LoRA init, so the initial
    # broadcast of the whole model (init_sync) would only cost time and memory; buffers
    # (rotary tables) never change, so they are not re-sent every forward.
    no_buffers = (
        "forward_sync_buffers"  # newer torch; broadcast_buffers (deprecated) before
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        else "broadcast_buffers"
    )
    return DistributedDataParallel(
        student,
        device_ids=[place.device.index] if place.device.type == "cuda" else None,
        init_sync=False,
        **{no_buffers: False},
    )
