"""``kvconvert check OUTPUT --engine vllm|llama.cpp``: does a serving engine run an output as
transformers does?

The engine runs in its own interpreter (``--python``, e.g. a venv that has vLLM but not
kvconvert) through a standalone probe script (``kvconvert/serving/*_probe.py``) that takes a
request and writes a JSON result. Here, transformers computes the same things on the same token
ids, and the two are compared: greedy continuations, the log-prob of every prompt token, and
the engine's KV cache (vLLM: capacity in tokens; llama.cpp: bytes) against ``kvconvert.json``.
An output that the engine cannot serve (PoD, projected keys, kvconvert's own per-layer code)
must be refused by the engine with a reason; then the check fails and says so. See
docs/check.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .check import device_of, one_line, open_output, prompt_ids, prompt_length
from .errors import KVConvertError
from .promise import BYTES_TOLERANCE
from .report import DTYPE_BYTES

SERVING = Path(__file__).resolve().parent / "serving"


@dataclass(frozen=True)
class Engine:
    """A serving engine ``check --engine`` can run: its probe script and what it reports."""

    name: str
    probe: str
    #: the result key that holds the engine's version
    version_key: str
    #: largest |log-prob difference| from transformers, by the served dtype
    tolerance: dict[str, float]


#: float32: measured on SmolLM2-135M, 5e-5 (vLLM 0.32 on CPU) and 2e-5 (llama.cpp 0.3.36, float32
#: cache, flash attention off); 16-bit formats round every activation.
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.1}
ENGINES = {
    "vllm": Engine("vLLM", "vllm_probe.py", "vllm_version", TOLERANCE),
    "llama.cpp": Engine("llama.cpp", "llamacpp_probe.py", "llama_cpp_version", TOLERANCE),
}
#: what an engine's own message means, where it does not say (docs/serving.md)
HINTS = (
    (
        "Cannot find Llama BPE tokenizer",
        "llama.cpp's DeciLM converter reads only Llama-3 and SentencePiece vocabularies; "
        "docs/serving.md shows the one-line vocabulary fallback",
    ),
    (
        "Model KVConvert",
        "llama.cpp has no converter for kvconvert's own model code; the model card says which "
        "engines serve it",
    ),
)
#: config keys that bound a model's context (GPT-2 says n_positions)
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
#: bytes per element of llama.cpp's KV cache types
CACHE_TYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2}
#: how every kvconvert refusal (the checkpoints' ``n_head_kv`` answer) starts and ends; engines
#: wrap it in their own error text
REFUSAL_START, REFUSAL_END = "kvconvert ", "says which engines serve it."


@dataclass
class EngineCheckResult:
    """What ``check_engine`` found; ``line()`` is what ``kvconvert check --engine`` prints."""

    folder: str
    engine: str
    python: str
    ok: bool = False
    problems: list[str] = field(default_factory=list)
    engine_version: str | None = None
    #: the model class the engine resolved (e.g. LlamaForCausalLM, DeciLMForCausalLM)
    architecture: str | None = None
    dtype: str | None = None
    #: the engine stopped with the checkpoint's own reason (not served, as it should be)
    refused: str | None = None
    greedy_agreeing: int | None = None
    greedy_tokens: int = 0
    logprob_max_diff: float | None = None
    logprob_mean_diff: float | None = None
    #: vLLM: the KV cache's capacity in tokens in ``kv_space_gib`` GiB
    kv_tokens: int | None = None
    expected_kv_tokens: int | None = None
    #: llama.cpp: the KV cache's bytes at ``kv_cells`` cells of type ``kv_type``
    kv_bytes: int | None = None
    expected_kv_bytes: int | None = None
    kv_cells: int | None = None
    kv_type: str | None = None
    kv_not_compared: str | None = None
    kv_space_gib: int = 2

    def line(self) -> str:
        """One line: ``ok: ...`` or ``FAILED: ...``."""
        name = ENGINES[self.engine].name if self.engine in ENGINES else self.engine
        who = f"{name} {self.engine_version}" if self.engine_version else name
        if not self.ok:
            return f"FAILED: {self.folder} ({who}): " + ("; ".join(self.problems) or "unknown")
        if self.kv_bytes is not None:
            kv = f"KV cache {self.kv_bytes:,} bytes at {self.kv_cells} cells ({self.kv_type})"
            want = self.expected_kv_bytes
        else:
            kv = f"KV cache {self.kv_tokens:,} tokens in {self.kv_space_gib} GiB"
            want = self.expected_kv_tokens
        kv += (
            f" (not compared: {self.kv_not_compared})"
            if self.kv_not_compared
            else f", as kvconvert.json predicts ({want:,})"
        )
        return (
            f"ok: {self.folder} ({who} as {self.architecture}, {self.dtype}): greedy "
            f"{self.greedy_agreeing}/{self.greedy_tokens} tokens as transformers; prompt "
            f"log-probs within {self.logprob_max_diff:.1e} (mean {self.logprob_mean_diff:.1e}) "
            f"of transformers'; {kv}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "line": self.line()}


def check_engine(
    folder: str | Path,
    engine: str = "vllm",
    python: str | None = None,
    device: str = "cpu",
    new_tokens: int = 32,
    kv_space_gib: int = 2,
    *,
    llama_cpp: str | Path | None = None,
    trust_remote_code: bool | None = None,
) -> EngineCheckResult:
    """Run ``folder`` in ``engine`` (in the interpreter ``python``) and compare it with
    transformers on the same token ids; see docs/check.md. ``llama_cpp`` is the llama.cpp
    source tree whose converter writes the GGUF (engine ``llama.cpp`` only). Never raises for
    a broken or refused output: problems land in ``EngineCheckResult.problems``."""
    if engine not in ENGINES:
        raise KVConvertError(
            f"engine: {engine!r} is not one of {', '.join(ENGINES)} (transformers is "
            "kvconvert.check.check)"
        )
    if engine == "llama.cpp" and not llama_cpp:
        raise KVConvertError(
            "--llama-cpp: give a llama.cpp source tree (its convert_hf_to_gguf.py converts the "
            "output), e.g. the vendor/llama.cpp folder of the llama-cpp-python sdist"
        )
    if new_tokens < 1:
        raise KVConvertError(f"new_tokens: must be at least 1, got {new_tokens}")
    if not isinstance(kv_space_gib, int) or kv_space_gib < 1:
        raise KVConvertError(f"kv_space_gib: must be a whole number >= 1, got {kv_space_gib!r}")
    python = python or sys.executable
    res = EngineCheckResult(
        folder=str(folder), engine=engine, python=python, kv_space_gib=kv_space_gib
    )
    dev = device_of(device)
    try:
        # transformers first: the engine is slow to start, and a folder that transformers
        # cannot load is reported the same way as `kvconvert check` reports it
        path, config, model, report = open_output(folder, dev, trust_remote_code, False)
        res.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        length = prompt_length(config)
        ids = prompt_ids(path, config, model, length, rows=4)
    except KVConvertError as e:
        res.problems.append(str(e))
        return res
    except Exception as e:  # noqa: BLE001 - e.g. remote code failing to build the model
        res.problems.append(f"preparing the prompts failed: {one_line(e)}")
        return res
    prompts, sequences = ids[:2].tolist(), ids[2:].tolist()
    request = {
        "folder": str(path),
        "dtype": res.dtype,
        "max_model_len": model_length(config, length + new_tokens),
        "kv_space_gib": kv_space_gib,
        "trust_remote_code": "auto_map" in config,
        "greedy": {"prompts": prompts, "new_tokens": new_tokens},
        "prompt_logprobs": {"sequences": sequences},
    }
    if llama_cpp:
        request["llama_cpp_tree"] = str(Path(llama_cpp).expanduser().resolve())
    out = run_probe(engine, python, request)
    if not _engine_ran(res, out):
        return res
    try:
        _compare_greedy(res, model, prompts, out["greedy"], dev)
        _compare_logprobs(res, model, sequences, out["prompt_logprobs"], dev)
        _compare_kv(res, report)
    except Exception as e:  # noqa: BLE001 - an engine answer of an unexpected shape
        res.problems.append(f"comparing with transformers failed: {one_line(e)}")
    res.ok = not res.problems
    return res


def model_length(config: dict[str, Any], needed: int) -> int:
    """The engine's max_model_len: 1024 or the model's own limit where smaller, and at least
    ``needed``. vLLM states its KV capacity as concurrency x max_model_len, in whole cache
    blocks per request; a length of whole blocks (multiples of 128 here) keeps it exact."""
    text = config.get("text_config") or config
    limits = [int(text[k]) for k in POSITION_KEYS if isinstance(text.get(k), int)]
    return max(needed, min([1024, *limits]))


def run_probe(engine: str, python: str, request: dict[str, Any]) -> dict[str, Any]:
    """Run the engine's probe script in ``python``; its JSON result, or ``{"crash": why}``."""
    with tempfile.TemporaryDirectory(prefix="kvconvert-engine-") as tmp:
        req, out = Path(tmp, "request.json"), Path(tmp, "result.json")
        req.write_text(json.dumps(request))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        try:
            done = subprocess.run(
                [python, str(SERVING / ENGINES[engine].probe), str(req), str(out)],
                capture_output=True,
                text=True,
                env=env,
                check=False,
            )
        except OSError as e:  # no such interpreter, not executable
            return {"crash": f"cannot run {python}: {e.strerror or e}"}
        if out.is_file():
            try:
                return json.loads(out.read_text())
            except json.JSONDecodeError:
                pass
        tail = [s for s in (done.stderr or "").splitlines() if s.strip()][-1:]
        return {
            "crash": f"the {ENGINES[engine].name} process stopped without a "
            f"result (exit {done.returncode})" + (f": {tail[0].strip()}" if tail else "")
        }


