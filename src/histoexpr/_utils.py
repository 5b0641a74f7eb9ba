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


def renamed_kwargs(**renames: str):
    """Decorator: accept the old keyword names ``old=new`` for one release, with a DeprecationWarning.

    Example
    -------
    >>> @renamed_kwargs(seed="random_state")
    ... def f(*, random_state=0):
    ...     return random_state
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     f(seed=3)
    3
    """
    import functools

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__name__}() got both {old}= (deprecated) and {new}=; pass only {new}=")
                    warnings.warn(f"{fn.__name__}({old}=...) is deprecated; use {new}=", DeprecationWarning,
                                  stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper

    return decorate


def align_by_index(time: Any, event: Any, groups: Any) -> tuple[Any, Any, Any]:
    """Put pandas inputs in the order of ``time``'s index (e.g. clinical table vs risk groups of predictions)."""
    import pandas as pd

    if not isinstance(time, pd.Series):
        return time, event, groups
    aligned = []
    for name, values in (("event", event), ("groups", groups)):
        if isinstance(values, pd.Series) and not values.index.equals(time.index):
            if len(values) != len(time) or set(values.index) != set(time.index):
                raise ValueError(
                    f"`{name}` and `time` are pandas Series indexed by different samples; select the same "
                    f"samples in both (e.g. {name}.reindex(time.index))"
                )
            values = values.reindex(time.index)
        aligned.append(values)
    return time, aligned[0], aligned[1]


#: Slide id of tiles that record none (no ``obs[slide_key]`` and no ``uns["histoexpr"]["slide_id"]``).
DEFAULT_SLIDE_ID = "slide_0"


def iter_slides(adata, slide_key: str = "slide_id") -> list[tuple[str, np.ndarray]]:
    """``(slide_id, positions)`` of each slide of a (possibly concatenated) AnnData, in order of appearance.

    The one rule: slides are told apart by ``obs[slide_key]``; without that column the whole AnnData
    is one slide whose id is ``uns["histoexpr"]["slide_id"]``, else ``"slide_0"``.

    Example
    -------
    >>> import anndata as ad, pandas as pd
    >>> a = ad.AnnData(obs=pd.DataFrame({"slide_id": ["b", "a", "b"]}, index=["t0", "t1", "t2"]))
    >>> [(s, pos.tolist()) for s, pos in iter_slides(a)]
    [('b', [0, 2]), ('a', [1])]
    """
    import pandas as pd

    if slide_key in adata.obs:
        ids = adata.obs[slide_key].astype(str).to_numpy()
        return [(str(s), np.flatnonzero(ids == s)) for s in pd.unique(ids)]
    info = adata.uns.get(UNS_KEY)
    sid = info.get("slide_id") if isinstance(info, dict) else None
    return [(str(sid) if sid is not None else DEFAULT_SLIDE_ID, np.arange(adata.n_obs))]


def grid_coords(adata) -> tuple[np.ndarray, np.ndarray]:
    """Integer grid indices ``(obs["row"], obs["col"])`` of tiles, checked."""
    missing = [c for c in ("row", "col") if c not in adata.obs]
    if missing:
        raise ValueError(
            f"tiles need integer grid coordinates obs['row'] and obs['col'] (missing: {missing}). "
            "Make tiles with `hx.pp.tile`, or add the grid indices of each tile to obs."
        )
    rows, cols = adata.obs["row"].to_numpy(), adata.obs["col"].to_numpy()
    for name, v in (("row", rows), ("col", cols)):
        if v.dtype.kind not in "iu":
            if v.dtype.kind != "f" or not np.all(np.isfinite(v)) or not np.all(v == np.round(v)):
                raise ValueError(f"obs[{name!r}] must hold integer grid indices; got dtype {v.dtype}.")
    return rows.astype(np.int64), cols.astype(np.int64)


def dense(x) -> np.ndarray:
    """A (possibly sparse) matrix as a dense numpy array."""
    import scipy.sparse as sp

    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)
