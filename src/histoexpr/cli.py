"""The ``histoexpr`` command line: pipeline steps on SpatialData zarr stores.

Every step reads a SpatialData zarr, does one thing and writes its result back through the
crash-safe writers of :mod:`histoexpr.io`. A finished step records a fingerprint of its parameters
in the ``uns["histoexpr"]["cli"]`` of the table it wrote; running it again with the same
parameters is skipped (``--overwrite`` redoes it). Failures print one line ``error: ...`` and exit
with status 1 (``--debug`` shows the traceback). ``--json PATH`` (``-`` for stdout) writes a
machine-readable summary. Heavy libraries are imported inside the commands, so ``--help`` is fast.

Run ``histoexpr --help`` or see ``docs/cli.md``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import click

from . import __version__

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
_SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".png", ".jpg",
                   ".jpeg", ".qptiff", ".ome.tif"}


class StepError(Exception):
    """A user-facing failure of a CLI step (printed as one line)."""


# ---------------------------------------------------------------------------- common options
def _common(fn):
    """Options shared by every subcommand, and the error/summary handling around it."""
    options = [
        click.option("--device", default=None, help="Torch device: auto (default), cpu, cuda, cuda:1, ..."),
        click.option("--num-workers", type=int, default=None,
                     help="DataLoader worker processes reading tiles (default: library default)."),
        click.option("--threads", type=int, default=None,
                     help="CPU threads for torch/BLAS inside each step (default: 1 for small models, "
                          "all CPUs for large encoders)."),
        click.option("--log-level", type=click.Choice(["error", "warning", "info", "debug"]), default=None,
                     help="Logging level of the 'histoexpr' logger (default warning)."),
        click.option("-v", "--verbose", count=True, help="More output: -v info, -vv debug."),
        click.option("--progress/--no-progress", default=None,
                     help="Progress bars (default: on when stderr is a terminal)."),
        click.option("--json", "json_path", default=None, metavar="PATH",
                     help="Write a JSON summary of what was done to PATH ('-' for stdout)."),
        click.option("--debug", is_flag=True, help="On failure, show the full traceback."),
    ]
    for option in reversed(options):
        fn = option(fn)

    @functools.wraps(fn)
    def wrapper(*args, device, num_workers, threads, log_level, verbose, progress, json_path, debug, **kwargs):
        from ._settings import settings

        level = log_level or {0: "warning", 1: "info"}.get(verbose, "debug")
        settings.verbosity = level
        _quiet_third_party(level)
        if progress is not None:
            settings.progress = progress
        if device is not None:
            settings.device = device
        if threads is not None:
            if threads < 1:
                _fail(f"--threads must be ≥ 1, got {threads}", debug=False)
            settings.n_threads = threads
        ctx = click.get_current_context()
        start = time.perf_counter()
        summary: dict[str, Any] = {"command": ctx.info_name, "histoexpr_version": __version__}
        try:
            result = fn(*args, num_workers=num_workers, **kwargs) or {}
        except click.exceptions.Exit:
            raise
        except click.ClickException:
            raise
        except Exception as err:  # one line, exit 1; --debug for the traceback
            if debug:
                traceback.print_exc()
            summary.update(status="failed", error=f"{type(err).__name__}: {err}",
                           seconds=round(time.perf_counter() - start, 3))
            _emit_json(summary, json_path, quiet=True)
            _fail(_one_line(err), debug=False)
        summary.update(result)
        summary.setdefault("status", "done")
        summary["seconds"] = round(time.perf_counter() - start, 3)
        _emit_json(summary, json_path)
        if json_path != "-":
            click.echo(_human(summary), err=True)
        if summary["status"] == "partial":
            _fail(f"{summary.get('n_failed')} of {summary.get('n_slides')} slides failed (see the summary)",
                  debug=False)

    return wrapper


def _quiet_third_party(level: str) -> None:
    """Our process, our choice: third-party chatter is hidden unless -v/--log-level debug."""
    if level == "debug":
        return
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"histoexpr(\.|$)")
    for name in ("ome_zarr", "spatialdata", "distributed", "numba", "fsspec", "zarr"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.showwarning = _show_warning


def _show_warning(message, category, filename, lineno, file=None, line=None):  # pragma: no cover - format
    click.echo(f"warning: {str(message).splitlines()[0] if str(message) else category.__name__}", err=True)


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    if isinstance(err, KeyError) and text.startswith(("'", '"')):
        text = text.strip("'\"")
    text = " ".join(text.split())
    prefix = "" if isinstance(err, StepError | ValueError | KeyError) else f"{type(err).__name__}: "
    return prefix + text


def _fail(message: str, *, debug: bool) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _emit_json(summary: dict, json_path: str | None, *, quiet: bool = False) -> None:
    if not json_path:
        return
    text = json.dumps(summary, indent=2, default=_json_default)
    if json_path == "-":
        click.echo(text)
    else:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(text + "\n")


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _human(summary: dict) -> str:
    steps = summary.get("steps")
    if steps:
        parts = ", ".join(f"{s['step']} {s['status']}" for s in steps)
        return f"{summary['command']}: {parts} ({summary['seconds']:.1f} s)"
    return f"{summary['command']}: {summary.get('status')} ({summary['seconds']:.1f} s)"


# ---------------------------------------------------------------------------- fingerprints
def _fingerprint(params: dict) -> str:
    text = json.dumps(params, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _recorded(uns: dict, step: str) -> dict | None:
    info = uns.get("histoexpr", {}) if isinstance(uns, dict) else {}
    cli = info.get("cli", {}) if isinstance(info, dict) else {}
    rec = cli.get(step) if isinstance(cli, dict) else None
    return rec if isinstance(rec, dict) else None


def _record(uns: dict, step: str, params: dict) -> None:
    info = uns.setdefault("histoexpr", {})
    cli = info.get("cli")
    cli = dict(cli) if isinstance(cli, dict) else {}
    cli[step] = {"fingerprint": _fingerprint(params), "params": json.dumps(params, sort_keys=True, default=str),
                 "histoexpr_version": __version__, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    info["cli"] = cli


def _decide(step: str, uns: dict | None, params: dict, *, exists: bool, overwrite: bool, what: str) -> str:
    """``"skip"`` (finished with these parameters), ``"run"`` or ``"redo"`` (overwrite); else raise."""
    if not exists:
        return "run"
    if overwrite:
        return "redo"
    rec = _recorded(uns or {}, step)
    if rec is not None and rec.get("fingerprint") == _fingerprint(params):
        return "skip"
    if rec is not None:
        raise StepError(f"{what} exists but was made with other parameters (recorded: {rec.get('params')}); "
                        "pass --overwrite to redo it")
    raise StepError(f"{what} exists but was not recorded as finished by `histoexpr {step}`; pass --overwrite "
                    "to redo it")


# ---------------------------------------------------------------------------- stores
def _is_store(path: Path) -> bool:
    return path.is_dir() and (path.suffix == ".zarr" or (path / "zarr.json").exists()
                              or (path / ".zgroup").exists())


def _read_store(path: str | os.PathLike):
    """Read a SpatialData zarr (Xenium stores through :func:`histoexpr.io.read_xenium`, for their units)."""
    import spatialdata as sd

    from .io import read_xenium
    from .io._readers import ReaderError

    path = Path(path)
    if not path.exists():
        raise StepError(f"{path} does not exist")
    if not _is_store(path):
        raise StepError(f"{path} is not a SpatialData zarr store (a folder ending in .zarr)")
    try:
        sdata = sd.read_zarr(path)
    except Exception as err:
        raise StepError(f"cannot read {path} as a SpatialData zarr: {_one_line(err)}") from err
    if len(sdata.points) and "table" in sdata.tables:
        try:
            return read_xenium(sdata)
        except ReaderError:
            pass
    return sdata


def _image_key(sdata, image_key: str | None) -> str | None:
    """The image to tile by the library's one rule (:func:`histoexpr.io.pick_image_key`); ``None`` without images."""
    from .io import pick_image_key

    if not sdata.images and image_key is None:
        return None
    return pick_image_key(sdata, image_key, error=StepError)


