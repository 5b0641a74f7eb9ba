"""What the figures draw: layout without overlaps, scale bars, colour ranges, module bars (bundled data)."""

from __future__ import annotations

import itertools

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from _mob_maps import mob_maps, per_gene_table

import histoexpr as hx


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def mob():
    pred, truth = mob_maps(n_genes=6)
    return pred, truth, per_gene_table(pred, truth)


def _text_boxes(fig):
    """Window extents of every visible title / colour-bar label / tick label and of each colour bar."""
    renderer = fig.canvas.get_renderer()
    boxes = []
    for ax in fig.axes:
        is_cbar = ax.get_label() == "<colorbar>"
        if is_cbar:
            boxes.append(("colorbar", ax.get_tightbbox(renderer)))
        for t in (ax.title, ax._left_title, ax._right_title):
            if t.get_text().strip():
                boxes.append((f"title {t.get_text()[:20]!r}", t.get_window_extent(renderer)))
    return boxes


def _overlaps(boxes):
    out = []
    for (na, a), (nb, b) in itertools.combinations(boxes, 2):
        if "colorbar" in na and "colorbar" in nb:
            continue
        if a.overlaps(b) and min(a.x1, b.x1) - max(a.x0, b.x0) > 1 and min(a.y1, b.y1) - max(a.y0, b.y0) > 1:
            out.append((na, nb))
    return out


def _scalebars(ax):
    return [a for a in ax.artists if a.get_gid() == "scalebar"]


def test_demo_figure_no_overlap_scalebar_and_metrics_given(mob, monkeypatch):
    from histoexpr.demo import comparison_figure

    pred, truth, per_gene = mob
    # the figure uses the metrics it is given: no EMD is recomputed inside the plot
    monkeypatch.setattr(hx.metrics._emd, "emd", lambda *a, **k: pytest.fail("EMD recomputed in the plot"))
    fig = comparison_figure(pred, truth, per_gene.rename(columns={"r": "r_histoprism", "emd": "emd_histoprism"}))
    fig.canvas.draw()
    overlaps = _overlaps(_text_boxes(fig))
    assert overlaps == [], overlaps
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(panels) == 6 and len(colorbars) == 1
    # panels do not overlap each other nor the colour bar
    renderer = fig.canvas.get_renderer()
    boxes = [ax.get_window_extent(renderer) for ax in panels + colorbars]
    for a, b in itertools.combinations(boxes, 2):
        assert not (a.overlaps(b) and min(a.x1, b.x1) - max(a.x0, b.x0) > 1 and min(a.y1, b.y1) - max(a.y0, b.y0) > 1)
    # a scale bar in µm on every predicted panel, H&E under the tiles, EMD with its unit in the title
    for ax in panels[::2]:
        assert len(_scalebars(ax)) == 1
        assert "EMD = " in ax.get_title() and "tiles" in ax.get_title()
        assert len(ax.get_images()) == 1
    best = per_gene["r"].sort_values(ascending=False).index[0]
    assert f"EMD = {per_gene.loc[best, 'emd']:.2f} tiles" in panels[0].get_title()
    # the H&E shows through the tiles: the collection is semi-transparent
    assert panels[0].collections[0].get_alpha() < 0.8


def test_spatial_compare_raw_values_row_colorbars_outline(mob):
    pred, truth, per_gene = mob
    genes = list(pred.var_names[:2])
    fig = hx.pl.spatial_compare(pred, truth, genes, values="raw", emd=per_gene, outline=True)
    colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(colorbars) == 2  # one per gene (row)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    coll = panels[0].collections[0]
    vals = np.concatenate([pred[:, genes[0]].X.ravel(), truth[:, genes[0]].X.ravel()])
    lo, hi = coll.get_clim()
    assert lo == pytest.approx(np.percentile(vals, 1), rel=1e-4) and hi == pytest.approx(np.percentile(vals, 99), rel=1e-4)
    # outlines: faces are transparent, edges carry the colours
    assert np.all(coll.get_facecolor()[:, 3] == 0) or len(coll.get_facecolor()) == 0
    fig.canvas.draw()
    edges = coll.get_edgecolor()
    assert len(edges) == pred.n_obs and len(np.unique(edges.round(3), axis=0)) > 5
    fig2 = hx.pl.spatial_compare(pred, truth, genes[0], values="raw", vmin=0, vmax=3, emd=per_gene)
    assert fig2.axes[0].collections[0].get_clim() == (0, 3)
    with pytest.raises(ValueError, match="percentile"):
        hx.pl.spatial_compare(pred, truth, genes[0], values="zscore")


