"""Pushing to the Hub: the real huggingface_hub client against a local stand-in (no network).

The stand-in (tests/hub_standin.py) implements the endpoints create_repo, create_branch and
upload_folder call; weights go through the LFS protocol (Xet disabled). The token must reach
the server and never appear in any output.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

import kvconvert
from kvconvert.cli import main
from kvconvert.errors import KVConvertError
from kvconvert.hub import push
from kvconvert.report import publishable
from tests.conftest import FAST, ROOT
from tests.hub_standin import HubStandIn

TOKEN = "hf_kvconvertTESTtoken0123456789secret"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as c

    with HubStandIn(TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(c, "ENDPOINT", server.url)  # read at import; the env is for children
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setattr(c, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setattr(c, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
        monkeypatch.setattr(c, "AGENT_HARNESSES_PATH", str(tmp_path / "harnesses.json"))
        yield server


@pytest.fixture(scope="module")
def output(tiny_models, tmp_path_factory):
    """A finished output with three weight shards (each its own LFS object)."""
    out = tmp_path_factory.mktemp("push") / "out"
    return kvconvert.convert(
        str(tiny_models["mistral"]), str(out), kv_heads=2, max_shard_size="60KB", **FAST
    )


def local_files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_push_uploads_every_file_with_the_token(hub, output):
    url = push(output, "alice/tiny-kv2", private=True, progress=False)
    repo = hub.repos["alice/tiny-kv2"]
    assert repo.private and url.startswith(f"{hub.url}/alice/tiny-kv2/commit/")
    assert repo.branches["main"] == local_files(output)  # every file, byte for byte
    shards = [n for n in repo.branches["main"] if n.endswith(".safetensors")]
    assert len(shards) >= 3 and len(hub.calls("PUT", "/_lfs/")) == len(shards)
    for name in ("/api/repos/create", "/api/validate-yaml", "/preupload/main", "/commit/main"):
        assert hub.calls("POST", name), name
    assert hub.calls("POST", "/alice/tiny-kv2.git/info/lfs/objects/batch")
    log = zip(hub.log, hub.auth_headers, strict=True)
    api = [a for (m, p), a in log if p.startswith("/api") and p != "/api/agent-harnesses"]
    assert api and all(a == f"Bearer {TOKEN}" for a in api)


def test_new_branch_then_existing_repo(hub, output):
    url = push(output, "alice/tiny", revision="kv2", progress=False)
    repo = hub.repos["alice/tiny"]
    assert hub.calls("POST", "/api/models/alice/tiny/branch/kv2") and "/commit/" in url
    assert repo.branches["kv2"] == local_files(output) and repo.branches["main"] == {}
    push(output, "alice/tiny", progress=False)  # the repo exists now: create_repo's 409 is fine
    assert repo.branches["main"] == local_files(output)
    assert [c["branch"] for c in repo.commits] == ["kv2", "main"]


def test_failed_upload_keeps_output_and_rerun_resumes(hub, output):
    before = local_files(output)
    shards = sorted(n for n in before if n.endswith(".safetensors"))
    last = hashlib.sha256(before[shards[-1]]).hexdigest()
    hub.fail_put_oids = {last}  # the storage refuses the last shard once
    with pytest.raises(KVConvertError) as err:
        push(output, "alice/resume", progress=False)
    msg = str(err.value)
    assert "upload to alice/resume failed" in msg and "403" in msg
    assert f"kvconvert push {output} alice/resume" in msg and TOKEN not in msg
    assert local_files(output) == before  # the local output is untouched
    assert not hub.repos["alice/resume"].commits  # nothing half-committed
    assert len(hub.lfs) == len(shards) - 1  # the other shards did arrive

    puts_before = len(hub.calls("PUT"))
    push(output, "alice/resume", progress=False)  # the retry sends only what is missing
    assert hub.calls("PUT")[puts_before:] == [f"/_lfs/{last}"]
    assert hub.repos["alice/resume"].branches["main"] == before

    commits = len(hub.repos["alice/resume"].commits)
    push(output, "alice/resume", progress=False)  # nothing changed: nothing sent, no commit
    assert len(hub.calls("PUT")) == puts_before + 1
    assert len(hub.repos["alice/resume"].commits) == commits


def test_failed_commit_says_how_to_retry(hub, output):
    hub.fail_commits = 1
    result = CliRunner().invoke(main, ["push", str(output), "bob/x", "--hub-revision", "v1"])
    assert result.exit_code == 1
    assert "kvconvert push" in result.output and "--hub-revision v1" in result.output
    assert TOKEN not in result.output
    result = CliRunner().invoke(main, ["push", str(output), "bob/x", "--hub-revision", "v1", "-q"])
    assert result.exit_code == 0, result.output
    # every file; the card, recipe and report as published (no local paths: test_newcomer.py)
    published = {**local_files(output), **publishable(output)}
    assert hub.repos["bob/x"].branches["v1"] == published
    assert not any(str(output.parent) in v.decode(errors="replace") for v in published.values())


def test_convert_with_push_to_hub(hub, tiny_models, tmp_path):
    out = tmp_path / "o"
    args = [str(tiny_models["llama"]), "--kv-heads", "2", "-o", str(out), "-q"]
    args += ["--num-samples", "4", "--seq-len", "32", "--push-to-hub", "carol/llama-kv2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "pushed to" in result.output and TOKEN not in result.output
    assert hub.repos["carol/llama-kv2"].branches["main"] == {
        **local_files(out),
        **publishable(out),
    }
    assert "recipe.yaml" in hub.repos["carol/llama-kv2"].branches["main"]


def test_missing_token_fails_before_converting(monkeypatch, tiny_models, tmp_path):
    import huggingface_hub.constants as c

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(tmp_path / "none"))
    out = tmp_path / "o"
    args = [str(tiny_models["llama"]), "--kv-heads", "2", "-o", str(out), "--push-to-hub", "a/b"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "no Hugging Face token" in result.output
    assert not out.exists()  # refused before any work
    bad = CliRunner().invoke(main, [*args[:-1], "not a repo"])
    assert "is not a Hub repo id" in bad.output
    orphan = CliRunner().invoke(main, [*args[:-2], "--private"])
    assert orphan.exit_code == 2 and "--push-to-hub" in orphan.output


def test_push_refuses_a_folder_that_is_not_an_output(hub, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(KVConvertError, match="not a finished kvconvert output"):
        push(tmp_path, "alice/x")
    assert not hub.log  # nothing was sent


def test_cli_push_in_a_subprocess_through_hf_endpoint(hub, output, tmp_path):
    """The installed client, configured only through the environment, as a user runs it."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_ENDPOINT": hub.url,
        "HF_TOKEN": TOKEN,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(tmp_path / "hf-home"),  # the client caches a registry there
    }
    proc = subprocess.run(
        [sys.executable, "-m", "kvconvert", "push", str(output), "dave/tiny"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"pushed to {hub.url}/dave/tiny/commit/" in proc.stdout
    assert TOKEN not in proc.stdout + proc.stderr
    assert hub.repos["dave/tiny"].branches["main"] == {**local_files(output), **publishable(output)}