def _tiles_table(sdata, table_key: str | None) -> str:
    from .pp._features import _spatialdata_table

    try:
        return _spatialdata_table(sdata, table_key)
    except (KeyError, ValueError) as err:
        if not sdata.tables or table_key is None:
            raise StepError(f"no tiles table in {sdata.path}; run `histoexpr tile` first "
                            f"(tables: {list(sdata.tables)})") from err
        raise StepError(_one_line(err)) from err


def _step_result(step: str, status: str, **extra) -> dict:
    return {"step": step, "status": status, **extra}


# ---------------------------------------------------------------------------- main group
@click.group(context_settings=_CONTEXT)
@click.version_option(__version__, prog_name="histoexpr")
def main() -> None:
    """histoexpr: predict gene expression from H&E and compare it with measured spatial omics.

    Pipeline steps on a SpatialData zarr store (each skips itself when already done):

    \b
      histoexpr tile            STORE --tile-size 256 --mpp 0.5
      histoexpr features        STORE --encoder hed_stats
      histoexpr predict-spatial STORE --model ckpt/
      histoexpr compare         STORE --out results/

    Slide files: `histoexpr tile slide.svs --out slide.zarr`. Many slides: `histoexpr cohort`.
    """


# ---------------------------------------------------------------------------- info
@main.command(context_settings=_CONTEXT)
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--mpp", type=float, default=None, help="µm/px for slide files without it in their metadata.")
@_common
def info(path: Path, mpp: float | None, num_workers) -> dict:
    """What a store or slide holds: images (µm/px), tiles, features, predictions, finished steps.

    \b
    Example:
      histoexpr info xenium.zarr
      histoexpr info slide.svs --json -
    """
    from .io import open_slide

    if not path.exists():
        raise StepError(f"{path} does not exist")
    if not _is_store(path):
        slide = open_slide(path, mpp=mpp)
        out = {"kind": "slide", "path": str(path), "slide_id": slide.slide_id, "mpp": slide.mpp,
               "dimensions": list(slide.dimensions), "levels": slide.level_count}
        click.echo(f"slide {path.name}: {slide.dimensions[0]}×{slide.dimensions[1]} px at {slide.mpp:g} µm/px, "
                   f"{slide.level_count} levels", err=True)
        return out
    sdata = _read_store(path)
    images = {}
    for key in sdata.images:
        entry: dict[str, Any] = {}
        try:
            s = open_slide(sdata, image_key=key)
            entry.update(dimensions=list(s.dimensions), mpp=s.mpp)
        except Exception as err:
            entry["note"] = _one_line(err)
        images[key] = entry
    tiles, predictions, other = {}, {}, {}
    for key, table in sdata.tables.items():
        hx = table.uns.get("histoexpr", {}) if isinstance(table.uns.get("histoexpr"), dict) else {}
        region = table.uns.get("spatialdata_attrs", {}).get("region")
        entry = {"n_obs": int(table.n_obs), "n_vars": int(table.n_vars), "region": region,
                 "steps": sorted((hx.get("cli") or {}).keys()) if isinstance(hx.get("cli"), dict) else []}
        if "tile_size_level0" in hx and {"x0", "y0"} <= set(table.obs) and table.n_vars == 0:
            entry.update(tile_size=hx.get("tile_size"), mpp=hx.get("mpp"), slide_mpp=hx.get("slide_mpp"),
                         image_key=hx.get("image_key"), slide_path=hx.get("slide_path"),
                         features={k: list(table.obsm[k].shape) for k in table.obsm if k.startswith("X_")})
            tiles[key] = entry
        elif hx.get("kind") == "measured_on_tiles":
            entry.update(measured_table=hx.get("measured_table"))
            other[key] = entry
        elif "method" in hx or "model" in hx:
            entry.update(method=hx.get("method"), model=hx.get("model"), units=hx.get("units"))
            predictions[key] = entry
        else:
            other[key] = entry
    lines = [f"store {path}"]
    for key, e in images.items():
        lines.append(f"  image {key}: " + (f"{e['dimensions'][0]}×{e['dimensions'][1]} px, {e['mpp']:.4g} µm/px"
                                           if "mpp" in e else e.get("note", "")))
    for key, e in tiles.items():
        feats = ", ".join(f"{k} ({v[1]})" for k, v in e["features"].items()) or "none"
        lines.append(f"  tiles {key}: {e['n_obs']} tiles of {e['tile_size']} px at {e['mpp']} µm/px; features: {feats}")
    for key, e in predictions.items():
        lines.append(f"  predictions {key}: {e['n_obs']} × {e['n_vars']} genes ({e['method']}, {e['units']})")
    for key, e in other.items():
        lines.append(f"  table {key}: {e['n_obs']} × {e['n_vars']}")
    click.echo("\n".join(lines), err=True)
    return {"kind": "store", "path": str(path), "images": images, "tiles": tiles, "predictions": predictions,
            "tables": other, "shapes": list(sdata.shapes), "points": list(sdata.points)}


