"""PoD: proximal tokens over distant tokens, with layer key sharing, on the stock classes.

Each query splits the keys before it into *proximal* ones (the first ``pod_sink`` tokens and
the ``pod_recent`` tokens just before it) and *distant* ones (all others). Within a block of
consecutive layers (per KV head, ``config.pod_map``) an upper layer scores proximal tokens with
its own keys and distant tokens with the block bottom's keys, in one softmax; values are always
its own. So the cache really holds less: a block bottom keeps all its keys, an upper layer
keeps keys only for the sink and a rolling recent window, every layer keeps all its values.
The split is relative to each query's position, so prefill and cached decoding agree.

Every model here is a stock transformers ``*ForCausalLM`` whose attention modules run the
stock attention forward (fused qkv, q/k norms, partial rotary, soft-capping, GPT-NeoX's
parallel residual, OPT's learned positions all stay the stock code's). Only the attention
function differs: the stock forward stores its keys and values in the ``PodCache`` below and
then calls ``pod_attention``, registered with transformers' public ``AttentionInterface``.
That function reads every key where the cache stores it: an upper layer's distant part from
the block bottom's keys (a view, no copy), its proximal part from its own window, each part
returning its log-sum-exp, and the parts merged exactly as one softmax would weigh them. A
prefill runs in query chunks, so no (queries x keys) tensor is built for a whole sequence and
the cache holds no masks. A checkpoint may also carry ``pod_distant_bias``: per borrowing
head, a number added to its distant tokens' logits (it shifts the distant part's
log-sum-exp). Eager and SDPA attention, as the user picks them; reads top to bottom: one
attention part, the cache, the attention function, the mixins.

This file names no architecture: each output also carries the pair of classes of its own,
``modeling_kvconvert_pod_<arch>.py`` (``_llama`` for the Llama layout), which adds these
mixins to the stock classes, so that an output imports only its own architecture's
transformers module.
"""

import copy
import dataclasses
import functools
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

from .configuration_kvconvert_pod import sliding_windows

# transformers 5.24 renamed the cache argument and output field ``past_key_values`` to
# ``cache`` (in every stock class and the mask builders at once): read the installed names
# from the public signatures, accept both from callers, pass on the one the stock classes take.
CACHE_ARG = (
    "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
)
CACHE_FIELD = (
    "cache"
    if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)}
    else "past_key_values"
)

#: a longer prefill runs through the whole model in pieces of this many tokens, each attending
#: to the cache the earlier ones filled, so its activations (MLP, projections) are those of one
#: piece, not of the whole prompt
PREFILL = 1024
#: queries per chunk of a layer's attention: the masks and scores of one chunk are (chunk x keys)
CHUNK = 512
#: queries per piece of a chunk's recent-window part (a band: each sees recent + 1 keys)
NEAR = 64
#: decoding: fewest keys per piece when a single head's distant keys are cut for threads
PIECE = 2048
#: at most this many attention scores in one chunk of the math path (64 MiB in float32)
MATH_SCORES = 1 << 24


def pick_cache(past_key_values: Cache | None, kwargs: dict) -> Cache | None:
    """The cache a caller passed, under either name (the new one is removed from kwargs)."""
    cache = kwargs.pop("cache", None)
    return cache if cache is not None else past_key_values


# --- one attention part -------------------------------------------------------------------------
def _cpu_flash_with_lse():
    """torch's CPU flash-attention operator, which returns the log-sum-exp next to the output.

    It is private (``torch.ops.aten``): where a torch build lacks it, or on other devices, the
    math path below computes the same numbers with public operators.
    """
    try:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    except (AttributeError, RuntimeError):
        return None


CPU_FLASH = _cpu_flash_with_lse()


def fused_lse(query: torch.Tensor, backend: str, softcap: float | None) -> bool:
    """Whether a part's log-sum-exp can come from ``CPU_FLASH``: sdpa chosen, no soft-capping
    (no fused kernel does it), on the CPU, and no gradient wanted (the operator's lse has none,
    and ``kvconvert heal`` trains through this code). Else the math path gives it."""
    return (
        backend == "sdpa"
        and softcap is None
        and CPU_FLASH is not None
        and query.device.type == "cpu"
        and not (torch.is_grad_enabled() and query.requires_grad)
    )


