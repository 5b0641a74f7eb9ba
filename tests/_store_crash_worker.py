"""Writer process for the store fault-injection tests, plus the checks they share.

Run as ``python _store_crash_worker.py <store> <mode>`` with ``HISTOEXPR_CRASH_AT=<step>`` to be
killed (SIGKILL) at that step of the write. Modes: ``new_table``, ``overwrite_table``, ``new_image``.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from pathlib import Path

import numpy as np

XENIUM = Path("xenium_segtraq/tests/data/xenium_sp_subset.zarr")
TABLE = "hx_new"
IMAGE = "hx_img"
ELEMENT_TYPES = ("images", "labels", "points", "shapes", "tables")


def make_table(sdata, version: int):
    """The table the writer writes: the store's own cell table under a new name, X scaled by ``version``."""
    tb = sdata.tables["table"].copy()
    tb.uns.pop("spatialdata_attrs", None)
    tb.obs["cell_id"] = tb.obs["cell_id"].astype(str)
    tb.X = tb.X * version
    return tb


def make_image():
    from spatialdata.models import Image2DModel

    pixels = np.random.default_rng(7).integers(0, 255, (3, 96, 120), dtype=np.uint8)
    return Image2DModel.parse(pixels, dims=("c", "y", "x"), scale_factors=[2, 2]), pixels


def write(store: str, mode: str, version: int = 2) -> None:
    import spatialdata as sd

    import histoexpr as hx

    sdata = sd.read_zarr(store, selection=("shapes", "tables"))
    if mode in ("new_table", "overwrite_table"):
        hx.io.add_table(sdata, make_table(sdata, version), name=TABLE, region="cell_boundaries",
                        instance_key="cell_id", overwrite=mode == "overwrite_table")
    elif mode == "new_image":
        sdata[IMAGE] = make_image()[0]
        hx.io.write_element_safely(sdata, IMAGE, overwrite=False)
    else:
        raise ValueError(mode)


def hash_elements(root: Path, exclude: tuple[str, ...] = ()) -> dict[str, dict[str, str]]:
    """``{"tables/x": {relative file: md5}}`` for every element folder of the store."""
    out = {}
    for t in ELEMENT_TYPES:
        if not (root / t).is_dir():
            continue
        for el in sorted((root / t).iterdir()):
            key = f"{t}/{el.name}"
            if not el.is_dir() or key in exclude:
                continue
            files = {}
            for dirpath, _, names in os.walk(el):
                for n in names:
                    p = Path(dirpath) / n
                    files[str(p.relative_to(el))] = hashlib.md5(p.read_bytes()).hexdigest()
            out[key] = files
    return out


def written_state(root: Path, mode: str, sdata=None) -> str:
    """Read the store and say which version of the written element it holds: 'absent', 'v1' or 'v2'.

    Raises AssertionError when the element is there but not equal to either version (torn write).
    """
    import spatialdata as sd

    if sdata is None:
        sdata = sd.read_zarr(root, selection=("images",) if mode == "new_image" else ("shapes", "tables"))
    if mode == "new_image":
        if IMAGE not in sdata.images:
            return "absent"
        tree = sdata.images[IMAGE]
        expected = make_image()[1]
        got = np.asarray(tree["scale0"]["image"].values)
        assert len(tree.children) == 3, f"image has {len(tree.children)} scales, expected 3"
        assert np.array_equal(got, expected), "written image differs from what was written"
        for scale in tree.children.values():
            np.asarray(scale["image"].values)  # every level reads
        return "v2"
    if TABLE not in sdata.tables:
        return "absent"
    tb = sdata.tables[TABLE]
    x = tb.X.toarray() if hasattr(tb.X, "toarray") else np.asarray(tb.X)
    base = sdata.tables["table"].X
    base = base.toarray() if hasattr(base, "toarray") else np.asarray(base)
    assert list(tb.obs["cell_id"].astype(str)) == list(sdata.tables["table"].obs["cell_id"].astype(str))
    for v in (1, 2):
        if np.array_equal(x, base * v):
            return f"v{v}"
    raise AssertionError("the written table equals neither the old nor the new version")


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    store_, mode_ = sys.argv[1], sys.argv[2]
    import time

    import spatialdata  # noqa: F401  (imports first: a timed kill should land in the write)

    import histoexpr.io  # noqa: F401

    print("READY", flush=True)
    t0 = time.perf_counter()
    write(store_, mode_)
    print(f"DONE {time.perf_counter() - t0:.3f}", flush=True)