def _engine_ran(res: EngineCheckResult, out: dict[str, Any]) -> bool:
    """Record why the engine did not run the model, if it did not."""
    name = ENGINES[res.engine].name
    res.engine_version = out.get(ENGINES[res.engine].version_key)
    if "crash" in out:
        res.problems.append(out["crash"])
        return False
    if "missing" in out:
        res.problems.append(
            f"{name} is not importable by {res.python} ({out['missing']}); install it in its "
            "own environment and pass that interpreter as --python (docs/serving.md)"
        )
        return False
    if "error" in out:
        chain = out["error"].get("messages") or ["unknown error"]
        own = next((m for m in chain if REFUSAL_END in m and REFUSAL_START in m), None)
        if own is not None:
            start, end = own.find(REFUSAL_START), own.find(REFUSAL_END) + len(REFUSAL_END)
            res.refused = own[start:end]
            res.problems.append(
                f"{name} does not serve this output and stops with the checkpoint's reason, "
                f"as it should: {res.refused}"
            )
        else:
            hints = [hint for text, hint in HINTS if text in chain[-1]]
            more = f" ({hints[0]})" if hints else ""
            res.problems.append(f"{name} could not load it: {chain[-1]}{more}")
        return False
    res.architecture = out.get("architecture")
    res.kv_tokens, res.kv_bytes = out.get("kv_tokens"), out.get("kv_bytes")
    res.kv_cells, res.kv_type = out.get("kv_cells"), out.get("kv_type")
    return True


