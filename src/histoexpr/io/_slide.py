"""Lazy whole-slide image access with an explicit physical scale.

One small class, :class:`Slide`, hides three back-ends behind an openslide-like API:

* ``tiffslide`` for SVS and generic pyramidal TIFF (openslide-python when installed, as a fallback for
  formats tiffslide cannot read),
* PIL for large JPEG/PNG H&E images (decoded once, on first pixel access),
* a SpatialData image element (multiscale ``DataTree`` or single ``DataArray``), read through dask.

All coordinates are level-0 pixels ``(x, y)``; pixel arrays are ``(height, width, 3)`` ``uint8`` RGB.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .._utils import check_positive
from ._elements import image_levels, pick_image_key

#: File endings read with PIL instead of a WSI library.
_PIL_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
#: Plausible range of µm/px for brightfield slides (outside it, a resolution tag is not trusted).
_MPP_RANGE = (0.05, 20.0)
#: Largest level (in pixels) read whole for a thumbnail; larger ones are read in strips.
_THUMBNAIL_READ_PIXELS = 4096 * 4096
#: SpatialData (dask) regions up to this many pixels are computed with dask's synchronous scheduler:
#: a tile touches a few chunks, so threads buy nothing, and they cannot be used after a fork (see
#: ``Slide._read_level_box``).
_SYNC_READ_PIXELS = 2048 * 2048


class SlideError(ValueError):
    """A slide cannot be opened or lacks information needed to use it."""


class Slide:
    """A whole-slide image with a known physical scale, read lazily.

    Use :func:`open_slide` to create one.

    Attributes
    ----------
    path
        The file, or ``None`` for an in-memory SpatialData element.
    slide_id
        Identifier used in ``obs["slide_id"]`` (file stem by default).
    mpp
        µm per level-0 pixel.
    dimensions
        ``(width, height)`` at level 0.
    level_dimensions, level_downsamples
        Per pyramid level, as in openslide.
    """

    def __init__(
        self,
        *,
        backend: str,
        path: Path | None,
        mpp: float,
        slide_id: str,
        level_dimensions: tuple[tuple[int, int], ...],
        element: Any = None,
    ):
        self.backend = backend
        self.path = path
        self.mpp = float(mpp)
        self.slide_id = slide_id
        self.level_dimensions = level_dimensions
        w0, h0 = level_dimensions[0]
        self.level_downsamples = tuple((w0 / w + h0 / h) / 2 for w, h in level_dimensions)
        self._element = element
        self._handle: Any = None
        self._pil_levels: list[np.ndarray] | None = None
        self._tiff: list[_TiffLevel] | bool | None = None
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._origin_pid = self._pid  # the process that opened the slide (see _read_level_box)

    # ------------------------------------------------------------------ openslide-like API
    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (never upsample)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-2):
                best = i
        return best

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read ``size = (w, h)`` pixels of ``level`` starting at level-0 ``location = (x, y)``.

        Areas outside the image are filled with white (255), as background would be. Pixels that
        cannot be decoded (a truncated or corrupt file) raise a :class:`SlideError` naming the file
        and the region.
        """
        if not 0 <= level < self.level_count:
            raise SlideError(f"level {level} does not exist; this slide has levels 0..{self.level_count - 1}")
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise SlideError(f"region size must be positive, got {size}")
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        # Region in level coordinates, then clipped to the image; the rest stays white.
        lx, ly = int(round(location[0] / ds)), int(round(location[1] / ds))
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        cx0, cy0 = max(lx, 0), max(ly, 0)
        cx1, cy1 = min(lx + w, lw), min(ly + h, lh)
        if cx1 <= cx0 or cy1 <= cy0:
            return out
        try:
            patch = self._read_level_box(level, cx0, cy0, cx1 - cx0, cy1 - cy0)
        except (SlideError, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001 - tifffile/imagecodecs/zarr errors: name the file and region
            raise SlideError(
                f"cannot read the region x={cx0}..{cx1}, y={cy0}..{cy1} (level-{level} px) of {self._describe()}: "
                f"{type(e).__name__}: {e}. The file is probably truncated or corrupt (an interrupted copy or "
                "download?); copy it again, or drop the tiles in this region."
            ) from e
        out[cy0 - ly : cy1 - ly, cx0 - lx : cx1 - lx] = patch
        return out

    def read_tile(self, x0: float, y0: float, size0: float, out_size: int) -> np.ndarray:
        """The square of side ``size0`` level-0 px at top-left ``(x0, y0)``, resized to ``out_size`` px.

        It is read from the coarsest pyramid level that still has at least ``out_size`` pixels across,
        so a 40× slide tiled at 0.5 µm/px reads 512 px from level 0 (or 256 px from a 2× level).
        """
        if not (size0 > 0 and int(out_size) >= 1):
            raise SlideError(f"tile side and output size must be positive, got size0={size0!r}, out_size={out_size!r}")
        ds = size0 / out_size
        level = self.get_best_level_for_downsample(ds)
        lds = self.level_downsamples[level]
        n = max(1, int(round(size0 / lds)))
        patch = self.read_region((int(round(x0)), int(round(y0))), level, (n, n))
        if n == out_size:
            return patch
        from PIL import Image

        return np.asarray(Image.fromarray(patch).resize((out_size, out_size), Image.BILINEAR))

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """A downsampled RGB image whose longer side is at most ``max_size`` px."""
        w0, h0 = self.dimensions
        scale = max_size / max(w0, h0)
        if scale >= 1:
            return self.read_region((0, 0), 0, (w0, h0))
        level = self.get_best_level_for_downsample(1 / scale)
        lw, lh = self.level_dimensions[level]
        tw, th = max(1, round(w0 * scale)), max(1, round(h0 * scale))
        from PIL import Image

        if lw * lh <= _THUMBNAIL_READ_PIXELS:
            img = self.read_region((0, 0), level, (lw, lh))
            return np.asarray(Image.fromarray(img).resize((tw, th), Image.BILINEAR))
        # No small enough pyramid level (e.g. a flat TIFF): read in horizontal strips so that memory
        # stays bounded by one strip, whatever the slide size.
        out = np.empty((th, tw, 3), dtype=np.uint8)
        rows_per_strip = max(1, int(_THUMBNAIL_READ_PIXELS // lw * th / lh))
        ds = self.level_downsamples[level]
        for r0 in range(0, th, rows_per_strip):
            r1 = min(th, r0 + rows_per_strip)
            y0, y1 = int(r0 * lh / th), max(int(r0 * lh / th) + 1, int(round(r1 * lh / th)))
            strip = self.read_region((0, int(round(y0 * ds))), level, (lw, y1 - y0))
            out[r0:r1] = np.asarray(Image.fromarray(strip).resize((tw, r1 - r0), Image.BOX))
        return out

    def thumbnail_scale(self, thumbnail: np.ndarray) -> float:
        """Factor mapping level-0 px to pixels of ``thumbnail`` (as in ``tissue_hires_scalef``)."""
        return thumbnail.shape[1] / self.dimensions[0]

    # ------------------------------------------------------------------ back-ends
    def _read_level_box(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        self._forget_handles_after_fork()
        if self.backend == "pil":
            return self._pil_level(level)[y : y + h, x : x + w]
        if self.backend == "spatialdata":
            region = _element_level(self._element, level)[:, y : y + h, x : x + w]
            data = region.data
            if hasattr(data, "compute") and (os.getpid() != self._origin_pid or w * h <= _SYNC_READ_PIXELS):
                # dask's threaded scheduler keeps one process-wide pool; in a process forked after it
                # started (a DataLoader worker) its threads are gone and compute() waits forever.
                # Tile-sized reads gain nothing from threads anyway.
                patch = np.asarray(data.compute(scheduler="synchronous"))
            else:
                patch = np.asarray(region)
            return _to_rgb_uint8(np.moveaxis(patch, 0, -1))
        if self.backend == "tiffslide":
            fast = self._tiff_levels()
            if fast is not None:
                return fast[level].read(x, y, w, h)
        handle = self._open_handle()
        # The libraries take level-0 locations and floor them back to the level's grid: choose the
        # level-0 pixel that maps exactly onto (x, y) of this level.
        ds = float(handle.level_downsamples[level])
        loc = (int(math.ceil(x * ds - 1e-6)), int(math.ceil(y * ds - 1e-6)))
        if self.backend == "tiffslide":
            patch = handle.read_region(loc, level, (w, h), as_array=True)
        else:  # openslide
            patch = np.asarray(handle.read_region(loc, level, (w, h)))
        return _to_rgb_uint8(patch)

    def _forget_handles_after_fork(self) -> None:
        # A forked process (a DataLoader worker) shares the parent's file offsets: reading through
        # the inherited handles interleaves seeks with the parent and its siblings and returns
        # corrupt tiles. Each process opens its own (the parent's stay open for the parent).
        if self._pid != os.getpid():
            self._handle = None
            self._tiff = None
            self._lock = threading.Lock()
            self._pid = os.getpid()

    def _open_handle(self):
        if self._handle is None:
            with self._lock:
                if self._handle is None:
                    if self.backend == "tiffslide":
                        import tiffslide

                        self._handle = tiffslide.TiffSlide(self.path)
                    else:
                        import openslide

                        self._handle = openslide.OpenSlide(str(self.path))
        return self._handle

    def _tiff_levels(self) -> list[_TiffLevel] | None:
        """Direct tile decoders per level (None when the file's layout is not a plain tiled pyramid)."""
        if self._tiff is None:
            with self._lock:
                if self._tiff is None:
                    self._tiff = _open_tiff_levels(self.path, self.level_dimensions) or False
        return self._tiff or None

    def _pil_level(self, level: int) -> np.ndarray:
        if self._pil_levels is None:
            with self._lock:
                if self._pil_levels is None:
                    self._pil_levels = _pil_pyramid(self.path, self.level_dimensions)
        return self._pil_levels[level]

    def _describe(self) -> str:
        return str(self.path) if self.path is not None else f"the SpatialData image {self.slide_id!r}"

    # ------------------------------------------------------------------ housekeeping
    def close(self) -> None:
        if self._handle is not None and hasattr(self._handle, "close"):
            self._handle.close()
        if self._tiff:
            self._tiff[0].tif.close()
        self._handle = None
        self._tiff = None
        self._pil_levels = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        # Workers re-open the file themselves: handles and decoded pixels are not pickled.
        state = self.__dict__.copy()
        state["_handle"] = None
        state["_pil_levels"] = None
        state["_tiff"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def __repr__(self) -> str:
        w, h = self.dimensions
        src = self.path.name if self.path is not None else "SpatialData element"
        return (
            f"Slide({src!r}, {w}×{h} px, {self.mpp:.4g} µm/px, {self.level_count} level(s), "
            f"backend={self.backend!r})"
        )


class _TiffLevel:
    """Reads regions of one tiled TIFF page by decoding only the tiles it needs.

    tiffslide reads through a zarr store, which costs ~15 ms per region here; seeking to the tiles
    and decoding them with tifffile/imagecodecs costs ~1 ms per tile (benchmarks/bench_features.py).
    Recently decoded tiles are kept in a small LRU cache, as neighbouring regions share tiles.
    """

    def __init__(self, tif, page, cache_tiles: int = 128):
        from functools import lru_cache

        self.tif = tif
        self.page = page
        self.th, self.tw = page.tilelength, page.tilewidth
        self.height, self.width = page.imagelength, page.imagewidth
        self.n_across = -(-self.width // self.tw)
        self._tile = lru_cache(maxsize=cache_tiles)(self._decode_tile)

    def _decode_tile(self, index: int) -> np.ndarray:
        fh = self.tif.filehandle
        offset, count = self.page.dataoffsets[index], self.page.databytecounts[index]
        if count == 0:  # sparse file: a tile that was never written
            return np.full((self.th, self.tw, 3), 255, np.uint8)
        with fh.lock:
            fh.seek(offset)
            data = fh.read(count)
        tile = self.page.decode(data, index, jpegtables=self.page.jpegtables)[0]
        return _to_rgb_uint8(np.asarray(tile).reshape(self.th, self.tw, -1))

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        out = np.empty((h, w, 3), dtype=np.uint8)
        for ty in range(y // self.th, (y + h - 1) // self.th + 1):
            for tx in range(x // self.tw, (x + w - 1) // self.tw + 1):
                tile = self._tile(ty * self.n_across + tx)
                oy0, ox0 = ty * self.th, tx * self.tw
                ys, ye = max(y, oy0), min(y + h, oy0 + self.th)
                xs, xe = max(x, ox0), min(x + w, ox0 + self.tw)
                out[ys - y : ye - y, xs - x : xe - x] = tile[ys - oy0 : ye - oy0, xs - ox0 : xe - ox0]
        return out


def _open_tiff_levels(path: Path, level_dimensions) -> list[_TiffLevel] | None:
    """Tile decoders for every level, or None if any level is not a plain tiled RGB page."""
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
        levels = tif.series[0].levels
        pages = [lvl.keyframe for lvl in levels]
        ok = len(pages) == len(level_dimensions) and all(
            p.is_tiled and p.planarconfig == 1 and p.imagedepth == 1 and p.samplesperpixel in (3, 4)
            and p.dtype == np.uint8 and (p.imagewidth, p.imagelength) == tuple(dims)
            for p, dims in zip(pages, level_dimensions)
        )
        if not ok:
            tif.close()
            return None
        tif.filehandle.set_lock(True)  # threads share the file: seek + read must not interleave
        return [_TiffLevel(tif, p) for p in pages]
    except Exception:  # noqa: BLE001 - fall back to tiffslide's reader
        return None


def open_slide(
    source: str | os.PathLike | Any,
    *,
    mpp: float | None = None,
    slide_id: str | None = None,
    image_key: str | None = None,
    coordinate_system: str = "global",
) -> Slide:
    """Open a whole-slide image lazily, with its physical scale.

    Parameters
    ----------
    source
        Path to an SVS / pyramidal TIFF (tiffslide, or openslide when installed), a large JPEG/PNG,
        a :class:`spatialdata.SpatialData` (with ``image_key``) or a SpatialData image element.
    mpp
        µm per level-0 pixel. Overrides the metadata; required when the file has none.
    slide_id
        Identifier for ``obs["slide_id"]``; defaults to the file stem or ``image_key``.
    image_key
        Image element to use when ``source`` is a SpatialData object.
    coordinate_system
        For SpatialData images without ``mpp=``: the scale of the element's transformation to this
        coordinate system is taken as µm/px (Xenium's ``"global"`` system is in µm).

    Returns
    -------
    A :class:`Slide`.

    Raises
    ------
    SlideError
        The file is missing, truncated or corrupt (the message names it), or ``mpp`` (given, or read
        from the metadata) is not a finite number > 0: a string such as ``"0.5"``, NaN, 0 or
        negative. Pixels that cannot be decoded later raise a :class:`SlideError` naming the file
        and the region from :meth:`Slide.read_region`.

    Examples
    --------
    >>> import histoexpr as hx
    >>> slide = hx.io.open_slide("cmu-1-small-region.svs")  # doctest: +SKIP
    >>> slide.mpp, slide.dimensions  # doctest: +SKIP
    (0.499, (2220, 2967))
    >>> slide = hx.io.open_slide("HE.jpg", mpp=0.69)  # doctest: +SKIP
    """
    if mpp is not None:
        mpp = check_positive(mpp, "mpp", error=SlideError, hint="It is the slide's µm per level-0 pixel "
                             "(e.g. 0.25 for a 40× scan, 0.5 for 20×).")
    if not isinstance(source, str | os.PathLike):
        return _open_spatialdata(source, mpp=mpp, slide_id=slide_id, image_key=image_key,
                                 coordinate_system=coordinate_system)
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise SlideError(f"slide file not found: {path}")
    if path.is_dir():
        raise SlideError(
            f"{path} is a folder; pass a slide file (SVS/TIFF/JPEG/PNG), or open a SpatialData zarr "
            "with spatialdata.read_zarr and pass the SpatialData object with image_key=..."
        )
    slide_id = slide_id or path.stem
    if path.suffix.lower() in _PIL_SUFFIXES:
        dims = _pil_dimensions(path)
        return Slide(backend="pil", path=path, mpp=_require_mpp(mpp, path), slide_id=slide_id,
                     level_dimensions=_pil_level_dimensions(dims))
    backend, handle = _open_wsi(path)
    try:
        level_dimensions = tuple(tuple(int(v) for v in d) for d in handle.level_dimensions)
        file_mpp = _wsi_mpp(handle, path) if mpp is None else None
    except SlideError:
        raise
    except Exception as e:  # noqa: BLE001 - a raw tifffile/openslide error would not name the file
        raise SlideError(
            f"cannot read the structure (pages, levels, metadata) of {path}: {type(e).__name__}: {e}. The file is "
            "probably truncated or corrupt (an interrupted copy or download?); copy it again."
        ) from e
    finally:
        handle.close()
    if not level_dimensions or any(w <= 0 or h <= 0 for w, h in level_dimensions):
        raise SlideError(f"{path} has no readable image levels ({level_dimensions}); is the file truncated?")
    return Slide(backend=backend, path=path,
                 mpp=_require_mpp(mpp, path) if mpp is not None else _require_mpp(file_mpp, path, from_metadata=True),
                 slide_id=slide_id, level_dimensions=level_dimensions)


# ---------------------------------------------------------------------------- helpers
def _require_mpp(mpp: float | None, path: Path | str, *, from_metadata: bool = False) -> float:
    if mpp is None:
        raise SlideError(
            f"{path} has no µm-per-pixel (mpp) in its metadata. Pass mpp= explicitly, e.g. "
            "open_slide(path, mpp=0.25) for a 40× scan or mpp=0.5 for a 20× scan."
        )
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        source = "its metadata says" if from_metadata else "got"
        raise SlideError(
            f"{path}: {source} mpp={mpp!r}, which is not a valid µm per pixel (it must be a finite number > 0). "
            "Pass the right value explicitly, e.g. open_slide(path, mpp=0.25) for a 40× scan or mpp=0.5 for 20×."
        )
    return value


def _open_wsi(path: Path):
    errors = []
    try:
        import tiffslide

        return "tiffslide", tiffslide.TiffSlide(path)
    except Exception as e:  # noqa: BLE001 - report every back-end's reason below
        errors.append(f"tiffslide: {type(e).__name__}: {e}")
    try:
        import openslide

        return "openslide", openslide.OpenSlide(str(path))
    except ImportError:
        errors.append("openslide: not installed (pip install 'histoexpr[openslide]')")
    except Exception as e:  # noqa: BLE001
        errors.append(f"openslide: {type(e).__name__}: {e}")
    raise SlideError(
        f"cannot read {path} as a whole-slide image. Supported: SVS / pyramidal TIFF (tiffslide, or "
        "openslide for other vendor formats), JPEG/PNG. Reasons: " + "; ".join(errors)
    )


def _wsi_mpp(handle, path: Path) -> float | None:
    props = handle.properties
    for key in ("tiffslide.mpp-x", "openslide.mpp-x"):
        v = props.get(key)
        if v not in (None, ""):
            try:
                return float(v)
            except (TypeError, ValueError):
                return math.nan  # reported by _require_mpp with the file's name and the fix
    return _tiff_resolution_mpp(path)


def _tiff_resolution_mpp(path: Path) -> float | None:
    """µm/px from TIFF resolution tags when they are in centimetres (or plausible inches)."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            xres = page.tags.get("XResolution")
            unit = page.tags.get("ResolutionUnit")
            if xres is None or unit is None:
                return None
            num, den = xres.value
            if num == 0:
                return None
            px_per_unit = num / den
            unit_um = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
            if unit_um is None:
                return None
            mpp = unit_um / px_per_unit
            return mpp if _MPP_RANGE[0] <= mpp <= _MPP_RANGE[1] else None
    except Exception:  # noqa: BLE001 - resolution tags are optional
        return None


def _pil_dimensions(path: Path) -> tuple[int, int]:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # H&E JPEGs are large on purpose
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:  # noqa: BLE001
        raise SlideError(f"cannot read {path} as an image: {type(e).__name__}: {e}") from e


def _pil_level_dimensions(dims: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    # A virtual 4×-per-level pyramid so that tissue detection and thumbnails work on small arrays.
    w, h = dims
    levels = [(w, h)]
    while max(levels[-1]) > 2048:
        lw, lh = levels[-1]
        levels.append((max(1, lw // 4), max(1, lh // 4)))
    return tuple(levels)


def _pil_pyramid(path: Path, level_dimensions) -> list[np.ndarray]:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    with Image.open(path) as im:
        base = im.convert("RGB")
    levels = [np.asarray(base)]
    for lw, lh in level_dimensions[1:]:
        base = base.resize((lw, lh), Image.BOX)
        levels.append(np.asarray(base))
    return levels


def _to_rgb_uint8(patch: np.ndarray) -> np.ndarray:
    if patch.ndim == 2:
        patch = np.repeat(patch[..., None], 3, axis=-1)
    if patch.shape[-1] == 4:
        patch = patch[..., :3]
    if patch.shape[-1] == 1:
        patch = np.repeat(patch, 3, axis=-1)
    if patch.dtype != np.uint8:
        if np.issubdtype(patch.dtype, np.floating) and patch.max(initial=0) <= 1.0:
            patch = patch * 255
        patch = np.clip(patch, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(patch)


# ---------------------------------------------------------------------------- SpatialData
_element_levels = image_levels  # old private name


def _element_level(element, level: int):
    return _element_levels(element)[level]


def _open_spatialdata(source, *, mpp, slide_id, image_key, coordinate_system) -> Slide:
    element = source
    if hasattr(source, "images"):  # a SpatialData object
        image_key = pick_image_key(source, image_key, error=SlideError)
        element = source.images[image_key]
    levels = _element_levels(element)
    if not levels or "c" not in levels[0].dims:
        raise SlideError("expected a SpatialData image element with dims (c, y, x)")
    level_dimensions = tuple((int(a.sizes["x"]), int(a.sizes["y"])) for a in levels)
    from_metadata = mpp is None
    if mpp is None:
        mpp = _element_mpp(element, coordinate_system) * _um_per_unit(source, coordinate_system)
    return Slide(backend="spatialdata", path=None,
                 mpp=_require_mpp(mpp, f"image {image_key!r}", from_metadata=from_metadata),
                 slide_id=slide_id or image_key or "image", level_dimensions=level_dimensions,
                 element=element)


def _um_per_unit(sdata, coordinate_system: str) -> float:
    """µm per unit of ``coordinate_system``: recorded by :func:`histoexpr.io.read_xenium`, else assumed 1."""
    import warnings

    info = getattr(sdata, "attrs", {}).get("histoexpr", {}) if hasattr(sdata, "images") else {}
    if info.get("coordinate_system") == coordinate_system and info.get("um_per_unit"):
        return float(info["um_per_unit"])
    warnings.warn(
        f"assuming that coordinate system {coordinate_system!r} is in µm to get the image's µm/px; "
        "pass mpp= if it is not (e.g. Xenium stores may use 0.2125 µm morphology pixels; "
        "histoexpr.io.read_xenium records the right unit)",
        UserWarning,
        stacklevel=3,
    )
    return 1.0


def _element_mpp(element, coordinate_system: str) -> float | None:
    from spatialdata.transformations import get_transformation

    transforms = get_transformation(element, get_all=True)
    if coordinate_system not in transforms:
        raise SlideError(
            f"the image has no transformation to coordinate system {coordinate_system!r} "
            f"(it has {sorted(transforms)}); pass coordinate_system= or mpp="
        )
    matrix = transforms[coordinate_system].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    sx = float(np.hypot(matrix[0, 0], matrix[1, 0]))
    sy = float(np.hypot(matrix[0, 1], matrix[1, 1]))
    if not np.isclose(sx, sy, rtol=1e-3):
        raise SlideError(f"anisotropic pixel size ({sx:.4g} × {sy:.4g}); pass mpp= explicitly")
    return sx
