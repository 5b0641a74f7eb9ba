"""K-means slide summaries for SEQUOIA (SPEC §2): pp.kmeans_means and pp.cluster_features."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from sklearn.cluster import KMeans

import histoexpr as hx


def _loop_means(x, labels, k):
    """Reference: the per-cluster mean, one cluster at a time (as SEQUOIA computes it)."""
    return np.stack([x[labels == c].mean(axis=0) for c in range(k)])


def _tiles(n_per_slide=(150, 120), dim=8, seed=0):
    rng = np.random.default_rng(seed)
    obs, feats = [], []
    for s, n in enumerate(n_per_slide):
        centers = rng.normal(scale=5, size=(6, dim))
        feats.append(centers[rng.integers(0, 6, n)] + rng.normal(size=(n, dim)))
        obs += [(f"s{s}", f"s{s}_{i}") for i in range(n)]
    obs = pd.DataFrame(obs, columns=["slide_id", "tile_id"]).set_index("tile_id", drop=False)
    obs.index.name = None
    obs["slide_id"] = obs["slide_id"].astype("category")
    adata = ad.AnnData(obs=obs)
    adata.obsm["X_enc"] = np.concatenate(feats).astype(np.float32)
    adata.uns["histoexpr"] = {"feature_key": "X_enc"}
    return adata


def test_kmeans_means_matches_sklearn_and_loop():
    x = np.random.default_rng(1).normal(size=(300, 16)).astype(np.float32)
    means, labels = hx.pp.kmeans_means(x, n_clusters=20, random_state=7, return_labels=True)
    ref_labels = KMeans(n_clusters=20, random_state=7, n_init="auto").fit_predict(x)
    np.testing.assert_array_equal(labels, ref_labels)
    assert means.dtype == np.float32 and means.shape == (20, 16)
    np.testing.assert_allclose(means, _loop_means(x, ref_labels, 20), rtol=1e-5, atol=1e-6)
    # seeded: same call, same answer
    np.testing.assert_array_equal(means, hx.pp.kmeans_means(x, n_clusters=20, random_state=7))


def test_kmeans_means_recovers_blobs():
    rng = np.random.default_rng(0)
    centers = np.array([[0, 0], [20, 0], [0, 20]], dtype=float)
    x = np.concatenate([c + rng.normal(size=(100, 2)) for c in centers])
    means = hx.pp.kmeans_means(x, n_clusters=3)
    order = np.argsort(means[:, 0] + 2 * means[:, 1])
    np.testing.assert_allclose(means[order], centers[[0, 1, 2]], atol=0.3)


def test_empty_clusters_never_nan():
    # 40 distinct tiles repeated 5× (blank/duplicated tiles) with K=100: the upstream code gives NaN rows
    base = np.random.default_rng(2).normal(size=(40, 6)).astype(np.float32)
    x = np.repeat(base, 5, axis=0)
    with pytest.warns(UserWarning, match="clusters are empty"):
        means, labels = hx.pp.kmeans_means(x, n_clusters=100, return_labels=True)
    assert means.shape == (100, 6) and np.isfinite(means).all()
    assert len(np.unique(labels)) < 100  # there really were empty clusters
    # every row is an existing tile's feature (non-empty clusters hold identical copies)
    dist = np.abs(means[:, None, :] - base[None]).max(axis=2).min(axis=1)
    assert dist.max() < 1e-4


def test_too_few_tiles_and_nan_are_errors():
    x = np.random.default_rng(3).normal(size=(50, 4))
    with pytest.raises(ValueError, match="50 tiles but n_clusters=100"):
        hx.pp.kmeans_means(x)
    x[7, 2] = np.nan
    with pytest.raises(ValueError, match="NaN/inf"):
        hx.pp.kmeans_means(x, n_clusters=10)


def test_cluster_features_per_slide(tmp_path):
    adata = _tiles()
    out = hx.pp.cluster_features(adata, n_clusters=10, random_state=3, copy=True)
    assert "kmeans" not in adata.obs and "kmeans" not in adata.uns  # copy=True leaves the input alone
    assert isinstance(out.obs["kmeans"].dtype, pd.CategoricalDtype)
    assert list(out.obs["kmeans"].cat.categories) == [str(k) for k in range(10)]
    assert out.uns["kmeans"]["params"] == {"use_rep": "X_enc", "n_clusters": 10, "random_state": 3}
    for sid in ("s0", "s1"):
        rows = (adata.obs["slide_id"] == sid).to_numpy()
        x = adata.obsm["X_enc"][rows]
        ref_labels = KMeans(n_clusters=10, random_state=3, n_init="auto").fit_predict(x)
        np.testing.assert_array_equal(out.obs["kmeans"][rows].astype(int).to_numpy(), ref_labels)
        np.testing.assert_allclose(out.uns["kmeans"]["means"][sid], _loop_means(x, ref_labels, 10), rtol=1e-5,
                                   atol=1e-5)
        assert out.uns["kmeans"]["means"][sid].dtype == np.float32
    path = tmp_path / "tiles.h5ad"
    out.write_h5ad(path)  # the result is serialisable
    back = ad.read_h5ad(path)
    np.testing.assert_array_equal(back.uns["kmeans"]["means"]["s1"], out.uns["kmeans"]["means"]["s1"])


def test_cluster_features_errors():
    adata = _tiles(n_per_slide=(150, 30))
    with pytest.raises(ValueError, match="slide 's1'.*30 tiles but n_clusters=100"):
        hx.pp.cluster_features(adata)
    adata.obsm["X_enc"][3] = np.inf
    with pytest.raises(ValueError, match=r"NaN/inf features, e.g. \['s0_3'\]"):
        hx.pp.cluster_features(adata, n_clusters=10)
    adata.obsm["X_other"] = adata.obsm["X_enc"]
    del adata.uns["histoexpr"]
    with pytest.raises(ValueError, match="use_rep"):
        hx.pp.cluster_features(adata, n_clusters=10)


def test_cluster_features_single_slide_without_slide_id():
    adata = _tiles(n_per_slide=(200,))
    del adata.obs["slide_id"]
    adata.uns["histoexpr"]["slide_id"] = "only"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no empty-cluster warning on ordinary data
        hx.pp.cluster_features(adata, n_clusters=100, key_added="km")
    assert adata.uns["km"]["means"]["only"].shape == (100, 8)
    assert np.isfinite(adata.uns["km"]["means"]["only"]).all()
