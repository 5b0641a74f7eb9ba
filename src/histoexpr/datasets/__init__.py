"""Built-in real demo data and loaders for the real example samples by path (see docs/data.md)."""

from ._datasets import (
    DatasetNotFoundError,
    data_root,
    example_slide,
    her2st,
    mouse_olfactory_bulb,
    visium_muscle,
    xenium_breast,
)

__all__ = [
    "DatasetNotFoundError",
    "data_root",
    "example_slide",
    "her2st",
    "mouse_olfactory_bulb",
    "visium_muscle",
    "xenium_breast",
]
