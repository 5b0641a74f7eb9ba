"""``metrics.pathway_coherence`` against HistoPrism's Gene Pathway Coherence.

Fixture ``histoprism_gpc``: predicted/measured matrices of her2st C2 and C3, HistoPrism's own
final gene sets as GMT (CC BY-NC 4.0: test inputs only, never shipped) and the per-gene r, per-sample
pathway scores and GPC computed by HistoPrism's ``inference.py`` statements.
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from _fidelity_ref import reference_case

import histoexpr as hx
from histoexpr.metrics import load_gene_sets, pathway_coherence
from histoexpr.metrics._gpc import pearson_columns

ATOL = 1e-6
SECTIONS = ("C2", "C3")


@pytest.fixture(scope="module")
def case():
    path = reference_case("histoprism_gpc")
    genes = [g.strip() for g in (path / "genes.txt").read_text().splitlines() if g.strip()]
    data = {s: dict(np.load(path / f"{s}.npz")) for s in SECTIONS}
    pred, truth = [], []
    for s in SECTIONS:
        obs = pd.DataFrame({"slide_id": s}, index=[f"{s}_{i}" for i in range(data[s]["predicted"].shape[0])])
        var = pd.DataFrame(index=genes)
        pred.append(ad.AnnData(data[s]["predicted"], obs=obs, var=var))
        truth.append(ad.AnnData(data[s]["measured"], obs=obs, var=var))
    return {
        "path": path,
        "genes": genes,
        "data": data,
        "pred": ad.concat(pred),
        "truth": ad.concat(truth),
        "pathways": pd.read_csv(path / "expected_pathways.csv"),
        "gene_r": pd.read_csv(path / "expected_gene_pearson.csv", index_col="gene"),
    }


def test_per_gene_pearson(case):
    for s in SECTIONS:
        r = pearson_columns(case["data"][s]["predicted"], case["data"][s]["measured"])
        want = case["gene_r"].loc[case["genes"], s].to_numpy()
        np.testing.assert_array_equal(np.isnan(r), np.isnan(want))
        np.testing.assert_allclose(r, want, atol=ATOL, rtol=0, equal_nan=True)


def _check(res: pd.DataFrame, expected: pd.DataFrame, pathways=None) -> float:
    exp = expected.set_index("pathway")
    if pathways is not None:
        exp = exp.loc[pathways]
    got = res.reindex(exp.index)
    worst = 0.0
    for ours, theirs in (("gpc", "gpc"), ("gpc_C2", "score_C2"), ("gpc_C3", "score_C3")):
        a, b = got[ours].to_numpy(float), exp[theirs].to_numpy(float)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0, equal_nan=True)
        worst = max(worst, float(np.nanmax(np.abs(a - b))))
    return worst


@pytest.mark.parametrize(("name", "collection", "file"), [
    ("histoprism_hallmark", "hallmark", "histoprism_final_hallmark.gmt"),
    ("histoprism_go", "GO", "histoprism_final_go.gmt"),
])
def test_gpc_with_histoprism_sets_by_path(case, name, collection, file, monkeypatch):
    expected = case["pathways"][case["pathways"]["collection"] == collection]
    gmt = case["path"] / "genesets" / file
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a set without panel genes is reported
        res = pathway_coherence(case["pred"], case["truth"], gene_sets=name, gene_sets_path=gmt)
        _check(res, expected)
        monkeypatch.setenv("HISTOEXPR_HISTOPRISM_GENESETS", str(gmt.parent))
        again = pathway_coherence(case["pred"], case["truth"], gene_sets=name)
    pd.testing.assert_frame_equal(res, again)
    assert len(res) == len(expected)


def test_histoprism_sets_are_not_shipped(monkeypatch):
    monkeypatch.delenv("HISTOEXPR_HISTOPRISM_GENESETS", raising=False)
    with pytest.raises(ValueError, match="CC BY-NC 4.0.*gene_sets_path"):
        load_gene_sets("histoprism_go")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_gene_sets("histoprism_hallmark", path="/nonexistent/folder/x.gmt")


def test_gpc_hallmark_2025(case):
    """MSigDB 2025.1 Hallmark (bundled): equal to HistoPrism wherever its sets, cut to HistoPrism's own
    training panel, hold the same panel genes as the full MSigDB sets; the other pathways differ by the
    genes (e.g. JUN) HistoPrism's panel lacks."""
    full = load_gene_sets("hallmark_2025")
    assert len(full) == 50 and len(full["HALLMARK_HYPOXIA"]) == 200
    curated = hx.metrics.read_gmt(case["path"] / "genesets" / "histoprism_final_hallmark.gmt")
    panel = set(case["genes"])
    assert all(set(curated[k]) <= set(full[k]) for k in curated)  # HistoPrism's sets are cuts of these
    same = [k for k in curated if set(curated[k]) & panel == set(full[k]) & panel]
    assert len(same) >= 40
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = pathway_coherence(case["pred"], case["truth"], gene_sets="hallmark_2025")
    _check(res, case["pathways"][case["pathways"]["collection"] == "hallmark"], pathways=same)