def _tolerance(res: EngineCheckResult) -> float:
    table = ENGINES[res.engine].tolerance
    return table.get(str(res.dtype), max(table.values()))


@torch.inference_mode()
def token_logprobs(model: Any, rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """(rows, tokens - 1) float32 log-prob of every token after the ones before it, one
    uncached forward per row (so one row's logits over the vocabulary at a time)."""
    out = []
    for row in rows:
        ids = torch.tensor([row], device=device)
        lp = model(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)[0, :-1]
        out.append(lp.gather(-1, ids[0, 1:, None]).squeeze(-1).cpu())
    return torch.stack(out)


@torch.inference_mode()
def greedy_agreement(
    model: Any,
    prompts: list[list[int]],
    continuations: list[list[int]],
    device: torch.device,
    tolerance: float,
) -> tuple[int, int, tuple[int, int, int, int] | None]:
    """How many engine tokens are transformers' argmax after the same prefix (a token within
    ``tolerance`` of the top log-prob counts: a tie); of how many; and the first that is not,
    as (prompt, new token, engine's id, transformers' id)."""
    agree = total = 0
    first_bad = None
    for row, (prompt, new) in enumerate(zip(prompts, continuations, strict=True)):
        t = len(prompt)
        ids = torch.tensor([prompt + list(new)], device=device)
        logits = model(input_ids=ids, use_cache=False).logits[0, t - 1 : t + len(new) - 1]
        lp = logits.float().log_softmax(-1)
        picked = lp.gather(-1, ids[0, t:, None]).squeeze(-1)
        ok = lp.max(-1).values - picked <= tolerance
        agree, total = agree + int(ok.sum()), total + len(new)
        if first_bad is None and not bool(ok.all()):
            i = int((~ok).nonzero()[0])
            first_bad = (row, i, int(new[i]), int(lp[i].argmax()))
    return agree, total, first_bad


def _compare_greedy(
    res: EngineCheckResult,
    model: Any,
    prompts: list[list[int]],
    continuations: list[list[int]],
    device: torch.device,
) -> None:
    """Each engine token must be transformers' argmax after the same prefix (ties allowed)."""
    agree, total, first_bad = greedy_agreement(
        model, prompts, continuations, device, _tolerance(res)
    )
    res.greedy_agreeing, res.greedy_tokens = agree, total
    if first_bad is not None:
        row, i, got, want = first_bad
        res.problems.append(
            f"greedy decoding differs from transformers on {total - agree}/{total} tokens "
            f"(first: prompt {row}, new token {i}: engine {got}, transformers {want})"
        )


def _compare_logprobs(
    res: EngineCheckResult,
    model: Any,
    sequences: list[list[int]],
    engine_rows: list[list[float | None]],
    device: torch.device,
) -> None:
    """The log-prob of every prompt token after the ones before it, engine vs transformers."""
    ours = token_logprobs(model, sequences, device)
    theirs = torch.tensor([[float(x) for x in row[1:]] for row in engine_rows])
    diff = (ours - theirs).abs()
    res.logprob_max_diff, res.logprob_mean_diff = float(diff.max()), float(diff.mean())
    tol = _tolerance(res)
    if res.logprob_max_diff > tol:
        res.problems.append(
            f"prompt log-probs differ from transformers' by up to {res.logprob_max_diff:.3g} "
            f"(mean {res.logprob_mean_diff:.3g}; allowed {tol:g} in {res.dtype}): the engine "
            "computes a different model"
        )


def per_token_bytes(report: dict[str, Any] | None, element_bytes: int) -> tuple[float | None, str]:
    """KV bytes per token by ``kvconvert.json``, for a cache of ``element_bytes`` per value."""
    if report is None:
        return None, "no kvconvert.json conversion report in the folder"
    per_token = report.get("kv_bytes_per_token")
    if not isinstance(per_token, dict) or not isinstance(per_token.get("after"), int):
        return None, "kvconvert.json has no kv_bytes_per_token.after"
    have = DTYPE_BYTES.get(str(per_token.get("dtype")))
    if have is None:
        return None, f"kvconvert.json names an unknown dtype {per_token.get('dtype')!r}"
    return per_token["after"] * element_bytes / have, "kv_bytes_per_token"


def expected_kv_tokens(
    report: dict[str, Any] | None, dtype: str, space_gib: int
) -> tuple[int | None, str]:
    """Tokens a KV cache of ``space_gib`` GiB in ``dtype`` holds by ``kvconvert.json``."""
    if dtype not in DTYPE_BYTES:
        return None, f"unknown dtype {dtype!r}"
    per_token, why = per_token_bytes(report, DTYPE_BYTES[dtype])
    return (None if per_token is None else int(space_gib * 2**30 // per_token)), why


def _compare_kv(res: EngineCheckResult, report: dict[str, Any] | None) -> None:
    """vLLM's capacity in tokens, or llama.cpp's bytes at its cells, against the report."""
    if res.kv_bytes is not None and res.kv_cells:
        size = CACHE_TYPE_BYTES.get(str(res.kv_type))
        if size is None:
            res.kv_not_compared = f"KV cache type {res.kv_type!r}"
            return
        per_token, why = per_token_bytes(report, size)
        if per_token is None:
            res.kv_not_compared = why
            return
        got, want = res.kv_bytes, round(per_token * res.kv_cells)
        res.expected_kv_bytes, unit = want, f"bytes at {res.kv_cells} cells ({res.kv_type})"
    elif res.kv_tokens is not None:
        expected, why = expected_kv_tokens(report, str(res.dtype), res.kv_space_gib)
        if expected is None:
            res.kv_not_compared = why
            return
        got, want = res.kv_tokens, expected
        res.expected_kv_tokens, unit = want, f"tokens in {res.kv_space_gib} GiB"
    else:
        res.kv_not_compared = "the engine reported no KV cache size"
        return
    if abs(got - want) > BYTES_TOLERANCE * want:
        res.problems.append(
            f"KV cache holds {got:,} {unit}, kvconvert.json's bytes per token give {want:,}"
        )
