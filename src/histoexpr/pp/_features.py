"""Tile feature extraction: batched, pyramid-reading, resumable.

DataLoader workers read each tile from the slide pyramid at the encoder's input size (uint8); the
main process moves batches to the device, normalises them there, and runs the encoder under
``torch.inference_mode`` (plus autocast bf16/fp16 and channels-last on CUDA). With ``cache=`` the
features go to a zarr store chunk by chunk, with a per-tile done mask, so an interrupted run picks
up where it stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
import warnings
import weakref
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._constants import FEATURE_KEY_PREFIX, UNS_KEY
from .._settings import logger, progress_bar, resolve_progress, settings
from .._threads import limit_threads, worker_init_fn
from .._utils import check_positive, get_device

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import torch
    from anndata import AnnData

    from ..io import Slide
    from ..models.encoders import Encoder

_CACHE_FORMAT = 2  # 2: per-part fingerprints (slide identity, tiles, encoder weights)
#: Bytes read from a slide file for its content fingerprint: blocks at fixed, evenly spread offsets.
_SLIDE_HASH_BLOCKS, _SLIDE_HASH_BLOCK_SIZE = 16, 64 * 1024


# ---------------------------------------------------------------------------- dataset
class TileDataset:
    """Map-style dataset: tile ``i`` read from ``slide`` → ``(i, tensor)``.

    Built-in encoders get ``uint8 (3, S, S)`` tensors (normalised later on the device); user
    transforms get the tile as ``uint8 (H, W, 3)`` and return what their module expects.
    Picklable, so DataLoader workers re-open the slide themselves.
    """

    def __init__(self, slide, x0: np.ndarray, y0: np.ndarray, size0: float, out_size: int, transform, *,
                 uint8_output: bool):
        self.slide = slide
        self.x0 = np.asarray(x0, dtype=np.float64)
        self.y0 = np.asarray(y0, dtype=np.float64)
        self.size0 = float(size0)
        self.out_size = int(out_size)
        self.transform = transform
        self.uint8_output = uint8_output

    def __len__(self) -> int:
        return len(self.x0)

    def read(self, i: int) -> np.ndarray:
        return self.slide.read_tile(self.x0[i], self.y0[i], self.size0, self.out_size)

    def __getitem__(self, i: int):
        tile = self.read(i)
        if self.uint8_output:
            return i, self.transform.to_uint8(tile)
        return i, self.transform(tile)


def _chunk_batches(todo_chunks: Iterable[int], chunk: int, n: int) -> list[list[int]]:
    return [list(range(c * chunk, min((c + 1) * chunk, n))) for c in todo_chunks]


# ---------------------------------------------------------------------------- resumable storage
class _MemoryStore:
    """Features kept in memory (no ``cache=``)."""

    def __init__(self, n: int, dim: int, chunk: int):
        self.n, self.dim, self.chunk = n, dim, chunk
        self.features = np.full((n, dim), np.nan, dtype=np.float32)

    def todo_chunks(self) -> list[int]:
        return list(range(-(-self.n // self.chunk)))

    def write(self, start: int, values: np.ndarray) -> None:
        self.features[start : start + len(values)] = values

    def read(self) -> np.ndarray:
        return self.features


class _ZarrStore:
    """Features in a zarr group: ``features`` (n, D) float32 and ``done`` (n,) bool, same row chunks.

    A batch is exactly one row chunk; its features are written before its done flags, so a crash
    at any point leaves at most one chunk to redo and never a chunk marked done without features.
    ``attrs["fingerprints"]`` identify what the features were computed from (the slide's identity and
    sampled content, the tile geometry, the encoder and a hash of its weights, the precision). A
    cache whose fingerprints differ from this run's is cleared and recomputed, with a warning naming
    what changed; a folder that is not a histoexpr feature cache is never touched.
    The caller holds :func:`_cache_lock` for as long as the store is used.
    """

    def __init__(self, path: str | os.PathLike, n: int, dim: int, chunk: int, meta: dict):
        import zarr

        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"cache={str(self.path)!r} is a file; pass a folder path for the zarr feature cache")
        if self.path.is_dir() and any(self.path.iterdir()):
            try:
                old = dict(zarr.open_group(str(self.path), mode="r").attrs)
            except Exception:  # noqa: BLE001 - not a zarr group at all
                old = {}
            if not old.get("histoexpr_features_cache"):
                raise ValueError(
                    f"cache={str(self.path)!r} exists and is not a histoexpr feature cache; it is left untouched. "
                    "Pass a new path (e.g. 'slide.features.zarr') for the cache."
                )
        root = zarr.open_group(str(self.path), mode="a")
        old = dict(root.attrs)
        if old.get("histoexpr_features_cache"):
            changed = _changed_fingerprints(old, meta)
            if changed:
                warnings.warn(
                    f"the feature cache {self.path} was computed from {' and '.join(changed)} than this run; "
                    "it is discarded and the features are recomputed.",
                    UserWarning,
                    stacklevel=3,
                )
                root = zarr.open_group(str(self.path), mode="w")
                old = {}
        if old.get("histoexpr_features_cache"):
            chunk = int(old["chunk_rows"])
        else:
            root.attrs.update({**meta, "chunk_rows": int(chunk), "histoexpr_features_cache": _CACHE_FORMAT})
        if "features" not in root:
            root.create_array("features", shape=(n, dim), chunks=(chunk, dim), dtype="float32",
                              fill_value=np.nan, overwrite=True)
        if "done" not in root:
            root.create_array("done", shape=(n,), chunks=(chunk,), dtype="bool", fill_value=False,
                              overwrite=True)
        self.root, self.n, self.dim, self.chunk = root, n, dim, chunk

    def todo_chunks(self) -> list[int]:
        done = self.root["done"][:]
        n_chunks = -(-self.n // self.chunk)
        return [c for c in range(n_chunks) if not done[c * self.chunk : (c + 1) * self.chunk].all()]

    def write(self, start: int, values: np.ndarray) -> None:
        stop = start + len(values)
        self.root["features"][start:stop] = values
        self.root["done"][start:stop] = True

    def read(self) -> np.ndarray:
        return np.asarray(self.root["features"][:], dtype=np.float32)


#: What each fingerprint covers, for the message when a cache does not match.
_FINGERPRINT_NAMES = {
    "slide": "another slide (path, size, modification time or content)",
    "tiles": "other tiles (positions, size or pyramid level)",
    "encoder": "another encoder or other weights",
    "precision": "another precision",
}


def _changed_fingerprints(old: dict, meta: dict) -> list[str]:
    old_fp = old.get("fingerprints")
    if old.get("histoexpr_features_cache") != _CACHE_FORMAT or not isinstance(old_fp, dict):
        return ["an older histoexpr version's settings"]
    changed = [_FINGERPRINT_NAMES[k] for k in _FINGERPRINT_NAMES if old_fp.get(k) != meta["fingerprints"][k]]
    if not changed and (old.get("n_tiles"), old.get("dim")) != (meta["n_tiles"], meta["dim"]):
        changed.append("another number of tiles or feature dimension")
    return changed


@contextlib.contextmanager
def _cache_lock(path: str | os.PathLike, timeout: float | None = None):
    """Hold ``<cache>.lock`` (an OS file lock, released even on ``kill -9``) while the cache is used.

    A second run on the same cache waits for the first to finish (a message says so after 1 s), then
    checks the cache's fingerprints: same settings reuse the finished features, other settings
    recompute. Runs therefore never write into each other's chunks.
    """
    from filelock import FileLock, Timeout

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path.with_name(path.name + ".lock")))
    try:
        lock.acquire(timeout=1.0)
    except Timeout:
        warnings.warn(f"waiting for another process that is using the feature cache {path}", UserWarning,
                      stacklevel=3)
        try:
            lock.acquire(timeout=-1 if timeout is None else timeout)
        except Timeout:
            raise TimeoutError(
                f"another process has held the feature cache {path} for more than {timeout} s; pass another cache "
                "path, or wait for it to finish"
            ) from None
    try:
        yield
    finally:
        lock.release()


# ---------------------------------------------------------------------------- helpers
def _tile_info(adata: AnnData) -> dict:
    info = adata.uns.get(UNS_KEY, {})
    missing_obs = [c for c in ("x0", "y0") if c not in adata.obs]
    if missing_obs or "tile_size_level0" not in info:
        raise ValueError(
            "expected a tiles AnnData from histoexpr.pp.tile (obs 'x0', 'y0' and "
            "uns['histoexpr']['tile_size_level0']); missing: "
            + ", ".join([f"obs[{c!r}]" for c in missing_obs]
                        + (["uns['histoexpr']['tile_size_level0']"] if "tile_size_level0" not in info else []))
        )
    if "slide_id" in adata.obs and adata.obs["slide_id"].nunique() > 1:
        raise ValueError(
            f"this AnnData holds tiles of {adata.obs['slide_id'].nunique()} slides; extract features per slide "
            "(histoexpr.pp.extract_features_cohort does this for a list of slides), then concatenate."
        )
    if adata.n_obs == 0:
        raise ValueError("the tiles AnnData is empty (no tissue tiles); nothing to extract")
    return info


def _resolve_slide(slide, info: dict):
    from ..io import open_slide

    if slide is None:
        path = info.get("slide_path")
        if not path:
            raise ValueError(
                "no slide given and uns['histoexpr']['slide_path'] is not set; pass the slide "
                "(a path or histoexpr.io.open_slide(...)) as the second argument"
            )
        if not Path(path).exists():
            raise FileNotFoundError(
                f"the slide these tiles came from, {path}, is not there any more; pass its new location as "
                "extract_features(adata, slide='/new/path/slide.svs')"
            )
        slide = path
    if isinstance(slide, str | os.PathLike):
        slide = open_slide(slide, mpp=info.get("slide_mpp"))
    dims = info.get("level0_dimensions")
    if dims is not None and tuple(int(v) for v in dims) != tuple(int(v) for v in slide.dimensions):
        raise ValueError(
            f"the slide ({slide.dimensions[0]}×{slide.dimensions[1]} px) is not the one these tiles were cut "
            f"from ({dims[0]}×{dims[1]} px, {info.get('slide_path')})"
        )
    return slide


def _autocast_dtype(precision: str, device: torch.device):
    import torch

    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "bf16" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _feature_key(name: str) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "_-." else "_" for ch in name)
    return f"{FEATURE_KEY_PREFIX}{safe}"


def _tiles_fingerprint(adata: AnnData, info: dict, out_size: int, slide) -> str:
    """Tile positions, names and size, the output size and the pyramid level the tiles are read from."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(adata.obs["x0"].to_numpy(np.float64)).tobytes())
    h.update(np.ascontiguousarray(adata.obs["y0"].to_numpy(np.float64)).tobytes())
    h.update("|".join(map(str, adata.obs_names)).encode())
    size0 = float(info.get("tile_size_level0"))
    level = slide.get_best_level_for_downsample(size0 / out_size)
    h.update(f"{size0!r}|{out_size}|{info.get('slide_id')}|{level}|{slide.level_downsamples[level]!r}"
             f"|{slide.mpp!r}".encode())
    return h.hexdigest()


