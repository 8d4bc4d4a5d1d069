"""Model id or folder -> local snapshot; per-tensor reads of its weights; the resolved source.

A Hub id is fetched with ``huggingface_hub.snapshot_download`` limited to the files a
conversion needs (config, weights, tokenizer, generation config, chat template). Weights are
read one tensor at a time with ``safetensors.safe_open`` (or a memory-mapped ``torch.load``
for legacy ``.bin`` shards), so no second full copy of the model is ever built.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .arch import AttentionAdapter, get_adapter
from .errors import KVConvertError

#: Files fetched from the Hub for a conversion (weights are added below).
HUB_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
    "README.md",  # its front matter carries the licence into the output's card
    "LICENSE*",
    "USE_POLICY.md",
]
HUB_IGNORE = ["original/*", "*.gguf", "*.onnx", "*.msgpack", "*.h5", "*.ot", "*.pth"]
WEIGHT_SUFFIXES = (".safetensors", ".bin")


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _is_repo_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and ".." not in name


def resolve_source(
    name_or_path: str,
    revision: str | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> Path:
    """Return a local folder for a model folder or Hub id, downloading only what is needed.

    The Hub token comes from the usual places (``HF_TOKEN``, ``hf auth login``) and is
    never printed.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise KVConvertError(f"model path {name_or_path!r} is a file; give the model's folder")
    if not _is_repo_id(name_or_path):
        raise KVConvertError(f"model folder {name_or_path!r} does not exist")
    return _download(name_or_path, revision, trust_remote_code, progress)


