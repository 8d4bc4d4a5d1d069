"""Push a finished output folder to the Hugging Face Hub.

``push(folder, "user/name")`` creates the repo if needed (``create_repo(exist_ok=True)``), the
branch if one is named, and uploads the folder in one commit with ``upload_folder``. The token
comes from where ``huggingface_hub`` looks (``HF_TOKEN``, ``hf auth login``) and is never
printed: error messages are scrubbed of it. A failed upload leaves the local folder as it was
and says how to retry; a retry resumes, because the Hub skips weight files it already holds
(the LFS/Xet objects are keyed by content) and files whose content has not changed.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import KVConvertError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")

#: Never uploaded: hidden files and kvconvert's own work folders.
IGNORE = [".*", "**/.*", "*.kvconvert-partial-*", "*.kvconvert-old-*"]


def check_push_target(repo_id: str, revision: str | None = None) -> str:
    """Check the repo id and that a token is available, without touching the network.

    Called before a conversion so that a long run does not end with "no token". Returns the
    token (for the caller to pass on, never to print).
    """
    if not _REPO_ID.match(repo_id) or ".." in repo_id or len(repo_id) > 96:
        raise KVConvertError(
            f"--push-to-hub: {repo_id!r} is not a Hub repo id; expected user/name or org/name"
        )
    if revision is not None and (not revision.strip() or revision.startswith(("/", "-"))):
        raise KVConvertError(f"--hub-revision: {revision!r} is not a branch name")
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise KVConvertError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)"
        )
    return token


def retry_command(folder: Path, repo_id: str, private: bool, revision: str | None) -> str:
    args = ["kvconvert", "push", str(folder), repo_id]
    args += ["--private"] if private else []
    args += ["--hub-revision", revision] if revision else []
    return shlex.join(args)


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    progress: bool = True,
    rewritten: dict[str, bytes] | None = None,
) -> str:
    """Upload a finished kvconvert output to ``repo_id``; return the commit's URL.

    ``private`` applies when the repo is created (an existing repo keeps its visibility);
    ``revision`` is a branch, created from the default branch if it does not exist.
    ``rewritten`` maps file names to the bytes uploaded in their place (the local files are
    left as they are).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise KVConvertError(f"push: {folder} is not a folder")
    missing = [n for n in ("config.json", "kvconvert.json") if not (folder / n).is_file()]
    if missing:
        raise KVConvertError(
            f"push: {folder} is not a finished kvconvert output (no {', '.join(missing)})"
        )
    token = check_push_target(repo_id, revision)

    from huggingface_hub import HfApi
    from huggingface_hub.utils import disable_progress_bars

    if not progress:
        disable_progress_bars()
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private or None, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        with staged(folder, rewritten or {}) as upload:
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=upload,
                revision=revision,
                repo_type="model",
                commit_message=commit_message or f"Upload {folder.name} (kvconvert)",
                ignore_patterns=IGNORE,
            )
    except Exception as e:  # noqa: BLE001 - any failure: keep the output, say how to retry
        reason = _reason(e).replace(token, "***")
        raise KVConvertError(
            f"upload to {repo_id} failed: {reason}. The output in {folder} is intact; retry "
            f"with: {retry_command(folder, repo_id, private, revision)} (files already on the "
            "Hub are not sent again)"
        ) from None
    return str(info.commit_url)


@contextmanager
def staged(folder: Path, rewritten: dict[str, bytes]) -> Iterator[Path]:
    """``folder`` as uploaded: itself, or a temporary folder of links to its files with the
    ``rewritten`` ones replaced (links, so that no weight file is copied)."""
    if not rewritten:
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="kvconvert-push-") as tmp:
        stage = Path(tmp) / folder.name
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            target = stage / rel
            if path.is_dir():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if rel.as_posix() in rewritten:
                target.write_bytes(rewritten[rel.as_posix()])
            else:
                try:
                    os.symlink(path.resolve(), target)
                except OSError:  # no symlinks here (Windows without the right): copy
                    shutil.copy2(path, target)
        yield stage


def _reason(e: BaseException) -> str:
    """One line saying why, e.g. "uploading 'model.safetensors': 403 Forbidden: ..."."""
    prefix = ""
    if isinstance(e, RuntimeError) and e.__cause__ is not None:  # the LFS upload wrapper
        prefix = str(e).removeprefix("Error while ").removesuffix(" to the Hub.") + ": "
        e = e.__cause__
    lines = str(e).strip().splitlines()
    return prefix + (lines[0].rstrip(".") if lines else type(e).__name__)