# ---------------------------------------------------------------------------- tile
@main.command(context_settings=_CONTEXT)
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Store to write (slide input; default <slide>.zarr beside the slide's name in the cwd).")
@click.option("--image-key", default=None, help="H&E image element (store input; found automatically).")
@click.option("--tile-size", type=int, default=256, show_default=True, help="Tile side in px at --mpp.")
@click.option("--mpp", type=float, default=0.5, show_default=True, help="µm/px the tiles are cut at.")
@click.option("--slide-mpp", type=float, default=None, help="µm/px of the slide when its metadata lacks it.")
@click.option("--tissue-threshold", type=float, default=0.2, show_default=True)
@click.option("--max-tiles", type=int, default=None, help="Random cap on the number of tiles.")
@click.option("--contrast-filter/--no-contrast-filter", default=True, show_default=True,
              help="Drop low-contrast tiles.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Redo a finished step.")
@_common
def tile(source: Path, out, image_key, tile_size, mpp, slide_mpp, tissue_threshold, max_tiles, contrast_filter,
         seed, overwrite, num_workers) -> dict:
    """Cut the H&E into tiles on tissue: tile polygons plus a tiles table in the store.

    SOURCE is a SpatialData zarr (tiles are added to it) or a slide file (a new store --out is
    written, holding the tiles and the slide's path; features are read from the slide).

    \b
    Example:
      histoexpr tile xenium.zarr --tile-size 64 --mpp 0.5
      histoexpr tile slide.svs --out slide.zarr --tile-size 256 --mpp 0.5
    """
    params = {"tile_size": tile_size, "mpp": mpp, "slide_mpp": slide_mpp, "tissue_threshold": tissue_threshold,
              "max_tiles": max_tiles, "filter_low_contrast": contrast_filter, "seed": seed}
    kwargs = {"tile_size": tile_size, "mpp": mpp, "tissue_threshold": tissue_threshold, "max_tiles": max_tiles,
              "filter_low_contrast": contrast_filter, "seed": seed}
    if not source.exists():
        raise StepError(f"{source} does not exist")
    if _is_store(source):
        return _tile_store(source, image_key, params, kwargs, slide_mpp, overwrite)
    return _tile_slide(source, out, params, kwargs, slide_mpp, overwrite)


def _tile_store(path, image_key, params, kwargs, slide_mpp, overwrite) -> dict:
    from . import io as hxio
    from . import pp

    sdata = _read_store(path)
    key = _image_key(sdata, image_key)
    if key is None:
        raise StepError(f"{path} has no image to tile")
    params = {**params, "image_key": key}
    table_key, shapes_key = f"{key}_tiles_table", f"{key}_tiles"
    exists = table_key in sdata.tables or shapes_key in sdata.shapes
    uns = sdata.tables[table_key].uns if table_key in sdata.tables else None
    action = _decide("tile", uns, params, exists=exists, overwrite=overwrite, what=f"tiles {table_key!r}")
    if action == "skip":
        return {"steps": [_step_result("tile", "skipped", table=table_key, n_tiles=int(sdata.tables[table_key].n_obs))]}
    if action == "redo":
        _delete_elements(sdata, [table_key, shapes_key])
    tiles = pp.tile(sdata, image_key=key, slide_mpp=slide_mpp, **kwargs)
    table = sdata.tables[table_key]
    _record(table.uns, "tile", params)
    hxio.write_element_safely(sdata, table_key)
    return {"steps": [_step_result("tile", "done", table=table_key, shapes=shapes_key, n_tiles=int(tiles.n_obs),
                                   store=str(path))]}


def _tile_slide(source, out, params, kwargs, slide_mpp, overwrite) -> dict:
    import spatialdata as sd
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    from . import io as hxio
    from . import pp

    out = Path(out) if out is not None else Path(source.name.split(".")[0] + ".zarr")
    params = {**params, "slide": str(source.resolve())}
    if out.exists() and not _is_store(out):
        raise StepError(f"--out {out} exists and is not a SpatialData zarr store")
    sdata = _read_store(out) if out.exists() else None
    slide = hxio.open_slide(source, mpp=slide_mpp)
    table_key, shapes_key = f"{slide.slide_id}_tiles_table", f"{slide.slide_id}_tiles"
    exists = sdata is not None and (table_key in sdata.tables or shapes_key in sdata.shapes)
    uns = sdata.tables[table_key].uns if exists and table_key in sdata.tables else None
    action = _decide("tile", uns, params, exists=exists, overwrite=overwrite, what=f"tiles {table_key!r} in {out}")
    if action == "skip":
        return {"steps": [_step_result("tile", "skipped", table=table_key, n_tiles=int(sdata.tables[table_key].n_obs),
                                       store=str(out))]}
    tiles = pp.tile(slide, **kwargs)
    tiles.uns["histoexpr"].update(shapes_key=shapes_key, table_key=table_key)
    if sdata is None:
        sdata = sd.SpatialData()
        sdata.write(out)  # an empty new store; elements go in through the safe writers below
        sdata = sd.read_zarr(out)
    shapes = ShapesModel.parse(hxio.tiles_to_shapes(tiles), transformations={"global": Identity()})
    if shapes_key in sdata.shapes and action == "redo":
        _delete_elements(sdata, [table_key])
    sdata[shapes_key] = shapes
    hxio.write_element_safely(sdata, shapes_key)
    _record(tiles.uns, "tile", params)
    hxio.add_table(sdata, tiles, name=table_key, region=shapes_key, overwrite=True)
    return {"steps": [_step_result("tile", "done", table=table_key, shapes=shapes_key, n_tiles=int(tiles.n_obs),
                                   store=str(out))]}


def _delete_elements(sdata, names) -> None:
    """Remove elements (memory and disk) before a redo."""
    for name in names:
        present = any(name == n for _, n, _ in sdata.gen_elements())
        if not present:
            continue
        if sdata.is_backed() and name in {p.split("/")[-1] for p in sdata.elements_paths_on_disk()}:
            sdata.delete_element_from_disk(name)
        if present and any(name == n for _, n, _ in sdata.gen_elements()):
            del sdata[name]


# ---------------------------------------------------------------------------- features
@main.command(context_settings=_CONTEXT)
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--encoder", default="hed_stats", show_default=True,
              help="Encoder name (hed_stats works offline, without weights; uni, resnet50, timm names).")
