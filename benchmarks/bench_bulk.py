"""Bulk prediction benchmarks: SEQUOIA forward (fused heads vs the per-head loop) and the
well-predicted-gene test (vectorised vs a per-gene scipy loop).

``run(quick)`` returns JSON-serialisable numbers; ``python benchmarks/bench_bulk.py [--quick]``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import numpy as np


def _timeit(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _sequoia_forward(quick: bool) -> dict:
    import torch

    from histoexpr.models import Sequoia

    torch.manual_seed(0)
    cfg = {"num_outputs": 20820, "input_dim": 1024, "depth": 6, "nheads": 16, "num_clusters": 100}
    model = Sequoia(cfg).eval()
    batch = 2 if quick else 8
    x = torch.randn(batch, 100, 1024)

    def naive() -> torch.Tensor:  # the module tree applied literally: one head at a time
        h = x + model.pos_emb1D
        for mixer, ff in model.transformer.layers:
            h = mixer.projection(torch.cat([head(h) for head in mixer.mixers], dim=-1)) + h
            h = ff(h) + h
        return model.linear_head(h.mean(dim=1))

    with torch.no_grad():
        max_diff = float((model(x) - naive()).abs().max())
        repeats = 2 if quick else 5
        t_fused = _timeit(lambda: model(x), repeats)
        t_naive = _timeit(naive, repeats)
    return {
        "config": cfg,
        "batch_slides": batch,
        "torch_threads": torch.get_num_threads(),
        "fused_s_per_batch": t_fused,
        "naive_per_head_s_per_batch": t_naive,
        "fused_slides_per_s": batch / t_fused,
        "speedup_vs_naive": t_naive / t_fused,
        "max_abs_diff_vs_naive": max_diff,
        "device": "cpu",
    }


def _well_predicted(quick: bool) -> dict:
    from scipy import stats

    from histoexpr.metrics import well_predicted_genes

    rng = np.random.default_rng(0)
    n, g = 100, (2000 if quick else 20820)
    truth = rng.normal(size=(n, g))
    pred = truth + rng.normal(size=(n, g)) * rng.uniform(0.3, 3, g)
    rand = rng.normal(size=(n, g))

    def naive():
        p_st, r1s = [], []
        for j in range(g):
            r1, _ = stats.pearsonr(pred[:, j], truth[:, j])
            r2, _ = stats.pearsonr(rand[:, j], truth[:, j])
            r12, _ = stats.pearsonr(pred[:, j], rand[:, j])
            det = 1 - r1**2 - r2**2 - r12**2 + 2 * r1 * r2 * r12
            a = (r1 + r2) / 2
            t = (r1 - r2) * np.sqrt((n - 1) * (1 + r12) / (2 * (n - 1) / (n - 3) * det + a**2 * (1 - r12) ** 3))
            p_st.append(stats.t.sf(abs(t), n - 3))
            r1s.append(r1)
        return stats.false_discovery_control(np.array(p_st)), np.array(r1s)

    t_vec = _timeit(lambda: well_predicted_genes(pred, truth, rand), 3)
    t_naive = _timeit(naive, 1)
    table = well_predicted_genes(pred, truth, rand)
    p_adj, r1 = naive()
    return {
        "n_samples": n,
        "n_genes": g,
        "vectorised_s": t_vec,
        "per_gene_scipy_loop_s": t_naive,
        "speedup_vs_loop": t_naive / t_vec,
        "max_abs_diff_r": float(np.abs(table["r"].to_numpy() - r1).max()),
        "max_abs_diff_steiger_p_adj": float(np.abs(table["steiger_p_adj"].to_numpy() - p_adj).max()),
        "n_well_predicted": int(table["well_predicted"].sum()),
    }


def run(quick: bool = False) -> dict:
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    return {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available()},
        "quick": quick,
        "sequoia_forward": _sequoia_forward(quick),
        "well_predicted_genes": _well_predicted(quick),
    }


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
