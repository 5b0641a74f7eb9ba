"""Gene Pathway Coherence and gene-set loading."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy.stats import pearsonr

from histoexpr.metrics import (
    filter_redundant_gene_sets,
    load_gene_sets,
    pathway_coherence,
    read_gmt,
    write_gmt,
)
from histoexpr.metrics._gpc import pearson_columns


def _two_slides(seed=0, genes=None, n=80):
    rng = np.random.default_rng(seed)
    genes = genes or [f"G{i}" for i in range(12)]
    obs = pd.DataFrame(
        {"slide_id": np.repeat(["s1", "s2"], n), "row": np.tile(np.arange(n) // 10, 2), "col": np.tile(np.arange(n) % 10, 2)}
    )
    obs.index = [f"{s}_{r}_{c}" for s, r, c in zip(obs["slide_id"], obs["row"], obs["col"])]
    truth = rng.normal(size=(2 * n, len(genes)))
    pred = truth * rng.uniform(0, 1, len(genes)) + rng.normal(size=truth.shape)
    var = pd.DataFrame(index=genes)
    return ad.AnnData(pred, obs=obs.copy(), var=var.copy()), ad.AnnData(truth, obs=obs.copy(), var=var.copy())


def test_pearson_columns_matches_scipy_with_nans_and_constants():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 6)), rng.normal(size=(40, 6))
    y[:, 1] += 2 * x[:, 1]
    x[3, 2] = np.nan
    y[7, 2] = np.nan
    x[:, 3] = 0.1  # constant (not exactly representable: the mean has rounding error)
    y[:, 4] = np.nan
    r = pearson_columns(x, y)
    for j in (0, 1, 5):
        assert r[j] == pytest.approx(pearsonr(x[:, j], y[:, j])[0], abs=1e-12)
    ok = ~(np.isnan(x[:, 2]) | np.isnan(y[:, 2]))
    assert r[2] == pytest.approx(pearsonr(x[ok, 2], y[ok, 2])[0], abs=1e-12)
    assert np.isnan(r[3]) and np.isnan(r[4])


def test_gpc_equals_brute_force():
    pred, truth = _two_slides()
    pred.X[pred.obs["slide_id"] == "s1", 5] = 3.0  # constant on one slide: skipped there only
    sets = {"A": ["G0", "G1", "G2", "NOT_MEASURED"], "B": ["G3", "G4", "G5"], "C": ["G6"], "EMPTY": ["X", "Y"]}
    with pytest.warns(UserWarning, match="no gene with a defined correlation"):
        res = pathway_coherence(pred, truth, gene_sets=sets)
    genes = list(pred.var_names)
    per_slide = {}
    for s in ("s1", "s2"):
        m = (pred.obs["slide_id"] == s).to_numpy()
        r = {}
        for j, g in enumerate(genes):
            x, y = pred.X[m, j], truth.X[m, j]
            r[g] = np.nan if np.ptp(x) == 0 else pearsonr(x, y)[0]
        per_slide[s] = {k: np.nanmean([r[g] for g in v if g in r]) if any(g in r for g in v) else np.nan for k, v in sets.items()}
    for k in ("A", "B", "C"):
        want = np.mean([per_slide["s1"][k], per_slide["s2"][k]])
        assert res.loc[k, "gpc"] == pytest.approx(want, abs=1e-12)
        assert res.loc[k, "gpc_s1"] == pytest.approx(per_slide["s1"][k], abs=1e-12)
    assert res.loc["A", "n_genes"] == 3 and res.loc["A", "set_size"] == 4
    assert np.isnan(res.loc["EMPTY", "gpc"]) and res.loc["EMPTY", "n_slides"] == 0
    assert res.index[-1] == "EMPTY"  # sorted, NaN last


def test_gpc_arrays_and_errors():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 3))
    res = pathway_coherence(x, x + 0.1 * rng.normal(size=x.shape), genes=["a", "b", "c"], gene_sets={"S": ["a", "b"]})
    assert res.loc["S", "gpc"] > 0.9
    pred, truth = _two_slides()
    with pytest.raises(ValueError, match="gene symbols"):
        pathway_coherence(pred, truth, gene_sets={"S": ["TP53"]})
    with pytest.raises(ValueError, match="Unknown gene sets"):
        pathway_coherence(pred, truth, gene_sets="not_a_collection")


def test_builtin_gene_sets():
    hallmark = load_gene_sets("hallmark")
    assert len(hallmark) == 50 and len(hallmark["HALLMARK_HYPOXIA"]) == 200
    go = load_gene_sets("go_bp")
    sizes = [len(v) for v in go.values()]
    assert len(go) > 100 and min(sizes) >= 50 and max(sizes) <= 100
    names = list(go)
    for i in range(0, len(names), 7):  # spot-check the redundancy filter
        a = set(go[names[i]])
        for b_name in names[i + 1 :]:
            b = set(go[b_name])
            assert len(a & b) / len(a | b) <= 0.1
    neftel = load_gene_sets("neftel")
    assert set(neftel) == {f"NEFTEL_{m}" for m in ("AC", "MES1", "MES2", "NPC1", "NPC2", "OPC")}
    meta = load_gene_sets("neftel_meta")
    assert set(meta) == {"AC-like", "MES-like", "lineage development", "cell cycle"}
    assert set(neftel["NEFTEL_OPC"]) <= set(meta["lineage development"])
    assert "TIROSH_G2M" in load_gene_sets("cellcycle")


def test_bundled_go_bp_is_the_filtered_shared_file(shared_data):
    source = read_gmt(shared_data / "genesets" / "enrichr.GO_Biological_Process_2021.gmt")
    assert filter_redundant_gene_sets(source) == load_gene_sets("go_bp")


def test_redundancy_filter_drops_the_larger_set():
    base = [f"g{i}" for i in range(60)]
    sets = {
        "small": base[:50],
        "larger_overlapping": base[:55],  # Jaccard 50/55 with "small": dropped
        "disjoint": [f"h{i}" for i in range(70)],
        "too_small": base[:10],
        "too_big": [f"k{i}" for i in range(150)],
    }
    assert list(filter_redundant_gene_sets(sets)) == ["small", "disjoint"]


def test_gene_set_files_and_frames(tmp_path):
    sets = {"S1": ["A", "B", "C"], "S2": ["C", "D"]}
    write_gmt(sets, tmp_path / "x.gmt")
    assert load_gene_sets(tmp_path / "x.gmt") == sets
    (tmp_path / "x.json").write_text(json.dumps({"S1": {"geneSymbols": ["A", "B", "C"]}, "S2": ["C", "D"]}))
    assert load_gene_sets(str(tmp_path / "x.json")) == sets
    net = pd.DataFrame({"source": ["S1", "S1", "S1", "S2", "S2"], "target": ["A", "B", "C", "C", "D"]})
    assert load_gene_sets(net) == sets
    with pytest.raises(ValueError, match="single string"):
        load_gene_sets({"S": "ABC"})
    with pytest.raises(FileNotFoundError):
        read_gmt(tmp_path / "missing.gmt")


def test_gpc_on_real_section_with_hallmark(shared_data):
    from test_emd import her2st_grid

    pred, truth = her2st_grid(shared_data, n_grid=20, n_genes=2000)
    res = pathway_coherence(pred, truth, gene_sets="hallmark")
    assert len(res) == 50
    assert (res["n_genes"] > 0).sum() >= 45
    # the "prediction" is a smoothed copy of the measurement: coherence must be clearly positive
    assert res["gpc"].median() > 0.3
