"""A straightforward dense PoD reference built on the stock model's own modules.

Every layer computes full keys; an upper layer scores proximal keys (the first ``sink``
positions, and keys at most ``recent`` positions back) with its own keys and distant keys with
its block bottom's keys, in one softmax over all earlier tokens; values are its own. A
distant bias, where given, is added to the distant tokens' scaled scores.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


@torch.inference_mode()
def reference_logits(
    stock: torch.nn.Module,
    ids: torch.Tensor,
    pod_map: list[list[int]],
    sink: int,
    recent: int,
    distant_bias: list[list[float]] | None = None,
) -> torch.Tensor:
    m = stock.model
    batch, length = ids.shape
    pos = torch.arange(length)[None].expand(batch, -1)
    h = m.embed_tokens(ids)
    cos, sin = m.rotary_emb(h, pos)
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    proximal = (j < sink) | (i - j <= recent)
    causal = j <= i
    keys: list[torch.Tensor] = []
    for layer_idx, layer in enumerate(m.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        d = attn.head_dim
        q = attn.q_proj(x).view(batch, length, -1, d).transpose(1, 2)
        k = attn.k_proj(x).view(batch, length, -1, d).transpose(1, 2)
        v = attn.v_proj(x).view(batch, length, -1, d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        keys.append(k)
        groups = q.shape[1] // k.shape[1]
        heads = []
        for head in range(q.shape[1]):
            kv = head // groups
            bottom = keys[pod_map[layer_idx][kv]][:, kv]
            own = q[:, head] @ k[:, kv].transpose(-1, -2)
            far = q[:, head] @ bottom.transpose(-1, -2)
            bias = distant_bias[layer_idx][kv] if distant_bias else 0.0
            scores = torch.where(proximal, own * attn.scaling, far * attn.scaling + bias)
            scores = scores.masked_fill(~causal, float("-inf"))
            heads.append(scores.softmax(-1) @ v[:, kv])
        out = torch.stack(heads, dim=2).reshape(batch, length, -1)
        h = h + attn.o_proj(out)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return stock.lm_head(m.norm(h))