_MAJOR_MINOR = tuple(int(p) for p in torch.__version__.split(".")[:2])
SDPA_GQA = _MAJOR_MINOR >= (2, 5)  # ``enable_gqa`` of scaled_dot_product_attention


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    backend: str,
    softcap: float | None = None,
    dropout: float = 0.0,
    lse: bool = True,
    causal: bool = False,
    fold: bool = True,
    band: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of ``query`` (batch, kv * g, q, d) over ``key``/``value`` (batch, kv, k, d).

    ``mask``: boolean (batch or 1, 1, q, k), True = may attend, or None (all keys);
    ``causal``: query i sees keys 0..i (no mask). Returns the output (batch, kv * g, q, d) and,
    with ``lse``, the log-sum-exp of the scaled (soft-capped) logits (batch, kv * g, q) in
    float32, -inf where a row has no key. The g query heads of a KV head are folded into its
    query rows, so the keys are not repeated per query head; a causal part, or a masked one
    with ``fold=False`` (a few keys, where folding would repeat a long mask instead), repeats
    them. ``backend`` "eager" is the stock eager arithmetic (soft-capping, float32 softmax);
    "sdpa" uses torch's fused kernels where they give what is needed. ``band``: in place of
    ``mask``, on the fused path only, an additive mask already laid out for the folded rows
    (1, 1, g * q, k) (``PodCache.band``: made once per forward, not per call).
    """
    b, hq, q, _ = query.shape
    kv = key.shape[1]
    g = hq // kv
    if softcap is not None:  # no fused kernel soft-caps: the math path, under sdpa too
        backend = "eager"
    if backend == "sdpa" and not lse:
        extra = {}
        if g > 1 and SDPA_GQA:
            extra = {"enable_gqa": True}
        elif g > 1:
            key, value = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=mask,
            dropout_p=dropout,
            is_causal=causal,
            scale=scale,
            **extra,
        )
        return out, None
    fused = fused_lse(query, backend, softcap)
    empty = None if mask is None or not fused else ~mask.any(-1)  # rows without a key
    if causal or (mask is not None and not fold):
        if g > 1:
            key, value = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
        rows = query
    else:
        rows = query.reshape(b, kv, g * q, query.shape[-1])
        if mask is not None:
            k = key.shape[2]
            mask = mask.expand(mask.shape[0], g, q, k).reshape(mask.shape[0], 1, g * q, k)
    if fused:
        bias = band
        if mask is not None:
            zero = torch.zeros((), dtype=query.dtype, device=query.device)
            bias = torch.where(mask, zero, float("-inf"))
        try:
            out, row_lse = CPU_FLASH(rows, key, value, dropout, causal, attn_mask=bias, scale=scale)
        except (RuntimeError, TypeError):  # a torch whose private operator differs: math
            fused = False
            if band is not None:
                mask = band == 0
    if not fused:  # math: the stock eager arithmetic, with the log-sum-exp kept
        if causal:
            mask = torch.ones(q, key.shape[2], dtype=torch.bool, device=query.device).tril()
        scores = torch.matmul(rows, key.transpose(-1, -2)) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        scores = scores.float()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)
        finite = row_lse.masked_fill(row_lse == float("-inf"), 0.0)
        probs = torch.exp(scores - finite[..., None]).to(value.dtype)
        probs = F.dropout(probs, p=dropout, training=dropout > 0)
        out = torch.matmul(probs, value)
    out, row_lse = out.reshape(b, hq, q, -1), row_lse.reshape(b, hq, q)
    if fused and empty is not None:  # the operator reports 0 for a row without keys
        row_lse = row_lse.masked_fill(empty, float("-inf"))
    return out, row_lse


def attend_pieces(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """``attend`` for one decoding query per row over one KV head's many keys, on the fused
    CPU kernel: the keys are cut into as many pieces as torch has threads, each a head of its
    own (a view, no copy), so that the kernel runs them in parallel. Returns one (output, lse)
    part per piece, for ``merge``; None where that does not apply."""
    b, g, q, d = query.shape
    pieces = min(torch.get_num_threads(), key.shape[2] // PIECE)
    if not fused_lse(query, "sdpa", None) or q != 1 or key.shape[1] != 1 or pieces < 2:
        return None
    size = key.shape[2] // pieces
    end = size * pieces
    keys = key[:, :, :end].reshape(b, pieces, size, d)
    vals = value[:, :, :end].reshape(b, pieces, size, value.shape[-1])
    rows = query.reshape(b, 1, g, d).expand(b, pieces, g, d).contiguous()
    try:
        out, lse = CPU_FLASH(rows, keys, vals, 0.0, False, scale=scale)  # (b, pieces, g, ...)
    except (RuntimeError, TypeError):  # a torch whose private operator differs
        return None
    parts = [(out[:, i].reshape(b, g, 1, -1), lse[:, i].reshape(b, g, 1)) for i in range(pieces)]
    if end < key.shape[2]:
        parts.append(attend(query, key[:, :, end:], value[:, :, end:], None, scale, "sdpa"))
    return parts


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """One softmax over the union of the parts' keys, from each part's output and lse (a
    part's weight is its share of the total exp-sum; a part without keys weighs 0)."""
    if len(parts) == 1:
        return parts[0][0]
    lses = torch.stack([lse for _, lse in parts])
    shares = torch.exp(lses - lses.amax(dim=0))
    weights = (shares / shares.sum(dim=0))[..., None]
    outs = torch.stack([o for o, _ in parts]).float()
    return (outs * weights).sum(dim=0).to(parts[0][0].dtype)


def spans_of(t: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """Slots ``spans`` (ascending) of ``t`` along the token axis: a view where they are one
    range, else a small copy."""
    merged: list[list[int]] = []
    for a, b in spans:
        if b <= a:
            continue
        if merged and merged[-1][1] == a:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    pieces = [t[:, :, a:b] for a, b in merged]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)


@functools.lru_cache(maxsize=256)
def head_shift(shift: tuple[float, ...], g: int, device: torch.device) -> torch.Tensor:
    """Per KV head biases as (1, kv * g, 1), for the query rows of a part's log-sum-exp; made
    once per device, not at every forward."""
    with torch.inference_mode(False):  # usable in and out of inference mode alike
        per_kv = torch.tensor(shift, dtype=torch.float32, device=device)
        return per_kv.repeat_interleave(g)[None, :, None]


# --- cache ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class HeadRun:
    """Consecutive KV heads [start, stop) of a layer whose keys live in the same places.

    ``own``: where their own keys are, ("keys" | "window", first index): all tokens in the
    layer's ``keys``, or only the window slots in its ``window_keys``. ``bottom``: None when
    they keep their own keys; else (layer, first index) of their distant keys in that layer's
    ``keys``.
    """

    start: int
    stop: int
    own: tuple[str, int]
    bottom: tuple[int, int] | None


def head_runs(pod_map: list[list[int]], layer_idx: int) -> list[HeadRun]:
    sources = pod_map[layer_idx]
    owned_by = {s: [h for h, b in enumerate(pod_map[s]) if b == s] for s in set(sources)}
    borrowing = [h for h, b in enumerate(sources) if b != layer_idx]
    runs: list[HeadRun] = []
    for h, src in enumerate(sources):
        mine = src == layer_idx
        own = ("keys", owned_by[layer_idx].index(h)) if mine else ("window", borrowing.index(h))
        bottom = None if mine else (src, owned_by[src].index(h))
        last = runs[-1] if runs else None
        if (
            last is not None
            and last.own[0] == own[0]
            and last.own[1] + (last.stop - last.start) == own[1]
            and (last.bottom is None) == (bottom is None)
            and (
                bottom is None
                or (
                    last.bottom[0] == bottom[0]
                    and last.bottom[1] + (last.stop - last.start) == bottom[1]
                )
            )
        ):
            runs[-1] = dataclasses.replace(last, stop=h + 1)
        else:
            runs.append(HeadRun(h, h + 1, own, bottom))
    return runs


def first_fill(new: torch.Tensor) -> torch.Tensor:
    """What an empty cache holds of its first tokens: ``new`` itself when it is all of its
    memory (no copy of a whole prefill), else a copy, so that a view into a larger buffer (a
    fused projection's output, say) does not keep the buffer alive."""
    return (
        new if new.untyped_storage().nbytes() == new.numel() * new.element_size() else new.clone()
    )


class PodCacheLayer(CacheLayerMixin):
    """One layer's cache: full keys of the heads it owns, windowed keys of the heads it borrows.

    ``keys``: (batch, owned heads, tokens, head_dim), every token. ``window_keys``: (batch,
    borrowing heads, kept, head_dim), only the slots in ``PodCache.window_slots`` (sink and
    recent window; after the layer's attention, evicted down to ``PodCache.kept_slots``).
    ``values``: (batch, all KV heads, tokens, head_dim), every token.
    """

    is_sliding = False
    is_croppable = False

    def __init__(self, pod_map: list[list[int]], layer_idx: int):
        super().__init__()
        sources = pod_map[layer_idx]
        self.owned = [h for h, b in enumerate(sources) if b == layer_idx]
        self.borrowing = [h for h, b in enumerate(sources) if b != layer_idx]
        self.window_keys: torch.Tensor | None = None
        self.runs = head_runs(pod_map, layer_idx)
        #: per name ("keys", "values"): the buffer the tensor is a view of, with spare room
        self.room: dict[str, torch.Tensor] = {}
        #: per name ("keys", "values", "window"): where a prefill's tokens go (``reserve``)
        self.reserved: dict[str, torch.Tensor] = {}

    def reserve(
        self, new_keys: torch.Tensor, new_values: torch.Tensor, tokens: int, kept: int
    ) -> None:
        """Allocate what a prefill of ``tokens`` into this empty layer will hold, shaped after
        the first layer's new keys and values (batch, heads, new tokens, head_dim): owned keys
        and values of every token, and the borrowing heads' ``kept`` window slots. A prefill
        in pieces fills the keys and values piece by piece (``grow``)."""
        b, _, _, d = new_keys.shape
        dv, n = new_values.shape[-1], len(self.owned) + len(self.borrowing)
        like = {"dtype": new_keys.dtype, "device": new_keys.device}
        self.reserved = {"values": torch.empty(b, n, tokens, dv, **like)}
        if self.owned:
            self.reserved["keys"] = torch.empty(b, len(self.owned), tokens, d, **like)
        if self.borrowing and kept:
            self.reserved["window"] = torch.empty(b, len(self.borrowing), kept, d, **like)

    def reserved_for(self, name: str, new: torch.Tensor) -> torch.Tensor | None:
        """The buffer reserved under ``name`` (taken out of ``reserved``) if ``new`` fits in it:
        same dtype and shape but for at least as many tokens."""
        buf = self.reserved.pop(name, None)
        fits = (
            buf is not None
            and buf.dtype == new.dtype
            and buf.shape[2] >= new.shape[2]
            and buf.shape[:2] + buf.shape[3:] == new.shape[:2] + new.shape[3:]
        )
        return buf if fits else None

    def into_reserved(self, name: str, new: torch.Tensor) -> torch.Tensor | None:
        """``new`` copied into the buffer reserved for it, if one of its shape is."""
        buf = self.reserved_for(name, new)
        return buf.copy_(new) if buf is not None and buf.shape == new.shape else None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, _, _, d = key_states.shape
        self.keys = key_states.new_zeros(b, len(self.owned), 0, d)
        self.window_keys = key_states.new_zeros(b, len(self.borrowing), 0, d)
        self.values = value_states.new_zeros(b, value_states.shape[1], 0, value_states.shape[-1])
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, expect: int = 0, **kwargs
    ):
        """Append new tokens: owned heads' keys, borrowing heads' keys (window), all values.
        ``expect``: the tokens held once a prefill in pieces ends (0: not in pieces)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.owned:
            new = key_states if not self.borrowing else key_states[:, self.owned]
            self.keys = self.grow("keys", new, expect)
        if self.borrowing:
            new = key_states if not self.owned else key_states[:, self.borrowing]
            held = self.window_keys
            empty = held.shape[2] == 0
            self.window_keys = first_fill(new) if empty else torch.cat([held, new], dim=-2)
        self.values = self.grow("values", value_states, expect)
        return self.keys, self.values

    def grow(self, name: str, new: torch.Tensor, expect: int = 0) -> torch.Tensor:
        """``keys`` or ``values`` with ``new`` appended along the token axis.

        A prefill into an empty cache is kept as it is (no copy) or copied into what
        ``reserve`` allocated for it; a prefill in pieces fills that buffer piece by piece
        (``PodCausalLMMixin.forward``; onto a filled cache, room is made once for the
        ``expect`` tokens it will hold). Decoding writes into spare
        room at the end of a buffer (``room``), about 1% of the tokens held, so that a step
        does not copy every earlier token, as ``torch.cat`` would; the cache then holds at
        most that 1% more than its tokens."""
        held, room = getattr(self, name), self.room.get(name)
        t, q = held.shape[2], new.shape[2]
        if t == 0:
            self.room.pop(name, None)
            buf = self.reserved_for(name, new)
            if buf is None:
                return first_fill(new)
            if buf.shape[2] == q:
                return buf.copy_(new)
            self.room[name] = room = buf  # the first piece of a prefill in pieces
        frozen = room is not None and room.is_inference() and not torch.is_inference_mode_enabled()
        if room is None or frozen or t + q > room.shape[2]:
            size = max(t + q + max(16, (t + q) // 128), expect)  # pieces: room for all
            room = held.new_empty(*held.shape[:2], size, held.shape[3])
            room[:, :, :t] = held
            self.room[name] = room
        room[:, :, t : t + q] = new
        return room[:, :, : t + q]

    def evict(self, keep: torch.Tensor | None) -> None:
        """Keep only the window slots that a later query can still see as proximal."""
        if self.borrowing and keep is not None and keep.numel() < self.window_keys.shape[2]:
            self.window_keys = self.window_keys.index_select(2, keep)

    def cached_tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor this layer holds (for measuring the cache's bytes)."""
        if not self.is_initialized:
            return ()
        return (self.keys, self.window_keys, self.values)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return 0 if not self.is_initialized else self.values.shape[-2]

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.window_keys = None
        self.room, self.reserved = {}, {}
        self.is_initialized = False

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.room = {}
        if self.is_initialized:
            self.keys, self.window_keys, self.values = (
                fn(self.keys),
                fn(self.window_keys),
                fn(self.values),
            )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices, ...])


