"""Per-gene correlation metrics and the well-predicted-gene test, against scipy on real and synthetic data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from histoexpr.metrics import nrmse, pearson, rmse, spearman, steiger_test, well_predicted_genes


@pytest.fixture(scope="module")
def ref_expression(shared_data) -> pd.DataFrame:
    """Measured bulk RNA (log2(FPKM-UQ+1)) of 5 TCGA-BRCA slides, genes as columns."""
    df = pd.read_csv(shared_data / "sequoia_reference" / "ref_file.csv", index_col=0)
    expr = df[[c for c in df.columns if c.startswith("rna_")]]
    expr.columns = [c[4:] for c in expr.columns]
    return expr.astype(float)


def _rng(seed=0):
    return np.random.default_rng(seed)


def test_pearson_spearman_match_scipy():
    rng = _rng()
    truth = rng.normal(size=(30, 40))
    pred = truth * rng.uniform(-1, 1, 40) + rng.normal(size=(30, 40))
    pred[:, 5] = np.round(pred[:, 5])  # ties for Spearman
    truth[:, 6] = np.round(truth[:, 6] * 2)
    r, p = pearson(pred, truth)
    rho, p_rho = spearman(pred, truth)
    for j in range(40):
        ref = stats.pearsonr(pred[:, j], truth[:, j])
        assert r[j] == pytest.approx(ref.statistic, abs=1e-12)
        assert p[j] == pytest.approx(ref.pvalue, rel=1e-8, abs=1e-300)
        ref_s = stats.spearmanr(pred[:, j], truth[:, j])
        assert rho[j] == pytest.approx(ref_s.statistic, abs=1e-12)
        assert p_rho[j] == pytest.approx(ref_s.pvalue, rel=1e-8, abs=1e-300)


def test_constant_gene_is_nan_and_dataframes_keep_names():
    rng = _rng(1)
    truth = pd.DataFrame(rng.normal(size=(10, 3)), columns=["A", "B", "C"])
    pred = truth.copy()
    pred["B"] = 1.0
    r, p = pearson(pred, truth)
    assert list(r.index) == ["A", "B", "C"]
    assert r["A"] == pytest.approx(1.0) and np.isnan(r["B"]) and np.isnan(p["B"])
    with pytest.raises(ValueError, match="different genes"):
        pearson(pred[["C", "B", "A"]], truth)
    with pytest.raises(ValueError, match="shape"):
        rmse(np.zeros((3, 2)), np.zeros((3, 3)))


def test_rmse_and_nrmse_match_independent_computation():
    rng = _rng(2)
    truth = rng.normal(size=(25, 12)) * rng.uniform(0.5, 3, 12)
    pred = truth + rng.normal(size=(25, 12))
    got = rmse(pred, truth)
    expected = np.array([np.sqrt(np.mean((pred[:, j] - truth[:, j]) ** 2)) for j in range(12)])
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    scaled = expected / stats.iqr(truth, axis=0)
    np.testing.assert_allclose(nrmse(pred, truth), (scaled - scaled.min()) / (scaled.max() - scaled.min()), rtol=1e-10)
    assert np.nanmin(nrmse(pred, truth)) == 0 and np.nanmax(nrmse(pred, truth)) == 1


def test_steiger_known_answer():
    # psych::r.test(n = 103, r12 = .4, r13 = .5, r23 = .1) reports t = -0.89, two-tailed p = 0.37
    t, p = steiger_test(0.4, 0.5, 0.1, n=103)
    assert float(t) == pytest.approx(-0.891, abs=1e-3)
    assert float(p) == pytest.approx(1 - 0.37 / 2, abs=0.005)  # one-tailed, H1: r_xy > r_xz
    assert float(steiger_test(0.4, 0.5, 0.1, n=103, alternative="two-sided")[1]) == pytest.approx(0.37, abs=0.005)
    # SEQUOIA's variant: one-tailed on |t|, so worse-than-random gets the small p
    assert float(steiger_test(0.4, 0.5, 0.1, n=103, alternative="sequoia")[1]) == pytest.approx(0.37 / 2, abs=0.005)
    with pytest.raises(ValueError, match="alternative"):
        steiger_test(0.4, 0.5, 0.1, n=103, alternative="less")
    # vectorised = element-wise
    t_vec, p_vec = steiger_test(np.array([0.4, 0.6]), np.array([0.5, 0.1]), np.array([0.1, 0.2]), n=103)
    assert t_vec[0] == pytest.approx(float(t))
    assert t_vec[1] > 0 and p_vec[1] < 1e-4


def test_steiger_calibrated_under_null():
    """With equal true correlations the one-tailed test rejects ~5 % of the time at 0.05; SEQUOIA's
    one-tailed p on |t| rejects ~10 % (both tails)."""
    rng = _rng(3)
    n, genes = 60, 3000
    x = rng.normal(size=(n, genes))
    y = 0.5 * x + rng.normal(size=(n, genes))
    z = 0.5 * x + rng.normal(size=(n, genes))
    tab = well_predicted_genes(y, x, z)
    frac = float((tab["steiger_p"] < 0.05).mean())
    assert 0.035 < frac < 0.065
    assert tab["well_predicted"].mean() < 0.01
    frac_abs = float((well_predicted_genes(y, x, z, steiger="sequoia")["steiger_p"] < 0.05).mean())
    assert 0.08 < frac_abs < 0.12


def test_well_predicted_genes_synthetic_known_answers():
    rng = _rng(4)
    n = 200
    truth = rng.normal(size=(n, 6))
    random_pred = rng.normal(size=(n, 6)) * 0.3
    pred = np.empty_like(truth)
    pred[:, 0] = truth[:, 0] + 0.5 * rng.normal(size=n)  # good
    pred[:, 1] = truth[:, 1] + 0.5 * rng.normal(size=n)  # good
    pred[:, 2] = -truth[:, 2]  # anti-correlated
    pred[:, 3] = 20 * truth[:, 3]  # perfect correlation, terrible RMSE
    pred[:, 4] = rng.normal(size=n)  # noise
    pred[:, 5] = 0.0  # constant
    tab = well_predicted_genes(pred, truth, random_pred, genes=list("abcdef"))
    assert tab["well_predicted"].tolist() == [True, True, False, False, False, False]
    assert not tab.loc["c", "r_positive"]
    assert tab.loc["d", "r_above_random"] and not tab.loc["d", "rmse_below_random"]
    assert np.isnan(tab.loc["f", "r"]) and np.isnan(tab.loc["f", "steiger_p_adj"])
    expected_cols = {
        "r", "p", "p_adj", "r_random", "p_random", "r_pred_random", "rmse", "rmse_random", "nrmse", "rmse_iqr",
        "rmse_mean", "steiger_t", "steiger_p", "steiger_p_adj", "constant", "r_positive", "p_significant",
        "r_above_random", "rmse_below_random", "steiger_significant", "steiger_adj_significant", "well_predicted",
    }  # fmt: skip
    assert set(tab.columns) == expected_cols


def _independent_well_predicted(pred, truth, rand, alpha=0.05, fdr=0.2):
    """Gene-by-gene scipy computation of the SPEC §3.2 criteria, written without the module."""
    n, g = truth.shape
    rows = []
    for j in range(g):
        r1, p1 = stats.pearsonr(pred[:, j], truth[:, j])
        r2, _ = stats.pearsonr(rand[:, j], truth[:, j])
        r12, _ = stats.pearsonr(pred[:, j], rand[:, j])
        det = 1 - r1**2 - r2**2 - r12**2 + 2 * r1 * r2 * r12
        rbar = (r1 + r2) / 2
        t = (r1 - r2) * np.sqrt((n - 1) * (1 + r12) / (2 * (n - 1) / (n - 3) * det + rbar**2 * (1 - r12) ** 3))
        p_st = stats.t.sf(t, df=n - 3)  # one-tailed, H1: r > r_random
        e1 = np.sqrt(np.mean((pred[:, j] - truth[:, j]) ** 2))
        e2 = np.sqrt(np.mean((rand[:, j] - truth[:, j]) ** 2))
        rows.append((r1, p1, r2, t, p_st, e1, e2))
    r1, p1, r2, t, p_st, e1, e2 = map(np.array, zip(*rows))
    p_adj = stats.false_discovery_control(p_st, method="bh")
    ok = (r1 > 0) & (p1 < alpha) & (r1 > r2) & (e1 < e2) & (p_st < alpha) & (p_adj < fdr)
    return r1, p1, r2, t, p_st, p_adj, e1, e2, ok


def test_well_predicted_genes_on_real_tcga_expression(ref_expression):
    expr = ref_expression
    # keep genes that vary across the 5 slides, a few thousand for speed
    varying = expr.columns[(expr.std(axis=0) > 0.3).to_numpy()][:3000]
    truth = expr[varying].to_numpy()
    rng = _rng(5)
    sd = truth.std(axis=0)
    noise_level = rng.uniform(0.05, 2.0, truth.shape[1])
    pred = truth + rng.normal(size=truth.shape) * sd * noise_level
    rand = truth.mean(axis=0) + rng.normal(size=truth.shape) * sd
    tab = well_predicted_genes(pd.DataFrame(pred, columns=varying), pd.DataFrame(truth, columns=varying), rand)
    r1, p1, r2, t, p_st, p_adj, e1, e2, ok = _independent_well_predicted(pred, truth, rand)
    np.testing.assert_allclose(tab["r"], r1, atol=1e-10)
    np.testing.assert_allclose(tab["p"], p1, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(tab["r_random"], r2, atol=1e-10)
    np.testing.assert_allclose(tab["steiger_t"], t, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(tab["steiger_p"], p_st, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(tab["steiger_p_adj"], p_adj, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(tab["rmse"], e1, rtol=1e-10)
    np.testing.assert_allclose(tab["rmse_random"], e2, rtol=1e-10)
    assert tab["well_predicted"].to_numpy().tolist() == ok.tolist()
    assert list(tab.index) == list(varying)
    np.testing.assert_allclose(tab["p_adj"], stats.false_discovery_control(p1, method="bh"), rtol=1e-6, atol=1e-12)
    assert 0 < ok.sum() < len(ok)  # a non-trivial split on real values
    # the best-predicted genes are the low-noise ones
    assert noise_level[ok].mean() < noise_level[~ok].mean()


def test_constant_columns_detected_whatever_their_value():
    """A constant column whose mean is not exactly representable (0.1, 2.3, …) is still constant:
    plain centring leaves ~1e-17 residues and a spurious finite r."""
    rng = _rng(6)
    truth = rng.normal(size=(60, 40))
    pred = truth + rng.normal(size=(60, 40))
    values = rng.uniform(-5, 5, 20)
    pred[:, :20] = values  # constant columns with arbitrary values
    pred[:, 20] = 1e300  # huge constant
    pred[:, 21] = 0.1 * (1 + np.finfo(float).eps * (np.arange(60) % 2))  # constant up to 1 ulp
    r, p = pearson(pred, truth)
    assert np.isnan(r[:22]).all() and np.isnan(p[:22]).all()
    assert np.isfinite(r[22:]).all()
    tiny = truth * 1e-100  # small magnitude but real variation: not constant
    np.testing.assert_allclose(pearson(tiny, tiny + 1e-100 * pred, return_pvalue=False)[22:],
                               pearson(truth, truth + pred, return_pvalue=False)[22:], atol=1e-12)  # fmt: skip
    tab = well_predicted_genes(pred, truth, rng.normal(size=(60, 40)))
    assert tab["constant"].to_numpy()[:22].all() and not tab["constant"].to_numpy()[22:].any()
    assert tab["steiger_p_adj"].isna().to_numpy()[:22].all()


def test_inputs_are_not_modified():
    rng = _rng(7)
    truth = np.asfortranarray(rng.normal(size=(30, 50)))  # F order: a transposed view is contiguous
    pred = truth + rng.normal(size=(30, 50))
    rand = np.asfortranarray(rng.normal(size=(30, 50)))
    copies = [a.copy() for a in (pred, truth, rand)]
    tab = well_predicted_genes(pred, truth, rand)
    for a, b in zip((pred, truth, rand), copies):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(tab["r"], [stats.pearsonr(pred[:, j], truth[:, j])[0] for j in range(50)], atol=1e-12)
    q75, q25 = np.percentile(truth, [75, 25], axis=0)
    np.testing.assert_allclose(tab["rmse_iqr"], tab["rmse"] / (q75 - q25), rtol=1e-12)
    np.testing.assert_allclose(tab["rmse_mean"], tab["rmse"] / truth.mean(axis=0), rtol=1e-12)


def test_well_predicted_rejects_bad_options():
    x = _rng(8).normal(size=(10, 3))
    with pytest.raises(ValueError, match="constant_genes"):
        well_predicted_genes(x, x, x, constant_genes="drop")
    with pytest.raises(ValueError, match="flavor"):
        well_predicted_genes(x, x, x, flavor="paper")
    with pytest.raises(ValueError, match="steiger"):
        well_predicted_genes(x, x, x, steiger="abs")
    with pytest.raises(ValueError, match="more than 3 samples"):
        well_predicted_genes(x[:3], x[:3], x[:3])
