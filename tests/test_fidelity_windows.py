"""``tl.predict_spatial(windows="sequoia")`` against the published SEQUOIA sliding window.

Fixture ``sequoia_sliding_window``: a tile table, features, a small checkpoint written by upstream's
``ViS.save_pretrained`` and the per-tile predictions of upstream's ``sliding_window_method`` (with its
missing batch axis added) at stride 1 and 2, plus the windows it ran the model on.
"""

from __future__ import annotations

import json
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from _fidelity_ref import reference_case

import histoexpr as hx
from histoexpr.tl import window_index
from histoexpr.tl._spatial import _sliding_window_loop

ATOL = RTOL = 1e-5


@pytest.fixture(scope="module")
def case():
    path = reference_case("sequoia_sliding_window")
    tiles = pd.read_csv(path / "tiles.csv")
    return {
        "path": path,
        "cfg": json.loads((path / "case.json").read_text()),
        "tiles": tiles,
        "features": np.load(path / "features.npy"),
    }


@pytest.fixture(scope="module")
def model(case):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the released configs carry "device": "cuda:0"
        return hx.models.load_bulk_model(case["path"] / "checkpoint")


def _tiles_adata(tiles: pd.DataFrame, features: np.ndarray, order=None) -> ad.AnnData:
    order = np.arange(len(tiles)) if order is None else order
    t = tiles.iloc[order]
    a = ad.AnnData(obs=pd.DataFrame({"row": t["row"].to_numpy(), "col": t["col"].to_numpy()},
                                    index=t["tile"].astype(str).to_numpy()))
    a.obsm["X_enc"] = features[order]
    return a


def test_window_set_and_slots(case):
    """Same windows, in upstream's call order, with the same tile in every slot."""
    t = case["tiles"]
    idx, corners = window_index(t["row"].to_numpy(), t["col"].to_numpy(), window=case["cfg"]["window"])
    expected = pd.read_csv(case["path"] / "windows.csv")
    slots = np.load(case["path"] / "window_slots.npy").astype(np.int64)
    assert idx.shape == slots.shape == (case["cfg"]["summary"]["n_windows_stride1"], 100)
    np.testing.assert_array_equal(corners, expected[["corner_row", "corner_col"]].to_numpy())
    np.testing.assert_array_equal((idx < len(t)).sum(1), expected["n_tiles"].to_numpy())
    np.testing.assert_array_equal(np.where(idx == len(t), -1, idx), slots)
    # windows overhang the slide grid (no clipping)
    n_rows, n_cols = case["cfg"]["slide"]["grid_shape_rows_cols"]
    overhang = (corners[:, 0] + 10 > n_rows) | (corners[:, 1] + 10 > n_cols)
    assert overhang.sum() == case["cfg"]["summary"]["n_windows_overhanging_slide_grid"]


def test_window_slots_do_not_depend_on_tile_order(case):
    """The rule works on grid positions: a shuffled AnnData gets the same windows (as tile ids)."""
    t = case["tiles"]
    perm = np.random.default_rng(0).permutation(len(t))
    idx, corners = window_index(t["row"].to_numpy()[perm], t["col"].to_numpy()[perm])
    ref_idx, ref_corners = window_index(t["row"].to_numpy(), t["col"].to_numpy())
    back = np.append(perm, len(t))  # shuffled position -> original tile id; padding stays padding
    np.testing.assert_array_equal(back[idx], np.where(ref_idx == len(t), len(t), ref_idx))
    np.testing.assert_array_equal(corners, ref_corners)


@pytest.mark.parametrize(("stride", "expected_file"), [(1, "expected.npy"), (2, "expected_extra_stride.npy")])
def test_predict_spatial_matches_upstream(case, model, stride, expected_file):
    expected = np.load(case["path"] / expected_file)
    perm = np.random.default_rng(1).permutation(len(case["tiles"]))
    for order in (None, perm):  # upstream's table order and a shuffled one
        tiles = _tiles_adata(case["tiles"], case["features"], order)
        with pytest.warns(UserWarning, match="no window"):
            pred = hx.tl.predict_spatial(tiles, model, use_rep="X_enc", stride=stride, device="cpu", batch_size=37)
        want = expected if order is None else expected[order]
        np.testing.assert_array_equal(np.isnan(pred.X), np.isnan(want))
        np.testing.assert_allclose(pred.X, want, atol=ATOL, rtol=RTOL)
        assert pred.uns["histoexpr"]["windows"] == "sequoia"
        assert pred.uns["histoexpr"]["min_tissue_tiles"] == 50


def test_default_is_sequoia_and_grid_differs(case, model):
    tiles = _tiles_adata(case["tiles"], case["features"])
    expected = np.load(case["path"] / "expected.npy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explicit = hx.tl.predict_spatial(tiles, model, use_rep="X_enc", windows="sequoia", device="cpu")
        grid = hx.tl.predict_spatial(tiles, model, use_rep="X_enc", windows="grid", device="cpu")
    np.testing.assert_allclose(explicit.X, expected, atol=ATOL, rtol=RTOL)
    both = ~np.isnan(grid.X) & ~np.isnan(expected)
    assert np.abs(grid.X[both] - expected[both]).max() > 1e-2  # the earlier rule is a different procedure
    with pytest.raises(ValueError, match="windows must be one of"):
        hx.tl.predict_spatial(tiles, model, use_rep="X_enc", windows="upstream", device="cpu")


def test_loop_reference_matches_upstream(case, model):
    """The one-window-at-a-time reference used by the benchmarks follows the same rule."""
    t = case["tiles"]
    ref = _sliding_window_loop(case["features"], t["row"].to_numpy(), t["col"].to_numpy(), model, stride=2)
    np.testing.assert_allclose(ref, np.load(case["path"] / "expected_extra_stride.npy"), atol=ATOL, rtol=RTOL)


def _brute_force_sequoia(rows, cols, window, stride, threshold):
    """The rule in words: corners from the tissue's top-left, last corner max - 1, slots by (col, row)."""
    where = {(int(r), int(c)): i for i, (r, c) in enumerate(zip(rows, cols))}
    n = len(rows)
    out = []
    for x in range(0, int(cols.max() - cols.min()), stride):
        for y in range(0, int(rows.max() - rows.min()), stride):
            r0, c0 = int(rows.min()) + y, int(cols.min()) + x
            inside = sorted((c, r) for (r, c) in where if r0 <= r < r0 + window and c0 <= c < c0 + window)
            if len(inside) > threshold:
                ids = [where[(r, c)] for c, r in inside]
                out.append(((r0, c0), ids + [n] * (window * window - len(ids))))
    return out


@pytest.mark.parametrize(("window", "stride", "seed"), [(4, 1, 0), (4, 3, 1), (5, 2, 2), (3, 5, 3)])
def test_sequoia_rule_brute_force_other_grids(window, stride, seed):
    """Other grid shapes, offsets, window sizes and strides follow the same rule (no fixture needed)."""
    rng = np.random.default_rng(seed)
    h, w = rng.integers(6, 16, size=2)
    r, c = np.divmod(np.arange(h * w), w)
    keep = rng.random(r.size) < 0.75
    r, c = r[keep] + int(rng.integers(0, 5)), c[keep] + int(rng.integers(0, 5))
    perm = rng.permutation(r.size)
    r, c = r[perm], c[perm]
    idx, corners = window_index(r, c, window=window, stride=stride)
    expected = _brute_force_sequoia(r, c, window, stride, window * window / 2)
    assert [tuple(k) for k in corners.tolist()] == [k for k, _ in expected]
    assert idx.tolist() == [v for _, v in expected]
