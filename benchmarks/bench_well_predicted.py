"""The well-predicted-gene test (Pearson + Steiger + Benjamini–Hochberg): ``metrics.well_predicted_genes``
against (a) the best simple alternative, a plain vectorised numpy/scipy version written out here, and
(b) the published approach, SEQUOIA's per-gene loop (``scipy.stats.pearsonr`` + the Williams/Steiger
formula per gene), timed on a subset of genes and scaled per gene.

``run(quick)`` returns JSON-serialisable numbers; ``python benchmarks/bench_well_predicted.py [--quick]``.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
from scipy import stats


def numpy_baseline(pred, truth, rand, alpha=0.05, fdr=0.2):
    """Plain vectorised numpy: r, p, r_random, Steiger t / one-tailed p (H1 r > r_random), BH,
    RMSE and the call, as a user would write it in a notebook."""
    n = truth.shape[0]

    def corr(a, b):
        a = a - a.mean(axis=0)
        b = b - b.mean(axis=0)
        return (a * b).sum(axis=0) / np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))

    r1, r2, r12 = corr(pred, truth), corr(rand, truth), corr(pred, rand)
    p1 = 2 * stats.t.sf(np.abs(r1) * np.sqrt((n - 2) / (1 - r1**2)), n - 2)
    det = 1 - r1**2 - r2**2 - r12**2 + 2 * r1 * r2 * r12
    a = (r1 + r2) / 2
    t = (r1 - r2) * np.sqrt((n - 1) * (1 + r12) / (2 * (n - 1) / (n - 3) * det + a**2 * (1 - r12) ** 3))
    p_st = stats.t.sf(t, n - 3)
    p_adj = stats.false_discovery_control(p_st, method="bh")
    e1 = np.sqrt(((pred - truth) ** 2).mean(axis=0))
    e2 = np.sqrt(((rand - truth) ** 2).mean(axis=0))
    ok = (r1 > 0) & (p1 < alpha) & (r1 > r2) & (e1 < e2) & (p_st < alpha) & (p_adj < fdr)
    return {"r": r1, "p": p1, "r_random": r2, "steiger_t": t, "steiger_p": p_st, "steiger_p_adj": p_adj,
            "rmse": e1, "rmse_random": e2, "well_predicted": ok}  # fmt: skip


def per_gene_loop(pred, truth, rand):
    """SEQUOIA's evaluation shape: one ``pearsonr`` triple and one Steiger formula per gene."""
    n, g = truth.shape
    out = np.empty((g, 2))
    for j in range(g):
        r1, p1 = stats.pearsonr(truth[:, j], pred[:, j])
        r2, _ = stats.pearsonr(truth[:, j], rand[:, j])
        r12, _ = stats.pearsonr(pred[:, j], rand[:, j])
        det = 1 - r1**2 - r2**2 - r12**2 + 2 * r1 * r2 * r12
        a = (r1 + r2) / 2
        t = (r1 - r2) * np.sqrt((n - 1) * (1 + r12) / (2 * (n - 1) / (n - 3) * det + a**2 * (1 - r12) ** 3))
        out[j] = r1, stats.t.sf(t, n - 3)
    return out


def _interleaved(fns: dict, repeats: int) -> dict:
    """Median CPU seconds per function (``time.process_time``: the benchmark machine is shared, and
    CPU time is far less sensitive to other jobs than wall time), runs interleaved."""
    for fn in fns.values():
        fn()  # warm-up (imports, caches)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.process_time()
            fn()
            times[k].append(time.process_time() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def _case(n: int, g: int, repeats: int, loop_genes: int) -> dict:
    from histoexpr.metrics import well_predicted_genes

    rng = np.random.default_rng(0)
    truth = rng.normal(size=(n, g))
    pred = truth + rng.normal(size=(n, g)) * rng.uniform(0.3, 3, g)
    rand = 0.2 * pred + rng.normal(size=(n, g))
    t = _interleaved({"ours": lambda: well_predicted_genes(pred, truth, rand),
                      "numpy": lambda: numpy_baseline(pred, truth, rand)}, repeats)  # fmt: skip
    table = well_predicted_genes(pred, truth, rand)
    base = numpy_baseline(pred, truth, rand)
    diffs = {f"max_abs_diff_{k}": float(np.nanmax(np.abs(table[k].to_numpy() - v)))
             for k, v in base.items() if k != "well_predicted"}  # fmt: skip
    sub = slice(0, min(loop_genes, g))
    t0 = time.process_time()
    loop = per_gene_loop(pred[:, sub], truth[:, sub], rand[:, sub])
    t_loop_sub = time.process_time() - t0
    t_loop = t_loop_sub * g / loop.shape[0]
    return {
        "n_samples": n,
        "n_genes": g,
        "ours_s": t["ours"],
        "numpy_baseline_s": t["numpy"],
        "ratio_numpy_over_ours": t["numpy"] / t["ours"],
        "per_gene_loop_genes_timed": int(loop.shape[0]),
        "per_gene_loop_s_scaled_to_all_genes": t_loop,
        "ratio_loop_over_ours": t_loop / t["ours"],
        "calls_identical_to_numpy": bool((table["well_predicted"].to_numpy() == base["well_predicted"]).all()),
        "n_well_predicted": int(table["well_predicted"].sum()),
        **diffs,
        "max_abs_diff_r_vs_loop": float(np.abs(table["r"].to_numpy()[sub] - loop[:, 0]).max()),
        "max_abs_diff_steiger_p_vs_loop": float(np.abs(table["steiger_p"].to_numpy()[sub] - loop[:, 1]).max()),
    }


def run(quick: bool = False) -> dict:
    sizes = [(100, 2000)] if quick else [(100, 8693), (100, 20820)]
    return {
        "note": "CPU seconds (process_time), single thread (run with OMP_NUM_THREADS=1); ours computes more columns "
        "(p_random, p_adj, nrmse, rmse_iqr, rmse_mean, constancy) than the baseline",
        "cases": [_case(n, g, repeats=3 if quick else 9, loop_genes=300 if quick else 1000) for n, g in sizes],
    }


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