@click.option("--weights", default=None, help="Encoder weights: local file/folder (or hf-hub:org/name online).")
@click.option("--table-key", default=None, help="Tiles table (found automatically when there is one).")
@click.option("--batch-size", type=int, default=None)
@click.option("--precision", type=click.Choice(["bf16", "fp16", "fp32"]), default=None)
@click.option("--slide", "slide_path", type=click.Path(path_type=Path), default=None,
              help="Slide file, when the store does not hold the image and the slide moved.")
@click.option("--cache", type=click.Path(path_type=Path), default=None,
              help="Zarr cache of finished batches (an interrupted run resumes).")
@click.option("--overwrite", is_flag=True, help="Redo a finished step.")
@_common
def features(store: Path, encoder, weights, table_key, batch_size, precision, slide_path, cache, overwrite,
             num_workers) -> dict:
    """Encode every tile; features go to obsm['X_<encoder>'] of the tiles table.

    \b
    Example:
      histoexpr features xenium.zarr --encoder hed_stats
      histoexpr features slide.zarr --encoder uni --weights ~/models/uni/ --device cuda
    """
    from . import io as hxio
    from . import pp

    sdata = _read_store(store)
    key = _tiles_table(sdata, table_key)
    table = sdata.tables[key]
    params = {"encoder": encoder, "weights": str(weights), "precision": precision}
    feature_key = f"X_{''.join(ch if ch.isalnum() or ch in '_-.' else '_' for ch in encoder)}"
    exists = feature_key in table.obsm
    action = _decide("features", table.uns, params, exists=exists, overwrite=overwrite,
                     what=f"features {feature_key!r} of {key!r}")
    if action == "skip":
        return {"steps": [_step_result("features", "skipped", table=key, key=feature_key)]}
    slide = str(slide_path) if slide_path is not None else None
    target = pp.extract_features(sdata, slide, encoder=encoder, weights=weights, batch_size=batch_size,
                                 num_workers=num_workers, precision=precision, table_key=key, cache=cache,
                                 copy=True)
    _record(target.uns, "features", params)
    sdata.tables[key] = target
    hxio.write_element_safely(sdata, key)
    fk = target.uns["histoexpr"]["feature_key"]
    return {"steps": [_step_result("features", "done", table=key, key=fk, dim=int(target.obsm[fk].shape[1]),
                                   n_tiles=int(target.n_obs))]}


# ---------------------------------------------------------------------------- models
def _checkpoint_fingerprint(paths) -> list:
    out = []
    for p in paths:
        p = Path(p)
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        h = hashlib.sha1()
        for f in files:
            if f.is_file():
                h.update(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}".encode())
        out.append({"path": str(p.resolve()), "files": h.hexdigest()[:12]})
    return out


def _load_checkpoint(path: str):
    from .models import HistoPrism, load_bulk_model

    p = Path(path)
    if not path.startswith("hf-hub:") and not p.exists():
        raise StepError(f"model checkpoint {path} does not exist")
    model_type = None
    for name in ("histoexpr.json", "config.json"):
        f = p / name
        if f.is_file():
            try:
                model_type = json.loads(f.read_text()).get("model_type") or model_type
            except (json.JSONDecodeError, AttributeError):
                pass
    if model_type == "histoprism":
        return HistoPrism.from_pretrained(p)
    return load_bulk_model(path)


# ---------------------------------------------------------------------------- predict-spatial
@main.command("predict-spatial", context_settings=_CONTEXT)
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--model", "models", multiple=True, required=True,
              help="Checkpoint folder (save_pretrained layout); repeat for fold models (averaged).")
@click.option("--method", type=click.Choice(["auto", "sliding_window", "direct"]), default="auto", show_default=True,
              help="auto: direct for HistoPrism, sliding window for bulk models (SEQUOIA).")
