"""Thread limits for torch and BLAS inside histoexpr calls, restored afterwards.

Tiny models (a few hundred tiles × a few hundred features) gain nothing from many threads, and
OpenMP/BLAS thread pools spin-wait on each other when the machine is busy: measured on 2 cores with
other work running, the demo took 16 min with the default pools and under a minute with one thread.
:func:`limit_threads` caps the pools for the duration of a call and puts the caller's settings back,
so library code never leaves global state changed.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

from ._settings import available_cpus, settings


def resolve_threads(n_threads: int | None = None, *, small: bool = True) -> int:
    """Threads to use: ``n_threads``, else ``settings.n_threads``, else 1 for small models or all CPUs."""
    if n_threads is not None:
        if int(n_threads) != n_threads or n_threads < 1:
            raise ValueError(f"n_threads must be a positive integer, got {n_threads!r}")
        return int(n_threads)
    if settings.n_threads is not None:
        return settings.n_threads
    return 1 if small else available_cpus()


@contextmanager
def limit_threads(n_threads: int | None = None, *, small: bool = True):
    """Cap torch intra-op threads and BLAS/OpenMP pools (threadpoolctl) to ``n`` inside the block.

    ``n`` is :func:`resolve_threads` of the arguments. torch's thread count is restored on exit;
    threadpoolctl restores the BLAS pools. torch is only touched when it is already imported.

    Examples
    --------
    >>> from histoexpr._threads import limit_threads
    >>> with limit_threads(1):
    ...     pass
    """
    n = resolve_threads(n_threads, small=small)
    torch = sys.modules.get("torch")
    old_torch = torch.get_num_threads() if torch is not None else None
    from threadpoolctl import threadpool_limits

    try:
        if torch is not None and old_torch != n:
            torch.set_num_threads(n)
        with threadpool_limits(limits=n):
            yield n
    finally:
        if torch is not None and old_torch is not None and torch.get_num_threads() != old_torch:
            torch.set_num_threads(old_torch)


def threads_limited(small: bool = True):
    """Decorator: run the function under :func:`limit_threads` (``n_threads=`` kwarg if it has one)."""
    import functools

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with limit_threads(kwargs.get("n_threads"), small=small):
                return fn(*args, **kwargs)

        return wrapper

    return deco


def worker_init_fn(worker_id: int) -> None:  # pragma: no cover - runs in DataLoader workers
    """DataLoader worker initialiser: one torch/BLAS thread per worker (workers read tiles, nothing more)."""
    import torch

    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1)
    except Exception:
        pass
