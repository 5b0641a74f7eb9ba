"""Survival analysis with expression signatures (SEQUOIA paper, recurrence risk).

A Cox model is fitted on (measured or predicted) expression of a gene signature; its risk score
``Σ coef · expression`` splits patients at the median into a high- and a low-risk group, which
are compared with Kaplan–Meier curves (:func:`histoexpr.pl.kaplan_meier`) and a log-rank test.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .._utils import align_by_index

__all__ = ["cox_risk_score", "fit_cox_signature", "median_split", "logrank"]


def _expression_frame(expr: Any) -> pd.DataFrame:
    if hasattr(expr, "var_names") and hasattr(expr, "X"):  # AnnData
        x = expr.X.toarray() if hasattr(expr.X, "toarray") else np.asarray(expr.X)
        return pd.DataFrame(x, index=expr.obs_names, columns=expr.var_names)
    if isinstance(expr, pd.DataFrame):
        return expr
    raise TypeError("expression must be a DataFrame (samples × genes) or an AnnData with genes as var_names")


def cox_risk_score(expr: Any, coefs: Mapping[str, float] | pd.Series) -> pd.Series:
    """Risk score of a gene signature: ``Σ_i coef_i · expression_i`` per sample.

    Parameters
    ----------
    expr
        Samples × genes expression (DataFrame or AnnData), e.g. SEQUOIA predictions.
    coefs
        Gene -> Cox coefficient (e.g. from :func:`fit_cox_signature`).

    Returns
    -------
    Series of risk scores indexed by sample.

    Example
    -------
    >>> import pandas as pd
    >>> from histoexpr.metrics import cox_risk_score
    >>> expr = pd.DataFrame({"A": [1.0, 2.0], "B": [0.0, 1.0]}, index=["p1", "p2"])
    >>> cox_risk_score(expr, {"A": 0.5, "B": -1.0}).tolist()
    [0.5, 0.0]
    """
    frame = _expression_frame(expr)
    coefs = pd.Series(coefs, dtype=float)
    missing = [g for g in coefs.index if g not in frame.columns]
    if missing:
        raise KeyError(
            f"{len(missing)} signature gene(s) are not in the expression data, e.g. {missing[:5]}; "
            "check gene naming (symbols vs Ensembl ids) or restrict the signature"
        )
    values = frame[coefs.index].to_numpy(dtype=float)
    if not np.isfinite(values).all():
        raise ValueError("the expression of the signature genes contains NaN/inf values")
    return pd.Series(values @ coefs.to_numpy(), index=frame.index, name="risk_score")


def fit_cox_signature(
    expr: Any,
    time: Sequence[float],
    event: Sequence[bool],
    *,
    genes: Sequence[str] | None = None,
    penalizer: float = 0.1,
    l1_ratio: float = 1.0,
    threshold: float = 1e-3,
) -> pd.Series:
    """Fit a (by default LASSO-penalised) Cox model on expression and return the signature.

    Uses :class:`lifelines.CoxPHFitter`. lifelines' L1 penalty shrinks coefficients towards zero
    but does not set them exactly to zero, so coefficients with ``|coef| <= threshold`` are
    dropped. The paper chose the penalty with glmnet's 5-fold CV; choose ``penalizer`` the same way
    (e.g. with lifelines' ``k_fold_cross_validation``) for a faithful reproduction.

    Parameters
    ----------
    expr
        Samples × genes expression (DataFrame or AnnData).
    time, event
        Follow-up time and event indicator (1/True = recurrence/death observed) per sample.
    genes
        Candidate genes (default: all columns).
    penalizer, l1_ratio
        Passed to ``CoxPHFitter`` (``l1_ratio=1`` is the LASSO, ``0`` ridge).
    threshold
        Coefficients with a smaller absolute value are treated as zero.

    Returns
    -------
    Series gene -> coefficient (non-zero ones), sorted by absolute value.

    Example
    -------
    >>> sig = fit_cox_signature(expr, time, event, penalizer=0.05)  # doctest: +SKIP
    >>> risk = cox_risk_score(predicted_expr, sig)  # doctest: +SKIP
    """
    from lifelines import CoxPHFitter

    frame = _expression_frame(expr)
    if genes is not None:
        frame = frame[list(genes)]
    time = np.asarray(time, dtype=float)
    event = np.asarray(event).astype(bool)
    if len(time) != len(frame) or len(event) != len(frame):
        raise ValueError(f"time ({len(time)}) and event ({len(event)}) need one value per sample ({len(frame)})")
    if not event.any():
        raise ValueError("no events observed: a Cox model cannot be fitted")
    data = frame.astype(float).reset_index(drop=True).copy()
    data.columns = [str(c) for c in data.columns]
    data["__time"] = time
    data["__event"] = event.astype(int)
    cph = CoxPHFitter(penalizer=penalizer, l1_ratio=l1_ratio)
    cph.fit(data, duration_col="__time", event_col="__event")
    coefs = cph.params_
    coefs = coefs[coefs.abs() > threshold]
    coefs.index.name = "gene"
    coefs.name = "coef"
    return coefs.reindex(coefs.abs().sort_values(ascending=False).index)


def median_split(scores: Sequence[float] | pd.Series, *, labels: tuple[str, str] = ("low", "high")) -> pd.Series:
    """Split samples at the median risk score: above the median -> ``"high"``, else ``"low"``.

    Example
    -------
    >>> from histoexpr.metrics import median_split
    >>> median_split([0.1, 0.5, 0.9, 0.3]).tolist()
    ['low', 'high', 'high', 'low']
    """
    series = scores if isinstance(scores, pd.Series) else pd.Series(np.asarray(scores, dtype=float))
    high = series > series.median()
    return pd.Series(
        pd.Categorical(np.where(high, labels[1], labels[0]), categories=list(labels)), index=series.index, name="risk_group"
    )


def logrank(time: Sequence[float], event: Sequence[bool], groups: Sequence[Any]) -> dict[str, float]:
    """Log-rank test of survival differences between groups (lifelines).

    Two groups use :func:`lifelines.statistics.logrank_test`, more use the multivariate version.

    Returns
    -------
    ``{"test_statistic": ..., "p_value": ..., "n_groups": ...}``.

    Example
    -------
    >>> from histoexpr.metrics import logrank
    >>> res = logrank([5, 6, 7, 1, 2, 3], [1, 1, 1, 1, 1, 1], ["low"] * 3 + ["high"] * 3)
    >>> round(res["p_value"], 3) < 0.05
    True
    """
    from lifelines.statistics import logrank_test, multivariate_logrank_test

    time, event, groups = align_by_index(time, event, groups)
    time = np.asarray(time, dtype=float)
    event = np.asarray(event).astype(bool)
    groups = np.asarray(groups)
    if not (len(time) == len(event) == len(groups)):
        raise ValueError("time, event and groups must have the same length")
    levels = pd.unique(groups)
    if len(levels) < 2:
        raise ValueError("the log-rank test needs at least two groups")
    if len(levels) == 2:
        a, b = groups == levels[0], groups == levels[1]
        res = logrank_test(time[a], time[b], event_observed_A=event[a], event_observed_B=event[b])
    else:
        res = multivariate_logrank_test(time, groups, event)
    return {"test_statistic": float(res.test_statistic), "p_value": float(res.p_value), "n_groups": int(len(levels))}


_align_by_index = align_by_index  # old private name
