"""``kvconvert check OUTPUT``: does a converted checkpoint still work with this transformers?

Loads the folder as a user would (``AutoModelForCausalLM``, remote code only when the config
names some), runs transformers' own ``generate`` greedily, and checks it against an uncached
forward over the generated sequence; then measures the cache after a prefill and compares it
with what the conversion report (``kvconvert.json``) promised. See docs/check.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import KVConvertError
from .evaluate import kv_cache_bytes
from .promise import BYTES_TOLERANCE, expected_bytes

#: logits closer than this to the top one count as a tie (either token is a correct argmax)
TIE_TOLERANCE = 1e-4
#: measured cache bytes may differ from the report's promise by this fraction
MIN_PROMPT = 64
SPECIAL_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class CheckResult:
    """What ``check`` found; ``line()`` is what ``kvconvert check`` prints."""

    folder: str
    ok: bool = False
    problems: list[str] = field(default_factory=list)
    #: fraction of generated tokens that the uncached forward also predicts (None: not run)
    agreement: float | None = None
    agreeing_tokens: int | None = None
    new_tokens: int = 0
    prompt_tokens: int = 0
    #: cache bytes measured after a prefill of ``prompt_tokens`` tokens
    bytes: int | None = None
    #: what the conversion report promises at ``prompt_tokens`` tokens (None: not compared)
    expected_bytes: int | None = None
    #: why the byte comparison was skipped, when it was
    bytes_not_compared: str | None = None
    transformers_version: str = ""
    model_class: str | None = None

    def line(self) -> str:
        """One line: ``ok: ...`` or ``FAILED: ...``."""
        if not self.ok:
            return f"FAILED: {self.folder} (transformers {self.transformers_version}): " + (
                "; ".join(self.problems) or "unknown problem"
            )
        cache = f"cache {self.bytes} bytes at {self.prompt_tokens} tokens"
        cache += (
            f" (not compared: {self.bytes_not_compared})"
            if self.bytes_not_compared
            else " as reported"
        )
        return (
            f"ok: {self.folder} ({self.model_class}, transformers {self.transformers_version}): "
            f"generate agrees with uncached forward on {self.agreeing_tokens}/{self.new_tokens} "
            f"tokens; {cache}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "line": self.line()}


def check(
    folder: str | Path,
    device: str = "cpu",
    new_tokens: int = 32,
    *,
    trust_remote_code: bool | None = None,
    progress: bool = False,
) -> CheckResult:
    """Load ``folder`` as a user would and check that it still works; see docs/check.md.

    Greedy ``model.generate`` must agree with an uncached forward on every new token (exact
    ties allowed), and the cache after a prefill must hold what ``kvconvert.json`` promised
    (within 1%; skipped, with the reason, when the folder has no report). Never raises for a
    broken checkpoint: problems land in ``CheckResult.problems``. Model code shipped in the
    folder (``auto_map``) runs when ``trust_remote_code`` is True, or, when it is None, for a
    local folder that kvconvert wrote (it has ``kvconvert.json``): never for a Hub id unasked.
    """
    import transformers

    res = CheckResult(
        folder=str(folder), new_tokens=new_tokens, transformers_version=transformers.__version__
    )
    if new_tokens < 1:
        raise KVConvertError(f"new_tokens: must be at least 1, got {new_tokens}")
    dev = device_of(device)
    try:
        path, config, model, report = open_output(folder, dev, trust_remote_code, progress)
        res.model_class = type(model).__name__
        res.prompt_tokens = prompt_length(config)
        prompt = prompt_ids(path, config, model, res.prompt_tokens).to(dev)
    except KVConvertError as e:
        res.problems.append(str(e))
        return res
    except Exception as e:  # noqa: BLE001 - e.g. remote code failing in generation_config
        res.problems.append(f"preparing the prompt failed: {one_line(e)}")
        return res

    _stage(res, "generate", lambda: _check_generate(res, model, config, prompt))
    _stage(res, "cache", lambda: _check_bytes(res, model, config, report, prompt))
    res.ok = not res.problems
    return res


def _stage(res: CheckResult, what: str, fn: Any) -> None:
    """Run one check; an exception becomes a problem line, not a traceback."""
    try:
        fn()
    except KVConvertError as e:
        res.problems.append(str(e))
    except Exception as e:  # noqa: BLE001 - remote code may fail in any way
        res.problems.append(f"{what} failed: {one_line(e)}")


# --- loading ----------------------------------------------------------------------------------
def open_output(
    folder: str | Path, device: torch.device, trust_remote_code: bool | None, progress: bool
) -> tuple[Path, dict[str, Any], torch.nn.Module, dict[str, Any] | None]:
    """The folder (fetched if a Hub id), its config, the model loaded as a user would, and its
    ``kvconvert.json`` (None without one). Shipped model code runs when ``trust_remote_code``
    is True or, when it is None, for a local folder kvconvert wrote; raises KVConvertError."""
    path = _resolve(str(folder), progress)
    config = _read_json(path / "config.json", required=True)
    remote = "auto_map" in config
    if trust_remote_code is None:
        trust_remote_code = Path(folder).is_dir() and (path / "kvconvert.json").is_file()
    if remote and not trust_remote_code:
        raise KVConvertError(
            "it ships its own model code (auto_map in config.json); pass "
            "--trust-remote-code to run it"
        )
    with _progress_bars(progress):
        model = _load(path, device, trust_remote_code=remote)
    return path, config, model, _read_json(path / "kvconvert.json")


def device_of(name: str) -> torch.device:
    from .loading import resolve_device

    try:
        return resolve_device(name)
    except RuntimeError as e:  # torch.device("nonsense")
        raise KVConvertError(f"device: {e}") from e


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """transformers' "Loading weights" bar, on or off for the block (then as it was)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()