@click.option("--key-added", default="predictions", show_default=True, help="Name of the predictions table.")
@click.option("--table-key", default=None, help="Tiles table (found automatically when there is one).")
@click.option("--use-rep", default=None, help="Feature key in obsm (default: the one recorded).")
@click.option("--window", type=int, default=10, show_default=True)
@click.option("--stride", type=int, default=1, show_default=True)
@click.option("--min-tissue-tiles", type=int, default=50, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--condition", default=None, help="Condition label for conditioned direct models.")
@click.option("--overwrite", is_flag=True, help="Redo a finished step.")
@_common
def predict_spatial(store: Path, models, method, key_added, table_key, use_rep, window, stride, min_tissue_tiles,
                    batch_size, condition, overwrite, num_workers) -> dict:
    """Predict expression per tile; a table KEY_ADDED annotating the tile polygons.

    \b
    Example:
      histoexpr predict-spatial xenium.zarr --model histoprism_ckpt/
      histoexpr predict-spatial slide.zarr --model sequoia-0/ --model sequoia-1/ --window 10
    """
    from . import io as hxio
    from . import tl

    sdata = _read_store(store)
    key = _tiles_table(sdata, table_key)
    tiles = sdata.tables[key]
    params = {"models": _checkpoint_fingerprint(models), "method": method, "use_rep": use_rep, "window": window,
              "stride": stride, "min_tissue_tiles": min_tissue_tiles, "condition": condition, "tiles": key}
    exists = key_added in sdata.tables
    uns = sdata.tables[key_added].uns if exists else None
    action = _decide("predict-spatial", uns, params, exists=exists, overwrite=overwrite,
                     what=f"table {key_added!r}")
    if action == "skip":
        t = sdata.tables[key_added]
        return {"steps": [_step_result("predict-spatial", "skipped", table=key_added, n_tiles=int(t.n_obs),
                                       n_genes=int(t.n_vars))]}
    loaded = [_load_checkpoint(m) for m in models]
    if method == "auto":
        method = "direct" if type(loaded[0]).__name__ == "HistoPrism" else "sliding_window"
    region = tiles.uns.get("spatialdata_attrs", {}).get("region")
    if isinstance(region, list):
        region = region[0] if len(region) == 1 else None
    pred = tl.predict_spatial(tiles, loaded, method=method, use_rep=use_rep, window=window, stride=stride,
                              min_tissue_tiles=min_tissue_tiles, batch_size=batch_size, condition=condition)
    for col in ("region",):
        if col in pred.obs:
            del pred.obs[col]
    pred.uns.pop("spatialdata_attrs", None)
    _record(pred.uns, "predict-spatial", params)
    hxio.add_table(sdata, pred, name=key_added, region=region or tiles.uns["histoexpr"]["shapes_key"],
                   overwrite=True)
    n_nan = int((~__import__("numpy").isfinite(pred.X).all(axis=1)).sum())
    return {"steps": [_step_result("predict-spatial", "done", table=key_added, method=method, n_tiles=int(pred.n_obs),
                                   n_genes=int(pred.n_vars), n_tiles_without_prediction=n_nan)]}


# ---------------------------------------------------------------------------- predict-bulk
@main.command("predict-bulk", context_settings=_CONTEXT)
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--model", "models", multiple=True, required=True,
              help="Bulk checkpoint folder (SEQUOIA layout); repeat for fold models (averaged).")
@click.option("--key-added", default="bulk_predictions", show_default=True, help="Name of the bulk table.")
@click.option("--table-key", default=None, help="Tiles table (found automatically when there is one).")
@click.option("--use-rep", default=None)
@click.option("--out", "out_csv", type=click.Path(path_type=Path), default=None, help="Also write a CSV (slides × genes).")
@click.option("--random-state", type=int, default=0, show_default=True, help="K-means seed.")
@click.option("--overwrite", is_flag=True, help="Redo a finished step.")
@_common
def predict_bulk(store: Path, models, key_added, table_key, use_rep, out_csv, random_state, overwrite,
                 num_workers) -> dict:
    """Predict slide-level expression (SEQUOIA); a table KEY_ADDED (slides × genes) in the store.

    \b
    Example:
      histoexpr predict-bulk slide.zarr --model sequoia-brca-0/ --out bulk.csv
    """
    from spatialdata.models import TableModel

    from . import io as hxio
    from . import tl

    sdata = _read_store(store)
    key = _tiles_table(sdata, table_key)
    params = {"models": _checkpoint_fingerprint(models), "use_rep": use_rep, "random_state": random_state,
              "tiles": key}
    exists = key_added in sdata.tables
    uns = sdata.tables[key_added].uns if exists else None
    action = _decide("predict-bulk", uns, params, exists=exists, overwrite=overwrite, what=f"table {key_added!r}")
    if action != "skip":
        loaded = [_load_checkpoint(m) for m in models]
        bulk = tl.predict_bulk(sdata.tables[key], loaded, use_rep=use_rep, random_state=random_state)
        _record(bulk.uns, "predict-bulk", params)
        sdata.tables[key_added] = TableModel.parse(bulk)
        hxio.write_element_safely(sdata, key_added)
    bulk = sdata.tables[key_added]
    if out_csv is not None:
        bulk.to_df().to_csv(out_csv)
    return {"steps": [_step_result("predict-bulk", "skipped" if action == "skip" else "done", table=key_added,
                                   n_slides=int(bulk.n_obs), n_genes=int(bulk.n_vars),
                                   csv=str(out_csv) if out_csv else None)]}


# ---------------------------------------------------------------------------- fuse-xenium
@main.command("fuse-xenium", context_settings=_CONTEXT)
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--model", "model_path", type=click.Path(path_type=Path), required=True,
              help="A trained fusion model saved with torch.save(fit.model, PATH) (a trusted file).")
@click.option("--key-added", default="fusion", show_default=True,
              help="Crops '<key>_crops' and table '<key>_table' in the store.")
