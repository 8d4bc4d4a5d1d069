"""The terminal table of ``kvconvert eval``: one row per model, columns that would say
nothing left out, and a note under it for every flag and small sample."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def short_name(name: str) -> str:
    """A local folder by its name, a Hub id as given: how the table, bars and plot name a
    model."""
    p = Path(name)
    return p.name if p.exists() else name


def format_table(doc: dict[str, Any]) -> str:
    """The terminal table: one row per model."""
    ctx = doc["settings"]["context"]
    head = [
        "model",
        "KV B/token",
        f"KV @{ctx}",
        "KV ratio",
        "KL nats/tok",
        "top-1",
        "ppl",
        "prefill tok/s",
        "decode tok/s",
        "rep-4",
        "dist-2",
        "retrieval",
    ]
    retrieval = _retrieval_score(doc["models"][0]) not in (None, 0.0)
    loops = doc["models"][0].get("repetition") is not None
    # columns that would say nothing: retrieval the original cannot do either, and the
    # repetition measure under --repetition-tokens 0
    keep = [
        (name != "retrieval" or retrieval) and (name not in ("rep-4", "dist-2") or loops)
        for name in head
    ]
    rows = [head]
    for m in doc["models"]:
        r = m.get("retrieval")
        score = _retrieval_score(m)
        rows.append(
            [
                short_name(m["name"]),
                str(m["kv_bytes_per_token"]),
                _bytes(m["kv_bytes_at_context"]),
                f"{m['kv_ratio']:.3f}" if m["kv_ratio"] is not None else "-",
                f"{m['kl']:.4f}",
                f"{m['top1_agreement']:.1%}" if m.get("top1_agreement") is not None else "-",
                f"{m['ppl']:.3f}",
                f"{m['prefill_tok_s']:.0f}",
                f"{m['decode_tok_s']:.1f}" if m["decode_tok_s"] else "-",
                _share(m, "repeated_4grams", "{:.1%}"),
                _share(m, "distinct_2", "{:.3f}"),
                f"{score:.2f} ({r['task']})" if score is not None else "-",
            ]
        )
    rows = [[c for c, k in zip(row, keep, strict=True) if k] for row in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(_cells(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for m in doc["models"]:
        if m.get("kv_bytes_over_promise"):
            over = m["kv_bytes_at_context"] / m["kv_bytes_promised"] - 1
            lines.append(
                f"FLAG: {short_name(m['name'])}: its cache holds "
                f"{_bytes(m['kv_bytes_at_context'])} at {ctx} tokens, {over:.1%} more than the "
                f"{_bytes(m['kv_bytes_promised'])} its kvconvert.json promises (every tensor "
                "the cache object keeps counts)"
            )
    if loops:
        rep = doc["models"][0]["repetition"]
        lines.append(
            f"(rep-4: share of repeated token 4-grams, dist-2: distinct bigrams, in greedy "
            f"continuations of {rep['prompts']}, up to "
            f"{doc['settings']['repetition_tokens']} tokens each; the texts are in --json)"
        )
    probe = doc["models"][0].get("retrieval")
    if not retrieval and probe:
        task = probe["task"]
        lines.append(f"(retrieval left out: the original scores 0 on the {task} task here)")
    elif probe:  # say how small the sample behind the column is
        depths = ",".join(f"{d:g}" for d in probe["depths"])
        lines.append(
            f"(retrieval: {probe['task']}, {probe['trials']} prompt(s) at each depth {depths}, "
            f"{ctx} tokens; more with --trials, per depth in --json)"
        )
    return "\n".join(lines)


def _share(m: dict[str, Any], key: str, fmt: str) -> str:
    value = (m.get("repetition") or {}).get(key)
    return fmt.format(value) if value is not None else "-"


def _retrieval_score(m: dict[str, Any]) -> float | None:
    """Mean retrieval accuracy over the depths, or None when not measured."""
    acc = [a for a in (m.get("retrieval") or {}).get("accuracy", []) if a is not None]
    return sum(acc) / len(acc) if acc else None


def _cells(row: list[str], widths: list[int]) -> list[str]:
    """The model name left-aligned, numbers right-aligned."""
    return [row[0].ljust(widths[0])] + [
        c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
    ]


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
