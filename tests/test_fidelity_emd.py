"""EMD fidelity to SEQUOIA's published evaluation (spatial_vis/get_emd.py) on the `sequoia_emd` reference fixture.

The fixture (her2st C3, 180 spots, 10 genes, 7 spots without a prediction) was made by running the upstream
code; see its README. The rules are checked through the public API: ``median_filter="sequoia"``,
``values="zscore"``, ``normalize="sequoia"``, and independently on toy grids (so other sections follow the
same rules, not just these numbers).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from _fidelity_ref import reference_case
from scipy.stats import percentileofscore

import histoexpr as hx


@pytest.fixture(scope="module")
def case():
    folder = reference_case("sequoia_emd")
    meta = json.loads((folder / "case.json").read_text())
    spots = pd.read_csv(folder / "spots.csv")
    return {
        "dir": folder,
        "genes": meta["data"]["genes"],
        "xy": spots[["xcoord_tf", "ycoord_tf"]].to_numpy(dtype=float),
        "measured": np.load(folder / "measured.npy"),
        "predicted": np.load(folder / "predicted.npy"),
        "expected": pd.read_csv(folder / "expected.csv", index_col=0),
        "grid_x": meta["grid_shape_xy"][0],
    }


def _emd(case, **kw):
    return hx.metrics.emd(
        case["predicted"], case["measured"], coords=case["xy"], genes=case["genes"], min_unique=0, n_jobs=1, **kw
    )


# ------------------------------------------------------------------ intermediates (atol 1e-9)


def test_median_filter_and_percentiles_match_upstream(case):
    keep = ~np.isnan(case["predicted"]).any(1)
    assert (~keep).sum() == 7
    truth = np.where(keep[:, None], case["measured"], np.nan)  # unpredicted spots dropped BEFORE filtering
    filtered = hx.metrics.median_filter_grid(truth, case["xy"], rule="sequoia")
    want = np.load(case["dir"] / "expected_measured_median_filtered.npy")
    np.testing.assert_array_equal(np.isnan(filtered), np.isnan(want))
    np.testing.assert_allclose(filtered, want, atol=1e-9)
    for name, values in [
        ("expected_measured_percentile_filtered.npy", filtered),
        ("expected_measured_percentile_nofilt.npy", truth),
        ("expected_predicted_percentile.npy", case["predicted"]),
    ]:
        want = np.load(case["dir"] / name)
        got = hx.metrics.percentile_scores(values)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got, want, atol=1e-9, err_msg=name)
    # our own filter ("present": median of whatever is present, before dropping) differs from upstream's
    ours = hx.metrics.median_filter_grid(case["measured"], case["xy"], rule="present")
    assert np.nanmax(np.abs(ours[keep] - filtered[keep])) > 1e-3


# ------------------------------------------------------------------ EMD values (atol 1e-6), counts (exact)


@pytest.mark.parametrize(
    ("options", "column"),
    [
        ({"median_filter": "sequoia"}, "emd_filt"),
        ({}, "emd_pct_nofilt"),
        ({"values": "zscore"}, "emd"),
    ],
)
def test_emd_columns_match_exact_optimum(case, options, column):
    exp = case["expected"]
    res = _emd(case, solver="full", **options)
    np.testing.assert_allclose(res["emd"].to_numpy(), exp[f"{column}_exact"].to_numpy(), atol=1e-6, rtol=0)
    assert res["certified"].all()
    assert res.attrs["unit"] == "tile pitch (grid units)" and (res["unit"] == res.attrs["unit"]).all()
    # the published cv2 numbers: equal for percentile maps, within cv2's float32 error for raw values
    atol = 1e-5 if column != "emd" else 5e-3
    np.testing.assert_allclose(res["emd"].to_numpy(), exp[column].to_numpy(), atol=atol, rtol=0)
    # the sparse solver gives the same optimum
    sparse = _emd(case, solver="sparse", **options)
    np.testing.assert_allclose(sparse["emd"].to_numpy(), res["emd"].to_numpy(), atol=1e-9, rtol=0)


@pytest.mark.parametrize(
    ("options", "column"),
    [
        ({"median_filter": "sequoia"}, "emd_filt"),
        ({}, "emd_pct_nofilt"),
        ({"values": "zscore"}, "emd"),
    ],
)
def test_norm_divides_by_grid_x_extent(case, options, column):
    exp = case["expected"]
    res = _emd(case, normalize="sequoia", **options)
    assert case["grid_x"] == 20
    np.testing.assert_allclose(res["emd"].to_numpy(), exp[f"{column}_exact"].to_numpy() / 20, atol=1e-8, rtol=0)
    if column != "emd":  # cv2 equals the optimum on percentile maps of this grid
        np.testing.assert_allclose(res["emd"].to_numpy(), exp[f"{column}_norm"].to_numpy(), atol=1e-6, rtol=0)
    assert "x-extent" in res.attrs["unit"]
    diag = _emd(case, normalize="diagonal", **options)
    np.testing.assert_allclose(diag["emd"], res["emd"] * 20 / np.hypot(19, 15), rtol=1e-12)
    assert (diag["emd"] <= 1).all() and "diagonal" in diag.attrs["unit"]


def test_unique_value_counts_match_upstream(case):
    exp = case["expected"]
    filt = _emd(case, median_filter="sequoia")
    plain = _emd(case)
    np.testing.assert_array_equal(filt["n_unique_measured"].to_numpy(), exp["nr_gt_vals"].to_numpy())
    np.testing.assert_array_equal(filt["n_unique_measured_filtered"].to_numpy(), exp["nr_gt_vals_filt"].to_numpy())
    np.testing.assert_array_equal(
        plain["n_unique_measured_filtered"].to_numpy(), exp["nr_gt_vals_filt_nofilt_variant"].to_numpy()
    )


# ------------------------------------------------------------------ the rules on toy grids (no fixture)


def _brute_sequoia_filter(values, rc):
    lookup = {tuple(p): i for i, p in enumerate(rc)}
    out = values.copy()
    for i, (r, c) in enumerate(rc):
        if np.isnan(values[i]):
            continue
        block = [lookup[(r + dr, c + dc)] for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (r + dr, c + dc) in lookup]
        block = [k for k in block if not np.isnan(values[k])]
        if len(block) > 4.5:
            out[i] = np.median(values[block])
    return out


def test_sequoia_filter_rule_on_random_grid():
    rng = np.random.default_rng(4)
    rc = np.array([(r, c) for r in range(9) for c in range(8) if rng.random() > 0.3])
    values = rng.normal(size=(len(rc), 3))
    values[rng.random(len(rc)) < 0.1, 1] = np.nan
    got = hx.metrics.median_filter_grid(values, rc, rule="sequoia")
    for j in range(3):
        np.testing.assert_allclose(got[:, j], _brute_sequoia_filter(values[:, j], rc), atol=1e-12)


def test_sequoia_order_drops_unpredicted_tiles_before_filtering():
    rc = np.array([(r, c) for r in range(6) for c in range(6)], dtype=float)
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(36, 1)) + np.arange(36)[:, None] / 5
    pred = truth + rng.normal(size=(36, 1))
    pred[[7, 8, 14], 0] = np.nan
    res = hx.metrics.emd(pred, truth, coords=rc, median_filter="sequoia", min_unique=0, n_jobs=1)
    kept = np.where(np.isnan(pred), np.nan, truth)
    filt = _brute_sequoia_filter(kept[:, 0], rc.astype(int))
    keep = ~np.isnan(pred[:, 0])
    a = np.array([percentileofscore(pred[keep, 0], v) for v in pred[keep, 0]])
    b = np.array([percentileofscore(filt[keep], v) for v in filt[keep]])
    from histoexpr.metrics._emd import _exact_emd

    want, code = _exact_emd(a / a.sum(), b / b.sum(), rc[keep], 10**6)
    assert code == 1
    assert res["emd"].iloc[0] == pytest.approx(want, abs=1e-12)
    assert res["n_tiles"].iloc[0] == 33


def test_raw_values_shift_puts_mass_on_empty_cells():
    # a 3 x 4 bounding box with 2 empty cells; a negative minimum shifts every cell, empty ones too
    rc = np.array([(r, c) for r in range(3) for c in range(4) if (r, c) not in {(0, 3), (2, 0)}], dtype=float)
    rng = np.random.default_rng(1)
    pred, truth = rng.normal(size=(10, 1)), rng.normal(size=(10, 1)) + 1.5
    res = hx.metrics.emd(pred, truth, coords=rc, values="raw", min_unique=0, n_jobs=1)
    box = np.array([(r, c) for r in range(3) for c in range(4)], dtype=float)
    idx = {tuple(p): i for i, p in enumerate(box)}

    def grid_mass(v):
        arr = np.zeros(len(box))
        arr[[idx[tuple(p)] for p in rc]] = v
        arr = arr + abs(arr.min())
        return arr / arr.sum()

    from histoexpr.metrics._emd import _exact_emd

    want, _ = _exact_emd(grid_mass(pred[:, 0]), grid_mass(truth[:, 0]), box, 10**6)
    assert res["emd"].iloc[0] == pytest.approx(want, abs=1e-12)
    # all-positive maps on a box with empty cells are not shifted: empty cells stay massless
    pos = hx.metrics.emd(pred + 10, truth + 10, coords=rc, values="raw", min_unique=0, n_jobs=1)
    a, b = (pred[:, 0] + 10), (truth[:, 0] + 10)
    want_pos, _ = _exact_emd(a / a.sum(), b / b.sum(), rc, 10**6)
    assert pos["emd"].iloc[0] == pytest.approx(want_pos, abs=1e-12)
    # percentiles on a fully occupied box: shift="sequoia" adds the minimum, the default leaves them
    full = np.array([(r, c) for r in range(4) for c in range(4)], dtype=float)
    p, t = rng.normal(size=(16, 1)), rng.normal(size=(16, 1))
    shifted = hx.metrics.emd(p, t, coords=full, shift="sequoia", min_unique=0, n_jobs=1)["emd"].iloc[0]
    plain = hx.metrics.emd(p, t, coords=full, min_unique=0, n_jobs=1)["emd"].iloc[0]
    pa, pb = hx.metrics.percentile_scores(p)[:, 0], hx.metrics.percentile_scores(t)[:, 0]
    pa, pb = pa + pa.min(), pb + pb.min()
    assert shifted == pytest.approx(_exact_emd(pa / pa.sum(), pb / pb.sum(), full, 10**6)[0], abs=1e-12)
    assert plain != pytest.approx(shifted, abs=1e-9)
