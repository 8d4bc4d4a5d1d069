"""How alike consecutive layers attend to *distant* tokens, per KV head (PoD's layer signal).

For the last queries of each calibration sequence, each layer's attention is restricted to the
distant tokens (not among the first ``sink``, not within ``recent`` positions of the query) and
renormalised; the query heads reading a KV head are averaged. The similarity of layers l and
l + 1 for that head is 1 - JSD (base 2, so it lies in [0, 1]) of the two distributions,
averaged over queries and sequences.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ..arch import AttentionAdapter
from ..errors import KVConvertError

#: how many of the last positions of each calibration sequence act as queries
NUM_QUERIES = 32


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def jsd_bits(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (base 2) of distributions over the last dim."""
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor) -> torch.Tensor:
        return torch.where(a > 0, a * (a.clamp_min(1e-30).log2() - m.clamp_min(1e-30).log2()), 0)

    return 0.5 * (kl(p) + kl(q)).sum(-1)


class DistantAttention:
    """Forward hooks on every attention module; accumulates consecutive-layer similarity."""

    def __init__(
        self,
        model: torch.nn.Module,
        adapter: AttentionAdapter,
        config: dict,
        sink: int,
        recent: int,
        num_queries: int = NUM_QUERIES,
    ):
        if adapter.rope_layout not in ("rotate_half", None):
            raise KVConvertError(f"pod: RoPE layout {adapter.rope_layout!r} is not supported")
        self.model, self.adapter = model, adapter
        self.num_layers = adapter.num_layers(config)
        self.heads, self.kv = adapter.num_heads(config), adapter.num_kv_heads(config)
        self.head_dim = adapter.head_dim(config)
        self.rotary = adapter.rotary_dim(config)
        self.sink, self.recent, self.num_queries = sink, recent, num_queries
        self.total = torch.zeros(self.num_layers - 1, self.kv)
        self.count = 0
        self._prev: torch.Tensor | None = None
        self._handles = []

    def __enter__(self) -> DistantAttention:
        modules = dict(self.model.named_modules())
        for i in range(self.num_layers):
            name = self.adapter.module_name(i, "q").rsplit(".", 1)[0]
            hook = self._hook(i)
            self._handles.append(modules[name].register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        r = self.rotary
        if r == 0:
            return x
        rot = x[..., :r] * cos[:, None, :, :r] + _rotate_half(x[..., :r]) * sin[:, None, :, :r]
        return torch.cat([rot, x[..., r:]], dim=-1)

    def _hook(self, layer: int):
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            self._layer(layer, module, hidden, cos, sin)

        return hook

    @torch.no_grad()
    def _layer(self, layer: int, module, hidden, cos, sin) -> None:
        b, t, _ = hidden.shape
        nq = min(self.num_queries, t)
        d = self.head_dim
        q = module.q_proj(hidden[:, -nq:]).view(b, nq, self.heads, d).transpose(1, 2)
        k = module.k_proj(hidden).view(b, t, self.kv, d).transpose(1, 2)
        q = self._rope(q.float(), cos[:, -nq:].float(), sin[:, -nq:].float())
        k = self._rope(k.float(), cos.float(), sin.float())
        groups = self.heads // self.kv
        k = k.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-1, -2)) * d**-0.5  # (b, heads, nq, t)
        qpos = torch.arange(t - nq, t, device=q.device)[:, None]
        kpos = torch.arange(t, device=q.device)[None, :]
        distant = (kpos >= self.sink) & (qpos - kpos > self.recent)
        scores = scores.masked_fill(~distant, float("-inf"))
        has = distant.any(-1)  # queries that see any distant token
        probs = torch.softmax(scores[:, :, has], dim=-1)
        probs = probs.view(b, self.kv, groups, -1, t).mean(2)  # (b, kv, queries, t)
        if layer > 0 and self._prev is not None:
            jsd = jsd_bits(self._prev, probs).mean(dim=(0, 2))  # (kv,)
            if self.total.device != jsd.device:  # accumulate where the model runs
                self.total = self.total.to(jsd.device)
            self.total[layer - 1] += (1 - jsd).float() * b
        if layer == 0:
            self.count += b
        self._prev = probs

    def result(self) -> np.ndarray:
        """similarity[l, h]: layers l and l + 1, KV head h (shape (L - 1, KV))."""
        return (self.total / max(self.count, 1)).cpu().double().numpy()


@torch.inference_mode()
def layer_similarity(
    model: torch.nn.Module,
    adapter: AttentionAdapter,
    config: dict,
    tokens: torch.Tensor,
    sink: int,
    recent: int,
    batch_size: int,
    progress: bool = True,
) -> np.ndarray:
    """1 - JSD of consecutive layers' distant-token attention, (L - 1, KV), from ``tokens``."""
    if tokens.shape[1] <= sink + recent + 1:
        raise KVConvertError(
            f"seq_len: calibration sequences of {tokens.shape[1]} tokens have no distant tokens "
            f"with sink {sink} + recent {recent}; use --seq-len above {sink + recent + 1} or a "
            "smaller --recent"
        )
    device = next(model.parameters()).device
    with DistantAttention(model, adapter, config, sink, recent) as acc:
        n = (tokens.shape[0] + batch_size - 1) // batch_size
        for i in tqdm(range(n), desc="layer similarity", disable=not progress):
            batch = tokens[i * batch_size : (i + 1) * batch_size].to(device)
            model(input_ids=batch, use_cache=False)
    return acc.result()
