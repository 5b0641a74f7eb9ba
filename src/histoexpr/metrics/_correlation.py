"""Per-gene agreement between predicted and measured expression, vectorised over genes.

All functions take ``(n_samples, n_genes)`` matrices (numpy arrays, pandas DataFrames, or AnnData
with samples as observations) and compute one number per gene (column) over the samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["pearson", "spearman", "rmse", "nrmse", "steiger_test", "well_predicted_genes"]


def _as_matrix(x: Any, name: str) -> tuple[np.ndarray, list[str] | None]:
    """Return (float64 2-D array, gene names or None) for an array, DataFrame or AnnData."""
    genes = None
    if hasattr(x, "var_names") and hasattr(x, "X"):  # AnnData
        genes = list(map(str, x.var_names))
        x = x.X
        if hasattr(x, "toarray"):
            x = x.toarray()
    elif isinstance(x, pd.DataFrame):
        genes = list(map(str, x.columns))
        x = x.to_numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a (samples, genes) matrix; got shape {arr.shape}")
    return arr, genes


def _pair(a: Any, b: Any, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    x, gx = _as_matrix(a, names[0])
    y, gy = _as_matrix(b, names[1])
    if x.shape != y.shape:
        raise ValueError(f"{names[0]} has shape {x.shape} but {names[1]} has shape {y.shape}; they must match")
    if gx is not None and gy is not None and gx != gy:
        raise ValueError(
            f"{names[0]} and {names[1]} have different genes or gene order; align them first, e.g. "
            f"pred[:, truth.var_names] / pred[truth.columns]"
        )
    return x, y, gx if gx is not None else gy


def _wrap(values: np.ndarray, genes: list[str] | None, name: str):
    return pd.Series(values, index=pd.Index(genes, name="gene"), name=name) if genes is not None else values


def _pearson_arrays(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Column-wise Pearson r; NaN where either column is constant."""
    xc = x - x.mean(axis=0)
    yc = y - y.mean(axis=0)
    num = (xc * yc).sum(axis=0)
    den = np.sqrt((xc**2).sum(axis=0) * (yc**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    r[den == 0] = np.nan
    return np.clip(r, -1.0, 1.0)


def _r_pvalue(r: np.ndarray, n: int) -> np.ndarray:
    """Two-sided p-value of r under H0: rho = 0 (t distribution with n - 2 df, as scipy)."""
    if n < 3:
        return np.full_like(r, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = r * np.sqrt((n - 2) / ((1.0 - r) * (1.0 + r)))
    p = 2 * stats.t.sf(np.abs(t), n - 2)
    p[np.abs(r) == 1] = 0.0
    return p


def pearson(pred: Any, truth: Any, *, return_pvalue: bool = True):
    """Per-gene Pearson correlation between predictions and measurements over the samples.

    Parameters
    ----------
    pred, truth
        ``(n_samples, n_genes)`` arrays, DataFrames or AnnData (same shape and gene order).
    return_pvalue
        Also return the two-sided p-value (t test with n - 2 degrees of freedom, as
        :func:`scipy.stats.pearsonr`).

    Returns
    -------
    ``r`` or ``(r, p)``: arrays of length n_genes (Series indexed by gene when names are known).
    Constant genes give NaN.

    Example
    -------
    >>> import numpy as np
    >>> from histoexpr.metrics import pearson
    >>> truth = np.random.default_rng(0).normal(size=(50, 3))
    >>> r, p = pearson(truth + 0.1, truth)
    >>> np.allclose(r, 1.0)
    True
    """
    x, y, genes = _pair(pred, truth, ("pred", "truth"))
    r = _pearson_arrays(x, y)
    if not return_pvalue:
        return _wrap(r, genes, "pearson_r")
    return _wrap(r, genes, "pearson_r"), _wrap(_r_pvalue(r, x.shape[0]), genes, "pearson_p")


def spearman(pred: Any, truth: Any, *, return_pvalue: bool = True):
    """Per-gene Spearman rank correlation (ties get average ranks) with p-values, as
    :func:`scipy.stats.spearmanr` column by column. See :func:`pearson` for the arguments.

    Example
    -------
    >>> import numpy as np
    >>> from histoexpr.metrics import spearman
    >>> truth = np.random.default_rng(0).normal(size=(50, 3))
    >>> rho, p = spearman(np.exp(truth), truth)
    >>> np.allclose(rho, 1.0)
    True
    """
    x, y, genes = _pair(pred, truth, ("pred", "truth"))
    r = _pearson_arrays(stats.rankdata(x, axis=0), stats.rankdata(y, axis=0))
    if not return_pvalue:
        return _wrap(r, genes, "spearman_r")
    return _wrap(r, genes, "spearman_r"), _wrap(_r_pvalue(r, x.shape[0]), genes, "spearman_p")


def rmse(pred: Any, truth: Any):
    """Per-gene root mean squared error over the samples.

    Example
    -------
    >>> import numpy as np
    >>> from histoexpr.metrics import rmse
    >>> rmse(np.ones((4, 2)), np.zeros((4, 2)))
    array([1., 1.])
    """
    x, y, genes = _pair(pred, truth, ("pred", "truth"))
    return _wrap(np.sqrt(((x - y) ** 2).mean(axis=0)), genes, "rmse")


def nrmse(pred: Any, truth: Any):
    """Normalised RMSE of the SEQUOIA paper: RMSE / IQR(truth) per gene, then min–max over genes.

    The result lies in [0, 1] (lower is better). Genes whose measured values have zero
    interquartile range get NaN and are left out of the min–max scaling.

    Example
    -------
    >>> import numpy as np
    >>> from histoexpr.metrics import nrmse
    >>> truth = np.random.default_rng(0).normal(size=(40, 5))
    >>> v = nrmse(truth + np.linspace(0, 1, 5), truth)
    >>> float(v[0]), float(v[-1])
    (0.0, 1.0)
    """
    x, y, genes = _pair(pred, truth, ("pred", "truth"))
    err = np.sqrt(((x - y) ** 2).mean(axis=0))
    q75, q25 = np.percentile(y, [75, 25], axis=0)
    iqr = q75 - q25
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(iqr > 0, err / iqr, np.nan)
    lo, hi = np.nanmin(scaled) if np.isfinite(scaled).any() else np.nan, np.nanmax(scaled) if np.isfinite(scaled).any() else np.nan
    out = (scaled - lo) / (hi - lo) if hi > lo else np.where(np.isnan(scaled), np.nan, 0.0)
    return _wrap(out, genes, "nrmse")


def steiger_test(r_xy, r_xz, r_yz, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Williams/Steiger t test for two dependent correlations that share one variable.

    With x the measured expression, y the model's and z the random model's predictions, it tests
    whether r_xy (model vs truth) differs from r_xz (random model vs truth), given r_yz:

    ``t = d·sqrt((n−1)(1+r_yz) / (2((n−1)/(n−3))·det + a²(1−r_yz)³))``, d = r_xy − r_xz,
    det = 1 − r_xy² − r_xz² − r_yz² + 2 r_xy r_xz r_yz, a = (r_xy + r_xz)/2; the p-value is
    one-tailed from a t distribution with n − 3 degrees of freedom on ``|t|``.

    Works element-wise on arrays (one test per gene).

    Returns
    -------
    ``(t, p)`` arrays.

    Example
    -------
    >>> from histoexpr.metrics import steiger_test
    >>> t, p = steiger_test(0.6, 0.1, 0.2, n=100)
    >>> bool(p < 0.001)
    True
    """
    if n <= 3:
        raise ValueError(f"the Steiger test needs more than 3 samples; got n={n}")
    r_xy, r_xz, r_yz = (np.asarray(v, dtype=np.float64) for v in (r_xy, r_xz, r_yz))
    d = r_xy - r_xz
    det = 1 - r_xy**2 - r_xz**2 - r_yz**2 + 2 * r_xy * r_xz * r_yz
    a = (r_xy + r_xz) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        t = d * np.sqrt((n - 1) * (1 + r_yz) / (2 * ((n - 1) / (n - 3)) * det + a**2 * (1 - r_yz) ** 3))
    p = stats.t.sf(np.abs(t), n - 3)
    return t, p


def well_predicted_genes(
    pred: Any,
    truth: Any,
    random_pred: Any,
    *,
    genes: Sequence[str] | None = None,
    alpha: float = 0.05,
    fdr: float = 0.2,
) -> pd.DataFrame:
    """The SEQUOIA well-predicted-gene test, one row per gene.

    A gene is well predicted when, over the pooled test predictions:
    ``r > 0``, Pearson ``p < alpha``, ``r > r_random``, ``rmse < rmse_random``, the Steiger test of
    r vs r_random has ``p < alpha`` and its Benjamini–Hochberg adjusted p-value is ``< fdr``.

    Parameters
    ----------
    pred
        Trained-model predictions, ``(n_samples, n_genes)``.
    truth
        Measured expression, same shape.
    random_pred
        Predictions of an untrained model of the same architecture ("random model").
    genes
        Gene names (default: from the inputs' columns / ``var_names``, else ``0..G-1``).
    alpha, fdr
        Thresholds for the raw p-values and the BH-adjusted Steiger p-value.

    Returns
    -------
    DataFrame indexed by gene with columns ``r``, ``p``, ``r_random``, ``p_random``,
    ``r_pred_random``, ``rmse``, ``rmse_random``, ``nrmse``, ``steiger_t``, ``steiger_p``,
    ``steiger_p_adj``, the boolean criteria ``r_positive``, ``p_significant``,
    ``r_above_random``, ``rmse_below_random``, ``steiger_significant``,
    ``steiger_adj_significant`` and their conjunction ``well_predicted``. Genes with an undefined
    correlation (constant values) are never well predicted and are left out of the BH correction.

    Example
    -------
    >>> import numpy as np
    >>> from histoexpr.metrics import well_predicted_genes
    >>> rng = np.random.default_rng(0)
    >>> truth = rng.normal(size=(200, 4))
    >>> pred = truth + rng.normal(size=(200, 4))
    >>> table = well_predicted_genes(pred, truth, rng.normal(size=(200, 4)))
    >>> int(table["well_predicted"].sum())
    4
    """
    from statsmodels.stats.multitest import multipletests

    x, y, names = _pair(pred, truth, ("pred", "truth"))
    z, _, names_z = _pair(random_pred, truth, ("random_pred", "truth"))
    n = x.shape[0]
    if genes is not None:
        names = [str(g) for g in genes]
        if len(names) != x.shape[1]:
            raise ValueError(f"{len(names)} gene names for {x.shape[1]} genes")
    names = names or names_z or [str(i) for i in range(x.shape[1])]

    r = _pearson_arrays(x, y)
    r_rand = _pearson_arrays(z, y)
    r_pr = _pearson_arrays(x, z)
    t, p_steiger = steiger_test(r, r_rand, r_pr, n)
    p_adj = np.full_like(p_steiger, np.nan)
    ok = np.isfinite(p_steiger)
    if ok.any():
        p_adj[ok] = multipletests(p_steiger[ok], method="fdr_bh")[1]
    err = np.sqrt(((x - y) ** 2).mean(axis=0))
    err_rand = np.sqrt(((z - y) ** 2).mean(axis=0))
    table = pd.DataFrame(
        {
            "r": r,
            "p": _r_pvalue(r, n),
            "r_random": r_rand,
            "p_random": _r_pvalue(r_rand, n),
            "r_pred_random": r_pr,
            "rmse": err,
            "rmse_random": err_rand,
            "nrmse": np.asarray(nrmse(x, y)),
            "steiger_t": t,
            "steiger_p": p_steiger,
            "steiger_p_adj": p_adj,
        },
        index=pd.Index(names, name="gene"),
    )
    with np.errstate(invalid="ignore"):
        table["r_positive"] = table["r"] > 0
        table["p_significant"] = table["p"] < alpha
        table["r_above_random"] = table["r"] > table["r_random"]
        table["rmse_below_random"] = table["rmse"] < table["rmse_random"]
        table["steiger_significant"] = table["steiger_p"] < alpha
        table["steiger_adj_significant"] = table["steiger_p_adj"] < fdr
    criteria = [
        "r_positive",
        "p_significant",
        "r_above_random",
        "rmse_below_random",
        "steiger_significant",
        "steiger_adj_significant",
    ]
    table["well_predicted"] = table[criteria].all(axis=1)
    return table