class PodCache(Cache):
    """The cache of a PoD model: per-layer ``PodCacheLayer`` plus the token bookkeeping.

    ``positions`` and ``valid`` (batch, tokens) record each cached slot's position id and
    whether it is a real token (not padding); ``kept_slots`` are the slots whose keys upper
    layers still hold. ``begin`` is called once per forward, before the layers run; each
    layer's ``attend`` then reads the keys in place. ``aligned`` (every slot a real token at
    position = slot, as without padding) lets ``attend`` cut the keys by slot arithmetic
    instead of per-row masks.
    """

    def __init__(self, config, windows: list[int | None], stock_sliding: bool = True):
        # ``windows[i]``: layer i's sliding window (None: full attention). With
        # ``stock_sliding`` a sliding layer keeps the stock sliding cache (it never shares keys,
        # so it holds only its window, as the stock cache does); without, it is a PoD layer
        # like the others and its window lives in its mask only.
        self.windows = windows
        layers = [
            DynamicSlidingWindowLayer(w)
            if w is not None and stock_sliding
            else PodCacheLayer(config.pod_map, i)
            for i, w in enumerate(windows)
        ]
        super().__init__(layers=layers)
        self.sink, self.recent = config.pod_sink, config.pod_recent
        self.backend = "sdpa"
        self.positions: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.kept_slots: torch.Tensor | None = None
        self.window_slots: torch.Tensor | None = None
        self.keep: torch.Tensor | None = None
        self.aligned = True
        self.past = self.length = 0
        self.reserve_pending = False
        #: tokens a prefill in pieces will have cached after its last piece (0: not in pieces)
        self.prefill_total = 0
        #: this forward's band masks (``band``)
        self.bands: dict[tuple, torch.Tensor] = {}

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def begin(self, position_ids: torch.Tensor, padding_mask: torch.Tensor | None) -> None:
        """Record the new tokens. While ``aligned``, nothing but their count: slots, positions
        and the window follow from it. Otherwise ``positions``/``valid`` grow, and
        ``window_slots`` (slots whose own keys this forward sees) and ``keep`` (which of them
        stay in the window after it) are set."""
        past = self.get_seq_length()
        batch, q = position_ids.shape
        device = position_ids.device
        total = past + q
        if padding_mask is not None and padding_mask.shape[1] not in (total, q):
            raise ValueError(
                f"attention_mask covers {padding_mask.shape[1]} tokens; expected {total} "
                f"(cached + new) or {q} (new)"
            )
        self.past, self.length = past, total
        self.reserve_pending = past == 0 and q > 1 and not torch.is_grad_enabled()
        new = torch.arange(past, total, device=device)
        if self.aligned:  # one host sync per forward
            real = padding_mask is None or bool(padding_mask[:, -q:].all())
            if real and bool((position_ids == new).all()):
                return
            self.aligned = False
            # the bookkeeping the earlier, aligned tokens imply
            self.positions = torch.arange(past, device=device).expand(batch, past)
            self.valid = torch.ones(batch, past, dtype=torch.bool, device=device)
            kept = self.kept_spans(past)
            self.kept_slots = torch.cat([torch.arange(x, y, device=device) for x, y in kept])
        if padding_mask is None:
            valid = torch.ones(batch, q, dtype=torch.bool, device=device)
        else:
            valid = padding_mask[:, -total:].to(device=device, dtype=torch.bool)
        self.positions = torch.cat([self.positions, position_ids], dim=1)
        if valid.shape[1] == q:  # the mask covers only the new tokens
            valid = torch.cat([self.valid, valid], dim=1)
        self.valid = valid
        self.window_slots = torch.cat([self.kept_slots, new])
        pos, ok = self.positions[:, self.window_slots], self.valid[:, self.window_slots]
        is_sink = (ok & (pos < self.sink)).any(dim=0)
        is_recent = self.window_slots >= total - self.recent
        self.keep = torch.nonzero(is_sink | is_recent).flatten()
        self.kept_slots = self.window_slots[self.keep]

    def end(self) -> None:
        """After a forward: drop what only its layers needed."""
        self.window_slots = self.keep = None
        self.reserve_pending = False
        self.bands = {}
        for layer in self.layers:
            if isinstance(layer, PodCacheLayer):
                layer.reserved.clear()

    def kept_spans(self, total: int) -> list[tuple[int, int]]:
        """Aligned: the slots an upper layer's window keeps after ``total`` tokens (sink and
        recent window), as slot ranges."""
        recent_from = max(0, total - self.recent)
        return [(0, min(self.sink, recent_from)), (recent_from, total)]

    def window_index(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """Aligned: where the slots [0, min(sink, lo)) and [lo, hi) are in this forward's
        window, which holds the slots kept after ``past`` tokens and then the new ones."""
        (_, head), (start, _) = self.kept_spans(self.past)
        return [(0, min(self.sink, lo)), (head + lo - start, head + hi - start)]

    def evict(self, layer: "PodCacheLayer") -> None:
        """After a layer's attention: keep only the window slots a later query can still see
        as proximal (a copy, so that the dropped keys' memory is freed)."""
        if not layer.borrowing:
            return
        if not self.aligned:
            layer.evict(self.keep)
            return
        old = layer.window_keys
        kept = spans_of(old, self.window_index(max(0, self.length - self.recent), self.length))
        if kept.shape[2] < old.shape[2]:
            same = kept.untyped_storage().data_ptr() == old.untyped_storage().data_ptr()
            into = layer.into_reserved("window", kept)
            layer.window_keys = into if into is not None else kept.clone() if same else kept
        layer.reserved.clear()

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Store a layer's new tokens; return what the layer holds (``attend`` reads it).

        The first update of a prefill into an empty cache (without gradients) allocates what
        every layer will hold, before any layer's attention runs: allocated one by one between
        each layer's temporaries, the cache's tensors would pin the freed temporaries around
        them in the heap (on a CPU with glibc, about 10% more peak resident memory for a
        2048-token prefill; docs/pod.md)."""
        if self.reserve_pending:
            self.reserve_pending = False
            tokens = max(self.length, self.prefill_total)
            kept = sum(b - a for a, b in self.kept_spans(self.length)) if self.aligned else 0
            kept = kept if kept < self.length else 0  # a window evicts nothing: none reserved
            kept = kept if tokens == self.length else 0  # in pieces a window stays small
            for layer in self.layers:
                if isinstance(layer, PodCacheLayer) and not layer.is_initialized:
                    layer.reserve(key_states, value_states, tokens, kept)
        layer = self.layers[layer_idx]
        if isinstance(layer, PodCacheLayer):
            return layer.update(key_states, value_states, expect=self.prefill_total)
        return layer.update(key_states, value_states)

    # -- attention --------------------------------------------------------------------------
    def attend(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scale: float,
        softcap: float | None = None,
        dropout: float = 0.0,
        bias: tuple[float, ...] | None = None,
    ) -> torch.Tensor:
        """The layer's attention output (batch, queries, heads, head_dim), from the keys where
        the cache holds them; ``key``/``value`` are what ``update`` returned (used as they are
        by a stock sliding layer). Each run of heads writes its rows into the one output
        tensor. Evicts the layer's window afterwards."""
        layer = self.layers[layer_idx]
        window = self.windows[layer_idx]
        b, heads, q, _ = query.shape
        total = self.get_seq_length()
        if window is not None and window >= total and isinstance(layer, PodCacheLayer):
            window = None  # every key is inside the window: no mask needed
        result = query.new_empty(b, q, heads, value.shape[-1])
        if not isinstance(layer, PodCacheLayer):  # stock sliding: the last few tokens only
            first = total - key.shape[2]
            self._plain(result, query, key, value, first, window, scale, softcap, dropout)
            return result
        g = heads // (len(layer.owned) + len(layer.borrowing))
        for run in layer.runs:
            rows = query[:, run.start * g : run.stop * g]
            dest = result[:, :, run.start * g : run.stop * g]
            values = layer.values[:, run.start : run.stop]
            n = run.stop - run.start
            where, i = run.own
            own = (layer.keys if where == "keys" else layer.window_keys)[:, i : i + n]
            if run.bottom is None:
                self._plain(dest, rows, own, values, 0, window, scale, softcap, dropout)
            else:
                src, j = run.bottom
                far = self.layers[src].keys[:, j : j + n]
                shift = None if bias is None else bias[run.start : run.stop]
                args = (window, scale, softcap, dropout, shift)
                self._split(dest, rows, own, far, values, *args)
        self.evict(layer)
        return result

    def band(self, g: int, n: int, like: torch.Tensor) -> torch.Tensor:
        """The additive mask of ``n`` queries over the ``recent + n`` keys just before and at
        them, past the sink: query i sees keys i..i + recent. Laid out for ``g`` folded query
        heads (1, 1, g * n, recent + n); made once per forward and shape (``end`` drops it)."""
        key = (g, n, like.dtype, like.device)
        if key not in self.bands:
            i = torch.arange(n, device=like.device)[:, None]
            j = torch.arange(n + self.recent, device=like.device)[None, :]
            bias = torch.zeros(n, n + self.recent, dtype=like.dtype, device=like.device)
            bias.masked_fill_((j < i) | (j > i + self.recent), float("-inf"))
            self.bands[key] = bias.expand(g, *bias.shape).reshape(1, 1, g * n, -1)
        return self.bands[key]

    def _chunks(self, query: torch.Tensor, math: bool) -> list[tuple[int, int]]:
        """Slot ranges [s0, s1) of the new tokens, a chunk of queries each."""
        b, heads, q, _ = query.shape
        total = self.get_seq_length()
        size = CHUNK if not math else max(1, min(CHUNK, MATH_SCORES // (b * heads * total)))
        past = total - q
        return [(past + i, past + min(q, i + size)) for i in range(0, q, size)]

    def _masks(
        self, s0: int, s1: int, kslots: torch.Tensor, window: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For queries at slots [s0, s1) and keys at ``kslots``, (batch, 1, queries, keys):
        ``allowed`` (earlier or itself, a real token, inside a sliding window; a query always
        sees itself, so no row is empty) and ``proximal`` (sink or recent, by position)."""
        qslots = torch.arange(s0, s1, device=kslots.device)[:, None]
        allowed = (kslots[None, :] <= qslots)[None]
        if not self.aligned:  # else every slot is a real token at position = slot
            allowed = allowed & self.valid[:, None, kslots]
        if window is not None:
            allowed &= (qslots - kslots[None, :] < window)[None]
        allowed |= (kslots[None, :] == qslots)[None]
        if self.aligned:
            q_pos, k_pos = qslots[None], kslots[None, None, :]
        else:
            q_pos, k_pos = self.positions[:, s0:s1, None], self.positions[:, None, kslots]
        proximal = (k_pos < self.sink) | (q_pos - k_pos <= self.recent)
        return allowed[:, None], proximal[:, None]

    def _plain(
        self,
        dest: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        first_slot: int,
        window: int | None,
        scale: float,
        softcap: float | None,
        dropout: float,
    ) -> None:
        """Ordinary causal attention over a layer's own keys, which hold slots
        [``first_slot``, total), written into ``dest`` (batch, queries, heads, head_dim)."""
        q = query.shape[2]
        total = self.get_seq_length()
        past = total - q
        backend = self.backend
        if self.aligned and window is None and first_slot == 0:
            whole = None
            if q == 1:  # decoding: every key
                whole = attend(query, key, value, None, scale, backend, softcap, dropout, False)
            elif past == 0 and backend == "sdpa" and softcap is None:  # the fused causal kernel
                whole = attend(query, key, value, None, scale, backend, None, dropout, False, True)
            if whole is not None:
                dest.copy_(whole[0].transpose(1, 2))
                return
            if fused_lse(query, backend, softcap):  # a later piece of a prefill: no masks
                for s0, s1 in self._chunks(query, False):
                    rows = query[:, :, s0 - past : s1 - past]
                    square = key[:, :, s0:s1], value[:, :, s0:s1]
                    parts = [attend(rows, *square, None, scale, backend, None, dropout, True, True)]
                    earlier = key[:, :, :s0], value[:, :, :s0]  # every query sees all of these
                    parts.append(attend(rows, *earlier, None, scale, backend, None, dropout))
                    dest[:, s0 - past : s1 - past] = merge(parts).transpose(1, 2)
                return
        for s0, s1 in self._chunks(query, backend == "eager" or softcap is not None):
            k0 = max(first_slot, 0 if window is None else s0 - window + 1)
            kslots = torch.arange(k0, s1, device=query.device)
            allowed, _ = self._masks(s0, s1, kslots, window)
            rows = query[:, :, s0 - past : s1 - past]
            keys, vals = (
                key[:, :, k0 - first_slot : s1 - first_slot],
                value[:, :, k0 - first_slot : s1 - first_slot],
            )
            out = attend(rows, keys, vals, allowed, scale, backend, softcap, dropout, False)[0]
            dest[:, s0 - past : s1 - past] = out.transpose(1, 2)

    def _split(
        self,
        dest: torch.Tensor,
        query: torch.Tensor,
        window_keys: torch.Tensor,
        far: torch.Tensor,
        values: torch.Tensor,
        window: int | None,
        scale: float,
        softcap: float | None,
        dropout: float,
        shift: tuple[float, ...] | None,
    ) -> None:
        """Attention of heads that borrow, written into ``dest`` (batch, queries, heads,
        head_dim): distant keys from ``far`` (the block bottom's keys,
        every slot), proximal keys from ``window_keys`` (the slots in ``window_slots``), their
        own ``values`` for both; one log-sum-exp merge, ``shift`` added to the distant parts."""
        q = query.shape[2]
        total = self.get_seq_length()
        past = total - q
        backend, sink, recent = self.backend, self.sink, self.recent
        device = query.device
        math = not fused_lse(query, backend, softcap)
        g = query.shape[1] // far.shape[1]
        bias = None if shift is None or not any(shift) else head_shift(shift, g, device)

        def add(rows, keys, vals, mask, distant, causal=False, fold=True, into=None, band=None):
            """Append the part(s) of these keys to ``into`` (default: ``parts``)."""
            into = parts if into is None else into
            done = None
            if distant and mask is None and not causal and not math:
                done = attend_pieces(rows, keys, vals, scale)  # decoding over many keys
            how = (backend, softcap, dropout, True, causal, fold, band)
            for out, lse in done or [attend(rows, keys, vals, mask, scale, *how)]:
                into.append((out, lse + bias) if distant and bias is not None else (out, lse))

        for s0, s1 in self._chunks(query, math):
            rows = query[:, :, s0 - past : s1 - past]
            qslots = torch.arange(s0, s1, device=device)[:, None] if s1 - s0 > 1 else None
            parts = []
            if self.aligned and window is None:
                # distant: sink <= j <= s - recent - 1 for the query at slot s. Every query of
                # the chunk sees [sink, b0); the band [b0, e) after it is causal when square
                # (one query, decoding: no band, it sees all of [sink, e))
                e = s1 - recent - 1
                b0 = max(sink, e if s1 - s0 == 1 else s0 - recent - 1)
                if b0 > sink:
                    add(rows, far[:, :, sink:b0], values[:, :, sink:b0], None, True)
                if e > b0 and b0 == s0 - recent - 1:  # key b0 + j for query s0 + i: j <= i
                    band = far[:, :, b0:e], values[:, :, b0:e]
                    add(rows, *band, None, True, causal=True)
                elif e > b0:  # next to the sink: a mask
                    band = qslots - torch.arange(b0, e, device=device)[None, :] > recent
                    add(rows, far[:, :, b0:e], values[:, :, b0:e], band[None, None], True)
                # proximal: the sink before lo (every query), then [lo, s1) (a band mask); in
                # the window the kept slots come first, then the new ones
                lo = max(0, s0 - recent)
                (_, head), (w0, w1) = self.window_index(lo, s1)
                if s1 - s0 == 1:  # one query (decoding): every key of its window is proximal
                    keys = spans_of(window_keys, [(0, head), (w0, w1)])
                    vals = spans_of(values, [(0, head), (lo, s1)])
                    add(rows, keys, vals, None, False)
                    dest[:, s0 - past : s1 - past] = merge(parts).transpose(1, 2)
                    continue
                if head:
                    sink_part = window_keys[:, :, :head], values[:, :, :head]
                    add(rows, *sink_part, None, False)
                # [lo, s1) in pieces of NEAR queries: each sees at most recent + NEAR of them
                pieces = []
                for t0 in range(s0, s1, NEAR):
                    t1 = min(s1, t0 + NEAR)
                    a = max(lo, t0 - recent)
                    keys = window_keys[:, :, w0 + a - lo : w0 + t1 - lo], values[:, :, a:t1]
                    sub = rows[:, :, t0 - s0 : t1 - s0]
                    if not math and a == t0 - recent >= sink and t1 - t0 > 1:  # a full band
                        add(sub, *keys, None, False, into=pieces, band=self.band(g, t1 - t0, rows))
                        continue
                    mask = None
                    if t1 - t0 > 1:
                        k = torch.arange(a, t1, device=device)[None, :]
                        at = qslots[t0 - s0 : t1 - s0]
                        mask = ((k <= at) & ((k < sink) | (at - k <= recent)))[None, None]
                    add(sub, *keys, mask, False, fold=False, into=pieces)
                if len(pieces) == 1:
                    parts.append(pieces[0])
                else:
                    parts.append(tuple(torch.cat(x, dim=2) for x in zip(*pieces, strict=True)))
            else:
                kslots = torch.arange(0, s1, device=device)
                allowed, proximal = self._masks(s0, s1, kslots, window)
                add(rows, far[:, :, :s1], values[:, :, :s1], allowed & ~proximal, True)
                slots = self.window_slots
                if self.aligned:  # the kept slots, then the new ones
                    spans = [*self.kept_spans(past), (past, total)]
                    slots = torch.cat([torch.arange(x, y, device=device) for x, y in spans])
                allowed, proximal = self._masks(s0, s1, slots, window)
                itself = slots[None, :] == torch.arange(s0, s1, device=device)[:, None]
                near = allowed & (proximal | itself[None, None])
                cols = torch.arange(slots.numel(), device=device)
                if slots.numel() > s1 - s0 + sink + recent:  # a prefill: only the columns used
                    cols = torch.nonzero(near.any(dim=2).any(dim=0).flatten()).flatten()
                keys = window_keys.index_select(2, cols)
                vals = values.index_select(2, slots[cols])
                add(rows, keys, vals, near.index_select(3, cols), False)
            dest[:, s0 - past : s1 - past] = merge(parts).transpose(1, 2)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.positions is not None:
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))
            self.valid = self.valid.index_select(0, beam_idx.to(self.valid.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.positions is not None:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)
            self.valid = self.valid.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.positions is not None:
            self.positions, self.valid = self.positions[indices], self.valid[indices]


def pod_cache(
    cache: Cache | None, config, windows: list[int | None], stock_sliding: bool = True
) -> PodCache:
    """The PodCache to run with: the caller's, or a new one in place of none or of an empty
    stock cache (e.g. the DynamicCache that ``generate()`` makes); a filled one is refused."""
    if isinstance(cache, PodCache):
        return cache
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError(f"PoD models need a PodCache, got a filled {type(cache).__name__}")
    return PodCache(config, windows, stock_sliding)


# --- the attention function ---------------------------------------------------------------------
POD_ATTENTION = "kvconvert_pod"


def pod_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """What the stock attention forward of a PoD layer calls in place of eager or SDPA
    attention (registered as ``"kvconvert_pod"``). ``attention_mask`` is the model's
    placeholder: every mask comes from the module's ``PodCache``. Returns (batch, queries,
    heads, head_dim) and no attention weights."""
    cache = module.pod_cache
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = cache.attend(
        module.layer_idx, query, key, value, scale, softcap, dropout, module.pod_bias
    )
    return out, None


AttentionInterface.register(POD_ATTENTION, pod_attention)


# --- attention and model mixins -------------------------------------------------------------
class PodAttentionMixin:
    """The stock attention, reading its keys from a ``PodCache`` through ``pod_attention``.

    The stock forward calls ``cache.update`` and then the attention function its config
    names; a PoD module's ``config`` is a copy of the model's whose attention implementation is
    ``pod_attention`` (the model's own config keeps the user's eager or sdpa, which the cache
    carries as ``backend``). ``pod_cache_kwarg`` is the keyword the stock decoder layer passes
    the cache under where it is neither ``cache`` (transformers >= 5.24) nor
    ``past_key_values`` (before). ``pod_bias``: this layer's row of ``config.pod_distant_bias``
    (per KV head) when any entry is non-zero, else None.
    """

    pod_cache_kwarg = "past_key_values"
    pod_bias: tuple[float, ...] | None = None
    pod_cache: "PodCache | None" = None

    def forward(self, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get(self.pod_cache_kwarg))
        if not isinstance(cache, PodCache):
            raise ValueError(
                "a PoD attention layer needs the PodCache its model's forward makes (its upper "
                "layers read the block bottom's keys there); gradient checkpointing drops the "
                "cache, so PoD models do not train with it"
            )
        self.pod_cache = cache
        try:
            return super().forward(*args, **kwargs)
        finally:
            self.pod_cache = None


class PodCausalLMMixin:
    """The stock causal LM with PoD attention; its forward creates and drives the PodCache.

    ``pod_attention`` = (stock attention class, its PoD subclass). The subclass adds behaviour
    only (no parameters), so each stock attention module's class is switched in place after the
    stock ``__init__``: the module tree and the checkpoint's weight names stay the stock ones.
    """

    pod_attention: tuple[type, type]
    #: sliding-window layers keep the stock sliding cache and their own keys (False: they are
    #: PoD layers whose window is in their mask, as in kvconvert's Llama-layout PoD model)
    pod_stock_sliding = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False

    def __init__(self, config):
        super().__init__(config)
        stock, pod = self.pod_attention
        biases = getattr(config, "pod_distant_bias", None)
        dispatch = copy.copy(config)
        dispatch._attn_implementation = POD_ATTENTION
        for module in self.modules():
            if type(module) is stock:
                module.__class__ = pod
                module.config = dispatch
                row = biases[module.layer_idx] if biases else None
                module.pod_bias = tuple(float(b) for b in row) if row and any(row) else None
        self.pod_windows = sliding_windows(config)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ):
        backend = self.config._attn_implementation
        if backend not in ("eager", "sdpa"):
            raise ValueError("PoD models support eager and sdpa attention only")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("PoD models take a 2D padding attention_mask (batch, tokens)")
        past_key_values = pick_cache(past_key_values, kwargs)
        cache = pod_cache(past_key_values, self.config, self.pod_windows, self.pod_stock_sliding)
        cache.backend = backend
        ref = input_ids if input_ids is not None else inputs_embeds
        batch, length = ref.shape[:2]
        past = cache.get_seq_length()
        if position_ids is None:
            position_ids = self.pod_position_ids(attention_mask, past, length, ref.device)
        position_ids = position_ids.expand(batch, -1)
        keep = kwargs.get("logits_to_keep", 0)
        in_pieces = (
            length > PREFILL
            and not torch.is_grad_enabled()
            and isinstance(keep, int)
            and kwargs.get("labels") is None
            and not kwargs.get("output_hidden_states")
            and not kwargs.get("output_attentions")
            and kwargs.get("return_dict") is not False
        )
        if not in_pieces:
            out = self.pod_step(
                cache, input_ids, attention_mask, position_ids, inputs_embeds, use_cache, kwargs
            )
        else:  # the same model, its activations those of one piece at a time
            cache.prefill_total = past + length
            logits = []
            slots = kwargs.get("cache_position")  # older callers pass one per token
            try:
                for c0 in range(0, length, PREFILL):
                    c1 = min(length, c0 + PREFILL)
                    # logits wanted here: all (keep 0), or the last ``keep`` of the prompt
                    want = c1 - c0 if keep == 0 else max(0, c1 - max(c0, length - keep))
                    piece = {**kwargs, "logits_to_keep": max(want, 1)}  # 0 would mean all
                    if isinstance(slots, torch.Tensor) and slots.shape[-1] == length:
                        piece["cache_position"] = slots[..., c0:c1]
                    out = self.pod_step(
                        cache,
                        None if input_ids is None else input_ids[:, c0:c1],
                        self.pod_piece_mask(attention_mask, past, length, c0, c1),
                        position_ids[:, c0:c1],
                        None if inputs_embeds is None else inputs_embeds[:, c0:c1],
                        use_cache,
                        piece,
                    )
                    if want:
                        logits.append(out.logits[:, -want:])
            finally:
                cache.prefill_total = 0
            out.logits = logits[0] if len(logits) == 1 else torch.cat(logits, dim=1)
        if use_cache is False or (use_cache is None and not self.config.use_cache):
            out[CACHE_FIELD] = None
        return out

    @staticmethod
    def pod_piece_mask(
        mask: torch.Tensor | None, past: int, length: int, c0: int, c1: int
    ) -> torch.Tensor | None:
        """The padding mask for new tokens [c0, c1) of a prefill in pieces: over every token
        so far where the caller's covers cached and new ones, else over the piece's own."""
        if mask is None or mask.shape[1] not in (past + length, length):
            return mask  # none, or a mismatch that ``PodCache.begin`` names
        return mask[:, : past + c1] if mask.shape[1] == past + length else mask[:, c0:c1]

    def pod_step(
        self,
        cache: "PodCache",
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        inputs_embeds: torch.Tensor | None,
        use_cache: bool | None,
        kwargs: dict,
    ):
        """One stock forward of new tokens over the PodCache."""
        ref = input_ids if input_ids is not None else inputs_embeds
        batch, length = ref.shape[:2]
        past = cache.get_seq_length()
        cache.begin(position_ids, attention_mask)
        # A prepared 4D mask makes the stock model skip building its own; the PoD attention
        # ignores it. An expanded single element: no memory.
        placeholder = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=ref.device)
        try:
            return super().forward(
                input_ids=input_ids,
                attention_mask=placeholder.expand(batch, 1, length, past + length),
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **{CACHE_ARG: cache},
                **kwargs,
            )
        finally:
            cache.end()

    def pod_position_ids(
        self, attention_mask: torch.Tensor | None, past: int, length: int, device: torch.device
    ) -> torch.Tensor:
        """Position ids of new tokens when the caller gives none: the stock model's rule (the
        cache records them; sink and recent window are counted in positions)."""
        return torch.arange(past, past + length, device=device)[None]


__all__ = ["PodAttentionMixin", "PodCache", "PodCacheLayer", "PodCausalLMMixin", "pod_attention"]
