"""Predicted/measured map pairs on the built-in mouse olfactory bulb section, without training a model.

The "prediction" is the measured log1p expression plus noise: the plots and the explorer only need
two aligned maps on real tiles over the real H&E.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def mob_maps(n_genes: int = 12, noise: float = 0.6, random_state: int = 0):
    import histoexpr as hx

    spots = hx.datasets.mouse_olfactory_bulb()
    counts = spots.X.toarray() if hasattr(spots.X, "toarray") else np.asarray(spots.X)
    log_counts = np.log1p(counts)
    top = np.argsort(-log_counts.mean(0), kind="stable")[:n_genes]
    truth = spots[:, top].copy()
    truth.X = log_counts[:, top].astype(np.float32)
    truth.obs["row"] = truth.obs["array_row"].astype(int)
    truth.obs["col"] = truth.obs["array_col"].astype(int)
    truth.obs["slide_id"] = "MOB1"
    rng = np.random.default_rng(random_state)
    pred = truth.copy()
    pred.X = (truth.X + rng.normal(scale=noise, size=truth.shape)).astype(np.float32)
    pred.uns["histoexpr"] = dict(pred.uns["histoexpr"], units="log1p(counts)")
    return pred, truth


def per_gene_table(pred, truth) -> pd.DataFrame:
    import histoexpr as hx

    r, p = hx.metrics.pearson(pred.X, truth.X)
    emd = hx.metrics.emd(pred, truth, n_jobs=1)["emd"]
    return pd.DataFrame({"r": r, "p": p, "emd": emd.reindex(pred.var_names).to_numpy()}, index=pred.var_names)
