"""Small helpers used across subpackages (no heavy imports at module level)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ._constants import FEATURE_KEY_PREFIX, UNS_KEY


def get_device(device: Any = None):
    """Return a :class:`torch.device`: the given one, else ``histoexpr.settings.device``.

    ``None`` / ``"auto"`` mean the settings' device, whose default ``"auto"`` is CUDA when available,
    else CPU. Asking for CUDA on a machine without it is a clear error here rather than deep inside torch.
    """
    import torch

    from ._settings import settings

    if device is None or (isinstance(device, str) and device == "auto"):
        device = settings.device
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} was requested but CUDA is not available; pass device='cpu'")
    return device


def histoexpr_uns(adata) -> dict:
    """Return (creating if needed) ``adata.uns["histoexpr"]``."""
    return adata.uns.setdefault(UNS_KEY, {})


_FEATURES_HINT = "Re-extract the features of those tiles (pp.extract_features) or drop them before continuing."


def check_finite(x: np.ndarray, *, what: str, hint: str = _FEATURES_HINT) -> None:
    """Raise a clear :class:`ValueError` if ``x`` has NaN or infinite values (rows = first axis)."""
    x = np.asarray(x)
    if x.dtype.kind in "fc" and not np.isfinite(x).all():
        bad = ~np.isfinite(x)
        rows = np.unique(np.nonzero(bad)[0]) if x.ndim > 1 else np.nonzero(bad)[0]
        raise ValueError(
            f"{what} contains {int(bad.sum())} NaN/inf values (in {rows.size} of {x.shape[0]} rows, first "
            f"rows: {rows[:5].tolist()}). {hint}"
        )


def bf16_autocast(device):
    """bf16 autocast on CUDA, a no-op context elsewhere."""
    import contextlib

    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def warn(msg: str, category: type[Warning] = UserWarning) -> None:
    warnings.warn(msg, category, stacklevel=3)


def resolve_feature_key(adata, use_rep: str | None = None) -> str:
    """The ``obsm`` key of the tile features to use.

    ``use_rep`` when given (it must exist); else the key :func:`histoexpr.pp.extract_features`
    recorded in ``uns["histoexpr"]["feature_key"]``, else ``X_<encoder>`` for the recorded encoder,
    else the only ``X_*`` entry of ``obsm``.
    """
    if use_rep is not None:
        if use_rep not in adata.obsm:
            raise KeyError(
                f"obsm[{use_rep!r}] not found (available: {list(adata.obsm)}); run "
                "histoexpr.pp.extract_features first or pass the right use_rep="
            )
        return use_rep
    info = adata.uns.get(UNS_KEY, {})
    info = info if isinstance(info, dict) else {}
    if info.get("feature_key") in adata.obsm:
        return info["feature_key"]
    encoder = info.get("encoder")
    if isinstance(encoder, str) and f"{FEATURE_KEY_PREFIX}{encoder}" in adata.obsm:
        return f"{FEATURE_KEY_PREFIX}{encoder}"
    candidates = [k for k in adata.obsm if k.startswith(FEATURE_KEY_PREFIX) and k != "X_spatial"]
    if len(candidates) == 1:
        return candidates[0]
    raise ValueError(
        f"cannot tell which obsm entry holds the tile features (candidates: {candidates}); pass "
        "use_rep='X_<encoder>' (features come from histoexpr.pp.extract_features)"
    )