@click.option("--crop-size", type=int, default=None, help="Crop side in px (default: the ViT's input size).")
@click.option("--stride", type=int, default=None, help="Crop stride in px (default: the crop size).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--overwrite", is_flag=True, help="Redo a finished step.")
@_common
def fuse_xenium(store: Path, model_path: Path, key_added, crop_size, stride, batch_size, overwrite,
                num_workers) -> dict:
    """Early fusion on Xenium: predict the add-on panel per crop from H&E + core-panel transcripts.

    \b
    Example:
      histoexpr fuse-xenium xenium.zarr --model fusion_vit.pt --stride 112
    """
    import torch

    from . import io as hxio
    from . import tl

    if not model_path.is_file():
        raise StepError(f"model file {model_path} does not exist")
    sdata = _read_store(store)
    table_key = f"{key_added}_table"
    params = {"model": _checkpoint_fingerprint([model_path]), "stride": stride, "crop_size": crop_size}
    exists = table_key in sdata.tables
    uns = sdata.tables[table_key].uns if exists else None
    action = _decide("fuse-xenium", uns, params, exists=exists, overwrite=overwrite, what=f"table {table_key!r}")
    if action == "skip":
        return {"steps": [_step_result("fuse-xenium", "skipped", table=table_key)]}
    model = torch.load(model_path, map_location="cpu", weights_only=False)
    kwargs = {k: v for k, v in (("stride", stride), ("crop_size", crop_size)) if v is not None}
    pred = tl.fuse_xenium(sdata, model, batch_size=batch_size, key_added=key_added, overwrite=True, **kwargs)
    table = sdata.tables[table_key]
    _record(table.uns, "fuse-xenium", params)
    hxio.write_element_safely(sdata, table_key)
    return {"steps": [_step_result("fuse-xenium", "done", table=table_key, n_crops=int(pred.n_obs),
                                   n_genes=int(pred.n_vars))]}


# ---------------------------------------------------------------------------- compare
@main.command(context_settings=_CONTEXT)
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Folder for metrics and figures.")
@click.option("--predictions", "pred_key", default="predictions", show_default=True, help="Predictions table.")
@click.option("--measured", "measured_key", default=None,
              help="Measured table: cells/spots (mapped onto the tiles) or a table on the tiles "
                   "(default: the Xenium/Visium table 'table').")
@click.option("--k", type=int, default=4, show_default=True, help="Nearest cells/spots averaged per tile.")
@click.option("--log1p/--no-log1p", default=True, show_default=True, help="log1p the measured values.")
@click.option("--median-filter", is_flag=True, help="3×3 median filter of the measured map (SEQUOIA).")
@click.option("--min-unique", type=int, default=10, show_default=True, help="EMD: skip genes with fewer unique values.")
@click.option("--emd/--no-emd", default=True, show_default=True, help="Exact EMD per gene.")
@click.option("--gene-sets", default="hallmark", show_default=True,
              help="Gene sets for Gene Pathway Coherence (hallmark, go_bp, a .gmt path, or 'none').")
@click.option("--figures/--no-figures", default=True, show_default=True)
@click.option("--explorer", type=click.Path(path_type=Path), default=None,
              help="Also write an interactive HTML explorer (when histoexpr.pl.explore is available).")
