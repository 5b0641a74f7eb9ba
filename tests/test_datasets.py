"""Built-in demo data and the loaders of the real samples by path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import histoexpr as hx
from histoexpr.datasets import DatasetNotFoundError
from histoexpr.datasets._datasets import DATA_DIR

MOB_DIR = DATA_DIR / "mouse_olfactory_bulb"


@pytest.fixture(scope="module")
def mob():
    return hx.datasets.mouse_olfactory_bulb()


def test_bundled_data_small_and_licensed():
    files = [p for p in DATA_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 4 * 1024**2
    for folder in {p.parent for p in files}:
        assert (folder / "LICENSE").is_file(), f"{folder} has data without its licence"
    assert "MIT License" in (MOB_DIR / "LICENSE").read_text()


def test_mouse_olfactory_bulb_content(mob):
    assert mob.shape == (379, 1000)
    counts = pd.read_csv(MOB_DIR / "MOB1.tsv.gz", sep="\t", index_col=0)
    spots = pd.read_csv(MOB_DIR / "alignment_table_MOB1.tsv.gz", sep="\t")
    spots.index = spots["x"].astype(str) + "x" + spots["y"].astype(str)
    selected = spots[spots["selected"] == 1]
    assert set(mob.obs_names) == set(selected.index)
    np.testing.assert_array_equal(mob.X.toarray(), counts.loc[mob.obs_names].to_numpy())
    np.testing.assert_allclose(mob.obsm["spatial"], selected.loc[mob.obs_names, ["pixel_x", "pixel_y"]].to_numpy())
    info = mob.uns["histoexpr"]
    assert info["mpp_source"] == "estimated from spot lattice"
    assert 4.2 < info["slide_mpp"] < 4.6
    assert "hires" in mob.uns["spatial"]["MOB1"]["images"]


def test_mouse_olfactory_bulb_matches_shared_copy(shared_data, mob):
    original = pd.read_csv(shared_data / "st_stutility_mob" / "MOB1.tsv", sep="\t", index_col=0)
    np.testing.assert_array_equal(mob.X.toarray(), original.loc[mob.obs_names].to_numpy())
    assert (MOB_DIR / "MOB1.jpg").read_bytes() == (shared_data / "st_stutility_mob" / "MOB1.jpg").read_bytes()


def test_mouse_olfactory_bulb_opens_as_slide(mob):
    info = mob.uns["histoexpr"]
    slide = hx.io.open_slide(info["slide_path"], mpp=info["slide_mpp"])
    assert slide.dimensions == (1905, 1905)
    assert slide.mpp == pytest.approx(info["slide_mpp"])
    # spots sit on tissue: the H&E under the spots is darker than the slide's border (glass)
    thumb = slide.read_region((0, 0), 0, slide.dimensions).astype(float).mean(axis=2)
    xy = np.round(mob.obsm["spatial"]).astype(int)
    border = np.r_[thumb[:50].ravel(), thumb[-50:].ravel(), thumb[:, :50].ravel(), thumb[:, -50:].ravel()]
    assert np.median(thumb[xy[:, 1], xy[:, 0]]) < np.median(border) - 30


def test_data_root_resolution(shared_data, tmp_path, monkeypatch):
    monkeypatch.delenv("HISTOEXPR_SHARED_DATA", raising=False)
    monkeypatch.setenv("HISTOEXPR_DATA", str(tmp_path))
    assert hx.datasets.data_root() == tmp_path.resolve()
    assert hx.datasets.data_root(shared_data) == shared_data.resolve()
    with pytest.raises(DatasetNotFoundError, match="visium_scmuscle"):
        hx.datasets.visium_muscle()  # tmp_path has no data: the message names what to download
    with pytest.raises(DatasetNotFoundError, match="almaan/her2st"):
        hx.datasets.her2st("C2")
    monkeypatch.setenv("HISTOEXPR_DATA", str(tmp_path / "missing"))
    with pytest.raises(DatasetNotFoundError, match="HISTOEXPR_DATA"):
        hx.datasets.data_root()
    monkeypatch.delenv("HISTOEXPR_DATA")
    monkeypatch.chdir(shared_data.parent.parent)  # a folder holding shared/data
    assert hx.datasets.data_root().resolve() == shared_data.resolve()


def test_her2st_loader(shared_data):
    adata = hx.datasets.her2st("C2", root=shared_data, mpp=0.69)
    assert adata.shape == (187, 15706)
    assert adata.uns["histoexpr"]["slide_id"] == "C2" and adata.uns["histoexpr"]["slide_mpp"] == 0.69
    with pytest.raises(DatasetNotFoundError, match=r"available: \['B4', 'C2', 'C3', 'C4'\]"):
        hx.datasets.her2st("A1", root=shared_data)


def test_visium_muscle_loader(shared_data):
    adata = hx.datasets.visium_muscle(root=shared_data)
    assert adata.shape == (982, 33217)
    assert "Vis5A_2dpi" in adata.uns["spatial"]


def test_xenium_breast_loader(shared_data):
    sdata = hx.datasets.xenium_breast(root=shared_data)
    table = sdata.tables["table"]
    assert table.shape == (122, 313) and table.var_names[0] == "ABCC11"
    assert sdata.attrs["histoexpr"]["he_key"] == "he_image"


def test_example_slides(shared_data):
    for name in ("cmu-1-small-region", "tcga-cr-7395-01a-01-ts1", "kidney-48-5", "tcga-lung-rgb"):
        path = hx.datasets.example_slide(name, root=shared_data)
        assert isinstance(path, Path) and path.is_file()
    assert hx.datasets.example_slide("cmu-1-small-region.svs", root=shared_data).name == "cmu-1-small-region.svs"
    slide = hx.io.open_slide(hx.datasets.example_slide("cmu-1-small-region", root=shared_data))
    assert slide.dimensions == (2220, 2967)
    with pytest.raises(ValueError, match="unknown example slide"):
        hx.datasets.example_slide("nope", root=shared_data)


def test_mouse_olfactory_bulb_plots_with_scanpy(mob):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    gene = mob.var_names[int(np.argmax(np.asarray(mob.X.sum(axis=0)).ravel()))]
    axes = sc.pl.spatial(mob, color=gene, show=False)  # uses uns["spatial"]["MOB1"] hires + scalefactors
    assert len(axes) == 1 and len(axes[0].images) == 1
    plt.close("all")
