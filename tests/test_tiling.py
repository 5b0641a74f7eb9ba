"""pp.detect_tissue / pp.tile / SpatialData tiles on real slides."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import copy_writable

import histoexpr as hx


@pytest.fixture(scope="module")
def cmu(shared_data):
    return hx.io.open_slide(shared_data / "slides" / "cmu-1-small-region.svs")


@pytest.fixture(scope="module")
def cmu_tiles(cmu):
    return hx.pp.tile(cmu)


def _saturation(rgb):
    from skimage.color import rgb2hsv

    return rgb2hsv(rgb)[..., 1].mean()


def test_tissue_mask_real_slide(cmu):
    tissue = hx.pp.detect_tissue(cmu)
    assert max(tissue.mask.shape) <= 2048
    assert 0.15 < tissue.tissue_fraction < 0.6  # a strip of skin on a white background
    polys = tissue.polygons
    assert len(polys) >= 1 and polys.is_valid.all()
    # polygons are in level-0 px and cover about the tissue area
    assert polys.area.sum() / np.prod(cmu.dimensions) == pytest.approx(tissue.tissue_fraction, abs=0.08)
    minx, miny, maxx, maxy = polys.total_bounds
    assert 0 <= minx and maxx <= cmu.dimensions[0] + 1 and maxy <= cmu.dimensions[1] + 1


def test_tile_data_model(cmu, cmu_tiles):
    a = cmu_tiles
    assert a.n_obs == 41 and a.n_vars == 0
    assert list(a.obs.columns[:7]) == ["slide_id", "tile_id", "row", "col", "x0", "y0", "tissue_fraction"]
    assert a.obs_names.is_unique and (a.obs_names == a.obs["tile_id"]).all()
    uns = a.uns["histoexpr"]
    side = uns["tile_size_level0"]
    assert side == pytest.approx(256 * 0.5 / 0.499)
    assert uns["tile_size"] == 256 and uns["mpp"] == 0.5 and uns["tile_size_um"] == 128
    # centres, not top-left corners
    np.testing.assert_allclose(a.obsm["spatial"], a.obs[["x0", "y0"]].to_numpy() + side / 2)
    # grid indices agree with positions
    np.testing.assert_array_equal(a.obs["col"], np.round(a.obs["x0"] / side).astype(int))
    np.testing.assert_array_equal(a.obs["row"], np.round(a.obs["y0"] / side).astype(int))
    assert (a.obs["tissue_fraction"] > 0.2).all()
    assert (a.obs["x0"] + side <= cmu.dimensions[0] + 1).all()
    sf = a.uns["spatial"]["cmu-1-small-region"]["scalefactors"]
    assert sf["spot_diameter_fullres"] == pytest.approx(side)


def test_tiles_land_on_tissue(cmu, cmu_tiles):
    side = cmu_tiles.uns["histoexpr"]["tile_size_level0"]
    kept = {(r, c) for r, c in zip(cmu_tiles.obs["row"], cmu_tiles.obs["col"])}
    sat_kept, sat_dropped = [], []
    for r in range(int(cmu.dimensions[1] // side)):
        for c in range(int(cmu.dimensions[0] // side)):
            patch = cmu.read_tile(c * side, r * side, side, 32)
            (sat_kept if (r, c) in kept else sat_dropped).append(_saturation(patch))
    # H&E tissue is saturated (pink/purple), glass is not
    assert np.median(sat_kept) > 3 * np.median(sat_dropped)
    assert min(sat_kept) > np.median(sat_dropped)


def test_max_tiles_is_seeded_subset(cmu, cmu_tiles):
    tissue = hx.pp.detect_tissue(cmu)
    a = hx.pp.tile(cmu, max_tiles=10, seed=1, tissue=tissue)
    b = hx.pp.tile(cmu, max_tiles=10, seed=1, tissue=tissue)
    c = hx.pp.tile(cmu, max_tiles=10, seed=2, tissue=tissue)
    assert a.n_obs == 10
    assert list(a.obs_names) == list(b.obs_names)
    assert set(a.obs_names) <= set(cmu_tiles.obs_names)
    assert list(a.obs_names) != list(c.obs_names)


def test_scale_20x_vs_40x(tmp_path, shared_data):
    """The same tissue scanned at 40× (0.25 µm/px) and 20× (0.5 µm/px) gives the same tile grid."""
    from PIL import Image

    s40 = hx.io.open_slide(shared_data / "slides" / "tcga-cr-7395-01a-01-ts1.svs", mpp=0.25)
    w, h = s40.dimensions
    full = s40.read_region((0, 0), 0, (w, h))
    path20 = tmp_path / "tcga_20x.png"
    Image.fromarray(full).resize((w // 2, h // 2), Image.BOX).save(path20)
    s20 = hx.io.open_slide(path20, mpp=0.5)

    t40 = hx.pp.tile(s40, tile_size=128, mpp=1.0)
    t20 = hx.pp.tile(s20, tile_size=128, mpp=1.0)
    assert t40.uns["histoexpr"]["tile_size_level0"] == 512
    assert t20.uns["histoexpr"]["tile_size_level0"] == 256
    cells40 = set(zip(t40.obs["row"], t40.obs["col"]))
    cells20 = set(zip(t20.obs["row"], t20.obs["col"]))
    jaccard = len(cells40 & cells20) / len(cells40 | cells20)
    assert jaccard > 0.9
    # the same physical positions (µm)
    common = sorted(cells40 & cells20)
    pos40 = t40.obs.set_index(["row", "col"]).loc[common, ["x0", "y0"]].to_numpy() * 0.25
    pos20 = t20.obs.set_index(["row", "col"]).loc[common, ["x0", "y0"]].to_numpy() * 0.5
    np.testing.assert_allclose(pos40, pos20, atol=0.5)
    # the pixels read for a tile agree
    r, c = common[len(common) // 2]
    o40 = t40.obs.set_index(["row", "col"]).loc[(r, c)]
    o20 = t20.obs.set_index(["row", "col"]).loc[(r, c)]
    p40 = s40.read_tile(o40.x0, o40.y0, 512, 128).astype(float)
    p20 = s20.read_tile(o20.x0, o20.y0, 256, 128).astype(float)
    assert np.corrcoef(p40.ravel(), p20.ravel())[0, 1] > 0.9


def test_no_tissue_and_bad_arguments(tmp_path, cmu):
    from PIL import Image

    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((600, 800, 3), 245, np.uint8)).save(blank)
    with pytest.raises(ValueError, match="no tissue"):
        hx.pp.tile(hx.io.open_slide(blank, mpp=0.5))
    with pytest.raises(ValueError, match="smaller than one tile"):
        hx.pp.tile(cmu, tile_size=4096)
    with pytest.raises(ValueError, match="tile_size"):
        hx.pp.tile(cmu, tile_size=2.5)
    with pytest.raises(ValueError, match="mpp"):
        hx.pp.tile(cmu, mpp=0)


def test_tiles_from_centers_and_outside_error(cmu):
    centers = np.array([[500.0, 600.0], [1000.0, 1500.0]])
    t = hx.pp.tiles_from_centers(cmu, centers, tile_size=224, mpp=0.5, tile_ids=["a", "b"])
    np.testing.assert_allclose(t.obsm["spatial"], centers)
    assert list(t.obs_names) == ["a", "b"]
    with pytest.raises(ValueError, match="outside"):
        hx.pp.tiles_from_centers(cmu, np.array([[10.0, 10.0]]), tile_size=224, mpp=0.5)
    with pytest.raises(ValueError, match="centers"):
        hx.pp.tiles_from_centers(cmu, np.array([1.0, 2.0]))


def test_tiles_from_centers_of_a_grid_give_back_the_grid(cmu, cmu_tiles):
    t = hx.pp.tiles_from_centers(cmu, cmu_tiles.obsm["spatial"], tissue=hx.pp.detect_tissue(cmu))
    cols = ["tile_id", "row", "col", "x0", "y0"]
    pd.testing.assert_frame_equal(t.obs[cols], cmu_tiles.obs[cols])
    np.testing.assert_allclose(t.obs["tissue_fraction"], cmu_tiles.obs["tissue_fraction"])


def test_her2st_spots_fall_in_tiles(shared_data):
    """Measured ST spots under tissue are covered by kept tiles (real section C3)."""
    sel = pd.read_csv(shared_data / "her2st" / "C3_selection.tsv", sep="\t")
    slide = hx.io.open_slide(shared_data / "her2st" / "C3_HE.jpg", mpp=0.69)
    tiles = hx.pp.tile(slide)
    side = tiles.uns["histoexpr"]["tile_size_level0"]
    cells = set(zip(tiles.obs["row"], tiles.obs["col"]))
    spot_cells = zip((sel["pixel_y"] // side).astype(int), (sel["pixel_x"] // side).astype(int))
    covered = np.mean([cell in cells for cell in spot_cells])
    assert covered > 0.85


def test_squidpy_bridge_draws_tiles(cmu_tiles):
    sq = pytest.importorskip("squidpy")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = cmu_tiles.copy()
    a.obs["tissue_fraction"] = a.obs["tissue_fraction"].astype(float)
    sq.pl.spatial_scatter(a, color="tissue_fraction", shape="square", library_id="cmu-1-small-region")
    fig = plt.gcf()
    ax = fig.axes[0]
    assert ax.images, "the thumbnail is drawn"
    assert ax.collections and len(ax.collections[0].get_paths()) == a.n_obs
    plt.close(fig)


def test_spatialdata_tiles_roundtrip(tmp_path, shared_data):
    sd = pytest.importorskip("spatialdata")
    src = shared_data / "xenium_segtraq/tests/data/xenium_sp_subset.zarr"
    path = tmp_path / "xenium.zarr"
    copy_writable(src, path)
    sdata = sd.read_zarr(path)
    before = {name for _, name, _ in sdata.gen_elements()}
    tiles = hx.pp.tile(sdata, image_key="he_image", tile_size=32, mpp=1.0)
    shapes_key, table_key = "he_image_tiles", "he_image_tiles_table"

    back = sd.read_zarr(path)
    assert before <= {name for _, name, _ in back.gen_elements()}, "nothing the user had is lost"
    assert len(back.shapes[shapes_key]) == tiles.n_obs
    table = back.tables[table_key]
    assert table.uns["spatialdata_attrs"]["region"] == shapes_key
    assert set(table.obs["tile_id"]) == set(back.shapes[shapes_key].index.astype(str))
    # later steps (extract_features, predict_spatial) find the image and the shapes through these keys
    for uns in (tiles.uns["histoexpr"], table.uns["histoexpr"]):
        assert (uns["image_key"], uns["shapes_key"], uns["table_key"]) == ("he_image", shapes_key, table_key)
    # polygons are the tiles: square, side = tile_size_level0, same transform as the image
    side = tiles.uns["histoexpr"]["tile_size_level0"]
    np.testing.assert_allclose(back.shapes[shapes_key].area, side**2)
    from spatialdata.transformations import get_transformation

    def xy_matrix(element):
        return get_transformation(element).to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))

    np.testing.assert_allclose(xy_matrix(back.shapes[shapes_key]), xy_matrix(back.images["he_image"]))

    # writing again needs overwrite=True, and then replaces the element safely
    with pytest.raises(ValueError, match="overwrite"):
        hx.io.add_tiles_to_spatialdata(sdata, tiles, image_key="he_image")
    small = tiles[:5].copy()
    hx.io.add_tiles_to_spatialdata(sdata, small, image_key="he_image", overwrite=True)
    again = sd.read_zarr(path)
    assert len(again.shapes[shapes_key]) == 5 and again.tables[table_key].n_obs == 5
    assert not any("__histoexpr_tmp" in p.name for p in (path / "shapes").iterdir())


def test_read_only_store_is_never_written(tmp_path, shared_data):
    """A store whose permission bits say read-only is refused before anything is written."""
    import os
    import stat

    sd = pytest.importorskip("spatialdata")
    path = tmp_path / "ro.zarr"
    copy_writable(shared_data / "xenium_segtraq/tests/data/xenium_sp_subset.zarr", path)
    sdata = sd.read_zarr(path)
    mode = path.stat().st_mode
    os.chmod(path, mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        before = sorted(p.name for p in (path / "shapes").iterdir())
        with pytest.raises(PermissionError, match="read-only"):
            hx.pp.tile(sdata, image_key="he_image", tile_size=64, mpp=1.0)
        assert sorted(p.name for p in (path / "shapes").iterdir()) == before
    finally:
        os.chmod(path, mode)
