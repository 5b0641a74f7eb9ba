"""``pp.tile(rule="sequoia-bulk" | "sequoia-spatial")`` against the published SEQUOIA tile rules.

Fixture ``sequoia_tiling``: the mask and tile sets of upstream's ``extract_patches`` (bulk) and of the
valid-tile statements of ``visualize.py`` (spatial) on ``slides/cmu-1-small-region.svs``.
Also: tissue detection does not split an H&E crop that is all tissue (real Xenium H&E).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from _fidelity_ref import reference_case

import histoexpr as hx
from histoexpr.pp._tiling import _objective_power


@pytest.fixture(scope="module")
def case():
    path = reference_case("sequoia_tiling")
    return {"path": path, "cfg": json.loads((path / "case.json").read_text())}


@pytest.fixture(scope="module")
def cmu(shared_data):
    return hx.io.open_slide(shared_data / "slides" / "cmu-1-small-region.svs")


@pytest.fixture(scope="module")
def sequoia_mask(cmu):
    return hx.pp.detect_tissue(cmu, max_size=None, erosion_border=0)


def test_mask_matches_upstream(case, sequoia_mask):
    expected = np.load(case["path"] / "expected_mask.npz")["mask_xy"].T  # image orientation (row, col)
    assert sequoia_mask.mask.shape == expected.shape
    np.testing.assert_array_equal(sequoia_mask.mask, expected)
    assert sequoia_mask.tissue_fraction == pytest.approx(case["cfg"]["summary"]["mask_tissue_fraction"], abs=1e-12)


def test_bulk_rule_matches_upstream(case, cmu, sequoia_mask):
    expected = pd.read_csv(case["path"] / "expected_bulk_tiles.csv")
    for tissue in (None, sequoia_mask):  # computed inside, or passed in
        tiles = hx.pp.tile(cmu, rule="sequoia-bulk", tissue=tissue, n_threads=2)
        got = tiles.obs.sort_values(["y0", "x0"])
        np.testing.assert_array_equal(got[["x0", "y0"]].to_numpy(), expected[["x", "y"]].to_numpy())
        np.testing.assert_array_equal(got[["row", "col"]].to_numpy(), expected[["row", "col"]].to_numpy())
        np.testing.assert_array_equal(got["partial"].to_numpy(), expected["partial"].to_numpy())
    assert tiles.uns["histoexpr"]["tile_rule"] == "sequoia-bulk"
    assert tiles.uns["histoexpr"]["tile_size_level0"] == case["cfg"]["tile_size_level0"]
    assert _objective_power(cmu) == 20


def test_bulk_rule_candidate_order_and_cap(case, cmu, sequoia_mask):
    """With a cap, upstream keeps the first passing candidates in its seeded shuffled order (seed 5)."""
    cand = pd.read_csv(case["path"] / "expected_bulk_candidates.csv")
    assert len(cand) == case["cfg"]["summary"]["stage1_pass"]
    first = cand[cand["kept"]].head(7)
    capped = hx.pp.tile(cmu, rule="sequoia-bulk", tissue=sequoia_mask, max_tiles=7, n_threads=1)
    assert set(zip(capped.obs["x0"], capped.obs["y0"])) == set(zip(first["x"], first["y"]))


def test_spatial_rule_matches_upstream(case, cmu, sequoia_mask):
    expected = pd.read_csv(case["path"] / "expected_spatial_tiles.csv")
    tiles = hx.pp.tile(cmu, rule="sequoia-spatial", tissue=sequoia_mask)
    # same tiles in upstream's table order (by column, then row)
    np.testing.assert_array_equal(tiles.obs[["x0", "y0"]].to_numpy(), expected[["xcoord", "ycoord"]].to_numpy())
    np.testing.assert_array_equal(tiles.obs[["row", "col"]].to_numpy(), expected[["row", "col"]].to_numpy())
    assert (tiles.obs["tissue_fraction"] >= 0.5).all()
    bulk = hx.pp.tile(cmu, rule="sequoia-bulk", tissue=sequoia_mask)
    both = set(zip(tiles.obs["x0"], tiles.obs["y0"])) & set(zip(bulk.obs["x0"], bulk.obs["y0"]))
    assert len(both) == case["cfg"]["summary"]["in_both"]


def test_default_rule_is_not_sequoia(cmu):
    with pytest.raises(ValueError, match="rule must be one of"):
        hx.pp.tile(cmu, rule="sequoia")
    tiles = hx.pp.tile(cmu, tile_size=256, mpp=0.5)
    assert tiles.uns["histoexpr"]["tile_rule"] == "fraction"


# ------------------------------------------------------------------------------ all-tissue crops
@pytest.fixture(scope="module")
def xenium_he(shared_data):
    sd = pytest.importorskip("spatialdata")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = sd.read_zarr(shared_data / "xenium_segtraq/tests/data/xenium_sp_subset.zarr")
        return hx.io.open_slide(sdata, image_key="he_image")


def test_all_tissue_crop_is_not_split(xenium_he):
    """The Xenium H&E crop is tissue everywhere: Otsu alone would call only ~15 % of it tissue."""
    thumb = xenium_he.thumbnail(2048)
    assert not hx.pp.has_background(thumb)
    split = hx.pp.detect_tissue(xenium_he, check_background=False)
    assert split.tissue_fraction < 0.3
    with pytest.warns(UserWarning, match="no background"):
        tissue = hx.pp.detect_tissue(xenium_he)
    assert tissue.mask.all()


def test_slides_with_background_are_still_split(shared_data, cmu):
    """Real slides and ST images with glass keep the colour rule (no warning)."""
    images = [cmu, hx.io.open_slide(shared_data / "her2st" / "C3_HE.jpg", mpp=1.0),
              hx.io.open_slide(shared_data / "slides" / "tcga-lung-rgb.png", mpp=0.5)]
    for slide in images:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            tissue = hx.pp.detect_tissue(slide, max_size=1024)
        assert 0.05 < tissue.tissue_fraction < 0.9


def test_block_dilation_batched_equals_per_block():
    """The stacked dilation of the spatial rule equals dilating each mask block on its own."""
    from scipy import ndimage

    from histoexpr.pp._tiling import _dilated_block_fractions

    rng = np.random.default_rng(0)
    mask = ndimage.binary_opening(rng.random((203, 157)) < 0.45)
    ds, p = 4, 8
    xs, ys = np.meshgrid(np.arange(0, 157 * ds, 32), np.arange(0, 203 * ds, 32), indexing="ij")
    x0, y0 = xs.ravel(), ys.ravel()
    got = _dilated_block_fractions(mask, x0, y0, ds, p)
    for i in range(x0.size):
        block = mask[y0[i] // ds : y0[i] // ds + p, x0[i] // ds : x0[i] // ds + p]
        want = ndimage.binary_dilation(block, iterations=3).mean() if block.size else 0.0
        assert got[i] == pytest.approx(want, abs=1e-12)


def test_sequoia_rules_on_a_pyramidal_slide(shared_data):
    """A TCGA slide whose mask level is downsampled: both rules run and agree with the mask."""
    slide = hx.io.open_slide(shared_data / "slides" / "tcga-cr-7395-01a-01-ts1.svs", mpp=0.5)
    tissue = hx.pp.detect_tissue(slide, max_size=None, erosion_border=0)
    spatial = hx.pp.tile(slide, rule="sequoia-spatial", tissue=tissue)
    bulk = hx.pp.tile(slide, rule="sequoia-bulk", tissue=tissue, max_tiles=20, n_threads=2)
    side = spatial.uns["histoexpr"]["tile_size_level0"]
    w0, h0 = slide.dimensions
    assert (spatial.obs["x0"] + side < w0).all() and (spatial.obs["y0"] + side < h0).all()
    assert 0 < bulk.n_obs <= 20 and (spatial.obs["tissue_fraction"] >= 0.5).all()
    # stage 1: every bulk tile's top-left corner is tissue in the mask
    dx, dy = w0 / tissue.mask.shape[1], h0 / tissue.mask.shape[0]
    assert tissue.mask[(bulk.obs["y0"] / dy).astype(int), (bulk.obs["x0"] / dx).astype(int)].all()
