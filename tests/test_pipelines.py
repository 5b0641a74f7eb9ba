"""The example Snakemake workflow (examples/Snakefile) on two real slides, and Dask scale-out."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_snakemake_workflow_on_two_slides(shared_data, tmp_path):
    pytest.importorskip("snakemake")
    snakemake = shutil.which("snakemake") or str(Path(sys.executable).parent / "snakemake")
    if not Path(snakemake).exists():
        pytest.skip("snakemake command not found")
    slides = shared_data / "slides"
    manifest = tmp_path / "slides.csv"
    manifest.write_text(
        "slide,slide_id,mpp\n"
        f"{slides / 'cmu-1-small-region.svs'},cmu,\n"
        f"{slides / 'tcga-lung-rgb.png'},lung,0.5\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    cmd = [snakemake, "-s", str(REPO / "examples" / "Snakefile"), "--cores", "2", "--directory", str(tmp_path),
           "--config", f"slides={manifest}", f"out={tmp_path / 'results'}", "tile_size=256", "mpp=1.0",
           f"histoexpr={sys.executable} -m histoexpr.cli"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for sid in ("cmu", "lung"):
        info = json.loads((tmp_path / "results" / sid / "info.json").read_text())
        (tiles,) = info["tiles"].values()
        assert tiles["n_obs"] > 0 and tiles["features"]["X_hed_stats"][1] == 103
        assert json.loads((tmp_path / "results" / sid / "features.json").read_text())["steps"][0]["status"] == "done"
    # a second run has nothing to do
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.slow
def test_cohort_on_local_dask_cluster_equals_local(shared_data, tmp_path):
    import anndata as ad
    from dask.distributed import Client, LocalCluster

    import histoexpr as hx

    slides = {"cmu": shared_data / "slides" / "cmu-1-small-region.svs",
              "lung": shared_data / "slides" / "tcga-lung-rgb.png"}
    kw = {"encoder": "hed_stats", "mpp": {"lung": 0.5}, "tile_kwargs": {"tile_size": 256, "mpp": 1.0},
          "num_workers": 0, "progress": False}
    local = hx.pp.extract_features_cohort(slides, out_dir=tmp_path / "local", **kw)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        dist = hx.pp.extract_features_cohort(slides, out_dir=tmp_path / "dask", client=client, **kw)
    assert local["status"].tolist() == dist["status"].tolist() == ["done", "done"]
    assert set(dist["worker"]) != {"local"}
    for sid in slides:
        a = ad.read_h5ad(tmp_path / "local" / f"{sid}.h5ad")
        b = ad.read_h5ad(tmp_path / "dask" / f"{sid}.h5ad")
        assert list(a.obs_names) == list(b.obs_names)
        np.testing.assert_array_equal(a.obsm["X_hed_stats"], b.obsm["X_hed_stats"])