def _download(repo_id: str, revision: str | None, trust_remote_code: bool, progress: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = list(HUB_PATTERNS) + (["*.py"] if trust_remote_code else [])
    kwargs: dict[str, Any] = {"repo_id": repo_id, "revision": revision}
    if not progress:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    try:
        local = Path(
            snapshot_download(allow_patterns=patterns, ignore_patterns=HUB_IGNORE, **kwargs)
        )
        if not any(local.glob("*.safetensors")):
            # Legacy checkpoints: fetch the .bin shards only when there is no safetensors.
            local = Path(
                snapshot_download(
                    allow_patterns=patterns + ["*.bin"], ignore_patterns=HUB_IGNORE, **kwargs
                )
            )
    except GatedRepoError as e:
        raise KVConvertError(
            f"{repo_id!r} is gated: accept its licence on the Hub and set HF_TOKEN"
        ) from e
    except RevisionNotFoundError as e:
        raise KVConvertError(f"revision {revision!r} not found in {repo_id!r}") from e
    except RepositoryNotFoundError as e:
        raise KVConvertError(
            f"{repo_id!r} is neither a local folder nor a model on the Hub "
            "(private repos need HF_TOKEN)"
        ) from e
    except LocalEntryNotFoundError as e:
        raise KVConvertError(
            f"there is no folder {repo_id!r} here, and the Hugging Face Hub cannot be reached "
            "to fetch it as a model id (nor is it in the local cache); check the path, or the "
            "network and HF_HUB_OFFLINE"
        ) from e
    except (HfHubHTTPError, OSError) as e:
        raise KVConvertError(f"cannot fetch {repo_id!r} from the Hugging Face Hub: {e}") from e
    return local


def read_config(folder: Path) -> dict[str, Any]:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise KVConvertError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise KVConvertError(f"{cfg} is not valid JSON: {e}") from e


@dataclass
class TensorSource:
    """Lazy, per-tensor access to a checkpoint's weights, in the source's own dtypes.

    Use as a context manager; ``get(name)`` reads one tensor from disk.
    """

    folder: Path
    files: list[Path] = field(default_factory=list)
    _where: dict[str, Path] = field(default_factory=dict)
    _stack: ExitStack | None = None
    _handles: dict[Path, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: Path) -> TensorSource:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            files = sorted(p for p in folder.glob("*.bin") if "training_args" not in p.name)
        if not files:
            raise KVConvertError(f"{folder} has no weights (*.safetensors or *.bin)")
        src = cls(folder=folder, files=files)
        src._stack = ExitStack()
        for f in files:
            handle = src._open_file(f)
            src._handles[f] = handle
            for name in handle.keys():
                src._where[name] = f
        return src

    def _open_file(self, f: Path) -> Any:
        try:
            if f.suffix == ".safetensors":
                return self._stack.enter_context(_SafetensorsFile(f))
            return _BinFile(torch.load(f, map_location="cpu", mmap=True, weights_only=True))
        except Exception as e:  # noqa: BLE001 - any reader failure means a damaged file
            raise KVConvertError(f"corrupt or unreadable weights file {f.name}: {e}") from e

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KVConvertError(f"tensor {name!r} not found in the checkpoint at {self.folder}")
        f = self._where[name]
        try:
            return self._handles[f].get_tensor(name)
        except Exception as e:  # noqa: BLE001
            raise KVConvertError(f"corrupt weights: cannot read {name!r} from {f.name}: {e}") from e

    def get_optional(self, name: str) -> torch.Tensor | None:
        return self.get(name) if name in self._where else None

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor in checkpoint order, read one at a time."""
        for f in self.files:
            for name in self._handles[f].keys():
                yield name, self.get(name)

    def dtype_of(self, name: str) -> torch.dtype:
        return self.get(name).dtype

    def info(self, name: str) -> tuple[int, int, bool]:
        """(elements, bytes per element, is floating point) from the file header, no read."""
        handle = self._handles[self._where[name]]
        if isinstance(handle, _SafetensorsFile):
            return handle.info(name)
        t = self.get(name)
        return t.numel(), t.element_size(), t.is_floating_point()


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


class _SafetensorsFile:
    """A .safetensors file read with plain file reads, one tensor at a time.

    ``safetensors.safe_open`` memory-maps the file, and every page a read touches stays
    resident (and counted in the process RSS) for as long as the file is open: a conversion
    would end up holding the whole checkpoint. Reading each tensor into its own buffer keeps
    memory at what the caller holds; the OS page cache still serves repeated reads.
    """

    def __init__(self, path: Path):
        self._fh = path.open("rb")
        try:
            (n,) = struct.unpack("<Q", self._fh.read(8))
            header = json.loads(self._fh.read(n))
        except (struct.error, ValueError) as e:
            self._fh.close()
            raise ValueError(f"bad safetensors header: {e}") from e
        header.pop("__metadata__", None)
        self._base = 8 + n
        end = max((m["data_offsets"][1] for m in header.values()), default=0)
        if path.stat().st_size != self._base + end:
            self._fh.close()
            raise ValueError("file is truncated or has trailing bytes (data not fully covered)")
        self._meta = {k: header[k] for k in sorted(header)}  # safe_open's order: sorted

    def __enter__(self) -> _SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()

    def keys(self) -> list[str]:
        return list(self._meta)

    def info(self, name: str) -> tuple[int, int, bool]:
        m = self._meta[name]
        dtype = _ST_DTYPES[m["dtype"]]
        numel = 1
        for d in m["shape"]:
            numel *= int(d)
        return numel, dtype.itemsize, dtype.is_floating_point

    def get_tensor(self, name: str) -> torch.Tensor:
        m = self._meta[name]
        start, end = m["data_offsets"]
        buf = torch.empty(end - start, dtype=torch.uint8)
        if end > start:
            self._fh.seek(self._base + start)
            if self._fh.readinto(buf.numpy()) != end - start:
                raise ValueError("file is truncated")
        return buf.view(_ST_DTYPES[m["dtype"]]).reshape(m["shape"])


class _BinFile:
    """Adapter giving a loaded (memory-mapped) ``.bin`` state dict the ``safe_open`` interface."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self._state = state

    def keys(self) -> list[str]:
        return list(self._state)

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._state[name]


#: Config facts a converted model shares with its original, whatever the conversion.
SHARED_FACTS = {
    "vocabulary size": ("vocab_size",),
    "hidden size": ("hidden_size", "n_embd", "d_model"),
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
}


def check_derived(original: Path, converted: Path, original_name: str, converted_name: str) -> None:
    """Refuse, before any work, a converted model that cannot come from ``original``: its
    vocabulary, hidden size or layer count differ (heal and eval compare the two token by
    token)."""
    a, b = read_config(original), read_config(converted)
    for c in (a, b):
        c.update(c.get("text_config") or {})
    for what, keys in SHARED_FACTS.items():
        va = next((a[k] for k in keys if isinstance(a.get(k), int)), None)
        vb = next((b[k] for k in keys if isinstance(b.get(k), int)), None)
        if va is not None and vb is not None and va != vb:
            raise KVConvertError(
                f"{converted_name} is not a conversion of {original_name}: its {what} is {vb}, "
                f"the original's {va}"
            )


class Source:
    """A resolved model: its folder, raw config, architecture adapter and lazy weights.

    Every target and engine reads the source model through this one object (docs/architecture.md).
    """

    def __init__(
        self,
        model: str,
        revision: str | None = None,
        trust_remote_code: bool = False,
        progress: bool = True,
    ):
        self.folder = resolve_source(model, revision, trust_remote_code, progress)
        self.config = read_config(self.folder)
        self.adapter: AttentionAdapter = get_adapter(self.config.get("model_type"))
        self.tensors = TensorSource.open(self.folder)
        c, a = self.config, self.adapter
        self.num_layers, self.num_heads = a.num_layers(c), a.num_heads(c)
        self.num_kv_heads, self.head_dim = a.num_kv_heads(c), a.head_dim(c)
        #: the adapter with tensor names as this checkpoint stores them (module names for
        #: hooks stay ``adapter``'s): some are saved from the bare base model, e.g. ``h.0.``
        self.stored = a.for_checkpoint(self.tensors)
        self.dtype = self.tensors.get(self.stored.tensor_name(0, "k")).dtype

    def attention_items(
        self, layer: int, read: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor | None]:
        """Layer ``layer``'s attention tensors by role (q/k/v/o weights and biases, norms),
        cut apart by the adapter where the checkpoint fuses them; ``read``: tensors already in
        memory, by checkpoint name (not read again)."""
        a, t, read = self.stored, self.tensors, read or {}
        stored = {
            role: read[n] if n in read else t.get_optional(n)
            for role, n in a.layer_tensor_names(layer).items()
        }
        return a.split(stored, self.num_heads, self.head_dim)

    def attention_tensor_names(self, layer: int) -> dict[str, str]:
        """checkpoint name -> stored role (``adapter.join`` of the solved items), for tensors
        present."""
        names = self.stored.layer_tensor_names(layer)
        return {n: role for role, n in names.items() if n in self.tensors}

    def attention_path(self, layer: int) -> str:
        """Name of the layer's attention module, e.g. model.layers.3.self_attn."""
        return self.adapter.module_name(layer, "q").rsplit(".", 1)[0]

    def close(self) -> None:
        self.tensors.close()
