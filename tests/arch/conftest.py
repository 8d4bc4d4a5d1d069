from __future__ import annotations

from pathlib import Path

import pytest

from tests.models import ARCHS, REMOTE_ARCHS, build


@pytest.fixture(scope="session")
def arch_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("arch")
    return {k: build(k, root / k) for k in ARCHS}


@pytest.fixture(scope="session")
def remote_arch_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("remote-arch")
    return {k: build(k, root / k) for k in REMOTE_ARCHS}
