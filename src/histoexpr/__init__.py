"""histoexpr: predict gene expression from H&E histology and compare it with measured spatial omics."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

from ._settings import settings

_SUBMODULES = ("io", "pp", "tl", "pl", "metrics", "models", "datasets")

if TYPE_CHECKING:  # pragma: no cover
    from . import datasets, io, metrics, models, pl, pp, tl


def __getattr__(name: str):
    # Subpackages are imported lazily so that ``import histoexpr`` stays fast (torch, spatialdata
    # and scanpy are only imported when a function that needs them is first used).
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_SUBMODULES])


__all__ = [*_SUBMODULES, "__version__", "settings"]
