"""Spatial co-expression of gene modules and per-tile gene-set scores."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._utils import iter_slides
from ._genesets import load_gene_sets

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData


@dataclass
class ModuleCoexpression:
    """Result of :func:`module_coexpression`.

    Attributes
    ----------
    corr
        Gene × gene Pearson correlation of the predicted maps, averaged over slides (genes in the
        hierarchical-clustering order).
    module
        Module of each gene (``"a|b"`` when a gene is in several modules), in ``corr`` order.
    order
        The genes in clustering order (same as ``corr.index``).
    linkage
        SciPy linkage matrix of the clustering (average linkage on ``1 - corr``).
    n_slides
        Number of slides averaged, per gene pair (DataFrame like ``corr``).
    within_between
        Mean correlation of gene pairs within the same module vs between modules, per module.
    """

    corr: pd.DataFrame
    module: pd.Series
    order: list[str]
    linkage: np.ndarray
    n_slides: pd.DataFrame
    within_between: pd.DataFrame = field(default_factory=pd.DataFrame)


def _as_slides(adata_or_list, slide_key: str) -> list:
    items = list(adata_or_list) if isinstance(adata_or_list, list | tuple) else [adata_or_list]
    slides = []
    for item in items:
        if not hasattr(item, "obs"):
            raise TypeError("module_coexpression takes an AnnData or a list of AnnData (one per slide).")
        parts = iter_slides(item, slide_key)
        slides += [item] if len(parts) == 1 else [item[pos] for _, pos in parts]
    return slides


def _values(adata, genes: Sequence[str], layer: str | None) -> np.ndarray:
    from scipy import sparse

    mat = adata.layers[layer] if layer is not None else adata.X
    sub = mat[:, adata.var_names.get_indexer(list(genes))]
    sub = sub.toarray() if sparse.issparse(sub) else np.asarray(sub)
    return sub.astype(np.float64)


def module_coexpression(
    adata_or_list,
    *,
    modules: str | Path | Mapping[str, Iterable[str]] = "neftel_meta",
    slide_key: str = "slide_id",
    layer: str | None = None,
    min_slides: int = 1,
    method: str = "average",
) -> ModuleCoexpression:
    """Spatial co-expression of module genes: per-slide gene × gene correlation, averaged, clustered.

    As in SEQUOIA (Fig. 5d): for each slide the tile-level maps of every pair of module genes are
    correlated (Pearson across tiles), the matrices are averaged over slides and the genes ordered by
    hierarchical clustering. Genes that belong to one module should cluster together.

    Parameters
    ----------
    adata_or_list
        Predicted (or measured) maps, tiles × genes: one AnnData, several slides in one AnnData
        (``obs[slide_key]``), or a list of AnnData.
    modules
        ``"neftel_meta"`` (AC-like, MES-like, lineage development, cell cycle; SEQUOIA Fig. 5d),
        ``"neftel"`` (the six Neftel 2019 modules), any other :func:`load_gene_sets` source or a dict.
    slide_key
        ``obs`` column with slide ids when one AnnData holds several slides.
    layer
        Layer to read instead of ``X``.
    min_slides
        Gene pairs with a defined correlation on fewer slides are NaN.
    method
        Linkage method for :func:`scipy.cluster.hierarchy.linkage`.

    Returns
    -------
    :class:`ModuleCoexpression`; plot it with :func:`histoexpr.pl.module_correlation`.

    Example
    -------
    >>> res = hx.metrics.module_coexpression(pred_slides, modules="neftel_meta")  # doctest: +SKIP
    >>> res.within_between  # doctest: +SKIP
    """
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    sets = load_gene_sets(modules)
    slides = _as_slides(adata_or_list, slide_key)
    present = set.intersection(*(set(s.var_names) for s in slides))
    gene_module: dict[str, list[str]] = {}
    for name, genes in sets.items():
        for g in genes:
            if g in present:
                gene_module.setdefault(g, []).append(name)
    genes = list(gene_module)
    if len(genes) < 2:
        raise ValueError(
            f"Fewer than 2 module genes are in every slide ({len(genes)} found). Check that var_names are gene "
            "symbols and that the modules match the predicted panel."
        )
    n_missing = len({g for v in sets.values() for g in v}) - len(genes)
    if n_missing:
        warnings.warn(
            f"{n_missing} module genes are not in every slide and are left out.", UserWarning, stacklevel=2
        )
    total = np.zeros((len(genes), len(genes)))
    count = np.zeros_like(total)
    for s in slides:
        values = _values(s, genes, layer)
        values = values[np.isfinite(values).all(1)]
        if values.shape[0] < 3:
            continue
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = np.corrcoef(values, rowvar=False)
        corr = np.atleast_2d(corr)
        ok = np.isfinite(corr)
        total[ok] += corr[ok]
        count += ok
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count >= max(min_slides, 1), total / count, np.nan)
    # genes that never vary have no correlation: leave them out of the clustering
    defined = np.isfinite(mean).sum(1) > 1
    if defined.sum() < 2:
        raise ValueError("Fewer than 2 module genes vary across tiles; no co-expression to compute.")
    dropped = [g for g, d in zip(genes, defined) if not d]
    if dropped:
        warnings.warn(
            f"{len(dropped)} module genes are constant on every slide and are left out (e.g. {dropped[:5]}).",
            UserWarning,
            stacklevel=2,
        )
    genes = [g for g, d in zip(genes, defined) if d]
    mean = mean[np.ix_(defined, defined)]
    count = count[np.ix_(defined, defined)]
    dist = 1.0 - np.nan_to_num(mean, nan=0.0)
    np.fill_diagonal(dist, 0.0)
    dist = np.clip((dist + dist.T) / 2, 0.0, 2.0)
    link = linkage(squareform(dist, checks=False), method=method)
    order_idx = leaves_list(link)
    order = [genes[i] for i in order_idx]
    corr = pd.DataFrame(mean, index=genes, columns=genes).loc[order, order]
    n_slides = pd.DataFrame(count.astype(int), index=genes, columns=genes).loc[order, order]
    module = pd.Series({g: "|".join(gene_module[g]) for g in order}, name="module").loc[order]
    return ModuleCoexpression(
        corr=corr,
        module=module,
        order=order,
        linkage=link,
        n_slides=n_slides,
        within_between=_within_between(corr, module),
    )


def _within_between(corr: pd.DataFrame, module: pd.Series) -> pd.DataFrame:
    values = corr.to_numpy()
    off_diag = ~np.eye(len(values), dtype=bool)
    rows = {}
    names = list(dict.fromkeys(n for label in module for n in label.split("|")))
    for name in names:
        inside = np.array([name in label.split("|") for label in module])
        within = values[np.ix_(inside, inside)][off_diag[np.ix_(inside, inside)]]
        between = values[np.ix_(inside, ~inside)].ravel()
        rows[name] = {
            "n_genes": int(inside.sum()),
            "within": float(np.nanmean(within)) if within.size else np.nan,
            "between": float(np.nanmean(between)) if between.size else np.nan,
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def score_gene_sets(*args, **kwargs) -> AnnData | None:
    """Moved to :func:`histoexpr.tl.score_gene_sets` (scoring writes into the AnnData, a ``tl`` verb);
    this alias warns and calls it, for one release."""
    warnings.warn("histoexpr.metrics.score_gene_sets moved to histoexpr.tl.score_gene_sets", DeprecationWarning,
                  stacklevel=2)
    from ..tl import score_gene_sets as moved

    return moved(*args, **kwargs)
