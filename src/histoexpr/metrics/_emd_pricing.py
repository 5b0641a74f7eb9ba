"""Exact pricing of every surplus/deficit pair for the sparse EMD solver (numba kernel, private).

Imported lazily by :mod:`histoexpr.metrics._emd` on the first sparse solve: numba's import and the
kernel's compilation (cached on disk after the first run) cost about a second once per process.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# No reassociation, no approximate functions, no FMA contraction: every reduced cost is computed with the
# same IEEE operations, in the same order, as numpy's ``np.sqrt(dr * dr + dc * dc) - phs + phd``. Finite
# inputs only (the callers pass coordinates and potentials, never NaN or inf).
_FLAGS = {"nnan", "ninf", "nsz"}


def _jit(fn):
    try:
        return njit(cache=True, nogil=True, fastmath=_FLAGS)(fn)
    except RuntimeError:  # no writable cache location (read-only install and home): compile per process
        return njit(nogil=True, fastmath=_FLAGS)(fn)


@_jit
def _price_kernel(xs, xd, phs, phd, thr, k, col_best, out_i, out_j, col_min, col_arg):  # pragma: no cover - jitted
    ns, nd = xs.shape[0], xd.shape[0]
    xd0 = np.ascontiguousarray(xd[:, 0])
    xd1 = np.ascontiguousarray(xd[:, 1])
    row = np.empty(nd)
    buf_j = np.empty(max(k, 1), dtype=np.int64)
    buf_r = np.empty(max(k, 1))
    worst = np.inf
    n_out = 0
    for i in range(ns):
        x0, x1, p = xs[i, 0], xs[i, 1], phs[i]
        for j in range(nd):  # vectorised: the sqrt dominates
            d0 = x0 - xd0[j]
            d1 = x1 - xd1[j]
            row[j] = np.sqrt(d0 * d0 + d1 * d1) - p + phd[j]
        rmin = np.inf
        if col_best:
            for j in range(nd):
                v = row[j]
                if v < rmin:
                    rmin = v
                if v < col_min[j]:
                    col_min[j] = v
                    col_arg[j] = i
        else:
            for j in range(nd):
                if row[j] < rmin:
                    rmin = row[j]
        if rmin < worst:
            worst = rmin
        if k == 0 or not rmin < thr:
            continue
        # the k smallest reduced costs below thr: a buffer that replaces its largest entry
        m = 0
        top = -np.inf
        at = 0
        for j in range(nd):
            v = row[j]
            if not v < thr:
                continue
            if m < k:
                buf_j[m] = j
                buf_r[m] = v
                m += 1
                if m < k:
                    continue
            elif v < top:
                buf_j[at] = j
                buf_r[at] = v
            else:
                continue
            top = buf_r[0]
            at = 0
            for t in range(1, k):
                if buf_r[t] > top:
                    top = buf_r[t]
                    at = t
        for t in range(m):
            out_i[n_out] = i
            out_j[n_out] = buf_j[t]
            n_out += 1
    return worst, n_out


def price_pairs(
    xs: np.ndarray, xd: np.ndarray, phs: np.ndarray, phd: np.ndarray, *, thr: float, k: int, col_best: bool
) -> tuple[float, np.ndarray | None, np.ndarray | None]:
    """Reduced costs ``r_ij = |xs_i - xd_j| - phs_i + phd_j`` of every pair, one pass, memory O(ns · k + nd).

    Returns ``(worst, rows, cols)``: the exact minimum of r over all pairs, and the pairs to add: per row the
    ``k`` smallest r below ``thr`` and, with ``col_best``, the smallest r of each column if below ``thr``
    (``thr=inf``: the ``k`` smallest of every row regardless of sign). ``rows``/``cols`` may repeat a pair.
    """
    ns, nd = len(xs), len(xd)
    k = int(min(k, nd))
    out_i = np.empty(ns * k, dtype=np.int64)
    out_j = np.empty(ns * k, dtype=np.int64)
    col_min = np.full(nd, np.inf)
    col_arg = np.zeros(nd, dtype=np.int64)
    worst, n_out = _price_kernel(
        np.ascontiguousarray(xs, dtype=np.float64), np.ascontiguousarray(xd, dtype=np.float64),
        np.ascontiguousarray(phs, dtype=np.float64), np.ascontiguousarray(phd, dtype=np.float64),
        float(thr), k, bool(col_best), out_i, out_j, col_min, col_arg,
    )
    rows, cols = out_i[:n_out], out_j[:n_out]
    if col_best:
        best = np.flatnonzero(col_min < thr)
        rows, cols = np.concatenate([rows, col_arg[best]]), np.concatenate([cols, best])
    if not rows.size:
        return float(worst), None, None
    return float(worst), rows, cols


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernel now, e.g. before forking worker processes."""
    x = np.zeros((1, 2))
    price_pairs(x, x, np.zeros(1), np.zeros(1), thr=0.0, k=1, col_best=True)