def test_spatial_compare_gene_symbols(mob):
    pred, truth, per_gene = mob
    pred = pred.copy()
    pred.var["symbol"] = [f"Sym{i}" for i in range(pred.n_vars)]
    fig = hx.pl.spatial_compare(pred, truth, ["Sym1"], gene_symbols="symbol", emd=per_gene, r=per_gene)
    title = fig.axes[0].get_title()
    assert title.startswith("Sym1") and pred.var_names[1] not in title
    assert f"r = {per_gene['r'].iloc[1]:.2f}" in title
    with pytest.raises(KeyError, match="neither"):
        hx.pl.spatial_compare(pred, truth, ["Nope"], gene_symbols="symbol", emd=per_gene)


def test_module_correlation_overlapping_sets_one_module_per_gene():
    rng = np.random.default_rng(0)
    genes = [f"g{i}" for i in range(30)]
    sets = {"A": genes[:15], "B": genes[10:25], "C": genes[5:12] + genes[24:30], "D": genes[0:3]}
    import anndata as ad

    base = rng.normal(size=(150, 3))
    X = np.column_stack([base[:, i % 3] + rng.normal(scale=0.5, size=150) for i in range(30)])
    adata = ad.AnnData(X=X.astype(np.float32), var=pd.DataFrame(index=genes))
    res = hx.metrics.module_coexpression(adata, modules=sets)
    assert any("|" in m for m in res.module)  # the metric keeps the full membership
    fig = hx.pl.module_correlation(res)
    legend = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None][0]
    texts = [t.get_text() for t in legend.get_texts()]
    assert all("|" not in t for t in texts) and len(texts) <= len(sets)
    primary = fig.histoexpr_modules
    assert set(primary) <= set(sets) and primary.index.tolist() == res.order
    # rule: the largest of a gene's sets (A and B have 15 genes, C 13, D 3): g0 is in A and D -> A
    assert primary["g0"] == "A" and primary["g26"] == "C"
    fig2 = hx.pl.module_correlation(res, overlap="membership")
    bars = [ax for ax in fig2.axes if ax.images or ax.collections]
    assert len(bars) >= 3  # heatmap, membership bars, colour bar
    with pytest.raises(ValueError, match="overlap"):
        hx.pl.module_correlation(res, overlap="mixed")


def test_pl_return_types(mob):
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    pred, truth, per_gene = mob
    assert isinstance(hx.pl.gene_correlations(per_gene), Axes)
    gpc = pd.DataFrame({"gpc": [0.3, 0.1]}, index=["HALLMARK_A", "HALLMARK_B"])
    assert isinstance(hx.pl.pathway_coherence(gpc), Axes)
    assert isinstance(hx.pl.spatial_compare(pred, truth, pred.var_names[0], emd=per_gene), Figure)
    t = np.arange(20.0)
    assert isinstance(hx.pl.kaplan_meier(t, t % 2 == 0, ["a", "b"] * 10), Axes)


def test_explore_writes_self_contained_html(mob, tmp_path):
    pred, truth, per_gene = mob
    path = hx.pl.explore(pred, truth, metrics=per_gene, path=tmp_path / "sub" / "ex.html")
    assert path == tmp_path / "sub" / "ex.html" and path.exists()
    text = path.read_text()
    assert " src=\"http" not in text and "cdn.bokeh.org" not in text
    assert "gene_select" in text and "metrics_table" in text
    only_pred = hx.pl.explore(pred, path=tmp_path / "p.html", image=None)
    assert only_pred.stat().st_size > 100_000
    with pytest.raises(KeyError):
        hx.pl.explore(pred, truth, genes=["nope"], path=tmp_path / "x.html")


def test_library_never_selects_a_backend():
    from pathlib import Path

    src = Path(hx.__file__).parent
    offenders = [str(p.relative_to(src)) for p in src.rglob("*.py")
                 if "matplotlib.use(" in p.read_text() or "plt.show(" in p.read_text()]
    assert offenders == []
