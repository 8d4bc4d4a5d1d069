from __future__ import annotations

from pathlib import Path

import pytest

from tests.arch.models import ARCHS, POD_ONLY_ARCHS, build


@pytest.fixture(scope="session")
def arch_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("arch")
    return {k: build(k, root / k) for k in ARCHS + POD_ONLY_ARCHS}
