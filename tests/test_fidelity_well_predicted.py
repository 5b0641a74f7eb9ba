"""``metrics.well_predicted_genes`` against SEQUOIA's ``evaluation/evaluate_model.py`` run on the
``sequoia_well_predicted`` reference fixture (``../shared/reference`` or
``$HISTOEXPR_SHARED_REFERENCE``; the tests skip when it is absent).

``flavor="sequoia"`` must reproduce upstream's table within the fixture's tolerances (r / RMSE atol
1e-12, p / t rtol 1e-9, BH rtol 1e-9, the call exactly), except the stale ``random_real_r`` of
constant genes (an upstream typo we do not reproduce). The default flavor must agree on the
non-constant genes and differ only where documented: constant genes left out of BH, the Steiger p
one-tailed in the direction r > r_random.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from _fidelity_ref import reference_case
from scipy import stats

from histoexpr.metrics import SEQUOIA_COLUMNS, well_predicted_genes


@pytest.fixture(scope="module")
def case():
    d = reference_case("sequoia_well_predicted")
    real, pred, rand = (np.load(d / f"{name}.npy") for name in ("real", "pred", "random"))
    genes = pd.read_csv(d / "genes.csv")["gene"].astype(str).tolist()
    expected = pd.read_csv(d / "expected.csv").set_index("gene").loc[genes]
    return pred, real, rand, genes, expected


def _close(ours, theirs, *, atol=0.0, rtol=0.0, what=""):
    ours, theirs = np.asarray(ours, dtype=float), np.asarray(theirs, dtype=float)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs), err_msg=f"{what}: NaN pattern")
    np.testing.assert_array_equal(np.isposinf(ours), np.isposinf(theirs), err_msg=f"{what}: inf pattern")
    ok = np.isfinite(theirs)
    np.testing.assert_allclose(ours[ok], theirs[ok], atol=atol, rtol=rtol, err_msg=what)


def test_constant_columns_are_all_detected(case):
    pred, real, rand, genes, expected = case
    tab = well_predicted_genes(pred, real, rand, genes=genes)
    assert tab["constant"].tolist() == expected["constant_in"].notna().tolist()
    # every gene constant in pred or real has an undefined correlation (80 + 15 here)
    in_pred_or_real = expected["constant_in"].isin(["pred", "real"]).to_numpy()
    assert np.isnan(tab["r"].to_numpy()[in_pred_or_real]).all()
    assert np.isfinite(tab["r"].to_numpy()[~in_pred_or_real]).all()


def test_sequoia_flavor_reproduces_upstream_table(case):
    pred, real, rand, genes, expected = case
    tab = well_predicted_genes(pred, real, rand, genes=genes, flavor="sequoia")
    assert list(tab.index) == genes
    up = tab.rename(columns=SEQUOIA_COLUMNS)
    constant = expected["constant_in"].notna().to_numpy()
    for col in ("pred_real_r", "rmse_pred", "rmse_random", "rmse_quantile_norm", "rmse_mean_norm"):
        # rtol 1e-14 on top: where the IQR is 0, upstream's rmse / (0 + 1e-5) is ~1e5-1e6
        _close(up[col], expected[col], atol=1e-12, rtol=1e-14, what=col)
    for col in ("pearson_p", "Steiger_p"):
        _close(up[col], expected[col], rtol=1e-9, atol=1e-14, what=col)
    for col in ("fdr_pearson_p", "fdr_Steiger_p"):
        _close(up[col], expected[col], rtol=1e-9, what=col)
    # t and r(pred, random) exist where upstream computed them (non-constant genes)
    _close(tab["steiger_t"].to_numpy()[~constant], expected["steiger_t"].to_numpy()[~constant], rtol=1e-9,
           atol=1e-14, what="steiger_t")  # fmt: skip
    assert np.isnan(tab["steiger_t"].to_numpy()[constant]).all()
    _close(tab["r_pred_random"].to_numpy()[~constant], expected["pred_random_r"].to_numpy()[~constant], atol=1e-12)
    # random_real_r: exact where upstream computed it; for constant genes upstream carries the previous
    # gene's value over (typo) -- ours is the genuine correlation, NaN where undefined
    _close(tab["r_random"].to_numpy()[~constant], expected["random_real_r"].to_numpy()[~constant], atol=1e-12)
    assert tab["well_predicted"].tolist() == expected["well_predicted"].tolist()
    assert int(tab["well_predicted"].sum()) == int(expected["well_predicted"].sum())


def test_include_option_alone_gives_upstream_bh_and_call(case):
    """constant_genes='include' is the part of the upstream behaviour that moves the call here."""
    pred, real, rand, genes, expected = case
    tab = well_predicted_genes(pred, real, rand, genes=genes, constant_genes="include", steiger="sequoia")
    _close(tab["steiger_p_adj"], expected["fdr_Steiger_p"], rtol=1e-9, what="fdr_Steiger_p")
    assert tab["well_predicted"].tolist() == expected["well_predicted"].tolist()
    constant = tab["constant"].to_numpy()
    assert (tab["r"].to_numpy()[constant] == 0).all() and (tab["steiger_p"].to_numpy()[constant] == 1).all()


def test_default_flavor_agrees_on_nonconstant_genes_and_documents_the_rest(case):
    pred, real, rand, genes, expected = case
    tab = well_predicted_genes(pred, real, rand, genes=genes)
    nc = expected["constant_in"].isna().to_numpy()
    ours, up = tab[nc], expected[nc]
    for a, b in (("r", "pred_real_r"), ("r_random", "random_real_r"), ("rmse", "rmse_pred"),
                 ("rmse_random", "rmse_random"), ("rmse_mean", "rmse_mean_norm")):  # fmt: skip
        _close(ours[a], up[b], atol=1e-12, what=a)
    _close(ours["p"], up["pearson_p"], rtol=1e-9, atol=1e-14, what="p")
    _close(ours["steiger_t"], up["steiger_t"], rtol=1e-9, atol=1e-14, what="t")
    # one-tailed in the direction r > r_random: upstream's p where t > 0, its complement where t < 0
    t = up["steiger_t"].to_numpy()
    p_dir = np.where(t > 0, up["Steiger_p"], 1 - up["Steiger_p"])
    _close(ours["steiger_p"], p_dir, rtol=1e-9, atol=1e-14, what="Steiger p (directional)")
    # RMSE / IQR without upstream's +1e-5
    iqr = np.subtract(*np.percentile(real, [75, 25], axis=0))
    _close(tab["rmse_iqr"], np.where(iqr > 0, tab["rmse"] / iqr, np.nan), rtol=1e-12, what="rmse_iqr")
    # constant genes: no test, so outside both BH families, never called
    constant = ~nc
    assert tab["steiger_p_adj"][constant].isna().all()
    r_undefined = expected["constant_in"].isin(["pred", "real"]).to_numpy()
    assert tab["p_adj"][r_undefined].isna().all() and tab["p_adj"][~r_undefined].notna().all()
    assert not tab["well_predicted"][constant].any()
    # BH over the genes actually tested, from upstream's own p-values
    bh = stats.false_discovery_control(p_dir, method="bh")
    _close(ours["steiger_p_adj"], bh, rtol=1e-9, what="BH over non-constant genes")
    call = ((up["pred_real_r"] > 0) & (up["pearson_p"] < 0.05) & (up["rmse_pred"] < up["rmse_random"])
            & (up["pred_real_r"] > up["random_real_r"]) & (p_dir < 0.05) & (bh < 0.2))  # fmt: skip
    assert ours["well_predicted"].tolist() == call.tolist()
    # the documented difference: more genes called when the 100 constant genes do not dilute BH
    assert int(tab["well_predicted"].sum()) >= int(expected["well_predicted"].sum())
