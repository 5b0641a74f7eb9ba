"""DataLoader workers: no hang on a SpatialData (zarr/dask) slide, no orphaned workers on an error or Ctrl-C.

The hang: ``pp.tile`` reads pixels through dask's threaded scheduler, whose process-wide thread pool
does not survive the fork that starts a DataLoader worker; the worker's first ``compute()`` then waited
forever, and killing the main process left the worker behind as an orphan.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import histoexpr as hx
from histoexpr.models.encoders import get_encoder

XENIUM = "xenium_segtraq/tests/data/xenium_sp_subset.zarr"

_SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    warnings.simplefilter("ignore")
    import torch
    import histoexpr as hx

    torch.set_num_threads(1)
    sdata = hx.io.read_xenium(sys.argv[1])
    slide = hx.io.open_slide(sdata, image_key="he_image")
    tiles = hx.pp.tile(slide, tile_size=64, tissue_threshold=0.0)  # reads pixels with dask's thread pool
    torch.manual_seed(0)
    enc = hx.models.get_encoder("test_resnet", weights="random")
    # default num_workers: DataLoader worker processes, forked after dask's threads started
    hx.pp.extract_features(tiles, slide, encoder=enc, batch_size=8, progress=False)
    feats = tiles.obsm["X_test_resnet"]
    ref = hx.pp.extract_features(tiles, slide, encoder=enc, batch_size=8, num_workers=0, progress=False,
                                 copy=True).obsm["X_test_resnet"]
    assert (feats == ref).all()
    print("done", feats.shape[0], flush=True)
    """
)


def _processes_with_marker(marker: str) -> list:
    import psutil

    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("HX_LOADER_TEST") == marker:
                found.append(proc)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def test_spatialdata_slide_with_default_workers_does_not_hang(shared_data, tmp_path):
    """Runs in a subprocess under `timeout`: before the fix it hung until killed (rc 124)."""
    marker = uuid.uuid4().hex
    src = Path(hx.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "HX_LOADER_TEST": marker}
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT)
    try:
        res = subprocess.run(["timeout", "-k", "10", "240", sys.executable, str(script), str(shared_data / XENIUM)],
                             capture_output=True, text=True, env=env, timeout=300)
    finally:
        leftovers = _processes_with_marker(marker)
        for proc in leftovers:  # do not leave a hung worker behind, even when the test fails
            proc.kill()
    assert res.returncode == 0, f"rc={res.returncode} (124: hung and killed)\n{res.stdout}\n{res.stderr[-3000:]}"
    assert "done" in res.stdout
    assert not leftovers, f"orphaned processes: {leftovers}"


class _FailOnBatch(nn.Module):
    """Raises ``error`` at the second forward pass (an error, or a Ctrl-C, in the middle of the loop)."""

    def __init__(self, base: nn.Module, error: type[BaseException]):
        super().__init__()
        self.base, self.error, self.calls = base, error, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 2:
            raise self.error("stop in the middle")
        return self.base(x)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_no_orphaned_workers_after_an_error(shared_data, error):
    import psutil

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    slide = hx.io.open_slide(shared_data / "slides" / "cmu-1-small-region.svs")
    tiles = hx.pp.tile(slide)[:16].copy()
    torch.manual_seed(0)
    tiny = get_encoder("test_resnet", weights="random")
    module = _FailOnBatch(tiny.module, error)
    enc = get_encoder(module, dim=96, transform=tiny.transform, name="failing")
    module.calls = 0
    with pytest.raises(error, match="stop in the middle") as excinfo:
        hx.pp.extract_features(tiles, slide, encoder=enc, batch_size=4, num_workers=2, progress=False)
    new = [p for p in me.children(recursive=True) if p.pid not in before]
    _, alive = psutil.wait_procs(new, timeout=10)
    for p in alive:
        p.kill()
    assert not alive, f"{len(alive)} DataLoader workers still running while the traceback is held: {alive}"
    assert excinfo.value is not None  # the traceback (and its frames) is still alive here
    assert "X_failing" not in tiles.obsm
    slide.close()
    np.testing.assert_equal(module.calls, 2)
