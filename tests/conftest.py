from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _find_shared_data() -> Path | None:
    env = os.environ.get("HISTOEXPR_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates += [REPO.parent / "shared" / "data", REPO / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c
    return None


SHARED_DATA = _find_shared_data()


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")


def pytest_collection_modifyitems(config, items):
    import torch

    skip_slow = pytest.mark.skip(reason="slow test: run with --runslow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder with the real data (``../shared/data``); tests using it skip when it is absent."""
    if SHARED_DATA is None:
        pytest.skip("real data folder ../shared/data not found (set HISTOEXPR_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(1)  # measured: 2 threads were much slower on shared 2-core CI
    yield


def copy_writable(src, dst):
    """Copy a folder of ../shared/data (read-only files) to ``dst`` with write permission restored."""
    import shutil
    import stat

    shutil.copytree(src, dst)
    for path in [Path(dst), *Path(dst).rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)
    return dst
