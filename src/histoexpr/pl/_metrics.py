"""Plots of evaluation metrics: per-gene correlations, pathway coherence, module co-expression."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_R_COLUMNS = ("r", "pearson_r", "pearson", "pcc", "correlation", "spearman_r", "rho")
_P_COLUMNS = ("p", "pval", "pvalue", "p_value", "pearson_p", "pearson_pval", "pearson_pvalue", "spearman_p")


def _pick(frame: pd.DataFrame, wanted: str | None, candidates: tuple[str, ...], what: str, required: bool):
    if wanted is not None:
        if wanted not in frame.columns:
            raise KeyError(f"Column {wanted!r} not found; columns: {list(frame.columns)}.")
        return wanted
    for c in candidates:
        if c in frame.columns:
            return c
    if required:
        raise KeyError(f"No {what} column found (looked for {candidates}); pass {what}_key=.")
    return None


def _collect(results, r_key, p_key) -> pd.DataFrame:
    """Long table (group, r, p) from a DataFrame / Series / array or a dict of them."""
    items = results.items() if isinstance(results, Mapping) else [("", results)]
    parts = []
    for name, res in items:
        if isinstance(res, pd.DataFrame):
            rc = _pick(res, r_key, _R_COLUMNS, "r", True)
            pc = _pick(res, p_key, _P_COLUMNS, "p", False)
            r = res[rc].to_numpy(dtype=float)
            p = res[pc].to_numpy(dtype=float) if pc else np.full(len(r), np.nan)
        elif isinstance(res, tuple) and len(res) == 2:  # (r, p) as returned by hx.metrics.pearson
            r = np.asarray(res[0], dtype=float).ravel()
            p = np.asarray(res[1], dtype=float).ravel()
            if p.shape != r.shape:
                raise ValueError(f"r and p differ in length ({r.size} vs {p.size}).")
        else:
            r = np.asarray(res, dtype=float).ravel()
            p = np.full(len(r), np.nan)
        parts.append(pd.DataFrame({"group": str(name), "r": r, "p": p}))
    table = pd.concat(parts, ignore_index=True)
    return table[np.isfinite(table["r"])]


def gene_correlations(
    results,
    *,
    r_key: str | None = None,
    p_key: str | None = None,
    alpha: float = 0.05,
    kind: str = "violin",
    ax=None,
    palette: str = "Set2",
) -> Axes:
    """Distribution of per-gene correlations, with the number of significant genes per group.

    Parameters
    ----------
    results
        Per-gene results: the ``(r, p)`` tuple of :func:`histoexpr.metrics.pearson`, a DataFrame with an
        r column and optionally a p-value column, a Series/array of r, or a dict ``{label: results}``
        to compare models or slides side by side.
    r_key, p_key
        Column names; by default the first of the usual names (``r``, ``pearson_r``, ... / ``p``,
        ``pval``, ``pearson_p``, ...).
    alpha
        A gene counts as significant when r > 0 and p < ``alpha``.
    kind
        ``"violin"`` (with an inner box) or ``"box"``.
    ax
        Axes to draw on (default: a new figure).

    Returns
    -------
    :class:`matplotlib.axes.Axes`
        Single panel. Each group's label reads ``"<label>\\nn=<genes>, sig=<k>"``.

    Example
    -------
    >>> ax = hx.pl.gene_correlations({"SEQUOIA": res_a, "HE2RNA": res_b})  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    if kind not in ("violin", "box"):
        raise ValueError(f"kind must be 'violin' or 'box', got {kind!r}.")
    table = _collect(results, r_key, p_key)
    if table.empty:
        raise ValueError("No finite correlation to plot.")
    if ax is None:
        _, ax = plt.subplots(figsize=(1.6 + 1.4 * table["group"].nunique(), 4))
    groups = list(dict.fromkeys(table["group"]))
    labels = {}
    for g in groups:
        sub = table[table["group"] == g]
        label = f"{g}\n" if g else ""
        label += f"n={len(sub)}"
        if sub["p"].notna().any():
            label += f", sig={int(((sub['p'] < alpha) & (sub['r'] > 0)).sum())}"
        labels[g] = label
    table = table.assign(label=table["group"].map(labels))
    order = [labels[g] for g in groups]
    if kind == "violin":
        sns.violinplot(data=table, x="label", y="r", order=order, inner="box", cut=0, ax=ax, hue="label",
                       palette=palette, legend=False)
    else:
        sns.boxplot(data=table, x="label", y="r", order=order, ax=ax, hue="label", palette=palette, legend=False)
    ax.axhline(0, color="0.5", lw=0.8, ls="--")
    ax.set_xlabel("")
    ax.set_ylabel("per-gene correlation (r)")
    if table["p"].notna().any():
        ax.set_title(f"significant: r > 0 and p < {alpha:g}", fontsize=9)
    return ax


