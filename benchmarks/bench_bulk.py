"""Bulk prediction benchmarks: SEQUOIA forward (fused heads vs the per-head loop). The
well-predicted-gene test has its own benchmark, ``bench_well_predicted.py``.

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


def run(quick: bool = False) -> dict:
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    return {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available()},
        "quick": quick,
        "sequoia_forward": _sequoia_forward(quick),
    }


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
