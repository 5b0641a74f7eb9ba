"""Gene-set / pathway scores per tile (decoupler), written into the AnnData."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._docs import doc_params
from ..metrics import load_gene_sets

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

__all__ = ["score_gene_sets"]


@doc_params()
def score_gene_sets(
    adata,
    *,
    gene_sets: str | Path | Mapping[str, Iterable[str]] | pd.DataFrame = "hallmark",
    method: str = "ulm",
    layer: str | None = None,
    tmin: int = 5,
    key_added: str = "gene_set_scores",
    copy: bool = False,
) -> AnnData | None:
    """Score gene sets / pathways per tile with decoupler, for plotting score maps.

    Parameters
    ----------
    adata
        Tiles × genes (predicted or measured expression, log scale).
    gene_sets
        Any :func:`load_gene_sets` source (``"hallmark"``, ``"neftel"``, ``"neftel_meta"``, a GMT path,
        a dict, or a decoupler network with ``source``/``target`` (and optional ``weight``) columns).
    method
        A decoupler method in ``decoupler.mt`` (``"ulm"``, ``"mlm"``, ``"aucell"``, ``"zscore"``, ...).
    layer
        Layer to score instead of ``X``.
    tmin
        Minimum number of a set's genes present in the data; smaller sets are skipped by decoupler.
    key_added
        ``obsm`` key for the scores (a DataFrame tiles × sets); p-values, when the method gives them,
        go to ``obsm[f"{key_added}_padj"]``.
    {copy}

    Returns
    -------
    ``None`` or the annotated copy (``copy=True``). To map a score, copy its column to ``obs`` and use
    ``sq.pl.spatial_scatter(adata, color=..., shape="square")``.

    Example
    -------
    >>> hx.tl.score_gene_sets(pred_tiles, gene_sets="neftel")  # doctest: +SKIP
    >>> pred_tiles.obsm["gene_set_scores"]["NEFTEL_MES1"]  # doctest: +SKIP
    """
    import decoupler as dc
    from scipy import sparse

    adata = adata.copy() if copy else adata
    mt = getattr(dc.mt, method, None)
    if mt is None or not callable(mt):
        raise ValueError(f"Unknown decoupler method {method!r}; choose one of {[m for m in dir(dc.mt) if not m.startswith('_')]}.")
    if isinstance(gene_sets, pd.DataFrame) and "weight" in gene_sets.columns:
        net = gene_sets[["source", "target", "weight"]].copy()
    else:
        sets = load_gene_sets(gene_sets)
        net = pd.DataFrame(
            [(name, g, 1.0) for name, genes in sets.items() for g in genes], columns=["source", "target", "weight"]
        )
    mat = adata.layers[layer] if layer is not None else adata.X
    if mat is None or adata.n_vars == 0:
        raise ValueError("adata has no expression in X; pass an AnnData with predicted or measured genes (or layer=).")
    dense = mat.toarray() if sparse.issparse(mat) else np.asarray(mat)
    if not np.isfinite(dense).all():
        raise ValueError("The expression has NaN/inf values; impute or drop those tiles before scoring.")
    frame = pd.DataFrame(dense, index=adata.obs_names.astype(str), columns=adata.var_names.astype(str))
    overlap = net["target"].isin(frame.columns).groupby(net["source"]).sum()
    if not (overlap >= tmin).any():
        raise ValueError(
            f"No gene set has at least tmin={tmin} genes in the data (largest overlap: {int(overlap.max())}). "
            "Check the gene identifiers or lower tmin."
        )
    result = mt(frame, net, tmin=tmin)
    scores, pvals = result if isinstance(result, tuple) else (result, None)
    adata.obsm[key_added] = pd.DataFrame(scores.to_numpy(), index=adata.obs_names, columns=scores.columns)
    if pvals is not None:
        adata.obsm[f"{key_added}_padj"] = pd.DataFrame(pvals.to_numpy(), index=adata.obs_names, columns=pvals.columns)
    return adata if copy else None
