"""Structural tests of the metric plots (matplotlib Agg)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

import histoexpr as hx  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def maps(shared_data):
    from test_emd import her2st_grid

    pred, truth = her2st_grid(shared_data, n_grid=20, n_genes=3)
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(shared_data / "her2st" / "C3_HE.jpg") as im:
        scale = 600 / max(im.size)
        thumb = np.asarray(im.reduce(int(1 / scale)).convert("RGB"))
    scale = thumb.shape[1] / 9936  # C3_HE.jpg is 9936 px wide
    centres = pred.obsm["spatial"]
    side = float(np.median(np.diff(np.unique(centres[:, 0]))))
    pred.uns["spatial"] = {
        "C3": {"images": {"hires": thumb}, "scalefactors": {"tissue_hires_scalef": scale, "spot_diameter_fullres": side}}
    }
    return pred, truth


def test_spatial_compare_structure(maps):
    pred, truth = maps
    genes = list(pred.var_names[:2])
    fig = hx.pl.spatial_compare(pred, truth, genes)
    assert isinstance(fig, plt.Figure)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 4
    r = hx.metrics.pearson(pred, truth)[0] if hasattr(hx.metrics, "pearson") else None
    emd = hx.metrics.emd(pred, truth, genes=genes, n_jobs=1)
    for i, g in enumerate(genes):
        title = panels[2 * i].get_title()
        assert g in title and "r = " in title and "EMD = " in title and "tiles" in title
        assert f"EMD = {emd.loc[g, 'emd']:.2f}" in title
        if r is not None:
            assert f"r = {float(np.asarray(r)[i]):.2f}" in title
        assert "measured" in panels[2 * i + 1].get_title()
    # thumbnail drawn under the tiles, squares coloured by percentile 0-100
    images = panels[0].get_images()
    assert len(images) == 1 and images[0].get_array().size > 0
    coll = panels[0].collections[0]
    assert len(coll.get_paths()) == pred.n_obs
    values = coll.get_array()
    assert 0 < values.min() and values.max() == pytest.approx(100.0)
    fig.canvas.draw()


def test_spatial_compare_without_image_and_errors(maps):
    pred, truth = maps
    bare = pred.copy()
    del bare.uns["spatial"]
    fig = hx.pl.spatial_compare(bare, truth, pred.var_names[0], show_emd=False)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 2 and not panels[0].get_images()
    assert "EMD" not in panels[0].get_title()
    with pytest.raises(KeyError, match="not in both"):
        hx.pl.spatial_compare(pred, truth, ["NOT_A_GENE"])


def test_gene_correlations_counts_significant():
    rng = np.random.default_rng(0)
    a = pd.DataFrame({"pearson_r": rng.uniform(-0.2, 0.8, 100), "pearson_p": rng.uniform(0, 0.2, 100)})
    b = (pd.Series(rng.uniform(-0.5, 0.5, 80)), pd.Series(rng.uniform(0, 1, 80)))
    ax = hx.pl.gene_correlations({"model A": a, "model B": b})
    labels = [t.get_text() for t in ax.get_xticklabels()]
    sig_a = int(((a["pearson_p"] < 0.05) & (a["pearson_r"] > 0)).sum())
    sig_b = int(((b[1] < 0.05) & (b[0] > 0)).sum())
    assert labels == [f"model A\nn=100, sig={sig_a}", f"model B\nn=80, sig={sig_b}"]
    assert len(ax.collections) >= 2  # one violin body per group
    ax2 = hx.pl.gene_correlations(rng.uniform(-1, 1, 30), kind="box")
    assert [t.get_text() for t in ax2.get_xticklabels()] == ["n=30"]
    with pytest.raises(ValueError):
        hx.pl.gene_correlations(np.array([np.nan]))


def test_pathway_coherence_plot(maps):
    pred, truth = maps
    rng = np.random.default_rng(0)
    res = pd.DataFrame(
        {"gpc": rng.uniform(-0.2, 0.6, 30), "gpc_s1": rng.uniform(-0.2, 0.6, 30), "gpc_s2": rng.uniform(-0.2, 0.6, 30)},
        index=[f"HALLMARK_SET_{i}" for i in range(30)],
    )
    ax = hx.pl.pathway_coherence(res, top=10)
    assert len(ax.patches) == 10
    by_position = {t.get_position()[1]: t.get_text() for t in ax.get_yticklabels()}
    top_label = by_position[max(by_position)]  # highest bar = highest GPC
    assert top_label == res["gpc"].idxmax().replace("HALLMARK_", "").replace("_", " ")
    widths = sorted(p.get_width() for p in ax.patches)
    np.testing.assert_allclose(widths, np.sort(res["gpc"].nlargest(10).to_numpy()))
    assert len(ax.collections) == 2  # per-slide dots


def test_module_correlation_plot():
    from test_modules import _module_slides

    slides, modules = _module_slides()
    res = hx.metrics.module_coexpression(slides, modules=modules)
    fig = hx.pl.module_correlation(res)
    assert isinstance(fig, plt.Figure)
    arrays = [ax.collections[0].get_array() for ax in fig.axes if ax.collections]
    arrays = [a for a in arrays if a is not None]
    # the heatmap (the module colour bars have one cell per gene)
    heat = [a for a in arrays if a.size == len(res.order) ** 2]
    assert len(heat) == 1
    np.testing.assert_allclose(np.asarray(heat[0]).ravel(), res.corr.to_numpy().ravel())
    legend = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None][0]
    assert {t.get_text() for t in legend.get_texts()} == {"M1 (6)", "M2 (5)", "M3 (4)"}
    fig2 = hx.pl.module_correlation(slides, modules=modules)
    assert isinstance(fig2, plt.Figure)