def pathway_coherence(result: pd.DataFrame, *, top: int = 20, show_slides: bool = True, ax=None) -> Axes:
    """Bar chart of Gene Pathway Coherence (output of :func:`histoexpr.metrics.pathway_coherence`).

    Parameters
    ----------
    result
        The GPC DataFrame (``gpc`` and ``gpc_<slide>`` columns, indexed by pathway).
    top
        Number of pathways, highest GPC first.
    show_slides
        Overlay each slide's score as a dot.
    ax
        Axes to draw on.

    Returns
    -------
    :class:`matplotlib.axes.Axes`
        Single panel with one bar per pathway.

    Example
    -------
    >>> ax = hx.pl.pathway_coherence(hx.metrics.pathway_coherence(pred, truth), top=15)  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    if "gpc" not in result.columns:
        raise KeyError("result needs a 'gpc' column (the output of hx.metrics.pathway_coherence).")
    shown = result.dropna(subset=["gpc"]).sort_values("gpc", ascending=False).head(top)
    if shown.empty:
        raise ValueError("No pathway has a GPC value.")
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 0.3 * len(shown) + 1.2))
    y = np.arange(len(shown))[::-1]
    labels = [str(n).replace("HALLMARK_", "").replace("_", " ") for n in shown.index]
    ax.barh(y, shown["gpc"], color="#4c72b0", alpha=0.8, label="mean over slides")
    slide_cols = [c for c in shown.columns if c.startswith("gpc_") and c != "gpc_sd"]
    if show_slides and len(slide_cols) > 1:
        for c in slide_cols:
            ax.scatter(shown[c], y, s=10, color="k", zorder=3)
    ax.set_yticks(y, labels, fontsize=8)
    ax.axvline(0, color="0.5", lw=0.8)
    ax.set_xlabel("gene pathway coherence (mean r)")
    return ax


def _primary_module(module: pd.Series) -> pd.Series:
    """One module per gene: of the modules a gene is in, the one with most genes here (ties: first listed)."""
    members = module.astype(str).str.split("|")
    size: dict[str, int] = {}
    for names in members:
        for n in names:
            size[n] = size.get(n, 0) + 1
    return members.map(lambda names: max(names, key=lambda n: (size[n], -names.index(n)))).rename("module")


def module_correlation(
    result,
    *,
    modules=None,
    overlap: str = "primary",
    cmap: str = "RdBu_r",
    palette: str = "tab20",
    show_gene_labels: bool | None = None,
    max_membership: int = 12,
    figsize: tuple[float, float] = (8, 8),
) -> Figure:
    """Heatmap of module-gene co-expression in clustering order (SEQUOIA Fig. 5d).

    Genes can belong to several sets (Hallmark sets overlap). They are never shown as combined
    labels such as ``"A|B|C"``: with ``overlap="primary"`` each gene gets ONE module, the largest
    of its modules among the plotted genes (ties: the one listed first), in a single colour bar
    and a legend of at most one entry per module; with ``overlap="membership"`` one side bar per
    module (the ``max_membership`` largest) marks every gene that belongs to it.

    Parameters
    ----------
    result
        Output of :func:`histoexpr.metrics.module_coexpression`, or AnnData / list of AnnData (then
        computed with ``modules``).
    modules
        Modules when ``result`` is data (default ``"neftel_meta"``).
    overlap
        ``"primary"`` or ``"membership"`` (see above).
    cmap
        Colour map of the correlations (fixed to -1…1).
    palette
        Colours of the modules.
    show_gene_labels
        Gene names on the axes (default: when ≤ 80 genes).
    max_membership
        Most module bars drawn with ``overlap="membership"``.
    figsize
        Figure size in inches.

    Returns
    -------
    :class:`matplotlib.figure.Figure`
        Multi-panel figure (a seaborn clustermap's): the heatmap, the module bar(s), the colour bar
        and the module legend. The primary module of each gene is in ``fig.histoexpr_modules``.

    Example
    -------
    >>> fig = hx.pl.module_correlation(hx.metrics.module_coexpression(pred_slides))  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.patches import Patch

    from ..metrics._modules import ModuleCoexpression, module_coexpression

    if overlap not in ("primary", "membership"):
        raise ValueError(f"overlap must be 'primary' or 'membership', got {overlap!r}.")
    if not isinstance(result, ModuleCoexpression):
        result = module_coexpression(result, modules=modules or "neftel_meta")
    primary = _primary_module(result.module)
    members = result.module.astype(str).str.split("|")
    counts = pd.Series([n for names in members for n in names]).value_counts(sort=False)
    first_seen = list(dict.fromkeys(n for names in members for n in names))
    names = sorted(first_seen, key=lambda n: (-counts[n], first_seen.index(n)))
    colour_list = sns.color_palette(palette, max(len(names), 1))
    colors = {n: colour_list[i % len(colour_list)] for i, n in enumerate(names)}
    if overlap == "primary":
        side = primary.map(colors).rename("module")
        shown = [n for n in names if (primary == n).any()]
    else:
        shown = names[:max_membership]
        side = pd.DataFrame({n: [colors[n] if n in m else (1.0, 1.0, 1.0) for m in members] for n in shown},
                            index=result.module.index)
    labels = show_gene_labels if show_gene_labels is not None else len(result.order) <= 80
    grid = sns.clustermap(
        result.corr,
        row_cluster=False,
        col_cluster=False,
        row_colors=side,
        col_colors=side if overlap == "primary" else None,
        cmap=cmap,
        vmin=-1,
        vmax=1,
        xticklabels=labels,
        yticklabels=labels,
        figsize=figsize,
        cbar_kws={"label": "mean Pearson r"},
    )
    grid.ax_heatmap.set_xlabel("")
    grid.ax_heatmap.set_ylabel("")
    handles = [Patch(color=colors[n], label=f"{n} ({int((primary == n).sum()) if overlap == 'primary' else int(counts[n])})")
               for n in shown]
    n_multi = int((members.str.len() > 1).sum())
    title = "module (genes)"
    if n_multi:
        title += f"\n{n_multi} genes in several sets: " + ("coloured by their largest set" if overlap == "primary"
                                                           else "marked in each set's bar")
    grid.ax_heatmap.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7,
                           frameon=False, title=title, title_fontsize=7, ncol=1 if len(handles) <= 25 else 2)
    fig = grid.figure
    fig.histoexpr_modules = primary
    plt.figure(fig.number)  # keep pyplot's current figure consistent for notebooks
    return fig
