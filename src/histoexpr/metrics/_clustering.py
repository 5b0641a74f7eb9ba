"""Agreement between two clusterings (e.g. Leiden of predictions vs pathologist labels)."""

from __future__ import annotations

import numpy as np
import pandas as pd


def _labels_of(x, key: str | None, what: str) -> pd.Series:
    if hasattr(x, "obs"):
        if key is None:
            raise ValueError(f"{what} is an AnnData: name the obs column with key_{what[-1]}=.")
        if key not in x.obs:
            raise KeyError(f"obs[{key!r}] not found in {what}; available columns: {list(x.obs.columns)}.")
        return pd.Series(x.obs[key].to_numpy(), index=x.obs_names)
    if isinstance(x, pd.Series):
        return x
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D labels, got shape {arr.shape}.")
    return pd.Series(arr)


def cluster_agreement(
    labels_a,
    labels_b=None,
    *,
    key_a: str | None = None,
    key_b: str | None = None,
) -> pd.Series:
    """Adjusted mutual information and adjusted Rand index between two labelings.

    Parameters
    ----------
    labels_a, labels_b
        Label arrays / Series of equal length, or AnnData with ``key_a`` / ``key_b`` naming ``obs``
        columns. When ``labels_b`` is ``None`` both keys are read from ``labels_a``. Two AnnData (or two
        Series) are aligned on their shared ``obs_names`` / index. Observations with a missing label
        on either side are left out.
    key_a, key_b
        ``obs`` columns when AnnData are passed.

    Returns
    -------
    Series with ``ami``, ``ari`` (scikit-learn), ``n_obs``, ``n_clusters_a``, ``n_clusters_b``.

    Example
    -------
    >>> import histoexpr as hx
    >>> res = hx.metrics.cluster_agreement([0, 0, 1, 1, 2, 2], ["a", "a", "b", "b", "b", "c"])
    >>> round(float(res["ari"]), 3), int(res["n_clusters_b"])
    (0.444, 3)
    """
    from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score

    if labels_b is None:
        if not hasattr(labels_a, "obs"):
            raise ValueError("Pass labels_b, or an AnnData as labels_a with both key_a and key_b.")
        labels_b, key_b = labels_a, key_b
    a = _labels_of(labels_a, key_a, "labels_a")
    b = _labels_of(labels_b, key_b, "labels_b")
    aligned_by_name = (hasattr(labels_a, "obs") and hasattr(labels_b, "obs")) or (
        isinstance(labels_a, pd.Series) and isinstance(labels_b, pd.Series)
    )
    if aligned_by_name:
        common = a.index.intersection(b.index, sort=False)
        if len(common) == 0:
            raise ValueError("The two labelings share no observation name; they cannot be compared.")
        a, b = a.loc[common], b.loc[common]
    elif len(a) != len(b):
        raise ValueError(f"The labelings have different lengths ({len(a)} vs {len(b)}).")
    a_vals, b_vals = a.to_numpy(), b.to_numpy()
    keep = ~(pd.isna(a_vals) | pd.isna(b_vals))
    a_vals, b_vals = a_vals[keep].astype(str), b_vals[keep].astype(str)
    if keep.sum() < 2:
        raise ValueError("Fewer than 2 observations have a label on both sides.")
    return pd.Series(
        {
            "ami": float(adjusted_mutual_info_score(a_vals, b_vals)),
            "ari": float(adjusted_rand_score(a_vals, b_vals)),
            "n_obs": int(keep.sum()),
            "n_clusters_a": int(np.unique(a_vals).size),
            "n_clusters_b": int(np.unique(b_vals).size),
        },
        dtype=object,
    )
