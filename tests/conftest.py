from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def find_shared(folder: str, env_var: str) -> Path | None:
    """``$env_var``, else ``../shared/<folder>`` beside the repository, else ``shared/<folder>`` inside it."""
    env = os.environ.get(env_var)
    candidates = [Path(env)] if env else []
    candidates += [REPO.parent / "shared" / folder, REPO / "shared" / folder]
    for c in candidates:
        if c.is_dir():
            return c
    return None


SHARED_DATA = find_shared("data", "HISTOEXPR_SHARED_DATA")


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


# --------------------------------------------------------------------------------------------
# shared tiny data and models (import them: ``from conftest import grid_tiles, tiny_sequoia``)
# --------------------------------------------------------------------------------------------
SEQUOIA_SMALL = {"depth": 1, "nheads": 2, "dimensions_f": 8, "dimensions_s": 8, "dimensions_c": 8}


def grid_tiles(rows, cols, d=16, seed=0, slide_id="s1"):
    """A tiles AnnData on grid positions ``(rows, cols)`` (256 px tiles) with random ``obsm["X_enc"]``."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    n = len(rows)
    ids = [f"{slide_id}_{r}_{c}" for r, c in zip(rows, cols)]
    obs = pd.DataFrame({"slide_id": pd.Categorical([slide_id] * n), "tile_id": ids, "row": rows, "col": cols,
                        "x0": np.asarray(cols) * 256, "y0": np.asarray(rows) * 256,
                        "tissue_fraction": np.ones(n)}, index=ids)
    a = ad.AnnData(np.zeros((n, 0), np.float32), obs=obs)
    a.obsm["spatial"] = np.c_[obs.x0 + 128, obs.y0 + 128].astype(float)
    a.obsm["X_enc"] = rng.normal(size=(n, d)).astype(np.float32)
    a.uns["histoexpr"] = {"slide_id": slide_id, "encoder": "enc", "tile_size_level0": 256.0}
    a.uns["spatial"] = {slide_id: {"scalefactors": {"spot_diameter_fullres": 256.0}}}
    return a


def tiny_sequoia(K=100, D=16, G=6, seed=0, genes=None, zero_pos=False):
    """A one-block SEQUOIA (K slots of D features → G genes) in eval mode."""
    import torch

    from histoexpr.models import Sequoia

    torch.manual_seed(seed)
    model = Sequoia({"num_outputs": G, "input_dim": D, "num_clusters": K, **SEQUOIA_SMALL}, genes=genes)
    if zero_pos:  # no slot embedding -> the model is invariant to the order of the K inputs
        with torch.no_grad():
            model.pos_emb1D.zero_()
    return model.eval()


def tiny_histoprism(genes=None, **kw):
    """A small HistoPrism (16 features → 7 genes, no dropout) in eval mode."""
    import torch

    from histoexpr.models import HistoPrism

    cfg = dict(input_dim=16, num_outputs=7, hidden_dim=32, nheads=4, dim_feedforward=64, dropout=0.0)
    cfg.update(kw)
    torch.manual_seed(0)
    return HistoPrism(cfg, genes=genes).eval()
