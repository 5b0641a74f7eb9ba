"""Survival helpers: Cox risk score, signature fitting, median split, log-rank, Kaplan–Meier plot."""

from __future__ import annotations

import anndata as ad
import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

from histoexpr.metrics import cox_risk_score, fit_cox_signature, logrank, median_split
from histoexpr.pl import kaplan_meier


def cohort(n=300, seed=0):
    """Synthetic cohort: hazard driven by genes A (+) and B (−); C and D are noise."""
    rng = np.random.default_rng(seed)
    expr = pd.DataFrame(rng.normal(size=(n, 4)), columns=list("ABCD"), index=[f"p{i}" for i in range(n)])
    hazard = np.exp(1.0 * expr["A"] - 0.7 * expr["B"])
    t_event = rng.exponential(1 / hazard)
    t_cens = rng.exponential(2.0, n)
    time = np.minimum(t_event, t_cens)
    event = t_event <= t_cens
    return expr, time, event


def test_cox_risk_score_is_weighted_sum_and_accepts_anndata():
    expr, _, _ = cohort(20)
    coefs = pd.Series({"B": -0.5, "A": 2.0})
    score = cox_risk_score(expr, coefs)
    np.testing.assert_allclose(score.to_numpy(), 2.0 * expr["A"] - 0.5 * expr["B"])
    assert list(score.index) == list(expr.index)
    adata = ad.AnnData(expr.to_numpy(), obs=pd.DataFrame(index=expr.index), var=pd.DataFrame(index=expr.columns))
    pd.testing.assert_series_equal(cox_risk_score(adata, coefs.to_dict()), score)
    with pytest.raises(KeyError, match="not in the expression data.*'ZZZ'"):
        cox_risk_score(expr, {"A": 1.0, "ZZZ": 1.0})


def test_fit_cox_signature_recovers_planted_genes():
    from lifelines import CoxPHFitter

    expr, time, event = cohort()
    sig = fit_cox_signature(expr, time, event, penalizer=0.0, threshold=0.0)
    # unpenalised: identical to lifelines on the same data
    ref = CoxPHFitter().fit(expr.assign(T=time, E=event.astype(int)), "T", "E").params_
    np.testing.assert_allclose(sig[ref.index].to_numpy(), ref.to_numpy(), rtol=1e-5)
    assert sig["A"] == pytest.approx(1.0, abs=0.25) and sig["B"] == pytest.approx(-0.7, abs=0.25)
    lasso = fit_cox_signature(expr, time, event, penalizer=0.05, threshold=0.05)
    assert set(lasso.index) == {"A", "B"}
    assert list(lasso.index)[0] == "A"  # sorted by |coef|


def test_median_split_and_logrank_match_lifelines():
    from lifelines.statistics import logrank_test, multivariate_logrank_test

    expr, time, event = cohort()
    score = cox_risk_score(expr, {"A": 1.0, "B": -0.7})
    groups = median_split(score)
    assert (groups == "high").sum() == (groups == "low").sum() == 150
    assert groups[score.idxmax()] == "high" and groups[score.idxmin()] == "low"
    res = logrank(time, event, groups.to_numpy())
    hi = (groups == "high").to_numpy()
    ref = logrank_test(time[hi], time[~hi], event[hi], event[~hi])
    assert res["p_value"] == pytest.approx(ref.p_value) and res["p_value"] < 1e-6
    thirds = pd.qcut(score, 3, labels=["a", "b", "c"]).to_numpy()
    res3 = logrank(time, event, thirds)
    assert res3["n_groups"] == 3
    assert res3["p_value"] == pytest.approx(multivariate_logrank_test(time, thirds, event).p_value)
    with pytest.raises(ValueError, match="at least two groups"):
        logrank(time, event, np.zeros(len(time)))


def test_kaplan_meier_plot():
    import matplotlib.pyplot as plt

    expr, time, event = cohort()
    groups = median_split(cox_risk_score(expr, {"A": 1.0}))
    ax = kaplan_meier(time, event, groups, title="TCGA")
    assert isinstance(ax, matplotlib.axes.Axes)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["low (n=150)", "high (n=150)"]
    assert "log-rank p" in ax.get_title() and ax.get_title().startswith("TCGA")
    # the curves are the lifelines Kaplan–Meier estimates (first line = low group)
    from lifelines import KaplanMeierFitter

    low = (groups == "low").to_numpy()
    kmf = KaplanMeierFitter().fit(time[low], event[low])
    y_plot = ax.get_lines()[0].get_ydata()
    assert y_plot.min() == pytest.approx(kmf.survival_function_.iloc[:, 0].min())
    fig, ax2 = plt.subplots()
    assert kaplan_meier(time, event, groups, ax=ax2, show_ci=False, at_risk_counts=True) is ax2
    plt.close("all")


def test_kaplan_meier_aligns_series_by_sample():
    # clinical table and risk groups (from predictions) in different sample orders
    import matplotlib.pyplot as plt

    expr, time, event = cohort()
    clin = pd.DataFrame({"time": time, "event": event}, index=expr.index)
    groups = median_split(cox_risk_score(expr, {"A": 1.0}))
    shuffled = groups.sample(frac=1.0, random_state=0)
    ax = kaplan_meier(clin["time"], clin["event"], shuffled)
    ref = kaplan_meier(time, event, groups, ax=plt.subplots()[1])
    assert ax.get_title() == ref.get_title()
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), ref.get_lines()[0].get_ydata())
    with pytest.raises(ValueError, match="different samples"):
        kaplan_meier(clin["time"], clin["event"], groups.iloc[:-1])
    assert logrank(clin["time"], clin["event"], shuffled) == logrank(time, event, groups.to_numpy())
    plt.close("all")
