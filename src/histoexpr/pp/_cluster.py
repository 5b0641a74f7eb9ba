"""K-means summary of a slide's tile features: the (K, D) input of SEQUOIA.

SEQUOIA clusters each slide's tile features into K = 100 groups with k-means and feeds the
per-cluster mean features, in cluster order, to the aggregator. The published code averages
``features[labels == k]`` for every k, which gives NaN rows when a cluster is empty (k-means on
duplicated tiles). Here every row is finite: an empty cluster takes its k-means centre (a
duplicate of an existing point), and fewer tiles than K is an error.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

from .._docs import doc_params
from .._threads import threads_limited
from .._utils import check_finite, iter_slides, means_fingerprint, resolve_feature_key

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData


def _kmeans(features: np.ndarray, n_clusters: int, random_state: int, *, what: str):
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    x = np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"{what}: expected features of shape (n_tiles, dim), got {x.shape}")
    check_finite(x, what=what)
    if x.shape[0] < n_clusters:
        raise ValueError(
            f"{what}: {x.shape[0]} tiles but n_clusters={n_clusters}; k-means needs at least as many tiles "
            "as clusters. Tile with a smaller tile size or lower tissue threshold, or exclude this slide."
        )
    x = x.astype(np.float32, copy=False)
    km = KMeans(n_clusters=n_clusters, random_state=random_state, n_init="auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        labels = km.fit_predict(x)
    for w in caught:
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return labels.astype(np.int64), km.cluster_centers_.astype(np.float32)


def _cluster_means(x: np.ndarray, labels: np.ndarray, centers: np.ndarray, *, what: str) -> np.ndarray:
    k, d = centers.shape
    counts = np.bincount(labels, minlength=k)
    sums = np.zeros((k, d), dtype=np.float64)
    np.add.at(sums, labels, x)
    means = np.empty((k, d), dtype=np.float32)
    filled = counts > 0
    means[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
    if not filled.all():
        # The upstream bug: an empty cluster's mean is NaN. Use its k-means centre instead.
        means[~filled] = centers[~filled]
        n_distinct = len(np.unique(x, axis=0))
        warnings.warn(
            f"{what}: {int((~filled).sum())} of {k} k-means clusters are empty (only {n_distinct} distinct "
            "tile features); their rows use the k-means centres, which duplicate existing tiles.",
            UserWarning,
            stacklevel=3,
        )
    return means


@threads_limited(small=True)
def kmeans_means(
    features: np.ndarray, *, n_clusters: int = 100, random_state: int = 0, return_labels: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Per-cluster mean features of one slide: k-means (seeded) → ``(n_clusters, dim)`` float32.

    Parameters
    ----------
    features
        ``(n_tiles, dim)`` tile features of one slide.
    n_clusters
        K (SEQUOIA: 100).
    random_state
        Seed of :class:`sklearn.cluster.KMeans` (k-means++ initialisation).
    return_labels
        Also return the cluster label of each tile.

    Returns
    -------
    ``means`` of shape ``(n_clusters, dim)``, row k = mean feature of the tiles in cluster k;
    never NaN (an empty cluster takes its k-means centre, with a warning). With
    ``return_labels=True``: ``(means, labels)``.

    Raises
    ------
    ValueError
        Fewer tiles than ``n_clusters``, or NaN/inf features.

    Example
    -------
    >>> import numpy as np
    >>> from histoexpr.pp import kmeans_means
    >>> x = np.random.default_rng(0).normal(size=(500, 16))
    >>> kmeans_means(x, n_clusters=100).shape
    (100, 16)
    """
    x = np.asarray(features, dtype=np.float32)
    labels, centers = _kmeans(x, n_clusters, random_state, what="features")
    means = _cluster_means(x, labels, centers, what="features")
    return (means, labels) if return_labels else means


@doc_params()
@threads_limited(small=True)
def cluster_features(
    adata: AnnData,
    *,
    use_rep: str | None = None,
    n_clusters: int = 100,
    random_state: int = 0,
    key_added: str = "kmeans",
    copy: bool = False,
) -> AnnData | None:
    """K-means of each slide's tile features and the per-cluster means SEQUOIA takes as input.

    Each slide (``obs["slide_id"]``; the whole AnnData when absent) is clustered separately with
    :class:`sklearn.cluster.KMeans` (k-means++, seeded), as in SEQUOIA.

    Parameters
    ----------
    adata
        Tiles AnnData with features in ``obsm[use_rep]``.
    {use_rep}
    n_clusters
        K (SEQUOIA: 100). Every slide needs at least K tiles.
    random_state
        Seed of the k-means initialisation.
    key_added
        Where results go: ``obs[key_added]`` and ``uns[key_added]``.
    {copy}

    Returns
    -------
    ``None``, or the copy when ``copy=True``. Sets

    * ``obs[key_added]``: categorical cluster label (``"0"`` … ``"K-1"``) of each tile, per slide;
    * ``uns[key_added]``: ``{"params": {"use_rep", "n_clusters", "random_state"},
      "means": {slide_id: (K, D) float32}, "fingerprints": {slide_id: str}}``; row k of a slide's
      means is the mean feature of its cluster k (never NaN: empty clusters take the k-means centre,
      with a warning). The fingerprint hashes the slide's features, tile names and the settings;
      :func:`histoexpr.tl.predict_bulk` reuses the means only while it matches (after subsetting
      tiles or replacing features they are recomputed).

    Raises
    ------
    ValueError
        A slide with fewer tiles than ``n_clusters``, or NaN/inf features (the message names them).

    Example
    -------
    >>> import anndata as ad, numpy as np, pandas as pd, histoexpr as hx
    >>> tiles = ad.AnnData(obs=pd.DataFrame({"slide_id": ["s1"] * 50}, index=[f"t{i}" for i in range(50)]))
    >>> tiles.obsm["X_uni"] = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    >>> hx.pp.cluster_features(tiles, use_rep="X_uni", n_clusters=10)
    >>> tiles.uns["kmeans"]["means"]["s1"].shape
    (10, 8)
    """
    import pandas as pd

    adata = adata.copy() if copy else adata
    rep = resolve_feature_key(adata, use_rep)
    x = np.asarray(adata.obsm[rep])
    labels = np.empty(adata.n_obs, dtype=np.int64)
    means: dict[str, np.ndarray] = {}
    fingerprints: dict[str, str] = {}
    for sid, rows in iter_slides(adata):
        what = f"obsm[{rep!r}] of slide {sid!r}"
        xs = x[rows].astype(np.float32, copy=False)
        if not np.isfinite(xs).all():
            bad = adata.obs_names[rows[~np.isfinite(xs).all(axis=1)]]
            raise ValueError(
                f"{what}: {len(bad)} tiles have NaN/inf features, e.g. {list(bad[:10])}. Re-extract or drop them."
            )
        lab, centers = _kmeans(xs, n_clusters, random_state, what=what)
        means[sid] = _cluster_means(xs, lab, centers, what=what)
        fingerprints[sid] = means_fingerprint(xs, adata.obs_names[rows], use_rep=rep, n_clusters=n_clusters,
                                              random_state=random_state)
        labels[rows] = lab
    adata.obs[key_added] = pd.Categorical(labels.astype(str), categories=[str(k) for k in range(n_clusters)])
    adata.uns[key_added] = {
        "params": {"use_rep": rep, "n_clusters": int(n_clusters), "random_state": int(random_state)},
        "means": means,
        "fingerprints": fingerprints,
    }
    return adata if copy else None