@click.option("--overwrite", is_flag=True, help="Redo a finished step.")
@_common
def compare(store: Path, out_dir: Path, pred_key, measured_key, k, log1p, median_filter, min_unique, emd, gene_sets,
            figures, explorer, overwrite, num_workers) -> dict:
    """Compare predicted with measured expression: per-gene metrics, EMD, GPC, figures.

    Measured cells/spots are put on the tiles (mean of the --k nearest, in H&E pixels) and stored
    as table '<predictions>_measured'. Writes OUT/per_gene_metrics.csv/.json, OUT/gpc.csv,
    OUT/summary.json and figures.

    \b
    Example:
      histoexpr compare xenium.zarr --out results/ --predictions predictions
    """
    import numpy as np
    import pandas as pd

    from . import io as hxio
    from . import metrics

    sdata = _read_store(store)
    if pred_key not in sdata.tables:
        raise StepError(f"no predictions table {pred_key!r} in {store} (tables: {list(sdata.tables)}); run "
                        "`histoexpr predict-spatial` first")
    pred = sdata.tables[pred_key]
    measured_key = measured_key or ("table" if "table" in sdata.tables else None)
    if measured_key is None or measured_key not in sdata.tables:
        raise StepError(f"no measured table {measured_key!r} in {store}; pass --measured (tables: {list(sdata.tables)})")
    params = {"predictions": pred_key, "measured": measured_key, "k": k, "log1p": log1p, "median_filter": median_filter,
              "min_unique": min_unique, "emd": emd, "gene_sets": gene_sets, "figures": figures,
              "pred_fingerprint": (_recorded(pred.uns, "predict-spatial") or {}).get("fingerprint")}
    summary_file = out_dir / "summary.json"
    done_before = summary_file.is_file()
    old = json.loads(summary_file.read_text()) if done_before else {}
    rec = {"histoexpr": {"cli": {"compare": old.get("record", {})}}} if old else {}
    action = _decide("compare", rec, params, exists=done_before, overwrite=overwrite, what=f"results in {out_dir}")
    if action == "skip":
        return {"steps": [_step_result("compare", "skipped", out=str(out_dir), **old.get("headline", {}))]}
    out_dir.mkdir(parents=True, exist_ok=True)

    truth = _measured_on_tiles(sdata, measured_key, pred, k=k, log1p=log1p, median_filter=median_filter)
    genes = [g for g in pred.var_names if g in set(truth.var_names)]
    if not genes:
        raise StepError(f"the predictions ({pred.n_vars} genes) and the measured table {measured_key!r} "
                        f"({truth.n_vars} genes) share no gene names")
    truth_key = f"{pred_key}_measured"
    t_store = truth.copy()
    for col in ("region",):
        if col in t_store.obs:
            del t_store.obs[col]
    t_store.uns.pop("spatialdata_attrs", None)
    t_info = dict(t_store.uns.get("histoexpr", {}))
    for drop in ("method", "model", "n_models", "use_rep", "units", "genes", "cli"):
        t_info.pop(drop, None)
    t_store.uns["histoexpr"] = {**t_info, "kind": "measured_on_tiles", "measured_table": measured_key,
                                "log1p": log1p, "k": k}
    region = pred.uns.get("spatialdata_attrs", {}).get("region")
    hxio.add_table(sdata, t_store, name=truth_key, region=region, overwrite=True)

    p = pred[:, genes].copy()
    t = truth[:, genes].copy()
    pv, tv = np.asarray(p.X, dtype=np.float64), np.asarray(t.X, dtype=np.float64)
    ok = np.isfinite(pv).all(axis=1)
    r, pval = metrics.pearson(pv[ok], tv[ok])
    rho = metrics.spearman(pv[ok], tv[ok], return_pvalue=False)
    rmse = metrics.rmse(pv[ok], tv[ok])
    table = pd.DataFrame({"pearson_r": np.asarray(r), "pearson_p": np.asarray(pval), "spearman_rho": np.asarray(rho),
                          "rmse": np.asarray(rmse)}, index=pd.Index(genes, name="gene"))
    if emd:
        e = metrics.emd(p[ok], t[ok], genes=genes, min_unique=min_unique)
        table = table.join(e[["emd"]])
    table.to_csv(out_dir / "per_gene_metrics.csv")
    (out_dir / "per_gene_metrics.json").write_text(table.reset_index().to_json(orient="records", indent=1))
    gpc_info = None
    if gene_sets and gene_sets.lower() != "none":
        gpc = metrics.pathway_coherence(p[ok], t[ok], gene_sets=gene_sets, min_genes=2)
        gpc.to_csv(out_dir / "gpc.csv")
        scored = gpc["gpc"].dropna()
        gpc_info = {"n_pathways_scored": int(scored.size),
                    "median_gpc": float(scored.median()) if scored.size else None}
    files = sorted(str(f.name) for f in out_dir.iterdir())
    if figures:
        files += _compare_figures(p[ok], t[ok], table, out_dir)
    if explorer is not None:
        explore = getattr(__import__("histoexpr.pl", fromlist=["pl"]), "explore", None)
        if explore is None:
            click.echo("warning: histoexpr.pl.explore is not available in this version; --explorer skipped", err=True)
        else:
            explore(p, t, path=explorer)
            files.append(str(explorer))
    headline = {
        "n_genes": len(genes), "n_tiles": int(ok.sum()),
        "median_pearson_r": float(np.nanmedian(table["pearson_r"])) if len(table) else None,
        "median_emd": float(np.nanmedian(table["emd"])) if emd and table["emd"].notna().any() else None,
        **({"gpc": gpc_info} if gpc_info else {}),
    }
    rec_uns: dict = {}
    _record(rec_uns, "compare", params)
    summary_file.write_text(json.dumps({"record": rec_uns["histoexpr"]["cli"]["compare"], "headline": headline},
                                       indent=2, default=_json_default))
    return {"steps": [_step_result("compare", "done", out=str(out_dir), measured_table=truth_key,
                                   files=sorted(set(files)), **headline)]}


def _measured_on_tiles(sdata, measured_key: str, pred, *, k: int, log1p: bool, median_filter: bool):
    """Measured expression on the prediction tiles (a copy; nothing in the store is changed)."""
    import anndata as ad
    import numpy as np
    import scipy.sparse as sps

    from . import pp

    measured = sdata.tables[measured_key]
    region = measured.uns.get("spatialdata_attrs", {}).get("region")
    pred_region = pred.uns.get("spatialdata_attrs", {}).get("region")
    if region == pred_region and "tile_id" in measured.obs:
        truth = measured[measured.obs["tile_id"].astype(str).isin(pred.obs["tile_id"].astype(str))].copy()
        truth.obs_names = truth.obs["tile_id"].astype(str).values
        truth = truth[pred.obs["tile_id"].astype(str).values].copy()
        if log1p:
            truth.X = np.log1p(truth.X.toarray() if sps.issparse(truth.X) else truth.X)
        return truth
    if "spatial" not in measured.obsm:
        raise StepError(f"measured table {measured_key!r} has no obsm['spatial'] cell/spot positions")
    if isinstance(region, list):
        region = region[0] if len(region) == 1 else None
    xy = np.asarray(measured.obsm["spatial"], dtype=np.float64)[:, :2]
    xy_px = _to_image_px(sdata, pred, region, xy)
    m = ad.AnnData(X=measured.X, var=measured.var.copy(), obs=measured.obs[[]].copy())
    m.obsm["spatial"] = xy_px
    tiles = ad.AnnData(obs=pred.obs.copy())
    tiles.obsm["spatial"] = np.asarray(pred.obsm["spatial"])
    tiles.uns["histoexpr"] = dict(pred.uns.get("histoexpr", {}))
    if "spatial" in pred.uns:
        tiles.uns["spatial"] = pred.uns["spatial"]
    truth = pp.map_measured_to_tiles(m, tiles, k=min(k, m.n_obs), median_filter=median_filter)
    if log1p:
        truth.X = np.log1p(np.asarray(truth.X, dtype=np.float32))
    return truth


