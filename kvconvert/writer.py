"""Output folder: sharded safetensors, index, config and side files, written atomically.

Everything goes into a hidden work folder next to the output; only a complete conversion is
renamed into place, so a failure or Ctrl-C never leaves a half-written output.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import shutil
import socket
import stat
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import KVConvertError

try:
    import fcntl
except ImportError:  # Windows: outputs are not locked
    fcntl = None  # type: ignore[assignment]

#: Source files an output carries over unchanged (fnmatch patterns): the tokenizer, the
#: generation config, the chat template and the licence. Nothing else is copied: a note or a
#: data file lying in the source folder must not end up published with the output.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "*.tiktoken",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "LICENSE*",
    "LICENCE*",
    "NOTICE*",
    "USE_POLICY.md",
)
#: What marks a folder as a kvconvert output (``--overwrite`` replaces only those).
REPORT = "kvconvert.json"
#: The layer-sequential engine's resume state, inside the work folder.
STATE_DIR = ".kvconvert-resume"


#: torch dtype -> safetensors dtype tag (the format's header spelling).
_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_COPY_CHUNK = 16 * 2**20


class ShardedWriter:
    """Streams tensors into shards of at most ``max_shard_size`` bytes.

    Each tensor's bytes are appended to the open shard file as soon as they arrive, so memory
    holds one tensor, never a shard. The file starts with room reserved for the safetensors
    header; when the shard is full the header is written into that room, padded with spaces
    (which the format allows), so each byte is written once. A shard whose header outgrows
    the room is rewritten once with an exact header. Single-shard outputs are named
    ``model.safetensors``; larger ones ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``, as ``save_pretrained`` writes them. :meth:`state` /
    :meth:`restore` let an interrupted run continue the same shards byte for byte
    (``--resume``).
    """

    def __init__(self, folder: Path, max_shard_size: int):
        self.folder = folder
        self.max = max_shard_size
        #: bytes reserved for the 8-byte length and the header: ~500 tensors at 5 GB shards
        self.reserve = 8 * max(512, min(8192, max_shard_size // 512))
        self._entries: list[tuple[str, str, list[int], int, int]] = []
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._data: Any = None
        self.total_bytes = 0

    def _data_path(self) -> Path:
        return self.folder / f".shard-{len(self._shards):05d}.safetensors"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous()
        if t.dtype not in _ST_DTYPES:
            raise KVConvertError(f"cannot write {name!r}: dtype {t.dtype} has no safetensors tag")
        size = t.numel() * t.element_size()
        if self._entries and self._pending_bytes + size > self.max:
            self._flush()
        if self._data is None:
            self._open()
        start = self._pending_bytes
        if size:
            self._data.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self._entries.append((name, _ST_DTYPES[t.dtype], list(t.shape), start, start + size))
        self._pending_bytes += size
        self.total_bytes += size

    def _open(self) -> None:
        """Start the next shard file with its header room reserved."""
        self._data = self._data_path().open("w+b")
        self._data.write(b"\0" * self.reserve)

    def _header(self) -> bytes:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        for name, dtype, shape, start, end in self._entries:
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}
        return json.dumps(header, separators=(",", ":")).encode()

    def _flush(self) -> None:
        path = self._data_path()
        if self._data is None:  # a shard with no tensors at all
            self._open()
        raw = self._header()
        room = self.reserve - 8
        if len(raw) <= room:  # the usual case: the header goes into the reserved room
            self._data.seek(0)
            self._data.write(struct.pack("<Q", room) + raw + b" " * (room - len(raw)))
            self._data.close()
        else:  # too many tensors for the room: rewrite once with an exact header
            self._data.close()
            raw += b" " * (-len(raw) % 8)  # 8-byte aligned data, as safetensors writes it
            exact = path.with_suffix(".exact")
            with exact.open("wb") as out, path.open("rb") as src:
                out.write(struct.pack("<Q", len(raw)) + raw)
                src.seek(self.reserve)
                shutil.copyfileobj(src, out, _COPY_CHUNK)
            os.replace(exact, path)
        self._data = None
        self._shards.append((path, [e[0] for e in self._entries]))
        self._entries, self._pending_bytes = [], 0

    def sync(self) -> None:
        """Push buffered bytes to disk (before a resume checkpoint)."""
        if self._data is not None:
            self._data.flush()
            os.fsync(self._data.fileno())

    def state(self) -> dict[str, Any]:
        """Everything needed to continue writing after an interrupt (JSON-serialisable)."""
        self.sync()
        return {
            "shards": [[p.name, names] for p, names in self._shards],
            "entries": [list(e) for e in self._entries],
            "pending_bytes": self._pending_bytes,
            "total_bytes": self.total_bytes,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state`: the open shard is cut back to that point."""
        self._shards = [(self.folder / p, list(n)) for p, n in state["shards"]]
        self._entries = [(e[0], e[1], list(e[2]), e[3], e[4]) for e in state["entries"]]
        self._pending_bytes, self.total_bytes = state["pending_bytes"], state["total_bytes"]
        data = self._data_path()
        if self._entries:
            end = self.reserve + self._pending_bytes
            if not data.is_file() or data.stat().st_size < end:
                raise KVConvertError(f"cannot resume: {data} is missing or truncated")
            os.truncate(data, end)
            self._data = data.open("r+b")
            self._data.seek(end)
        elif data.exists():
            data.unlink()

    def close(self) -> None:
        if self._data is not None:
            self._data.close()
            self._data = None

    def finish(self) -> list[str]:
        """Write the last shard, give shards their final names and write the index."""
        if self._entries:
            self._flush()
        self.close()
        n = len(self._shards)
        if n == 1:
            self._shards[0][0].rename(self.folder / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for i, (path, tensors) in enumerate(self._shards, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / final)
            names.append(final)
            weight_map.update(dict.fromkeys(tensors, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        write_json(self.folder / "model.safetensors.index.json", index)
        return names


def cast_float(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``t`` in the output dtype when one is set and ``t`` is floating point (ids, masks and
    integer buffers keep theirs)."""
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy the source's tokenizer, chat template, generation config and licence files
    (``SIDE_FILES``) unchanged; return their names."""
    copied = []
    for p in sorted(src.iterdir()):
        if p.is_file() and any(fnmatch.fnmatchcase(p.name, pat) for pat in SIDE_FILES):
            shutil.copy2(p, dst / p.name)
            copied.append(p.name)
    return copied


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an output that exists (without ``overwrite``), that is not a folder, that holds
    the current directory, or that ``--overwrite`` would wrongly delete: a non-empty folder
    that is not a kvconvert output."""
    if not output.exists():
        return
    if not output.is_dir():  # --overwrite would not help: it only replaces kvconvert outputs
        raise KVConvertError(
            f"output {output} is a file, not a folder; choose another -o (or remove the file)"
        )
    if not overwrite:
        raise KVConvertError(f"output {output} already exists; pass --overwrite to replace it")
    here = Path.cwd().resolve()
    if here == output.resolve() or output.resolve() in here.parents:
        raise KVConvertError(
            f"output {output} is (or holds) the current directory, which cannot be replaced; "
            "choose another -o"
        )
    if not (output / REPORT).is_file() and any(output.iterdir()):
        raise KVConvertError(
            f"output {output} is not a kvconvert output (no {REPORT}); --overwrite only "
            "replaces earlier kvconvert outputs: remove it yourself or choose another -o"
        )


#: Output locks this process holds: lock path -> file descriptor. A run that composes runs
#: (convert-then-heal) takes its output's lock again; the inner take is a no-op.
_HELD_LOCKS: dict[Path, int] = {}


def lock_path(output: Path) -> Path:
    return output.parent / f".{output.name}.kvconvert-lock"


@contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold the output's lock (``.NAME.kvconvert-lock`` beside it) for a whole run, so that a
    second run writing the same output or its work folder refuses at once, naming the holder.

    An advisory ``flock``: released by the operating system if the process dies. Under
    torchrun only rank 0 takes it (the ranks of one run share the output). Where ``fcntl`` is
    missing (Windows) no lock is taken.
    """
    path = lock_path(output.expanduser().resolve())
    if path in _HELD_LOCKS or fcntl is None or int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise KVConvertError(
                f"output {output} is being written by another kvconvert run ({holder}); wait "
                f"for it to finish or choose another -o (lock: {path})"
            ) from None
        try:  # the holder before us may have removed the file we opened: lock the new one
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}".encode())
    _HELD_LOCKS[path] = fd
    try:
        yield
    finally:
        del _HELD_LOCKS[path]
        try:
            os.unlink(path)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


@contextmanager
def atomic_output(output: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a work folder; on success it replaces ``output``, on any failure it is removed."""
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    work = output.parent / f".{output.name}.kvconvert-partial-{os.getpid()}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    move_into_place(work, output)


def move_into_place(work: Path, output: Path) -> None:
    """Rename a finished work folder to ``output``, replacing (then deleting) an old one.

    Every file first gets the mode the user's umask gives a new file (0644 usually): some
    writers (safetensors' atomic save, temporary files) create theirs 0600, which a server
    running as another user cannot read."""
    usual_modes(work)
    if output.exists():
        old = output.parent / f".{output.name}.kvconvert-old-{os.getpid()}"
        output.rename(old)
        work.rename(output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        work.rename(output)


def usual_modes(folder: Path) -> None:
    """Give ``folder``'s files and subfolders the modes the umask gives new ones."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        mode = (0o777 if path.is_dir() else 0o666) & ~umask
        if stat.S_IMODE(path.stat().st_mode) != mode:
            path.chmod(mode)


def os_error_line(e: OSError, output: Path) -> str:
    """One line for a file-system failure during a run writing ``output``."""
    what = {errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only file system"}
    line = what.get(e.errno or 0, e.strerror or str(e))
    if e.filename:
        line += f": {e.filename}"
    work = work_folder(output)
    if (work / STATE_DIR / "state.json").is_file():
        line += f"; the layers done so far are kept in {work}: fix this, then rerun with --resume"
    return line


def work_folder(output: Path) -> Path:
    """The resumable work folder of ``output``: ``OUTPUT.kvconvert-work`` beside it."""
    return output.parent / f"{output.name}.kvconvert-work"


@contextmanager
def resumable_output(output: Path, overwrite: bool, resume: bool) -> Iterator[Path]:
    """Like :func:`atomic_output`, but the work folder survives an interrupt or crash.

    ``OUTPUT.kvconvert-work`` holds the shards written so far and the resume state; it becomes
    ``output`` only when the run completes. A KVConvertError (bad input, NaN) removes it, since
    resuming cannot help; Ctrl-C or any other failure keeps it for ``--resume``.
    """
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    work = work_folder(output)
    if resume and not work.is_dir():
        raise KVConvertError(f"--resume: there is no interrupted run to resume ({work} is absent)")
    if not resume and work.exists():
        shutil.rmtree(work)
    work.mkdir(exist_ok=True)
    try:
        yield work
    except KVConvertError:
        shutil.rmtree(work, ignore_errors=True)
        raise
    move_into_place(work, output)
