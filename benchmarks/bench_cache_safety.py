"""What the feature cache's safety costs, and whether simultaneous runs can still mix (issue 10).

* Slide fingerprint (path, size, mtime, BLAKE2b of 16 × 64 KiB sampled blocks; for a SpatialData
  image: layout and sampled pixels): ms per slide, on the real slides in ``../shared/data``.
* Weights fingerprint (CRC-32 of every byte of every tensor): first call and memoised call, for the
  0.4 M-parameter test encoder, ResNet-50 (25.6 M) and, unless ``quick``, a ViT-L/16 (UNI size, 303 M),
  random weights (hashing cost does not depend on the values).
* Simultaneous starts: two processes with different weights on one cache, released together by a
  barrier; counts runs whose features differ from their own weights' reference ("mixed").
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("HISTOEXPR_SHARED_DATA", HERE.parent.parent / "shared" / "data"))


def _ms(fn, repeat: int = 5) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat * 1e3


def _slide_fingerprints() -> dict:
    import histoexpr as hx
    from histoexpr.pp._features import _slide_fingerprint

    out = {}
    for name, mpp in (("cmu-1-small-region.svs", None), ("tcga-cr-7395-01a-01-ts1.svs", 0.25)):
        path = SHARED / "slides" / name
        with hx.io.open_slide(path, mpp=mpp) as slide:
            out[name] = {"mb": round(path.stat().st_size / 2**20, 2), "ms": round(_ms(lambda: _slide_fingerprint(slide)), 2)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = hx.io.read_xenium(SHARED / "xenium_segtraq/tests/data/xenium_sp_subset.zarr")
        slide = hx.io.open_slide(sdata, image_key="he_image")
    out["xenium he_image (SpatialData)"] = {"ms": round(_ms(lambda: _slide_fingerprint(slide)), 2)}
    return out


def _weights_fingerprints(quick: bool) -> dict:
    import timm

    from histoexpr.models.encoders import get_encoder
    from histoexpr.pp import _features

    models = {"test_resnet": "test_resnet", "resnet50": "resnet50"}
    if not quick:
        models["vit_large_patch16_224"] = "vit_large_patch16_224"
    out = {}
    for label, name in models.items():
        module = timm.create_model(name, pretrained=False, num_classes=0)
        enc = get_encoder(module, dim=module.num_features, transform=lambda x: x, name=label)
        t = time.perf_counter()
        _features._weights_fingerprint(enc)
        first = (time.perf_counter() - t) * 1e3
        out[label] = {"parameters_m": round(sum(p.numel() for p in module.parameters()) / 1e6, 1),
                      "first_call_ms": round(first, 1),
                      "memoised_ms": round(_ms(lambda e=enc: _features._weights_fingerprint(e)), 3)}
        del module, enc
    return out


def _child(tiles, slide, enc, cache, barrier, path):
    import torch

    import histoexpr as hx

    torch.set_num_threads(1)
    barrier.wait()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = hx.pp.extract_features(tiles, slide, encoder=enc, batch_size=2, num_workers=0, progress=False,
                                   cache=cache, copy=True).obsm[f"X_{enc.name}"]
    np.save(path, f)


def _races(trials: int) -> dict:
    import torch

    import histoexpr as hx
    from histoexpr.models.encoders import get_encoder

    slide = hx.io.open_slide(SHARED / "slides" / "cmu-1-small-region.svs")
    tiles = hx.pp.tile(slide)[:12].copy()
    encs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        encs.append(get_encoder("test_resnet", weights="random"))
    expected = [hx.pp.extract_features(tiles, slide, encoder=e, batch_size=2, num_workers=0, progress=False,
                                       copy=True).obsm["X_test_resnet"] for e in encs]
    ctx = mp.get_context("fork")
    mixed = correct = 0
    with tempfile.TemporaryDirectory() as tmp:
        for t in range(trials):
            barrier = ctx.Barrier(2)
            outs = [f"{tmp}/{t}_{i}.npy" for i in range(2)]
            procs = [ctx.Process(target=_child, args=(tiles, slide, e, f"{tmp}/{t}.zarr", barrier, o))
                     for e, o in zip(encs, outs)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            for i, o in enumerate(outs):
                ok = Path(o).exists() and np.array_equal(np.load(o), expected[i])
                correct += ok
                mixed += not ok
    slide.close()
    return {"trials": trials, "runs": 2 * trials, "correct": correct, "mixed_or_failed": mixed}


def run(quick: bool = False) -> dict:
    return {
        "what": "feature-cache fingerprints (ms) and simultaneous starts with different weights on one cache",
        "slide_fingerprint": _slide_fingerprints(),
        "weights_fingerprint": _weights_fingerprints(quick),
        "simultaneous_starts": _races(4 if quick else 20),
    }


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
