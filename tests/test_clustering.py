"""Leiden convenience and cluster agreement."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score

import histoexpr as hx


def _blobs(n_per=60, n_genes=80, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(["a", "b", "c"], n_per)
    centres = rng.normal(scale=6.0, size=(3, n_genes))
    X = centres[np.repeat(np.arange(3), n_per)] + rng.normal(size=(3 * n_per, n_genes))
    adata = ad.AnnData(X.astype(np.float32), obs=pd.DataFrame({"truth": labels}, index=[f"t{i}" for i in range(len(X))]))
    adata.obsm["X_emb"] = X[:, :10].copy()
    return adata


def test_cluster_agreement_matches_sklearn():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 4, 200), rng.integers(0, 3, 200)
    b[:100] = a[:100]
    res = hx.metrics.cluster_agreement(a, b)
    assert res["ami"] == pytest.approx(adjusted_mutual_info_score(a, b))
    assert res["ari"] == pytest.approx(adjusted_rand_score(a, b))
    assert res["n_obs"] == 200 and res["n_clusters_a"] == 4


def test_cluster_agreement_anndata_alignment_and_missing_labels():
    adata = _blobs()
    adata.obs["other"] = adata.obs["truth"].to_numpy()
    adata.obs.loc[adata.obs_names[:5], "other"] = None
    res = hx.metrics.cluster_agreement(adata, key_a="truth", key_b="other")
    assert res["ari"] == pytest.approx(1.0) and res["n_obs"] == adata.n_obs - 5
    shuffled = adata[np.random.default_rng(1).permutation(adata.n_obs)].copy()
    res2 = hx.metrics.cluster_agreement(adata, shuffled, key_a="truth", key_b="truth")
    assert res2["ami"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="different lengths"):
        hx.metrics.cluster_agreement([1, 2, 3], [1, 2])
    with pytest.raises(KeyError, match="nope"):
        hx.metrics.cluster_agreement(adata, key_a="truth", key_b="nope")


def test_leiden_on_expression_and_embedding():
    adata = _blobs()
    before = adata.X.copy()
    hx.tl.leiden(adata, resolution=0.3, method="gauss")
    assert adata.obs["leiden"].dtype == "category"
    assert hx.metrics.cluster_agreement(adata, key_a="leiden", key_b="truth")["ari"] == pytest.approx(1.0)
    np.testing.assert_array_equal(adata.X, before)  # input untouched
    assert "neighbors" not in adata.uns and "X_pca" not in adata.obsm
    out = hx.tl.leiden(adata, use_rep="X_emb", key_added="leiden_emb", resolution=0.3, method="gauss", copy=True)
    assert "leiden_emb" in out.obs and "leiden_emb" not in adata.obs
    assert hx.metrics.cluster_agreement(out, key_a="leiden_emb", key_b="truth")["ami"] > 0.95
    again = hx.tl.leiden(adata, resolution=0.3, method="gauss", copy=True)
    np.testing.assert_array_equal(again.obs["leiden"], adata.obs["leiden"])  # seeded


def test_leiden_errors():
    empty = ad.AnnData(np.zeros((10, 0), dtype=np.float32))
    empty.obsm["X_uni"] = np.zeros((10, 4))
    with pytest.raises(ValueError, match="use_rep='X_<encoder>'"):
        hx.tl.leiden(empty)
    with pytest.raises(KeyError, match="X_uni"):
        hx.tl.leiden(empty, use_rep="X_missing")
    bad = _blobs()
    bad.X[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        hx.tl.leiden(bad)


@pytest.mark.slow  # scanpy's umap weights: numba compilation on first use (~20 s)
def test_leiden_predicted_vs_measured_real_section(shared_data):
    from test_emd import her2st_grid

    pred, truth = her2st_grid(shared_data, n_grid=20, n_genes=300)
    hx.tl.leiden(pred, resolution=0.5)
    hx.tl.leiden(truth, resolution=0.5)
    res = hx.metrics.cluster_agreement(pred, truth, key_a="leiden", key_b="leiden")
    assert res["n_obs"] == pred.n_obs
    assert 0.1 < res["ami"] <= 1.0  # smoothed copy of the measurement: clearly related clusters


def test_leiden_gauss_on_real_section(shared_data):
    from test_emd import her2st_grid

    pred, truth = her2st_grid(shared_data, n_grid=20, n_genes=300)
    hx.tl.leiden(pred, resolution=0.5, method="gauss")
    hx.tl.leiden(truth, resolution=0.5, method="gauss")
    res = hx.metrics.cluster_agreement(pred, truth, key_a="leiden", key_b="leiden")
    assert res["n_obs"] == pred.n_obs and res["ami"] > 0.1
