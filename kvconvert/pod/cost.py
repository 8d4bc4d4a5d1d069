"""What borrowing keys costs each (layer, KV head), measured on the layer's real output.

For the last queries of each calibration sequence, a layer's attention is computed twice: as
the model does, and as a PoD upper layer would (its own keys for proximal tokens, a lower
layer's keys for distant ones, one softmax, its own values). The difference, passed through
the layer's output projection, is the error this head would add to the residual stream; its
squared norm relative to the residual stream's is the cost, averaged over queries that see a
distant token. It is measured for every lower layer a block could start at (up to
``depth`` layers down), so a block's cost is the sum of its upper layers' costs against its
bottom. docs/pod.md ("How the map is chosen") says why this, rather than the attention
similarity, orders the merges.

With ``biases`` (``--distant-bias``) each borrowing is also measured with every bias of the
grid added to the borrowed distant logits, and keeps its cheapest: a head whose borrowed keys
mislead it can lean on its own proximal keys instead (docs/pod.md, "Distant bias").
"""

from __future__ import annotations

import numpy as np
import torch

from ..arch import AttentionAdapter
from .similarity import DistantAttention, run_probe

#: queries per calibration sequence whose error is measured
NUM_QUERIES_COST = 64

#: how far down a block's bottom may lie (blocks of up to DEPTH + 1 layers) unless
#: ``--max-block`` says otherwise
DEPTH = 7


class BorrowCost(DistantAttention):
    """cost[l, h, d - 1, g]: the relative residual error of layer l, KV head h, reading its
    distant keys from the full-attention layer d links below it, with ``biases[g]`` added to
    their logits (NaN where there is no such layer)."""

    def __init__(
        self, model, adapter, config, sink, recent, depth=DEPTH, windows=None, biases=(0.0,)
    ):
        super().__init__(model, adapter, config, sink, recent, NUM_QUERIES_COST, windows)
        self.depth = depth
        self.biases = tuple(float(b) for b in biases)
        shape = (self.num_layers, self.kv, depth, len(self.biases))
        self.cost = torch.full(shape, float("nan"), dtype=torch.float64)
        self.below: list[list[int]] = []  # per layer: the layers a block could start at
        for layer in range(self.num_layers):
            chain, p = [], self.prev[layer]
            while p is not None and len(chain) < depth:
                chain.append(p)
                p = self.prev[p]
            self.below.append(chain)
            self.cost[layer, :, : len(chain)] = 0
        # per layer whose keys some block may start from: the last layer that reads them
        self.last_reader = {b: layer for layer, chain in enumerate(self.below) for b in chain}
        self._keys: dict[int, torch.Tensor] = {}
        self._resid: dict[int, torch.Tensor] = {}
        self._hooks: list = []

    def __enter__(self) -> BorrowCost:
        prefix = self.adapter.layer_prefix
        for layer in range(self.num_layers):
            mod = self.model.get_submodule(prefix.format(i=layer).rstrip("."))
            self._hooks.append(
                mod.register_forward_pre_hook(self._residual(layer), with_kwargs=True)
            )
        super().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        for h in self._hooks:
            h.remove()

    def _residual(self, layer: int):
        def hook(module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            self._resid[layer] = x[:, -self.num_queries :].detach()

        return hook

    def _out_weight(self, layer: int) -> torch.Tensor:
        """The output projection as (hidden, heads * head_dim), float32."""
        name = self.adapter.layer_prefix.format(i=layer) + self.adapter.o_proj
        w = self.model.get_submodule(name).weight.float()
        return w.T if self.adapter.transposed else w

    @torch.no_grad()
    def _layer(self, module, query, key, value, scaling, softcap) -> None:
        super()._layer(module, query, key, value, scaling, softcap)  # the similarity too
        layer = module.layer_idx
        if layer in self.last_reader:
            self._keys[layer] = key
        below = self.below[layer]
        if not below:
            return
        b, _, t, _ = key.shape
        nq = min(self.num_queries, t)
        q = query[:, :, -nq:].float()
        groups = q.shape[1] // self.kv
        qpos = torch.arange(t - nq, t, device=q.device)[:, None]
        kpos = torch.arange(t, device=q.device)[None, :]
        causal = kpos <= qpos
        distant = (kpos >= self.sink) & (qpos - kpos > self.recent)  # earlier than the window
        # the queries that see a distant token are the last n (positions >= sink + recent + 1)
        n = t - max(t - nq, self.sink + self.recent + 1)
        if n <= 0:
            return
        v = value.float().repeat_interleave(groups, dim=1)

        def scores(k: torch.Tensor) -> torch.Tensor:
            s = (q @ k.float().repeat_interleave(groups, dim=1).transpose(-1, -2)) * scaling
            return s if softcap is None else torch.tanh(s / softcap) * softcap

        own = scores(key)
        out = torch.softmax(own.masked_fill(~causal, float("-inf")), dim=-1) @ v
        w = self._out_weight(layer)
        resid = self._resid.pop(layer)[:, -n:].float().pow(2).sum(-1)  # (b, n)
        d = v.shape[-1]
        # the output projection's columns per KV head: (KV, groups * d, hidden)
        w = w.view(w.shape[0], self.kv, groups * d).permute(1, 2, 0)
        if self.cost.device != q.device:  # accumulate where the model runs (no sync per layer)
            self.cost = self.cost.to(q.device)

        def error(s: torch.Tensor) -> torch.Tensor:
            """Per KV head, the summed relative error of attention scored by ``s``."""
            delta = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1) @ v - out
            delta = delta[:, :, -n:].view(b, self.kv, groups, n, d).transpose(2, 3)
            err = (delta.reshape(b, self.kv, n, groups * d) @ w).pow(2).sum(-1)  # (b, KV, n)
            err = err / resid.clamp_min(1e-30)[:, None]
            return err.mean(-1).sum(0).double()

        for depth, bottom in enumerate(below):
            self._record(layer, depth, scores(self._keys[bottom]), own, distant, error)
        for old in [k for k in self._keys if self.last_reader[k] <= layer]:
            del self._keys[old]  # no later layer reads it

    def _record(self, layer, depth, bottom_scores, own, distant, error) -> None:
        """Add the cost of scoring distant tokens with the bottom's keys, once per bias."""
        for g, bias in enumerate(self.biases):
            scored = torch.where(distant, bottom_scores + bias if bias else bottom_scores, own)
            self.cost[layer, :, depth, g] += error(scored)

    def costs(self) -> tuple[np.ndarray, np.ndarray]:
        """(L, KV, depth) each, averaged over the calibration sequences: the cost with the
        cheapest bias, and that bias."""
        cost = (self.cost / max(self.count, 1)).cpu().numpy()
        pick = np.nan_to_num(cost, nan=np.inf).argmin(-1)
        return cost.min(-1), np.asarray(self.biases)[pick]


def borrow_cost(
    model: torch.nn.Module,
    adapter: AttentionAdapter,
    config: dict,
    tokens: torch.Tensor,
    sink: int,
    recent: int,
    batch_size: int,
    depth: int = DEPTH,
    progress: bool = True,
    windows: list[int | None] | None = None,
    biases: tuple[float, ...] = (0.0,),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From ``tokens``: cost[l, h, d - 1] (see ``BorrowCost``) with the cheapest of ``biases``,
    (L, KV, depth); that bias, same shape; and the similarity matrix ``layer_similarity``
    gives, measured in the same pass."""
    probe = BorrowCost(model, adapter, config, sink, recent, depth, windows, biases)
    run_probe(probe, tokens, batch_size, "borrowing cost", progress)
    cost, bias = probe.costs()
    return cost, bias, probe.result()
