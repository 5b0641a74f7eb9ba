"""Module co-expression (SEQUOIA Fig. 5d) and per-tile gene-set scores."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy.stats import linregress

import histoexpr as hx
from histoexpr.metrics import ModuleCoexpression, module_coexpression
from histoexpr.tl import score_gene_sets


def _module_slides(n_slides=3, n_tiles=120, seed=0):
    """Predicted maps where each module's genes follow one shared spatial factor."""
    rng = np.random.default_rng(seed)
    modules = {"M1": [f"a{i}" for i in range(6)], "M2": [f"b{i}" for i in range(5)], "M3": [f"c{i}" for i in range(4)]}
    genes = [g for v in modules.values() for g in v] + ["noise"]
    slides = []
    for s in range(n_slides):
        factors = rng.normal(size=(n_tiles, 3))
        cols = [factors[:, k] + 0.5 * rng.normal(size=n_tiles) for k, v in enumerate(modules.values()) for _ in v]
        X = np.column_stack([*cols, rng.normal(size=n_tiles)])
        obs = pd.DataFrame({"slide_id": f"s{s}"}, index=[f"s{s}_t{i}" for i in range(n_tiles)])
        slides.append(ad.AnnData(X, obs=obs, var=pd.DataFrame(index=genes)))
    return slides, modules


def test_module_coexpression_equals_pandas_average_and_groups_modules():
    slides, modules = _module_slides()
    with pytest.warns(UserWarning, match="not in every slide"):
        res = module_coexpression(slides, modules={**modules, "M4": ["absent_gene"]})
    assert isinstance(res, ModuleCoexpression)
    genes = [g for v in modules.values() for g in v]
    want = sum(pd.DataFrame(s[:, genes].X, columns=genes).corr() for s in slides) / len(slides)
    pd.testing.assert_frame_equal(res.corr, want.loc[res.order, res.order], check_names=False, atol=1e-12)
    assert (res.n_slides.to_numpy() == 3).all()
    # clustering keeps each module contiguous
    labels = res.module.to_numpy()
    assert sum(labels[i] != labels[i + 1] for i in range(len(labels) - 1)) == 2
    wb = res.within_between
    assert (wb["within"] > 0.6).all() and (wb["between"].abs() < 0.2).all()


def test_module_coexpression_one_anndata_with_slide_key_matches_list():
    slides, modules = _module_slides()
    joined = ad.concat(slides)
    a = module_coexpression(joined, modules=modules)
    b = module_coexpression(slides, modules=modules)
    pd.testing.assert_frame_equal(a.corr, b.corr)


def test_module_coexpression_errors_and_constant_genes():
    slides, modules = _module_slides(n_slides=1)
    with pytest.raises(ValueError, match="Fewer than 2 module genes"):
        module_coexpression(slides, modules={"X": ["nope1", "nope2"]})
    slides[0].X[:, 0] = 1.0
    with pytest.warns(UserWarning, match="constant"):
        res = module_coexpression(slides, modules=modules)
    assert "a0" not in res.order
    with pytest.raises(TypeError):
        module_coexpression(np.zeros((3, 3)))


def test_neftel_builtin_modules_on_symbol_panel():
    meta = hx.metrics.load_gene_sets("neftel_meta")
    genes = sorted({g for v in meta.values() for g in v})[:120]
    rng = np.random.default_rng(0)
    adata = ad.AnnData(rng.normal(size=(90, len(genes))), var=pd.DataFrame(index=genes))
    with pytest.warns(UserWarning):
        res = module_coexpression(adata)
    assert set(n for label in res.module for n in label.split("|")) <= set(meta)
    assert res.corr.shape == (len(res.order), len(res.order))


def test_score_gene_sets_ulm_matches_linear_regression():
    rng = np.random.default_rng(0)
    genes = [f"g{i}" for i in range(60)]
    adata = ad.AnnData(rng.normal(size=(20, 60)), var=pd.DataFrame(index=genes))
    adata.obs_names = [f"t{i}" for i in range(20)]
    sets = {"A": genes[:10], "B": genes[10:25], "tiny": genes[:2]}
    before = adata.X.copy()
    score_gene_sets(adata, gene_sets=sets)
    scores = adata.obsm["gene_set_scores"]
    assert list(scores.index) == list(adata.obs_names)
    assert set(scores.columns) == {"A", "B"}  # "tiny" is below tmin=5
    member = np.isin(genes, sets["A"]).astype(float)
    for i in (0, 7):
        fit = linregress(member, adata.X[i])
        assert scores.loc[f"t{i}", "A"] == pytest.approx(fit.slope / fit.stderr, rel=1e-6)
    assert "gene_set_scores_padj" in adata.obsm
    np.testing.assert_array_equal(adata.X, before)
    out = score_gene_sets(adata, gene_sets=sets, method="zscore", key_added="z", copy=True)
    assert "z" in out.obsm and "z" not in adata.obsm
    with pytest.raises(ValueError, match="Unknown decoupler method"):
        score_gene_sets(adata, gene_sets=sets, method="nope")
    with pytest.raises(ValueError, match="tmin"):
        score_gene_sets(adata, gene_sets={"S": ["x", "y"]})