def check_positive(
    value: Any,
    name: str,
    *,
    integer: bool = False,
    allow_zero: bool = False,
    error: type[Exception] = ValueError,
    hint: str = "",
) -> float | int:
    """Return ``value`` as a float (or int) after checking it is a finite positive number.

    Rejects strings (even ``"0.5"``), booleans, NaN, inf, zero (unless ``allow_zero``) and negative
    values with an ``error`` naming the parameter, what it got and the fix. ``integer=True`` also
    rejects fractions (``2.0`` is accepted as ``2``).

    Example
    -------
    >>> check_positive(0.5, "mpp")
    0.5
    >>> check_positive(4, "batch_size", integer=True)
    4
    """
    import numbers

    kind = "a whole number" if integer else "a number"
    bound = "≥ 0" if allow_zero else "> 0"
    if isinstance(value, str | bytes):
        try:
            as_number = float(value)
        except ValueError:
            as_number = None
        fix = f"; pass {name}={as_number!r} without quotes" if as_number is not None else ""
        raise error(f"{name} must be {kind} {bound}, got the string {value!r}{fix}.{hint and ' ' + hint}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise error(f"{name} must be {kind} {bound}, got {value!r} ({type(value).__name__}).{hint and ' ' + hint}")
    v = float(value)
    ok = np.isfinite(v) and (v >= 0 if allow_zero else v > 0) and (not integer or v == int(v))
    if not ok:
        raise error(f"{name} must be {kind} {bound}, got {value!r}.{hint and ' ' + hint}")
    return int(v) if integer else v


def check_targets(targets: Any, *, layer: str | None = None, genes: Any = None, what: str = "targets") -> None:
    """Raise a :class:`ValueError` naming the genes and spots/samples when training targets hold NaN/inf.

    One check for every trainer: ``targets`` may be an array, a DataFrame, an AnnData (``X`` or
    ``layer``; sparse is fine), or a mapping / list of AnnData (one per slide). Training on a NaN
    target makes every weight NaN, so the model would predict NaN everywhere.
    With ``genes``, only those columns of AnnData/DataFrame targets are checked (the panel trained on).

    Example
    -------
    >>> check_targets(np.ones((3, 2)))
    """
    from collections.abc import Mapping

    import scipy.sparse as sp

    if isinstance(targets, Mapping):
        parts = [(f"slide {k!r}", v) for k, v in targets.items()]
    elif isinstance(targets, list | tuple) and targets and all(hasattr(t, "obs") for t in targets):
        parts = [(f"slide {i}", t) for i, t in enumerate(targets)]
    else:
        parts = [("", targets)]
    problems, total = [], 0
    for label, t in parts:
        rows = cols = None
        if hasattr(t, "obs") and hasattr(t, "X"):
            if genes is not None:
                t = t[:, t.var_names.isin([str(g) for g in genes])]
            rows, cols = list(map(str, t.obs_names)), list(map(str, t.var_names))
            x = t.layers[layer] if layer is not None else t.X
        elif hasattr(t, "columns") and hasattr(t, "to_numpy"):
            if genes is not None:
                t = t.loc[:, t.columns.astype(str).isin([str(g) for g in genes])]
            rows, cols = list(map(str, t.index)), list(map(str, t.columns))
            x = t.to_numpy()
        else:
            x = t.detach().cpu().numpy() if hasattr(t, "detach") else t
        if sp.issparse(x):
            x = sp.coo_matrix(x)
            if x.dtype.kind not in "fc" or np.isfinite(x.data).all():
                continue
            bad = ~np.isfinite(x.data)
            r, c = x.row[bad], x.col[bad]
        else:
            x = np.asarray(x)
            if x.dtype.kind not in "fc" or np.isfinite(x).all():
                continue
            r, c = np.nonzero(~np.isfinite(x.reshape(len(x), -1)))
        total += len(r)
        r_u, c_u = np.unique(r), np.unique(c)
        genes = [cols[j] for j in c_u[:5]] if cols is not None else c_u[:5].tolist()
        spots = [rows[i] for i in r_u[:5]] if rows is not None else r_u[:5].tolist()
        problems.append(
            f"{label + ': ' if label else ''}{len(r)} values in {len(c_u)} genes (e.g. {genes}) of "
            f"{len(r_u)} spots/samples (e.g. {spots})"
        )
    if problems:
        raise ValueError(
            f"the {what} contain {total} NaN/inf values: " + "; ".join(problems[:5])
            + ". Training on them would make every weight NaN. Drop those genes or spots (or fill the "
            "values) before training."
        )


def means_fingerprint(features: np.ndarray, tile_names: Any, *, use_rep: str, n_clusters: int,
                      random_state: int) -> str:
    """Hash of what a slide's k-means means are computed from: its features, tile index and the k-means
    settings. Stored next to the means in ``uns`` and checked before they are reused, so subsetting
    the tiles or replacing the features can never give the old slide's means.

    Example
    -------
    >>> fp = means_fingerprint(np.zeros((3, 2), np.float32), ["a", "b", "c"], use_rep="X_uni",
    ...                        n_clusters=2, random_state=0)
    >>> len(fp)
    32
    """
    import hashlib

    x = np.ascontiguousarray(np.asarray(features, dtype=np.float32))
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{x.shape}|{use_rep}|{int(n_clusters)}|{int(random_state)}".encode())
    h.update(x.tobytes())
    h.update("\x1f".join(map(str, tile_names)).encode())
    return h.hexdigest()