def _to_image_px(sdata, pred, region, xy):
    """Positions given in ``region``'s coordinates → level-0 pixels of the tiles' image."""
    import numpy as np
    from spatialdata.transformations import get_transformation

    info = pred.uns.get("histoexpr", {})
    image_key = info.get("image_key")
    if region is None or image_key is None or image_key not in sdata.images:
        return xy  # a slide-file store: positions are taken to be slide pixels already
    elements = {**dict(sdata.shapes), **dict(sdata.points)}
    if region not in elements:
        return xy
    t_el = get_transformation(elements[region], get_all=True) or {}
    t_img = get_transformation(sdata.images[image_key], get_all=True) or {}
    common = [cs for cs in t_img if cs in t_el]
    if not common:
        raise StepError(f"the measured positions ({region!r}) and the image {image_key!r} share no coordinate system")
    cs = "global" if "global" in common else common[0]
    axes = ("x", "y")
    m_img = np.asarray(t_img[cs].to_affine_matrix(input_axes=axes, output_axes=axes), dtype=float)
    m_el = np.asarray(t_el[cs].to_affine_matrix(input_axes=axes, output_axes=axes), dtype=float)
    m = np.linalg.solve(m_img, m_el)
    h = np.column_stack([xy, np.ones(len(xy))])
    return (h @ m.T)[:, :2]


def _compare_figures(pred, truth, table, out_dir: Path) -> list[str]:
    import matplotlib.pyplot as plt

    from . import pl

    files = []
    best = list(table["pearson_r"].sort_values(ascending=False).dropna().index[:3])
    if best:
        fig = pl.spatial_compare(pred, truth, best)
        fig.savefig(out_dir / "spatial_compare.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        files.append("spatial_compare.png")
    ax = pl.gene_correlations({"predicted": (table["pearson_r"].to_numpy(), table["pearson_p"].to_numpy())})
    ax.figure.savefig(out_dir / "gene_correlations.png", dpi=100, bbox_inches="tight")
    plt.close(ax.figure)
    files.append("gene_correlations.png")
    return files


# ---------------------------------------------------------------------------- cohort
@main.command(context_settings=_CONTEXT)
@click.argument("manifest", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--encoder", default="hed_stats", show_default=True)
@click.option("--weights", default=None)
@click.option("--tile-size", type=int, default=256, show_default=True)
@click.option("--mpp", type=float, default=0.5, show_default=True, help="µm/px the tiles are cut at.")
@click.option("--max-tiles", type=int, default=None)
@click.option("--tissue-threshold", type=float, default=0.2, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["h5ad", "zarr"]), default="h5ad", show_default=True)
@click.option("--scheduler-address", default=None, help="Dask scheduler (tcp://host:8786): run slides as Dask tasks.")
@click.option("--local-cluster", type=int, default=None, metavar="N",
              help="Start a local Dask cluster of N single-threaded workers.")
@click.option("--fail-fast", is_flag=True, help="Stop at the first failing slide (default: record and go on).")
@click.option("--overwrite", is_flag=True, help="Redo slides whose output exists.")
@_common
def cohort(manifest: Path, out_dir: Path, encoder, weights, tile_size, mpp, max_tiles, tissue_threshold, fmt,
           scheduler_address, local_cluster, fail_fast, overwrite, num_workers) -> dict:
    """Tile and featurise every slide of a manifest CSV; one file per slide, resumable.

    MANIFEST has a column 'slide' (path; relative paths are relative to the manifest) and optional
    'slide_id' and 'mpp' (µm/px of slides without it in their metadata). Finished slides are
    skipped. Writes OUT/<slide_id>.h5ad and OUT/cohort_summary.csv.

    \b
    Example:
      histoexpr cohort slides.csv --out features/ --encoder hed_stats
      histoexpr cohort slides.csv --out features/ --local-cluster 4
      histoexpr cohort slides.csv --out /shared/features --scheduler-address tcp://head:8786
    """
    import pandas as pd

    from . import pp

    if not manifest.is_file():
        raise StepError(f"manifest {manifest} does not exist")
    table = pd.read_csv(manifest)
    if "slide" not in table.columns:
        raise StepError(f"manifest {manifest} needs a column 'slide' (columns: {list(table.columns)})")
    if scheduler_address and local_cluster:
        raise StepError("pass either --scheduler-address or --local-cluster, not both")
    base = manifest.resolve().parent
    paths = [str(p if Path(p).is_absolute() else base / p) for p in table["slide"].astype(str)]
    ids = (table["slide_id"].astype(str).tolist() if "slide_id" in table.columns
           else [Path(p).name.split(".")[0] for p in paths])
    if len(set(ids)) != len(ids):
        raise StepError("slide ids in the manifest are not unique; add a unique 'slide_id' column")
    slides = dict(zip(ids, paths))
    mpps = None
    if "mpp" in table.columns:
        mpps = {i: float(v) for i, v in zip(ids, table["mpp"]) if pd.notna(v)}
    tile_kwargs = {"tile_size": tile_size, "mpp": mpp, "max_tiles": max_tiles, "tissue_threshold": tissue_threshold}
    client = cluster = None
    try:
        if scheduler_address or local_cluster:
            from dask.distributed import Client, LocalCluster

            if local_cluster:
                cluster = LocalCluster(n_workers=local_cluster, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
                client = Client(cluster)
            else:
                client = Client(scheduler_address)
        summary = pp.extract_features_cohort(
            slides, out_dir=out_dir, encoder=encoder, weights=weights, mpp=mpps, tile_kwargs=tile_kwargs,
            num_workers=num_workers, format=fmt, overwrite=overwrite, errors="raise" if fail_fast else "warn",
            client=client)
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    summary.to_csv(out_dir / "cohort_summary.csv", index=False)
    rows = summary.replace({float("nan"): None}).to_dict(orient="records")
    n_failed = int((summary["status"] == "failed").sum())
    result = {"steps": [{"step": f"slide {r['slide_id']}", **r} for r in rows],
              "n_slides": len(rows), "n_done": int((summary["status"] == "done").sum()),
              "n_skipped": int((summary["status"] == "skipped").sum()), "n_failed": n_failed,
              "scheduler": scheduler_address or (f"LocalCluster({local_cluster})" if local_cluster else "local")}
    if n_failed:
        result["status"] = "partial"
    return result


if __name__ == "__main__":  # pragma: no cover
    main()