def _resolve(name: str, progress: bool) -> Path:
    from .source import resolve_source

    # *.py files of a Hub repo are fetched; they run only if config.json has an auto_map
    return resolve_source(name, None, trust_remote_code=True, progress=progress)


def _read_json(path: Path, required: bool = False) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise KVConvertError(f"no {path.name} in {path.parent}")
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise KVConvertError(f"{path.name} is not valid JSON: {e}") from e


def _load(folder: Path, device: torch.device, trust_remote_code: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust_remote_code)
        return model.to(device).eval()
    except Exception as e:  # noqa: BLE001 - missing files, broken remote code, ...
        raise KVConvertError(f"cannot load: {one_line(e)}") from e


def one_line(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    text = lines[0] if lines else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# --- the prompt -------------------------------------------------------------------------------
def prompt_length(config: dict[str, Any]) -> int:
    """Long enough that a PoD model has distant tokens: max(64, recent + sink + 16)."""
    recent, sink = config.get("pod_recent") or 0, config.get("pod_sink") or 0
    return max(MIN_PROMPT, int(recent) + int(sink) + 16)


def special_ids(folder: Path, config: dict[str, Any], model: Any) -> set[int]:
    """Token ids a prompt should not contain: the configs' bos/eos/pad, the tokenizer's."""
    out: set[int] = set()
    gen = _read_json(folder / "generation_config.json") or {}
    text = config.get("text_config") or {}
    for source in (config, text, gen, model.generation_config.to_dict()):
        for key in SPECIAL_KEYS:
            out.update(_ints(source.get(key)))
    if any((folder / f).is_file() for f in TOKENIZER_FILES):
        from .loading import load_tokenizer

        tok = load_tokenizer(folder, "auto_map" in config)
        if tok is not None:
            out.update(int(i) for i in tok.all_special_ids)
    return out


def _ints(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def vocab_size(model: Any) -> int:
    cfg = model.config.get_text_config()
    n = getattr(cfg, "vocab_size", None)
    emb = model.get_input_embeddings()
    rows = getattr(emb, "num_embeddings", None)
    sizes = [int(x) for x in (n, rows) if isinstance(x, int)]
    if not sizes:
        raise KVConvertError("the model declares no vocab_size")
    return min(sizes)


def prompt_ids(
    folder: Path, config: dict[str, Any], model: Any, length: int, rows: int = 1
) -> torch.Tensor:
    """(rows, length) token ids drawn with a fixed seed from the vocabulary, no special ids."""
    allowed = torch.ones(vocab_size(model), dtype=torch.bool)
    for i in special_ids(folder, config, model):
        if 0 <= i < allowed.numel():
            allowed[i] = False
    pool = torch.nonzero(allowed).flatten()
    if pool.numel() == 0:
        raise KVConvertError("the vocabulary has only special tokens")
    g = torch.Generator().manual_seed(0)
    return pool[torch.randint(0, pool.numel(), (rows, length), generator=g)]


# --- generate vs uncached forward -------------------------------------------------------------
@torch.inference_mode()
def _check_generate(
    res: CheckResult, model: Any, config: dict[str, Any], prompt: torch.Tensor
) -> None:
    """Greedy ``generate`` (with the cache) vs the argmax of one uncached forward."""
    from transformers import GenerationConfig

    n = res.new_tokens
    eos = sorted(_ints(model.generation_config.eos_token_id) or _ints(config.get("eos_token_id")))
    pad = _ints(model.generation_config.pad_token_id) or eos or [0]
    # a neutral generation config: plain greedy, no penalties or suppressions from the folder's
    # generation_config.json (its cache_implementation is kept: that is how users decode)
    saved = model.generation_config
    model.generation_config = GenerationConfig(
        bos_token_id=saved.bos_token_id,
        eos_token_id=eos or None,
        pad_token_id=pad[0],
        cache_implementation=saved.cache_implementation,
    )
    try:
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=n,
            min_new_tokens=n,  # eos is suppressed, so it never stops early
            do_sample=False,
            num_beams=1,
            pad_token_id=pad[0],
            eos_token_id=eos or None,
        )
    finally:
        model.generation_config = saved
    seq = out if isinstance(out, torch.Tensor) else out.sequences
    t = prompt.shape[1]
    if seq.shape[1] != t + n or not torch.equal(seq[:, :t], prompt):
        raise KVConvertError(
            f"generate returned {seq.shape[1] - t} new tokens (asked for {n}) or changed the prompt"
        )
    logits = model(input_ids=seq, use_cache=False).logits[0, t - 1 : t + n - 1].float()
    if eos:  # generate suppressed eos (min_new_tokens): so does the comparison
        logits[:, [i for i in eos if i < logits.shape[-1]]] = float("-inf")
    generated = seq[0, t:]
    picked = logits.gather(-1, generated[:, None]).squeeze(-1)
    top = logits.max(-1).values
    agree = (logits.argmax(-1) == generated) | (top - picked < TIE_TOLERANCE)
    res.agreeing_tokens = int(agree.sum())
    res.agreement = res.agreeing_tokens / n
    if res.agreeing_tokens < n:
        first = int((~agree).nonzero()[0])
        res.problems.append(
            f"generate disagrees with the uncached forward on {n - res.agreeing_tokens}/{n} "
            f"new tokens (first at new token {first}: generated {int(generated[first])}, "
            f"uncached argmax {int(logits[first].argmax())}); the cached decoding path is broken"
        )


# --- cache bytes vs the report ----------------------------------------------------------------
def _check_bytes(
    res: CheckResult,
    model: Any,
    config: dict[str, Any],
    report: dict[str, Any] | None,
    prompt: torch.Tensor,
) -> None:
    res.bytes = kv_cache_bytes(model, prompt)
    if report is None:
        res.bytes_not_compared = "no kvconvert.json conversion report in the folder"
        return
    dtype = next(model.parameters()).dtype
    expected, why = expected_bytes(report, model.config, res.prompt_tokens, dtype)
    if expected is None:
        res.bytes_not_compared = why
        return
    res.expected_bytes = expected
    if abs(res.bytes - expected) > BYTES_TOLERANCE * expected:
        res.problems.append(
            f"cache holds {res.bytes} bytes at {res.prompt_tokens} tokens, the conversion "
            f"report promises {expected} bytes ({why})"
        )
