"""Kaplan–Meier curves of risk groups (SEQUOIA recurrence analysis)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["kaplan_meier"]


def kaplan_meier(
    time: Sequence[float],
    event: Sequence[bool],
    groups: Sequence[Any],
    *,
    ax: Any = None,
    show_ci: bool = True,
    show_pvalue: bool = True,
    at_risk_counts: bool = False,
    colors: Sequence[str] | None = None,
    xlabel: str = "time",
    ylabel: str = "survival probability",
    title: str | None = None,
) -> Any:
    """Kaplan–Meier curves per group, with the log-rank p-value in the title or legend.

    Parameters
    ----------
    time, event, groups
        Follow-up time, event indicator and group label (e.g. from
        :func:`histoexpr.metrics.median_split`) per patient.
    ax
        Axes to draw into (default: a new figure).
    show_ci
        Draw the 95 % confidence bands.
    show_pvalue
        Add the log-rank p-value (:func:`histoexpr.metrics.logrank`) to the title.
    at_risk_counts
        Add the number-at-risk table below the plot (lifelines).
    colors
        One colour per group, in the order of the groups' categories / first appearance.

    Returns
    -------
    :class:`matplotlib.axes.Axes`
        Single panel with one curve per group.

    Example
    -------
    >>> import histoexpr as hx
    >>> groups = hx.metrics.median_split(hx.metrics.cox_risk_score(pred, signature))  # doctest: +SKIP
    >>> ax = hx.pl.kaplan_meier(clin["time"], clin["event"], groups)  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt
    from lifelines import KaplanMeierFitter

    from histoexpr._utils import align_by_index
    from histoexpr.metrics import logrank

    time, event, groups = align_by_index(time, event, groups)
    time = np.asarray(time, dtype=float)
    event = np.asarray(event).astype(bool)
    groups = pd.Series(groups).reset_index(drop=True)
    if not (len(time) == len(event) == len(groups)):
        raise ValueError("time, event and groups must have the same length")
    levels = list(groups.cat.categories) if isinstance(groups.dtype, pd.CategoricalDtype) else list(pd.unique(groups))
    levels = [lv for lv in levels if (groups == lv).any()]
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 4))
    fitters = []
    for i, level in enumerate(levels):
        mask = (groups == level).to_numpy()
        kmf = KaplanMeierFitter(label=f"{level} (n={int(mask.sum())})")
        kmf.fit(time[mask], event_observed=event[mask])
        kwargs = {"color": colors[i]} if colors is not None else {}
        kmf.plot_survival_function(ax=ax, ci_show=show_ci, **kwargs)
        fitters.append(kmf)
    if at_risk_counts:
        from lifelines.plotting import add_at_risk_counts

        add_at_risk_counts(*fitters, ax=ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    heading = title or ""
    if show_pvalue and len(levels) >= 2:
        p = logrank(time, event, groups.to_numpy())["p_value"]
        heading = f"{heading}  log-rank p = {p:.3g}".strip()
    if heading:
        ax.set_title(heading)
    return ax

