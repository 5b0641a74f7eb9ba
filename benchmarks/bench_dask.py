"""Cohort feature extraction on Dask: speed-up of 2 workers over 1, and memory per worker (issue 11).

Five slides (the real SVS and PNG files of ``../shared/data/slides``, both SVS twice: one slide alone is
most of the work, so a cohort of one copy each could not go faster than that slide) are tiled and featurised with the offline
``hed_stats`` encoder by :func:`histoexpr.pp.extract_features_cohort` on a ``LocalCluster`` of 1 and
of 2 single-threaded worker processes (``--quick``: 2 slides). Reports wall time, speed-up, the
outputs' equality with a local run, and each worker's resident memory (RSS) after the run and its
peak (``VmHWM``).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = Path(os.environ.get("HISTOEXPR_SHARED_DATA", REPO.parent / "shared" / "data"))


def _rss() -> dict:
    import psutil

    peak_kb = int([ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")][0].split()[1])
    return {"rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1), "peak_rss_mb": round(peak_kb / 1024, 1)}


def run(quick: bool = False) -> dict:
    import anndata as ad
    import numpy as np
    from dask.distributed import Client, LocalCluster

    import histoexpr as hx

    slides_dir = SHARED / "slides"
    slides = {"cmu": slides_dir / "cmu-1-small-region.svs", "lung": slides_dir / "tcga-lung-rgb.png",
              "tcga": slides_dir / "tcga-cr-7395-01a-01-ts1.svs",
              "cmu_copy": slides_dir / "cmu-1-small-region.svs",
              "tcga_copy": slides_dir / "tcga-cr-7395-01a-01-ts1.svs"}  # kidney-48-5.tif: no tissue at this scale
    if quick:
        slides = dict(list(slides.items())[:2])
    kw = {"encoder": "hed_stats", "mpp": {"lung": 0.5, "tcga": 0.5, "tcga_copy": 0.5},
          "tile_kwargs": {"tile_size": 224, "mpp": 0.5}, "num_workers": 0, "progress": False}
    out: dict = {"slides": list(slides), "encoder": "hed_stats", "tile_kwargs": kw["tile_kwargs"]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        local = hx.pp.extract_features_cohort(slides, out_dir=tmp / "local", **kw)
        out["local_s"] = round(time.perf_counter() - t0, 2)
        out["n_tiles"] = dict(zip(local["slide_id"], local["n_tiles"].astype(int).tolist()))
        for n in (1, 2):
            with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                    Client(cluster) as client:
                client.run(lambda: __import__("histoexpr").models.get_encoder("hed_stats"))  # warm imports
                t0 = time.perf_counter()
                summary = hx.pp.extract_features_cohort(slides, out_dir=tmp / f"dask{n}", client=client, **kw)
                seconds = time.perf_counter() - t0
                mem = client.run(_rss)
            equal = all(
                np.array_equal(ad.read_h5ad(tmp / "local" / f"{s}.h5ad").obsm["X_hed_stats"],
                               ad.read_h5ad(tmp / f"dask{n}" / f"{s}.h5ad").obsm["X_hed_stats"])
                for s in slides)
            out[f"workers_{n}"] = {"seconds": round(seconds, 2), "status": summary["status"].tolist(),
                                   "equal_to_local": bool(equal), "memory_per_worker": list(mem.values())}
    out["speedup_2_vs_1"] = round(out["workers_1"]["seconds"] / out["workers_2"]["seconds"], 2)
    out["cpu_count"] = os.cpu_count()
    return out


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
