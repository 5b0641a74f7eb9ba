"""Caches that cannot lie: the feature cache's fingerprints and lock, and k-means means kept in ``uns``.

Each test failed before: a cache of another slide with the same name and size was reused, two
simultaneous runs with different weights could write into the same chunks, and ``predict_bulk`` used
the k-means means of tiles or features that had since changed.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import histoexpr as hx
from histoexpr.models.encoders import get_encoder
from histoexpr.pp._features import _slide_fingerprint, _weights_fingerprint

TINY = "test_resnet"


# ---------------------------------------------------------------------------- helpers
def _write_tiff(path, seed: int) -> None:
    """An uncompressed tiled RGB TIFF: same size in bytes for every seed, different pixels."""
    import tifffile

    rng = np.random.default_rng(seed)
    base = rng.integers(60, 200, size=(16, 16, 3), dtype=np.uint8)
    img = np.kron(base, np.ones((32, 32, 1), np.uint8))  # 512 × 512, blocky texture
    img = (img + rng.integers(0, 40, size=img.shape, dtype=np.uint8)).astype(np.uint8)
    tifffile.imwrite(path, img, tile=(128, 128), photometric="rgb", compression=None)


def _tiles(slide) -> ad.AnnData:
    return hx.pp.tile(slide, tile_size=64, mpp=1.0, tissue_threshold=0.0, filter_low_contrast=False)


def _encoder(seed: int):
    torch.manual_seed(seed)
    return get_encoder(TINY, weights="random")


def _features(tiles, slide, enc, **kw) -> np.ndarray:
    out = hx.pp.extract_features(tiles, slide, encoder=enc, batch_size=4, num_workers=0, progress=False,
                                 copy=True, **kw)
    return out.obsm[f"X_{enc.name}"]


# ---------------------------------------------------------------------------- foreign cache
def test_foreign_slide_with_same_name_size_and_mtime_is_not_reused(tmp_path):
    path = tmp_path / "slide.tif"
    _write_tiff(path, seed=0)
    stat_a = path.stat()
    enc = _encoder(0)
    cache = tmp_path / "slide.features.zarr"
    with hx.io.open_slide(path, mpp=0.5) as slide_a:
        tiles = _tiles(slide_a)
        feats_a = _features(tiles, slide_a, enc, cache=cache)

    _write_tiff(path, seed=1)  # another image under the same name ...
    os.utime(path, ns=(stat_a.st_atime_ns, stat_a.st_mtime_ns))  # ... same mtime
    assert path.stat().st_size == stat_a.st_size and path.stat().st_mtime_ns == stat_a.st_mtime_ns
    with hx.io.open_slide(path, mpp=0.5) as slide_b:
        tiles_b = _tiles(slide_b)
        assert list(tiles_b.obs_names) == list(tiles.obs_names)  # the same tiles: only the pixels differ
        expected_b = _features(tiles_b, slide_b, enc)
        with pytest.warns(UserWarning, match="computed from another slide"):
            got = _features(tiles_b, slide_b, enc, cache=cache)
    assert not np.allclose(expected_b, feats_a)
    np.testing.assert_array_equal(got, expected_b)


def test_other_weights_are_not_reused(cmu):
    slide, tiles = cmu
    enc_a, enc_b = _encoder(0), _encoder(1)
    assert enc_a.name == enc_b.name and enc_a.weights == enc_b.weights == "random"
    cache = cmu.tmp / "w.zarr"
    _features(tiles, slide, enc_a, cache=cache)
    with pytest.warns(UserWarning, match="another encoder or other weights"):
        got = _features(tiles, slide, enc_b, cache=cache)
    np.testing.assert_array_equal(got, _features(tiles, slide, enc_b))


def test_a_folder_that_is_not_a_cache_is_left_alone(cmu, tmp_path):
    slide, tiles = cmu
    folder = tmp_path / "my_data"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a histoexpr feature cache; it is left untouched"):
        _features(tiles, slide, _encoder(0), cache=folder)
    assert (folder / "notes.txt").read_text() == "mine" and len(list(folder.iterdir())) == 1


def test_weights_fingerprint_sees_one_changed_value():
    """A value outside the strided sample of a large tensor still changes the fingerprint."""
    lin = torch.nn.Linear(2048, 1024)
    enc = get_encoder(lin, dim=1024, transform=lambda x: x, name="lin")
    before = _weights_fingerprint(enc)
    with torch.no_grad():
        lin.weight[1000, 7] += 1e-3
    assert _weights_fingerprint(enc) != before


def test_spatialdata_slide_fingerprint_follows_the_pixels():
    import spatialdata as sd
    from spatialdata.models import Image2DModel

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, size=(3, 300, 400), dtype=np.uint8)

    def fp(a):
        sdata = sd.SpatialData(images={"he": Image2DModel.parse(a, dims=("c", "y", "x"))})
        return _slide_fingerprint(hx.io.open_slide(sdata, image_key="he", mpp=0.5))

    assert fp(img) == fp(img.copy())
    assert fp(img) != fp(255 - img)


# ---------------------------------------------------------------------------- concurrent writers
class _Cmu:
    def __init__(self, slide, tiles, tmp):
        self.slide, self.tiles, self.tmp = slide, tiles, tmp

    def __iter__(self):
        return iter((self.slide, self.tiles))


@pytest.fixture(scope="module")
def cmu(shared_data, tmp_path_factory):
    slide = hx.io.open_slide(shared_data / "slides" / "cmu-1-small-region.svs")
    tiles = hx.pp.tile(slide)[:12].copy()
    yield _Cmu(slide, tiles, tmp_path_factory.mktemp("cmu"))
    slide.close()


def _run_in_child(slide, tiles, enc, cache, barrier, out_path):
    torch.set_num_threads(1)
    barrier.wait()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        feats = hx.pp.extract_features(tiles, slide, encoder=enc, batch_size=2, num_workers=0, progress=False,
                                       cache=cache, copy=True).obsm[f"X_{enc.name}"]
    np.save(out_path, feats)


def test_concurrent_runs_with_other_weights_never_mix(cmu):
    slide, tiles = cmu
    encoders = [_encoder(0), _encoder(1)]
    expected = [_features(tiles, slide, e) for e in encoders]
    assert not np.allclose(expected[0], expected[1])
    ctx = mp.get_context("fork")
    for trial in range(3):
        cache = cmu.tmp / f"race{trial}.zarr"
        barrier = ctx.Barrier(2)
        outs = [cmu.tmp / f"race{trial}_{i}.npy" for i in range(2)]
        procs = [ctx.Process(target=_run_in_child, args=(slide, tiles, e, cache, barrier, o))
                 for e, o in zip(encoders, outs)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=300)
            assert p.exitcode == 0
        for i in range(2):
            np.testing.assert_array_equal(np.load(outs[i]), expected[i], err_msg=f"trial {trial}, run {i}")


def test_second_run_waits_for_the_lock(cmu):
    from filelock import FileLock

    slide, tiles = cmu
    enc = _encoder(0)
    cache = cmu.tmp / "locked.zarr"
    lock = FileLock(str(cache) + ".lock")
    lock.acquire()
    result = {}

    def run():
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            result["features"] = _features(tiles, slide, enc, cache=cache)
        result["warnings"] = [str(w.message) for w in rec]

    t = threading.Thread(target=run)
    t.start()
    try:
        time.sleep(3.0)
        assert t.is_alive() and not cache.exists()  # nothing written while another process holds the cache
    finally:
        lock.release()
    t.join(timeout=300)
    assert any("waiting for another process" in w for w in result["warnings"])
    np.testing.assert_array_equal(result["features"], _features(tiles, slide, enc))


# ---------------------------------------------------------------------------- k-means means in uns
def _random_tiles(n=60, d=8, seed=0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    obs = pd.DataFrame({"slide_id": pd.Categorical(["S"] * n)}, index=[f"t{i}" for i in range(n)])
    tiles = ad.AnnData(X=np.zeros((n, 0), np.float32), obs=obs)
    tiles.obsm["X_uni"] = rng.normal(size=(n, d)).astype(np.float32)
    tiles.uns["histoexpr"] = {"encoder": "uni"}
    return tiles


def _sequoia(K=6, D=8):
    from histoexpr.models import Sequoia

    torch.manual_seed(0)
    cfg = {"num_outputs": 4, "input_dim": D, "num_clusters": K, "depth": 1, "nheads": 2, "dimensions_f": 8,
           "dimensions_s": 8, "dimensions_c": 8}
    return Sequoia(cfg, genes=[f"g{i}" for i in range(4)]).eval()


def _fresh_prediction(tiles, model):
    fresh = tiles.copy()
    fresh.uns.pop("kmeans", None)
    return hx.tl.predict_bulk(fresh, model, device="cpu").X


def test_predict_bulk_recomputes_means_after_subsetting_tiles():
    model = _sequoia()
    tiles = _random_tiles()
    hx.pp.cluster_features(tiles, n_clusters=6)
    full = hx.tl.predict_bulk(tiles, model, device="cpu").X
    sub = tiles[::2].copy()  # uns (with the full slide's means) comes along
    with pytest.warns(UserWarning, match="computed from other tiles, features or k-means settings"):
        got = hx.tl.predict_bulk(sub, model, device="cpu").X
    expected = _fresh_prediction(sub, model)
    assert not np.allclose(expected, full)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_predict_bulk_recomputes_means_after_replacing_features():
    model = _sequoia()
    tiles = _random_tiles()
    hx.pp.cluster_features(tiles, n_clusters=6)
    tiles.obsm["X_uni"] = _random_tiles(seed=1).obsm["X_uni"]  # e.g. features re-extracted with other weights
    with pytest.warns(UserWarning, match="recomputed"):
        got = hx.tl.predict_bulk(tiles, model, device="cpu").X
    np.testing.assert_allclose(got, _fresh_prediction(tiles, model), rtol=1e-5, atol=1e-6)


def test_predict_bulk_reuses_matching_means_without_warning():
    model = _sequoia()
    tiles = _random_tiles()
    hx.pp.cluster_features(tiles, n_clusters=6)
    tiles.uns["kmeans"]["means"]["S"] = tiles.uns["kmeans"]["means"]["S"] + 0  # same values
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = hx.tl.predict_bulk(tiles, model, device="cpu").X
    np.testing.assert_allclose(got, _fresh_prediction(tiles, model), rtol=1e-5, atol=1e-6)
    # through h5ad: the fingerprints survive a round trip
    assert isinstance(tiles.uns["kmeans"]["fingerprints"]["S"], str)