def _slide_fingerprint(slide) -> str:
    """The slide's identity: file path, size, mtime and a hash of sampled bytes; for in-memory images
    (SpatialData) the level shapes, dtype, chunks and sampled pixels. Cheap: ~1 MB is read.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{slide.backend}|{slide.level_dimensions!r}|{slide.mpp!r}".encode())
    path = getattr(slide, "path", None)
    if path is not None and Path(path).is_file():
        st = os.stat(path)
        h.update(f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        size, block = st.st_size, _SLIDE_HASH_BLOCK_SIZE
        offsets = sorted({int(i * max(0, size - block) / (_SLIDE_HASH_BLOCKS - 1)) for i in range(_SLIDE_HASH_BLOCKS)})
        with open(path, "rb") as f:
            for off in offsets:
                f.seek(off)
                h.update(f.read(block))
        return h.hexdigest()
    # In-memory or zarr-backed image: array layout plus five 64 px regions of every level, read in one
    # synchronous dask pass (each chunk is loaded once).
    if slide.backend != "spatialdata":  # a file that is gone: its layout is all there is
        return h.hexdigest()
    import dask

    from ..io._slide import _element_levels

    parts = []
    for arr in _element_levels(slide._element):
        data = arr.data
        h.update(f"{arr.shape}|{arr.dtype}|{getattr(data, 'chunksize', None)}".encode())
        hgt, wid = int(arr.sizes["y"]), int(arr.sizes["x"])
        side = min(64, wid, hgt)
        for fx, fy in ((0, 0), (1, 0), (0, 1), (1, 1), (0.5, 0.5)):
            x, y = int(fx * (wid - side)), int(fy * (hgt - side))
            parts.append(data[:, y : y + side, x : x + side])
    for part in dask.compute(*parts, scheduler="synchronous"):
        h.update(np.ascontiguousarray(part).tobytes())
    return h.hexdigest()


#: module → (state key, fingerprint): the weights are hashed again only after they changed.
_WEIGHTS_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weights_fingerprint(enc: Encoder) -> str:
    """The encoder's name/transform and a hash of every byte of every weight tensor.

    Each tensor's bytes go through CRC-32 (position-sensitive: any changed, swapped or shifted
    value changes it) and the per-tensor results, names, shapes and dtypes through BLAKE2b. The
    result is remembered per module together with each tensor's storage pointer and version counter
    (bumped by every in-place change, ``load_state_dict`` included), so a cohort hashes its encoder
    once: ~0.1 s for a ResNet-50, ~1-2 s for a ViT-L (300 M parameters) on one busy core.
    """
    import torch

    state = enc.module.state_dict(keep_vars=True)
    key = tuple((k, t.data_ptr(), t._version, tuple(t.shape)) if torch.is_tensor(t) else (k, repr(t))
                for k, t in state.items())
    header = f"{enc.name}|{enc.weights}|{enc.dim}|{enc.input_size}|{enc.transform!r}"
    memo = _WEIGHTS_FINGERPRINTS.get(enc.module)
    if memo is not None and memo[0] == (header, key):
        return memo[1]
    h = hashlib.blake2b(digest_size=16)
    h.update(header.encode())
    with torch.no_grad():
        for k, t in state.items():
            if not torch.is_tensor(t):
                h.update(f"{k}|{t!r}".encode())
                continue
            flat = t.detach().reshape(-1).cpu().contiguous()
            crc = zlib.crc32(memoryview(flat.view(torch.uint8).numpy())) if flat.numel() else 0
            h.update(f"{k}|{tuple(t.shape)}|{t.dtype}|{crc}".encode())
    digest = h.hexdigest()
    _WEIGHTS_FINGERPRINTS[enc.module] = ((header, key), digest)
    return digest


def _is_spatialdata(obj) -> bool:
    return hasattr(obj, "tables") and hasattr(obj, "images")


def _spatialdata_table(sdata, table_key: str | None) -> str:
    if table_key is not None:
        if table_key not in sdata.tables:
            raise KeyError(f"table {table_key!r} not in this SpatialData; tables: {list(sdata.tables)}")
        return table_key
    # prediction tables (predict_spatial(sdata=...)) carry the tiling too; they record their "model"
    candidates = [k for k, t in sdata.tables.items()
                  if "tile_size_level0" in t.uns.get(UNS_KEY, {}) and {"x0", "y0"} <= set(t.obs)
                  and "model" not in t.uns.get(UNS_KEY, {})]
    if len(candidates) > 1:  # prediction tables copy the tiles' obs/uns; the tiles table has no genes
        candidates = [k for k in candidates if sdata.tables[k].n_vars == 0] or candidates
    if len(candidates) != 1:
        raise ValueError(
            f"cannot tell which table holds the tiles (candidates: {candidates}, tables: {list(sdata.tables)}); "
            "pass table_key="
        )
    return candidates[0]


# ---------------------------------------------------------------------------- main entry point
def extract_features(
    adata_tiles,
    slide: Slide | str | os.PathLike | None = None,
    *,
    encoder: str | Any = "uni",
    weights: str | os.PathLike | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    device: str | torch.device | None = None,
    precision: Literal["bf16", "fp16", "fp32"] | None = None,
    key_added: str | None = None,
    cache: str | os.PathLike | None = None,
    table_key: str | None = None,
    progress: bool | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Encode every tile with a pretrained encoder; features go to ``obsm["X_<encoder>"]``.

    Tiles are read from the slide pyramid by DataLoader workers at the encoder's input size
    (e.g. a 256 px tile at 0.5 µm/px → 224 px for UNI), batched, and encoded on ``device``. On
    CUDA: pinned memory, normalisation on the GPU, channels-last, autocast in the encoder's
    precision (bf16 when supported, else fp16) and ``torch.inference_mode``.

    Parameters
    ----------
    adata_tiles
        Tiles AnnData from :func:`histoexpr.pp.tile` (obs ``x0``, ``y0``;
        ``uns["histoexpr"]["tile_size_level0"]``), or a :class:`spatialdata.SpatialData` with such
        a tiles table (features are then written into that table's ``obsm``).
    slide
        The slide the tiles were cut from: a :class:`histoexpr.io.Slide` or a path. Default:
        ``uns["histoexpr"]["slide_path"]``, opened with ``slide_mpp``.
    encoder
        A registered name (``"uni"``, ``"resnet50"``), any timm model name, a
        :class:`torch.nn.Module`, or an :class:`~histoexpr.models.encoders.Encoder` from
        :func:`histoexpr.models.get_encoder`.
    weights
        Encoder weights: local file/folder, ``"hf-hub:org/name"`` or ``"random"`` (tests only).
        See :func:`histoexpr.models.get_encoder`; without weights and offline, a clear error says
        what to download.
    batch_size
        Tiles per forward pass; default 256 on CUDA, 32 on CPU. With ``cache=``, a resumed run keeps
        the batch size the cache was created with.
    num_workers
        DataLoader worker processes reading tiles; default ``min(16, cpus - 1)`` on CUDA,
        ``min(2, cpus - 1)`` on CPU, 0 for SpatialData image elements. 0 reads in the main process.
        Workers are stopped as soon as the loop ends, also on an error or Ctrl-C.
    device
        ``"cuda"``, ``"cpu"``, ...; default CUDA when available.
    precision
        Override the encoder's preferred CUDA precision (``"bf16"``, ``"fp16"``, ``"fp32"``).
        The CPU always runs in fp32.
    key_added
        ``obsm`` key; default ``"X_<encoder name>"``.
    cache
        Path of a zarr store receiving features batch by batch. If it exists and its fingerprints
        match this run (the slide's path, size, mtime and sampled content; the tile geometry; the
        encoder and a hash of its weights; the precision), finished batches are not recomputed: an
        interrupted run resumes. A cache that does not match is cleared and recomputed, with a
        warning saying what changed. A file lock (``<cache>.lock``) makes a second run on the same
        cache wait for the first. See ``docs/data_safety.md``.
    table_key
        With SpatialData input: the tiles table (found automatically when there is one).
    progress
        Show a progress bar; default ``histoexpr.settings.progress`` (on when interactive).
        Torch runs with ``histoexpr.settings.n_threads`` CPU threads (default: 1 for small encoders
        such as ``hed_stats``, all available CPUs for large ones); DataLoader workers use one each.
    copy
        Return a copy with the features instead of writing into ``adata_tiles``.

    Returns
    -------
    ``None`` (features written into ``adata_tiles``), or the updated copy when ``copy=True``
    (the tiles table when the input is SpatialData). Sets ``obsm[key_added]`` (float32,
    n_tiles × dim) and ``uns["histoexpr"]``: ``encoder``, ``encoder_weights``, ``encoder_dim``,
    ``encoder_input_size``, ``encoder_precision``, ``feature_key``.

    Raises
    ------
    ValueError
        When features contain NaN/inf (the message names the tiles), ``cache`` is a folder that is not a
        histoexpr feature cache, or ``batch_size``/``num_workers`` are not whole numbers (> 0, ≥ 0).
    histoexpr.io.SlideError
        When a tile cannot be decoded (truncated or corrupt slide); the message names the file and region.

    Example
    -------
    >>> import histoexpr as hx
    >>> slide = hx.io.open_slide("slide.svs")  # doctest: +SKIP
    >>> tiles = hx.pp.tile(slide)  # doctest: +SKIP
    >>> hx.pp.extract_features(tiles, slide, encoder="uni", weights="uni/pytorch_model.bin",
    ...                        cache="slide.features.zarr")  # doctest: +SKIP
    >>> tiles.obsm["X_uni"].shape  # doctest: +SKIP
    (3120, 1024)
    """
    if _is_spatialdata(adata_tiles):
        sdata = adata_tiles
        key = _spatialdata_table(sdata, table_key)
        table = sdata.tables[key]
        if slide is None:
            slide = _slide_from_spatialdata(sdata, key, table.uns.get(UNS_KEY, {}))
        target = table.copy() if copy else table
        extract_features(target, slide, encoder=encoder, weights=weights, batch_size=batch_size,
                         num_workers=num_workers, device=device, precision=precision, key_added=key_added,
                         cache=cache, progress=progress, copy=False)
        if copy:
            return target
        from ..io import write_element_safely

        write_element_safely(sdata, key)  # no-op unless sdata is backed by a zarr store
        return None

    import torch

    from ..models.encoders import TileTransform, get_encoder

    if batch_size is not None:
        batch_size = check_positive(batch_size, "batch_size", integer=True, hint="It is the tiles per forward pass.")
    if num_workers is not None:
        num_workers = check_positive(num_workers, "num_workers", integer=True, allow_zero=True,
                                     hint="It is the number of DataLoader processes reading tiles (0: none).")
    adata = adata_tiles.copy() if copy else adata_tiles
    info = _tile_info(adata)
    slide = _resolve_slide(slide, info)
    enc = get_encoder(encoder, weights=weights, precision=precision)
    dev = get_device(device)
    on_cuda = dev.type == "cuda"
    batch_size = int(batch_size or (256 if on_cuda else 32))
    if num_workers is None:
        cpus = os.cpu_count() or 1
        num_workers = max(0, min(16 if on_cuda else 2, cpus - 1))
        if getattr(slide, "backend", None) == "spatialdata":
            # dask-backed image elements are not fork-safe: a forked DataLoader worker can hang on a
            # lock held by one of the parent's dask/zarr threads (seen on a Xenium store)
            num_workers = 0
    key = key_added or _feature_key(enc.name)

    fast = isinstance(enc.transform, TileTransform)
    out_size = enc.transform.size if fast else int(info.get("tile_size", enc.input_size))
    dataset = TileDataset(slide, adata.obs["x0"].to_numpy(), adata.obs["y0"].to_numpy(),
                          info["tile_size_level0"], out_size, enc.transform, uint8_output=fast)
    n = adata.n_obs
    amp_dtype = _autocast_dtype(enc.precision, dev)
    effective_precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
    enc_info = {**enc.info(), "encoder_precision": effective_precision}
    with _cache_lock(cache) if cache is not None else contextlib.nullcontext():
        if cache is not None:
            fingerprints = {"slide": _slide_fingerprint(slide), "tiles": _tiles_fingerprint(adata, info, out_size, slide),
                            "encoder": _weights_fingerprint(enc), "precision": effective_precision}
            meta = {"fingerprints": fingerprints, "n_tiles": n, "dim": int(enc.dim), **enc_info}
            store: _ZarrStore | _MemoryStore = _ZarrStore(cache, n, enc.dim, batch_size, meta)
        else:
            store = _MemoryStore(n, enc.dim, batch_size)
        todo = store.todo_chunks()
        batches = _chunk_batches(todo, store.chunk, n)

        if batches:
            _run_batches(enc, dataset, batches, store, device=dev, num_workers=num_workers, progress=progress,
                         n_done=n - sum(map(len, batches)), n_total=n, desc=f"{enc.name} features")
        features = store.read()

    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        names = adata.obs_names[bad]
        hint = (" The encoder ran in fp16/bf16 autocast; precision='fp32' avoids overflow."
                if on_cuda and enc.precision != "fp32" else "")
        where = f" (features of the other tiles are cached in {cache})" if cache is not None else ""
        err = ValueError(
            f"{int(bad.sum())} of {n} tiles got NaN/inf features, e.g. {list(names[:10])}{where}. Check those "
            "tiles (corrupt slide regions?) and drop them: the full list is this error's `.tiles`, e.g. "
            f"adata = adata[~adata.obs_names.isin(err.tiles)].{hint}"
        )
        err.tiles = list(names)
        raise err
    adata.obsm[key] = features.astype(np.float32, copy=False)
    uns = adata.uns.setdefault(UNS_KEY, {})
    uns.update(enc_info)
    uns["feature_key"] = key
    uns.setdefault("features", {})[key] = enc_info
    return adata if copy else None


