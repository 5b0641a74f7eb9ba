"""Gene Pathway Coherence (GPC): how well predicted maps of a pathway's genes follow the measured maps."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ._emd import pair_maps
from ._genesets import load_gene_sets, membership_matrix


def pearson_columns(x: np.ndarray, y: np.ndarray, *, block: int = 1024) -> np.ndarray:
    """Pearson r between matching columns of ``x`` and ``y`` (n × g), vectorised, NaN-aware.

    Rows where either value is NaN are ignored per column; columns with fewer than 3 pairs or no
    variance get NaN (without numpy warnings). Computed in float64 over blocks of ``block`` columns,
    so temporary memory stays small for 20k genes.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"x and y must be 2-D arrays of the same shape, got {x.shape} and {y.shape}.")
    r = np.empty(x.shape[1], dtype=np.float64)
    for start in range(0, x.shape[1], block):
        cols = slice(start, start + block)
        r[cols] = _pearson_block(x[:, cols].astype(np.float64), y[:, cols].astype(np.float64))
    return r


def _pearson_block(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    valid = ~(np.isnan(x) | np.isnan(y))
    if valid.all():
        n = np.full(x.shape[1], x.shape[0], dtype=np.float64)
        mean_x, mean_y = x.mean(0), y.mean(0)
        x -= mean_x
        y -= mean_y
    else:
        n = valid.sum(0).astype(np.float64)
        x[~valid] = 0.0
        y[~valid] = 0.0
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_x, mean_y = x.sum(0) / n, y.sum(0) / n
        x -= np.nan_to_num(mean_x)
        y -= np.nan_to_num(mean_y)
        x[~valid] = 0.0
        y[~valid] = 0.0
    sxy = np.einsum("ij,ij->j", x, y)
    sxx = np.einsum("ij,ij->j", x, x)
    syy = np.einsum("ij,ij->j", y, y)
    # a column constant up to rounding (centring leaves ~1e-16·|mean| residues) has no defined r
    with np.errstate(invalid="ignore"):
        flat = (sxx <= n * (1e-10 * mean_x) ** 2) | (syy <= n * (1e-10 * mean_y) ** 2) | (n < 3)
        flat |= (sxx == 0) | (syy == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = sxy / np.sqrt(sxx * syy)
    r[flat] = np.nan
    return np.clip(r, -1.0, 1.0)


def pathway_coherence(
    pred,
    truth,
    *,
    gene_sets: str | Path | Mapping[str, Iterable[str]] | pd.DataFrame = "hallmark",
    gene_sets_path: str | Path | None = None,
    slide_key: str = "slide_id",
    genes: Sequence[str] | None = None,
    min_genes: int = 1,
    layer_pred: str | None = None,
    layer_truth: str | None = None,
) -> pd.DataFrame:
    """Gene Pathway Coherence (GPC) of predicted vs measured spatial maps (HistoPrism, eq. 7).

    Per slide and gene, the Pearson correlation across tiles (or spots) between prediction and
    measurement; a pathway's score on a slide is the mean over its genes that were measured and
    predicted (NaN correlations, e.g. of constant genes or of genes a slide does not measure, are
    skipped); the GPC is the mean over slides. This is HistoPrism's computation
    (``inference.py``): with its own gene sets (``gene_sets="histoprism_hallmark"`` /
    ``"histoprism_go"``, loaded by path) it gives HistoPrism's numbers to 1e-7.

    Parameters
    ----------
    pred, truth
        AnnData (tiles × genes) on the same tiles (matched by ``obs_names`` or ``obs[slide_key, "row",
        "col"]``), or two arrays (n_tiles, n_genes) with ``genes`` naming the columns.
    gene_sets
        ``"hallmark"`` (50 MSigDB Hallmark sets, v7.0), ``"hallmark_2025"`` (MSigDB 2025.1, the
        release HistoPrism used), ``"go_bp"`` (curated GO BP, 50–100 genes, non-redundant),
        ``"histoprism_hallmark"`` / ``"histoprism_go"`` (HistoPrism's curated sets, CC BY-NC 4.0, not
        shipped: give ``gene_sets_path``), ``"neftel"``, ``"neftel_meta"``, ``"cellcycle"``, a
        ``.gmt``/``.json`` path, a dict ``{name: genes}`` or a ``source``/``target`` DataFrame (see
        :func:`load_gene_sets`).
    gene_sets_path
        GMT file (or folder) for ``"histoprism_hallmark"`` / ``"histoprism_go"``; default
        ``$HISTOEXPR_HISTOPRISM_GENESETS``.
    slide_key
        ``obs`` column with the slide of each tile; correlations are computed within slides.
    genes
        Column names when ``pred``/``truth`` are arrays.
    min_genes
        Pathways with fewer genes present (with a defined correlation) get NaN on that slide.
    layer_pred, layer_truth
        Layers to read instead of ``X``.

    Returns
    -------
    DataFrame indexed by pathway: ``gpc`` (mean over slides), ``gpc_sd`` (SD over slides), ``n_slides``
    (slides with a score), ``n_genes`` (set genes present in both maps), ``set_size``, and one column
    ``gpc_<slide>`` per slide. Sorted by ``gpc``, highest first.

    Example
    -------
    >>> res = hx.metrics.pathway_coherence(pred_tiles, measured_tiles, gene_sets="hallmark")  # doctest: +SKIP
    >>> res.head()  # doctest: +SKIP
    """
    sets = load_gene_sets(gene_sets, path=gene_sets_path)
    if not sets:
        raise ValueError("No gene sets to score (the collection is empty).")
    if genes is None and hasattr(pred, "var_names") and hasattr(truth, "var_names"):
        # only genes of some set matter: read just those columns
        in_sets = {g for members in sets.values() for g in members}
        truth_genes = set(truth.var_names)
        genes = [g for g in pred.var_names if g in in_sets and g in truth_genes]
        if not genes:
            raise ValueError(
                "None of the gene-set genes is in both maps. Are var_names gene symbols? (the built-in sets use "
                "HGNC symbols)"
            )
    maps = pair_maps(pred, truth, genes=genes, slide_key=slide_key, layer_pred=layer_pred, layer_truth=layer_truth)
    membership = membership_matrix(sets, maps.genes)
    n_present = np.asarray(membership.sum(1)).ravel().astype(int)
    if n_present.sum() == 0:
        raise ValueError(
            "None of the gene-set genes is in both maps. Are var_names gene symbols? (the built-in sets use "
            "HGNC symbols)"
        )
    slide_ids = list(dict.fromkeys(maps.slides))
    scores = np.empty((len(sets), len(slide_ids)))
    for k, slide in enumerate(slide_ids):
        rows = maps.slides == slide
        r = pearson_columns(maps.pred[rows], maps.truth[rows])
        defined = ~np.isnan(r)
        sums = membership @ np.where(defined, r, 0.0)
        counts = membership @ defined.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            scores[:, k] = np.where(counts >= max(min_genes, 1), sums / counts, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(scores, axis=1)
        sd = np.nanstd(scores, axis=1, ddof=1) if len(slide_ids) > 1 else np.full(len(sets), np.nan)
    out = pd.DataFrame(
        {
            "gpc": mean,
            "gpc_sd": sd,
            "n_slides": (~np.isnan(scores)).sum(1),
            "n_genes": n_present,
            "set_size": [len(v) for v in sets.values()],
        },
        index=pd.Index(list(sets), name="pathway"),
    )
    for k, slide in enumerate(slide_ids):
        out[f"gpc_{slide}" if slide else "gpc_slide"] = scores[:, k]
    n_empty = int((out["n_slides"] == 0).sum())
    if n_empty:
        warnings.warn(
            f"{n_empty} of {len(out)} gene sets have no gene with a defined correlation in the data (GPC NaN).",
            UserWarning,
            stacklevel=2,
        )
    return out.sort_values("gpc", ascending=False, na_position="last")
