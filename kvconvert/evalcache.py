"""What ``kvconvert eval`` measures on the original alone, kept on disk for the next eval.

Evaluating several outputs of one original repeats work that depends on the original only:
sampling the ``--data self`` tokens and running its retrieval prompts (on a CPU, most of an
eval's time). Each result is stored once, in a small JSON file named by a hash of everything
that shapes it (the original's files, the settings, the versions), so the next eval of
another output reads it instead. Entries hold token ids and a few floats (kilobytes), never
model outputs.

Where: ``$KVCONVERT_CACHE/eval``, else ``$XDG_CACHE_HOME/kvconvert/eval``, else
``~/.cache/kvconvert/eval``; deleting the folder is always safe. Writes are atomic (a
temporary file renamed into place). An entry that cannot be read, was written by another
format, or records another key than the one asked for is ignored and rewritten, never
trusted; a cache that cannot be written is skipped with a note, never an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .version import __version__

#: Bump when what an entry holds would be computed differently (a prompt, a scoring rule).
CACHE_FORMAT = 1

#: Environment variable naming kvconvert's cache folder (eval entries go to its ``eval/``).
CACHE_ENV = "KVCONVERT_CACHE"


def cache_dir() -> Path:
    """The folder eval entries live in: ``$KVCONVERT_CACHE/eval``, else the XDG user cache."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = str(Path(xdg) / "kvconvert") if xdg else "~/.cache/kvconvert"
    return Path(root).expanduser() / "eval"


def files_fingerprint(folder: Path) -> dict[str, Any]:
    """The model folder's identity, cheaply: its path and each top-level file's name, size and
    modification time (no file is read, so a 100 GB checkpoint costs a few ``stat`` calls).
    A rewritten or replaced weights file changes its mtime and misses the cache."""
    folder = Path(folder).resolve()
    files = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        st = p.stat()  # follows Hub-cache symlinks to the blob
        files.append([p.name, st.st_size, st.st_mtime_ns])
    return {"path": str(folder), "files": files}


def key_digest(kind: str, key: dict[str, Any]) -> str:
    """Hex SHA-256 of the canonical JSON of ``kind`` and ``key``."""
    text = json.dumps({"kind": kind, "key": key}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def content_digest(value: Any) -> str:
    """Hex SHA-256 of a JSON-able value (token ids, prompts): a key part that names content."""
    return hashlib.sha256(json.dumps(value, separators=(",", ":")).encode()).hexdigest()


class EvalCache:
    """Entries for one original, device and dtype; ``directory=None`` turns it off.

    ``base`` is the part of every key that names the original and where it ran; ``get`` and
    ``put`` add what shapes one result (seed, lengths, a digest of the prompts)."""

    def __init__(self, directory: Path | None, base: dict[str, Any], progress: bool = False):
        self.directory = directory
        self.base = {"format": CACHE_FORMAT, "kvconvert": __version__, **base}
        self.progress = progress

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def path(self, kind: str, key: dict[str, Any]) -> Path:
        assert self.directory is not None
        return self.directory / f"{kind}-{key_digest(kind, self._full(key))[:40]}.json"

    def _full(self, key: dict[str, Any]) -> dict[str, Any]:
        # through JSON once, so tuples and lists (and int/float keys) compare as stored
        return json.loads(json.dumps({**self.base, **key}, sort_keys=True))

    def get(
        self, kind: str, key: dict[str, Any], valid: Callable[[Any], bool] | None = None
    ) -> Any | None:
        """The stored value, or None: no entry, or one that is unreadable, of another format,
        recorded under another key, or refused by ``valid`` (then it is rewritten later)."""
        if self.directory is None:
            return None
        path = self.path(kind, key)
        if not path.is_file():
            return None
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            ok = (
                isinstance(doc, dict)
                and doc.get("format") == CACHE_FORMAT
                and doc.get("kind") == kind
                and doc.get("key") == self._full(key)
                and "value" in doc
                and (valid is None or bool(valid(doc["value"])))
            )
        except (OSError, ValueError, TypeError, KeyError, IndexError):
            ok = False
        if not ok:
            self._note(f"ignoring the unusable cache entry {path} (it will be rewritten)")
            return None
        return doc["value"]

    def put(self, kind: str, key: dict[str, Any], value: Any) -> Path | None:
        """Store ``value`` atomically (temporary file, then rename); None where it could not
        be written (a read-only or full disk costs the next run time, not this one its result)."""
        if self.directory is None:
            return None
        path = self.path(kind, key)
        doc = {"format": CACHE_FORMAT, "kind": kind, "key": self._full(key), "value": value}
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(doc, fh, separators=(",", ":"))
            os.replace(tmp, path)
        except OSError as e:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            self._note(f"cannot write the eval cache at {path.parent}: {e}")
            return None
        return path

    def _note(self, line: str) -> None:
        if self.progress:
            print(line, file=sys.stderr, flush=True)