def _run_batches(enc: Encoder, dataset: TileDataset, batches: list[list[int]], store, *, device, num_workers: int,
                 progress: bool, n_done: int, n_total: int, desc: str) -> None:
    import torch
    from torch.utils.data import DataLoader

    on_cuda = device.type == "cuda"
    loader = DataLoader(
        dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=on_cuda,
        prefetch_factor=2 if num_workers > 0 else None, persistent_workers=False,
        worker_init_fn=worker_init_fn if num_workers > 0 else None,
    )
    first = next(iter(enc.module.parameters()), None)
    home = first.device if first is not None else torch.device("cpu")
    module = enc.module.to(device).eval()
    if on_cuda:
        module = module.to(memory_format=torch.channels_last)
    amp_dtype = _autocast_dtype(enc.precision, device)
    autocast = (torch.autocast(device_type="cuda", dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    normalize = enc.transform.normalize if dataset.uint8_output else None
    bar = progress_bar(total=n_total, initial=n_done, unit="tile", desc=desc, enabled=progress, smoothing=0.1)
    n_params = sum(p.numel() for p in enc.module.parameters())
    threads = limit_threads(small=n_params < 5_000_000)
    threads.__enter__()

    def flush(pending) -> None:
        start, host, event = pending
        if event is not None:
            event.synchronize()
        store.write(start, host.numpy())
        bar.update(len(host))

    pending = None
    batches_iter = None
    try:
        with torch.inference_mode(), autocast:
            batches_iter = iter(loader)
            for idx, x in batches_iter:
                x = x.to(device, non_blocking=True)
                if normalize is not None:
                    x = normalize(x)
                if on_cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                out = module(x)
                if out.ndim != 2 or out.shape[1] != enc.dim:
                    raise ValueError(
                        f"encoder {enc.name!r} returned shape {tuple(out.shape)}, expected (batch, {enc.dim})"
                    )
                # On CUDA the copy back is queued behind this batch's forward; the previous batch is
                # written while this one computes, so the GPU does not wait for the host.
                host = out.float().to("cpu", non_blocking=on_cuda)
                if not on_cuda:
                    flush((int(idx[0]), host, None))
                    continue
                event = torch.cuda.Event()
                event.record()
                if pending is not None:
                    flush(pending)
                pending = (int(idx[0]), host, event)
            if pending is not None:
                flush(pending)
    finally:
        # Stop the DataLoader workers now, also on an error or Ctrl-C: otherwise they live on for as long
        # as the traceback keeps the iterator alive (or, if the main process dies, as orphans).
        shutdown = getattr(batches_iter, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        batches_iter = None
        threads.__exit__(None, None, None)
        bar.close()
        if home != device:
            enc.module.to(home)  # give the GPU memory back; the module is where the caller had it


def _slide_from_spatialdata(sdata, table_key: str, info: dict):
    from ..io import open_slide

    image_key = info.get("image_key")
    if image_key is None and table_key.endswith("_tiles_table"):
        # add_tiles_to_spatialdata names the table "<image_key>_tiles_table".
        candidate = table_key.removesuffix("_tiles_table")
        image_key = candidate if candidate in sdata.images else None
    path = info.get("slide_path")
    if image_key is None and path and Path(path).is_file():
        return open_slide(path, mpp=info.get("slide_mpp"))
    return open_slide(sdata, image_key=image_key, mpp=info.get("slide_mpp"),
                      slide_id=info.get("slide_id"))


# ---------------------------------------------------------------------------- cohorts
def extract_features_cohort(
    slides: Iterable[str | os.PathLike | Slide] | Mapping[str, str | os.PathLike | Slide],
    *,
    out_dir: str | os.PathLike,
    encoder: str | Any = "uni",
    weights: str | os.PathLike | None = None,
    mpp: float | Mapping[str, float] | None = None,
    tile_kwargs: Mapping[str, Any] | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    device: str | torch.device | None = None,
    precision: Literal["bf16", "fp16", "fp32"] | None = None,
    key_added: str | None = None,
    format: Literal["h5ad", "zarr"] = "h5ad",
    overwrite: bool = False,
    errors: Literal["raise", "warn"] = "warn",
    progress: bool | None = None,
    client: Any = None,
) -> pd.DataFrame:
    """Tile and featurise a list of slides, one file per slide; finished slides are skipped.

    For each slide: :func:`histoexpr.pp.tile`, then :func:`extract_features` with a per-slide
    zarr cache in ``out_dir`` (so an interrupted slide resumes), then ``<slide_id>.h5ad`` (or
    ``.zarr``) is written atomically (temporary name, then rename) and the cache removed. Re-running
    the same call after a crash redoes only what is missing. The encoder is loaded once per process.

    With ``client=`` (a :class:`dask.distributed.Client`) every slide is one Dask task: the same
    code runs on a laptop, a ``LocalCluster`` or a SLURM cluster through ``dask-jobqueue`` (see
    ``docs/scaling.md``). Each task writes its own files, so no coordination is needed, and the
    outputs are identical to a local run.

    Parameters
    ----------
    slides
        Slide paths (or :class:`histoexpr.io.Slide` objects), or a mapping ``slide_id → path``.
    out_dir
        Output folder (created). With a Dask client it must be reachable from the workers
        (a shared file system on a cluster).
    encoder, weights, batch_size, num_workers, device, precision, key_added
        As in :func:`extract_features`.
    mpp
        µm per level-0 pixel for slides without it in their metadata (one value, or per slide id).
    tile_kwargs
        Keyword arguments of :func:`histoexpr.pp.tile` (``tile_size``, ``mpp``, ``max_tiles``, ...).
    format
        ``"h5ad"`` or ``"zarr"`` (AnnData zarr).
    overwrite
        Recompute slides whose output exists.
    errors
        ``"warn"``: record a failing slide in the summary, warn, and go on; ``"raise"``: stop.
    progress
        Progress bar over slides (and, locally, over each slide's tiles); default
        ``histoexpr.settings.progress``.
    client
        A ``dask.distributed.Client``: run slides as Dask tasks on its workers. Per-tile DataLoader
        workers default to 0 there (each Dask worker is already one process per slide).

    Returns
    -------
    A :class:`pandas.DataFrame`, one row per slide: ``slide_id``, ``path``, ``status``
    (``"done"``, ``"skipped"`` (output existed), ``"failed"`` (e.g. no tissue found; the reason is
    in ``error``)), ``n_tiles``, ``seconds``, ``output``, ``error``, ``worker`` (Dask worker or
    ``"local"``).

    Example
    -------
    >>> import histoexpr as hx
    >>> summary = hx.pp.extract_features_cohort(
    ...     ["a.svs", "b.svs"], out_dir="features/", encoder="uni", weights="uni/pytorch_model.bin"
    ... )  # doctest: +SKIP
    >>> from dask.distributed import Client, LocalCluster
    >>> with Client(LocalCluster(n_workers=4, threads_per_worker=1)) as client:  # doctest: +SKIP
    ...     summary = hx.pp.extract_features_cohort(slides, out_dir="features/", encoder="hed_stats",
    ...                                             client=client)
    """
    import pandas as pd

    if format not in ("h5ad", "zarr"):
        raise ValueError(f"format must be 'h5ad' or 'zarr', got {format!r}")
    if errors not in ("raise", "warn"):
        raise ValueError(f"errors must be 'raise' or 'warn', got {errors!r}")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    items = list(slides.items()) if isinstance(slides, Mapping) else [(None, s) for s in slides]
    job = {"out": str(out.resolve()), "encoder": encoder, "weights": weights, "mpp": mpp,
           "tile_kwargs": dict(tile_kwargs or {}), "batch_size": batch_size, "num_workers": num_workers,
           "device": device, "precision": precision, "key_added": key_added, "format": format,
           "overwrite": overwrite, "errors": errors, "n_threads": settings.n_threads}
    show = resolve_progress(progress)
    rows = []
    if client is None:
        state: dict = {}
        for given_id, source in progress_bar(items, enabled=show, desc="cohort slides", unit="slide"):
            rows.append(_cohort_slide(given_id, source, job=job, progress=show, state=state))
    else:
        if num_workers is None:
            job["num_workers"] = 0
        # largest files first (longest-processing-time-first): a big slide started last would be the tail
        futures = [client.submit(_cohort_slide, given_id, source, job=job, progress=False, state=None,
                                 pure=False, key=f"histoexpr-slide-{i}-{given_id or Path(str(source)).stem}",
                                 priority=_size_hint(source))
                   for i, (given_id, source) in enumerate(items)]
        from dask.distributed import as_completed

        done = {}
        bar = progress_bar(total=len(futures), enabled=show, desc="cohort slides (dask)", unit="slide")
        for future in as_completed(futures):
            row = future.result()  # errors="raise" re-raises the slide's exception here
            done[future.key] = row
            if row["status"] == "failed":
                warnings.warn(f"slide {row['slide_id'] or row['path']} failed: {row['error']}", stacklevel=2)
            bar.update(1)
        bar.close()
        rows = [done[f.key] for f in futures]
    return pd.DataFrame(rows, columns=["slide_id", "path", "status", "n_tiles", "seconds", "output", "error",
                                       "worker"])


def _size_hint(source) -> int:
    """A slide file's size in KiB (a scheduling priority; 0 when it is not a local file)."""
    try:
        return int(os.path.getsize(source) // 1024) if isinstance(source, (str, os.PathLike)) else 0
    except OSError:
        return 0


#: Encoders loaded in this process (a Dask worker runs many slides with the same encoder).
_COHORT_ENCODERS: dict = {}


def _cohort_slide(given_id, source, *, job: dict, progress: bool, state: dict | None) -> dict:
    """Tile, featurise and write one slide of a cohort; returns its summary row (a Dask task)."""
    # the caller's thread setting travels with the task (a Dask worker has its own settings)
    with settings.override(n_threads=job.get("n_threads", settings.n_threads)):
        return _cohort_slide_impl(given_id, source, job=job, progress=progress, state=state)


def _cohort_slide_impl(given_id, source, *, job: dict, progress: bool, state: dict | None) -> dict:
    from ..io import open_slide
    from ..models.encoders import get_encoder

    t0 = time.perf_counter()
    out = Path(job["out"])
    fmt, mpp = job["format"], job["mpp"]
    try:
        from dask.distributed import get_worker

        worker = get_worker().address
    except (ImportError, ValueError):
        worker = "local"
    row = {"slide_id": given_id, "path": None if not isinstance(source, str | os.PathLike) else str(source),
           "status": None, "n_tiles": 0, "seconds": 0.0, "output": None, "error": None, "worker": worker}
    opened = None
    try:
        slide_mpp = mpp.get(given_id) if isinstance(mpp, Mapping) else mpp
        if isinstance(source, str | os.PathLike):
            slide = opened = open_slide(source, mpp=slide_mpp, slide_id=given_id)
        else:
            slide = source
            row["path"] = str(slide.path) if slide.path is not None else None
        row["slide_id"] = slide_id = given_id or slide.slide_id
        target = out / f"{slide_id}.{fmt}"
        row["output"] = str(target)
        if target.exists() and not job["overwrite"]:
            row["status"] = "skipped"
            logger.info("cohort: %s skipped (output exists: %s)", slide_id, target)
            return row
        from . import tile

        # the id the output file is named by is also the tiles' obs["slide_id"]
        with limit_threads(small=True):
            tiles = tile(slide, **{"slide_id": slide_id, **job["tile_kwargs"]})
        row["n_tiles"] = int(tiles.n_obs)
        encoder = job["encoder"]
        if isinstance(encoder, str):
            cache_key = (encoder, str(job["weights"]), job["precision"])
            encoders = _COHORT_ENCODERS if state is None else state
            if cache_key not in encoders:
                encoders[cache_key] = get_encoder(encoder, weights=job["weights"], precision=job["precision"])
            encoder = encoders[cache_key]
        cache = out / f".{slide_id}.features.zarr"
        extract_features(tiles, slide, encoder=encoder, weights=None if not isinstance(encoder, str) else job["weights"],
                         batch_size=job["batch_size"], num_workers=job["num_workers"], device=job["device"],
                         key_added=job["key_added"], cache=cache, progress=progress)
        _write_atomic(tiles, target, fmt)
        shutil.rmtree(cache, ignore_errors=True)
        row["status"] = "done"
        logger.info("cohort: %s done (%d tiles)", slide_id, row["n_tiles"])
    except Exception as e:
        if job["errors"] == "raise":
            raise
        row["status"], row["error"] = "failed", f"{type(e).__name__}: {e}"
        if state is not None:  # local run: warn now; with Dask the client warns
            warnings.warn(f"slide {row['slide_id'] or row['path']} failed: {row['error']}", stacklevel=3)
    finally:
        if opened is not None:  # a cohort can hold thousands of slides: do not keep their files open
            opened.close()
        row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def _write_atomic(adata: AnnData, target: Path, format: str) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    if format == "h5ad":
        adata.write_h5ad(tmp)
    else:
        adata.write_zarr(tmp)
    if target.exists():  # overwrite=True
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    os.replace(tmp, target)
