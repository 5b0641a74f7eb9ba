"""Leiden clustering of tiles on predicted expression or on embeddings (scanpy under the hood)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .._docs import doc_params
from .._threads import threads_limited

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData


@threads_limited(small=True)
@doc_params()
def leiden(
    adata,
    *,
    use_rep: str | None = None,
    resolution: float = 1.0,
    n_neighbors: int = 15,
    n_pcs: int = 50,
    method: str = "umap",
    key_added: str = "leiden",
    random_state: int = 0,
    copy: bool = False,
) -> AnnData | None:
    """Leiden clusters of tiles (or spots) from predicted expression or an embedding.

    Builds a k-nearest-neighbour graph with :func:`scanpy.pp.neighbors` and runs
    :func:`scanpy.tl.leiden` (igraph implementation). The graph is built on a private copy, so only
    ``obs[key_added]`` and ``uns[key_added]`` are added to ``adata``.

    Parameters
    ----------
    adata
        AnnData with tiles as observations: predictions in ``X`` (e.g. from ``tl.predict_spatial``) or
        features / embeddings in ``obsm``.
    use_rep
        ``obsm`` key to cluster on (e.g. ``"X_uni"``, ``"X_fusion"``); ``None`` or ``"X"``: the
        expression in ``X``, reduced to ``n_pcs`` principal components when it has more genes than that.
    resolution
        Leiden resolution (higher: more clusters).
    n_neighbors
        Neighbours per tile in the kNN graph.
    n_pcs
        Principal components used when clustering on ``X`` with many genes (and for an ``obsm`` embedding
        wider than ``n_pcs``, which is reduced likewise).
    method
        Edge weights of the kNN graph (:func:`scanpy.pp.neighbors`): ``"umap"`` (scanpy's default; the
        first call in a session compiles numba code, ~10–20 s) or ``"gauss"``.
    key_added
        ``obs`` column for the labels (categorical strings "0", "1", ...).
    random_state
        Seed of the PCA and of Leiden.
    {copy}

    Returns
    -------
    ``None`` (labels in ``adata.obs[key_added]``), or the annotated copy when ``copy=True``.

    Example
    -------
    >>> import anndata as ad, numpy as np, histoexpr as hx
    >>> tiles = ad.AnnData(np.zeros((60, 0), np.float32))
    >>> tiles.obsm["X_enc"] = np.repeat(np.eye(3), 20, axis=0) + 0.01 * np.random.default_rng(0).normal(size=(60, 3))
    >>> hx.tl.leiden(tiles, use_rep="X_enc", resolution=0.5)
    >>> tiles.obs["leiden"].nunique()
    3
    """
    import anndata as ad
    import scanpy as sc

    adata = adata.copy() if copy else adata
    if adata.n_obs < 3:
        raise ValueError(f"Leiden clustering needs at least 3 observations, got {adata.n_obs}.")
    rep = _representation(adata, use_rep)
    if not np.isfinite(rep).all():
        bad = int((~np.isfinite(rep).all(1)).sum())
        raise ValueError(
            f"{bad} observations have NaN/inf values in {use_rep or 'X'}; drop or impute them before clustering."
        )
    work = ad.AnnData(np.zeros((adata.n_obs, 0), dtype=np.float32), obs=adata.obs[[]].copy())
    if rep.shape[1] > n_pcs:
        n_comps = min(n_pcs, rep.shape[0] - 1, rep.shape[1] - 1)
        work.obsm["X_rep"] = sc.pp.pca(rep.astype(np.float32), n_comps=n_comps, random_state=random_state)
    else:
        work.obsm["X_rep"] = rep.astype(np.float32)
    sc.pp.neighbors(
        work,
        n_neighbors=min(n_neighbors, adata.n_obs - 1),
        use_rep="X_rep",
        method=method,
        random_state=random_state,
    )
    sc.tl.leiden(
        work,
        resolution=resolution,
        random_state=random_state,
        key_added=key_added,
        flavor="igraph",
        n_iterations=2,
        directed=False,
    )
    adata.obs[key_added] = work.obs[key_added].to_numpy()
    adata.obs[key_added] = adata.obs[key_added].astype("category")
    adata.uns[key_added] = {
        "params": {
            "use_rep": use_rep or "X",
            "resolution": resolution,
            "n_neighbors": n_neighbors,
            "n_pcs": n_pcs,
            "method": method,
            "random_state": random_state,
        }
    }
    return adata if copy else None


def _representation(adata, use_rep: str | None) -> np.ndarray:
    from scipy import sparse

    if use_rep in (None, "X"):
        if adata.X is None or adata.n_vars == 0:
            raise ValueError(
                "adata.X is empty (tiles AnnData keep features in obsm): pass use_rep='X_<encoder>' to cluster an "
                f"embedding; available obsm keys: {list(adata.obsm.keys())}."
            )
        X = adata.X
        return X.toarray() if sparse.issparse(X) else np.asarray(X, dtype=np.float64)
    if use_rep not in adata.obsm:
        raise KeyError(f"obsm[{use_rep!r}] not found; available keys: {list(adata.obsm.keys())}.")
    rep = adata.obsm[use_rep]
    rep = rep.to_numpy() if hasattr(rep, "to_numpy") else rep
    return rep.toarray() if sparse.issparse(rep) else np.asarray(rep, dtype=np.float64)
