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
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..arch import AttentionAdapter
from ..errors import KVConvertError
from .layermap import links

#: how many of the last positions of each calibration sequence act as queries
NUM_QUERIES = 32


def jsd_bits(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (base 2) of distributions over the last dim."""
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor) -> torch.Tensor:
        return torch.where(a > 0, a * (a.clamp_min(1e-30).log2() - m.clamp_min(1e-30).log2()), 0)

    return 0.5 * (kl(p) + kl(q)).sum(-1)


PROBE = "kvconvert_distant_probe"


def _attend(module, query, key, value, mask, scaling, softcap, window) -> torch.Tensor:
    """The layer's real attention output, as the stock model computes it: SDPA, or the eager
    math when logits are soft-capped (Gemma 2, whose stock model refuses SDPA)."""
    if softcap is None:
        return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling)[0]
    groups = query.shape[1] // key.shape[1]
    key, value = (x.repeat_interleave(groups, dim=1) for x in (key, value))
    scores = query @ key.transpose(-1, -2) * scaling
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        t, s = query.shape[2], key.shape[2]
        qi = torch.arange(s - t, s, device=query.device)[:, None]
        ki = torch.arange(s, device=query.device)[None, :]
        mask = (ki <= qi) & ((qi - ki < window) if window else True)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return (probs @ value).transpose(1, 2).contiguous()


class DistantAttention:
    """Probes every attention layer of a stock model; accumulates consecutive-layer similarity.

    The model runs with a registered attention function (transformers' ``AttentionInterface``)
    that receives exactly what the stock attention computed: queries and keys after q/k norms
    and (partial) RoPE, the scaling (``query_pre_attn_scalar``...) and the soft-cap. It scores
    the last queries against the distant keys, then returns the layer's real output. Layers
    with a sliding window (``windows``) are skipped: they never share (see ``layermap.links``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        adapter: AttentionAdapter,
        config: dict,
        sink: int,
        recent: int,
        num_queries: int = NUM_QUERIES,
        windows: list[int | None] | None = None,
    ):
        self.model, self.adapter = model, adapter
        self.num_layers = adapter.num_layers(config)
        self.kv = adapter.num_kv_heads(config)
        self.prev = links(self.num_layers, windows)
        self.sink, self.recent, self.num_queries = sink, recent, num_queries
        self.total = torch.full((self.num_layers - 1, self.kv), float("nan"))
        for layer, p in enumerate(self.prev):
            if p is not None:
                self.total[layer - 1] = 0
        self.count = 0
        self._probs: dict[int, torch.Tensor] = {}

    def __enter__(self) -> DistantAttention:
        AttentionInterface.register(PROBE, self._attention)
        AttentionMaskInterface.register(PROBE, sdpa_mask)
        self._impl = self.model.config._attn_implementation
        self.model.set_attn_implementation(PROBE)
        return self

    def __exit__(self, *exc) -> None:
        self.model.set_attn_implementation(self._impl)

    def _attention(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        softcap, window = kwargs.get("softcap"), kwargs.get("sliding_window")
        if module.layer_idx == 0:
            self.count += query.shape[0]
        self._layer(module, query, key, value, scaling, softcap)
        out = _attend(module, query, key, value, attention_mask, scaling, softcap, window)
        return out, None

    @torch.no_grad()
    def _layer(self, module, query, key, value, scaling: float, softcap: float | None) -> None:
        layer = module.layer_idx
        linked = [p for p in self.prev if p is not None]
        if layer not in linked and self.prev[layer] is None:
            return  # neither a block bottom candidate nor a layer that may join one
        b, _, t, _ = key.shape
        nq = min(self.num_queries, t)
        q = query[:, :, -nq:].float()
        groups = q.shape[1] // self.kv
        k = key.float().repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-1, -2)) * scaling  # (b, heads, nq, t)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        qpos = torch.arange(t - nq, t, device=q.device)[:, None]
        kpos = torch.arange(t, device=q.device)[None, :]
        distant = (kpos >= self.sink) & (qpos - kpos > self.recent)
        scores = scores.masked_fill(~distant, float("-inf"))
        has = distant.any(-1)  # queries that see any distant token
        probs = torch.softmax(scores[:, :, has], dim=-1)
        probs = probs.view(b, self.kv, groups, -1, t).mean(2)  # (b, kv, queries, t)
        p = self.prev[layer]
        if p is not None and p in self._probs:
            jsd = jsd_bits(self._probs.pop(p), probs).mean(dim=(0, 2))  # (kv,)
            if self.total.device != jsd.device:  # accumulate where the model runs
                self.total = self.total.to(jsd.device)
            self.total[layer - 1] += (1 - jsd).float() * b
        self._probs = {layer: probs}  # only the latest full layer is ever needed next

    def result(self) -> np.ndarray:
        """similarity[l - 1, h]: layer l and the layer whose block it may join
        (``links``; l - 1 without sliding layers), KV head h; NaN where l may join none."""
        return (self.total / max(self.count, 1)).cpu().double().numpy()


@torch.inference_mode()
def run_probe(
    probe: DistantAttention, tokens: torch.Tensor, batch_size: int, desc: str, progress: bool
) -> DistantAttention:
    """Push ``tokens`` through the probe's model in batches, the probe registered."""
    if tokens.shape[1] <= probe.sink + probe.recent + 1:
        raise KVConvertError(
            f"seq_len: calibration sequences of {tokens.shape[1]} tokens have no distant tokens "
            f"with sink {probe.sink} + recent {probe.recent}; use --seq-len above "
            f"{probe.sink + probe.recent + 1} or a smaller --recent"
        )
    device = next(probe.model.parameters()).device
    with probe:
        n = (tokens.shape[0] + batch_size - 1) // batch_size
        for i in tqdm(range(n), desc=desc, disable=not progress):
            batch = tokens[i * batch_size : (i + 1) * batch_size].to(device)
            probe.model(input_ids=batch, use_cache=False)
    return probe


def layer_similarity(
    model: torch.nn.Module,
    adapter: AttentionAdapter,
    config: dict,
    tokens: torch.Tensor,
    sink: int,
    recent: int,
    batch_size: int,
    progress: bool = True,
    windows: list[int | None] | None = None,
) -> np.ndarray:
    """1 - JSD of consecutive layers' distant-token attention, (L - 1, KV), from ``tokens``."""
    probe = DistantAttention(model, adapter, config, sink, recent, windows=windows)
    return run_probe(probe, tokens, batch_size, "layer similarity", progress).result()
