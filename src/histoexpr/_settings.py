"""Package-wide settings: ``histoexpr.settings`` (verbosity, progress bars, device, threads).

Modelled on ``scanpy.settings``. Functions take ``progress=None`` / ``device=None`` and fall back
to these values, so a pipeline can set them once::

    import histoexpr as hx
    hx.settings.verbosity = "info"   # progress/info messages on the "histoexpr" logger
    hx.settings.progress = False     # no progress bars anywhere
    hx.settings.device = "cpu"       # default torch device ("auto": CUDA when available)
    hx.settings.n_threads = 4        # CPU threads of torch / BLAS inside histoexpr calls
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from typing import Any

#: The package logger. Progress and info messages go here; ``warnings`` are kept for things the
#: user should act on.
logger = logging.getLogger("histoexpr")

_LEVELS = {"error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}
#: scanpy-style integer verbosity: 0 error, 1 warning, 2 info, 3 debug (hint), 4 debug.
_INT_LEVELS = {0: logging.ERROR, 1: logging.WARNING, 2: logging.INFO, 3: logging.DEBUG, 4: logging.DEBUG}


def _in_jupyter() -> bool:
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def _interactive() -> bool:
    try:
        tty = sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        tty = False
    return tty or _in_jupyter()


def available_cpus() -> int:
    """CPUs this process may run on (affinity / cgroup aware where the OS tells)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - macOS / Windows
        return max(1, os.cpu_count() or 1)


class HistoexprSettings:
    """Settings of histoexpr (one instance: ``histoexpr.settings``).

    Attributes
    ----------
    verbosity
        ``"error"``, ``"warning"`` (default), ``"info"`` or ``"debug"`` (or scanpy's 0–4); sets the
        level of the ``logging.getLogger("histoexpr")`` logger. Setting it attaches a stderr
        handler to that logger when it has none (applications may configure logging themselves).
    progress
        ``True``/``False`` show/hide progress bars of long-running functions whose ``progress``
        argument is ``None``; ``None`` (default) shows them only when interactive (stderr is a
        terminal, or in Jupyter).
    device
        Default torch device of functions called with ``device=None``: ``"auto"`` (default: CUDA
        when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
    n_threads
        CPU threads that torch and the BLAS libraries may use inside histoexpr calls (restored
        afterwards). ``None`` (default): small models (the spatial/bulk heads, k-means, probes)
        run on 1 thread — on tiny matrices more threads only add synchronisation and collapse
        on a busy machine — and large encoders use all available CPUs.

    Examples
    --------
    >>> import histoexpr as hx
    >>> hx.settings.verbosity = "info"
    >>> with hx.settings.override(progress=False, n_threads=2):
    ...     pass
    >>> hx.settings.verbosity = "warning"
    """

    def __init__(self) -> None:
        self._verbosity = logging.WARNING
        self._progress: bool | None = None
        self._device: str = "auto"
        self._n_threads: int | None = None
        env_threads = os.environ.get("HISTOEXPR_N_THREADS")
        if env_threads:
            self.n_threads = int(env_threads)

    # ------------------------------------------------------------------ verbosity
    @property
    def verbosity(self) -> str:
        return logging.getLevelName(self._verbosity).lower()

    @verbosity.setter
    def verbosity(self, value: int | str) -> None:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise TypeError(f"verbosity must be a level name or 0–4, got {value!r}")
        if isinstance(value, str):
            if value.lower() not in _LEVELS:
                raise ValueError(f"verbosity must be one of {list(_LEVELS)} (or 0–4), got {value!r}")
            level = _LEVELS[value.lower()]
        else:
            level = _INT_LEVELS[min(4, max(0, value))]
        self._verbosity = level
        logger.setLevel(level)
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("histoexpr %(levelname)s: %(message)s"))
            logger.addHandler(handler)

    # ------------------------------------------------------------------ progress
    @property
    def progress(self) -> bool | None:
        return self._progress

    @progress.setter
    def progress(self, value: bool | None) -> None:
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"progress must be True, False or None (auto), got {value!r}")
        self._progress = value

    # ------------------------------------------------------------------ device
    @property
    def device(self) -> str:
        return self._device

    @device.setter
    def device(self, value: Any) -> None:
        value = "auto" if value is None else str(value)
        if value != "auto":
            import torch

            torch.device(value)  # raises on a malformed name
        self._device = value

    # ------------------------------------------------------------------ threads
    @property
    def n_threads(self) -> int | None:
        return self._n_threads

    @n_threads.setter
    def n_threads(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
            raise ValueError(f"n_threads must be a positive integer or None (auto), got {value!r}")
        self._n_threads = None if value is None else int(value)

    # ------------------------------------------------------------------ helpers
    @contextmanager
    def override(self, **kwargs):
        """Temporarily change settings: ``with hx.settings.override(progress=False): ...``."""
        unknown = set(kwargs) - {"verbosity", "progress", "device", "n_threads"}
        if unknown:
            raise AttributeError(f"unknown settings {sorted(unknown)}")
        old = {k: getattr(self, k) for k in kwargs}
        try:
            for k, v in kwargs.items():
                setattr(self, k, v)
            yield self
        finally:
            for k, v in old.items():
                setattr(self, k, v)

    def __repr__(self) -> str:
        return (f"histoexpr settings: verbosity={self.verbosity!r}, progress={self.progress!r} "
                f"(now {'on' if resolve_progress(None) else 'off'}), device={self.device!r}, "
                f"n_threads={self.n_threads!r}")


settings = HistoexprSettings()


def resolve_progress(progress: bool | None) -> bool:
    """The effective progress flag: the argument, else ``settings.progress``, else interactive."""
    if progress is not None:
        return bool(progress)
    if settings.progress is not None:
        return settings.progress
    return _interactive()


def progress_bar(iterable=None, *, enabled: bool | None = None, desc: str | None = None, total: int | None = None,
                 **kwargs):
    """A tqdm bar over ``iterable`` when progress is on (see :func:`resolve_progress`), else a silent one.

    Every long-running function of histoexpr uses this, so bars look and switch on/off alike.
    Always returns a tqdm object (disabled when off), so ``.update()``/``.close()`` work either way.
    """
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not resolve_progress(enabled), dynamic_ncols=True,
                **kwargs)


#: Short alias used inside the package.
_progress = progress_bar
