"""Crash safety of writes into SpatialData stores (issue: never lose or corrupt a user's data).

The writer runs in a subprocess on a copy of the real Xenium store, in zarr v2 (as shipped) and in
zarr v3 with consolidated metadata, and is killed with SIGKILL at each named step of the write
(``HISTOEXPR_CRASH_AT``) or after a timed delay. After each kill:

* ``spatialdata.read_zarr`` opens the store as it is (no cleanup), and again after ``recover_store``;
* every element that was in the store before is byte-identical;
* the written element is absent or whole (equal to what was written); on overwrite it is the old or
  the new version, whole; after recovery the staging folder is gone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from _store_crash_worker import (
    IMAGE,
    TABLE,
    XENIUM,
    hash_elements,
    make_image,
    make_table,
    write,
    written_state,
)
from conftest import copy_writable

import histoexpr as hx
from histoexpr.io import _store

WORKER = Path(__file__).with_name("_store_crash_worker.py")
SRC = Path(hx.__file__).resolve().parents[1]
MODES = ("new_table", "overwrite_table", "new_image")
#: named steps of a write, in order; every one is a kill point
STEPS = ("begin", "stage_root", "staged", "journaled", "renamed", "committed", "consolidated", "cleaned")
#: steps of an overwrite (atomic exchange), and of the fallback (move the old aside, then rename)
OVERWRITE_STEPS = ("begin", "stage_root", "staged", "journaled", "exchanged", "committed", "consolidated", "cleaned")
FALLBACK_STEPS = ("unlisted", "old_aside", "renamed")
#: where trial counts are recorded (read by docs/data_safety.md's numbers)
COUNTS = Path(os.environ.get("HISTOEXPR_CRASH_COUNTS", "")
              or Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "store_crash_trials.json")


def _quiet():
    warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="module")
def stores(shared_data, tmp_path_factory):
    """Pristine writable copies of the Xenium store: zarr v2 as shipped, and a consolidated zarr v3 copy."""
    import spatialdata as sd

    base = tmp_path_factory.mktemp("stores")
    v2 = copy_writable(shared_data / XENIUM, base / "v2.zarr")
    with warnings.catch_warnings():
        _quiet()
        sd.read_zarr(v2).write(base / "v3.zarr")  # default: zarr v3, consolidated metadata
    info = _store.store_info(base / "v3.zarr")
    assert info.zarr_format == 3 and info.consolidated
    assert _store.store_info(v2).zarr_format == 2
    return {"v2": v2, "v3": base / "v3.zarr"}


def _prepare(stores, fmt: str, mode: str, dst: Path) -> Path:
    shutil.copytree(stores[fmt], dst)
    if mode == "overwrite_table":
        with warnings.catch_warnings():
            _quiet()
            write(str(dst), "overwrite_table", version=1)  # the old version, written without a crash
    return dst


def _run_worker(store: Path, mode: str, *, env: dict | None = None, kill_after: float | None = None):
    e = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
         "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, str(WORKER), str(store), mode], env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if kill_after is not None:
        assert proc.stdout.readline().strip() == "READY"
        time.sleep(kill_after)
        proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def _check_after_crash(store: Path, mode: str, before: dict, exclude: tuple[str, ...], *,
                       gap: bool = False) -> dict:
    """The checks every trial must pass; returns what the store held before/after recovery."""
    import spatialdata as sd

    with warnings.catch_warnings():
        _quiet()
        # 1. opens as it is, with no cleanup, and the element is absent/old/new and whole
        plain = written_state(store, mode, sd.read_zarr(store))
        # 2. recovery, then it opens again
        report = hx.io.recover_store(store)
        recovered = written_state(store, mode, sd.read_zarr(store))
    assert not (store / _store.STAGING_DIR).exists(), "recover_store left the staging folder"
    # 3. every pre-existing element byte-identical
    after = hash_elements(store, exclude=exclude)
    assert {k: before[k] for k in before} == {k: after.get(k) for k in before}
    if mode == "overwrite_table":
        # ``gap``: the two-rename fallback killed between its renames; documented: the name is missing
        # for a plain read until recovery puts the new version in place
        assert plain in (("v1", "v2", "absent") if gap else ("v1", "v2")) and recovered in ("v1", "v2")
    else:
        assert plain in ("absent", "v2") and recovered in ("absent", "v2")
    return {"plain": plain, "recovered": recovered, "report": report}


def _trial(stores, tmp_path, fmt, mode, *, step=None, kill_after=None, env=None):
    store = _prepare(stores, fmt, mode, tmp_path / f"{fmt}-{mode}-{step or kill_after}.zarr")
    element = f"tables/{TABLE}" if "table" in mode else f"images/{IMAGE}"
    before = hash_elements(store, exclude=(element,))
    env = dict(env or {})
    if step is not None:
        env[_store.CRASH_ENV] = step
    rc, out, err = _run_worker(store, mode, env=env, kill_after=kill_after)
    if step is not None:
        assert rc == -signal.SIGKILL, f"the writer was not killed at {step!r} (rc={rc}): {err[-2000:]}"
    else:
        assert rc in (0, -signal.SIGKILL), err[-2000:]
    gap = step in FALLBACK_STEPS and env.get(_store.NO_EXCHANGE_ENV) == "1"
    result = _check_after_crash(store, mode, before, exclude=(element,), gap=gap)
    result["killed"] = rc == -signal.SIGKILL
    shutil.rmtree(store)
    return result


def _record(key: str, results: list[dict]) -> None:
    COUNTS.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(COUNTS.read_text()) if COUNTS.exists() else {}
    data[key] = {
        "trials": len(results),
        "killed": sum(r["killed"] for r in results),
        "passed": len(results),  # a failing trial fails the test before this point
        "plain_read_states": sorted({r["plain"] for r in results}),
        "after_recovery_states": sorted({r["recovered"] for r in results}),
    }
    COUNTS.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(key, data[key])


# ------------------------------------------------------------------------------------ slow tier
@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["v2", "v3"])
@pytest.mark.parametrize("mode", MODES)
def test_kill_at_every_step(stores, tmp_path, fmt, mode):
    steps = OVERWRITE_STEPS if mode == "overwrite_table" else STEPS
    results = [_trial(stores, tmp_path, fmt, mode, step=s) for s in steps]
    if mode == "overwrite_table":  # the two-rename fallback where RENAME_EXCHANGE is unavailable
        results += [_trial(stores, tmp_path, fmt, mode, step=s, env={_store.NO_EXCHANGE_ENV: "1"})
                    for s in FALLBACK_STEPS]
    # killed before the journal: nothing changed; after it: the new version after recovery
    journaled = steps.index("journaled")
    for s, r in zip(steps, results, strict=False):
        expect = "v2" if steps.index(s) >= journaled else ("v1" if mode == "overwrite_table" else "absent")
        assert r["recovered"] == expect, (s, r)
    _record(f"kill_at_step/{fmt}/{mode}", results)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["v2", "v3"])
@pytest.mark.parametrize("mode", MODES)
def test_kill_at_random_times(stores, tmp_path, fmt, mode):
    # how long the write takes after the imports (read + write), then kills spread over that time
    store = _prepare(stores, fmt, mode, tmp_path / "timing.zarr")
    rc, out, err = _run_worker(store, mode)
    assert rc == 0, err[-2000:]
    write_time = float(out.split("DONE")[1].split()[0])
    shutil.rmtree(store)
    delays = np.array([0.25, 0.5, 0.75, 0.9]) * write_time
    results = [_trial(stores, tmp_path, fmt, mode, kill_after=float(d)) for d in delays]
    _record(f"kill_at_random_time/{fmt}/{mode}", results)


# ------------------------------------------------------------------------------------ default tier
def test_fast_kill_after_journal(stores, tmp_path):
    """One real crash in the default tier: killed right after the commit point, rolled forward."""
    r = _trial(stores, tmp_path, "v2", "new_table", step="journaled")
    assert r["plain"] == "absent" and r["recovered"] == "v2"
    assert r["report"]["rolled_forward"] == [f"tables/{TABLE}"]


@pytest.mark.parametrize("fmt", ["v2", "v3"])
@pytest.mark.parametrize("step", ["staged", "journaled", "exchanged", "consolidated"])
def test_exception_mid_write(stores, tmp_path, monkeypatch, fmt, step):
    """An exception at any step leaves the old or the new table, whole, and no staging folder."""
    import spatialdata as sd

    store = _prepare(stores, fmt, "overwrite_table", tmp_path / "s.zarr")
    before = hash_elements(store, exclude=(f"tables/{TABLE}",))

    def boom(at):
        if at == step:
            raise RuntimeError(f"injected at {at}")

    monkeypatch.setattr(_store, "_crash_hook", boom)
    with warnings.catch_warnings():
        _quiet()
        sdata = sd.read_zarr(store, selection=("shapes", "tables"))
        old = sdata.tables[TABLE]
        with pytest.raises(RuntimeError, match="injected"):
            hx.io.add_table(sdata, make_table(sdata, 2), name=TABLE, region="cell_boundaries",
                            instance_key="cell_id", overwrite=True)
        assert sdata.tables[TABLE] is old  # the in-memory object is left as it was, too
        state = written_state(store, "overwrite_table")
    assert not (store / _store.STAGING_DIR).exists()
    assert state == ("v1" if step == "staged" else "v2")
    assert hash_elements(store, exclude=(f"tables/{TABLE}",)) == before


def test_new_image_into_v2_store(stores, tmp_path):
    """Was: format error (zarr v2 vs OME-Zarr 0.5) and a store that no longer opened."""
    import spatialdata as sd

    store = copy_writable(stores["v2"], tmp_path / "s.zarr")
    before = hash_elements(store)
    with warnings.catch_warnings():
        _quiet()
        sdata = sd.read_zarr(store, selection=("shapes",))
        sdata[IMAGE] = make_image()[0]
        report = hx.io.write_element_safely(sdata, IMAGE)
        assert report["element"] == f"images/{IMAGE}" and not report["replaced"]
        assert written_state(store, "new_image", sd.read_zarr(store)) == "v2"
    attrs = json.loads((store / "images" / IMAGE / ".zattrs").read_text())
    assert attrs["multiscales"][0]["version"].startswith("0.4")  # the store's own OME-Zarr version (0.4)
    assert hash_elements(store, exclude=(f"images/{IMAGE}",)) == before


def test_new_image_into_v3_store_keeps_consolidated_metadata(stores, tmp_path):
    import spatialdata as sd

    store = tmp_path / "s.zarr"
    shutil.copytree(stores["v3"], store)
    with warnings.catch_warnings():
        _quiet()
        sdata = sd.read_zarr(store, selection=("shapes",))
        sdata[IMAGE] = make_image()[0]
        hx.io.write_element_safely(sdata, IMAGE)
        assert written_state(store, "new_image") == "v2"
    meta = json.loads((store / "zarr.json").read_text())["consolidated_metadata"]["metadata"]
    assert f"images/{IMAGE}" in meta


def test_overwrite_refused_without_flag(stores, tmp_path):
    import spatialdata as sd

    store = _prepare(stores, "v2", "overwrite_table", tmp_path / "s.zarr")
    before = hash_elements(store)
    with warnings.catch_warnings():
        _quiet()
        sdata = sd.read_zarr(store, selection=("shapes", "tables"))
        with pytest.raises(ValueError, match="overwrite=True"):
            hx.io.add_table(sdata, make_table(sdata, 2), name=TABLE, region="cell_boundaries",
                            instance_key="cell_id")
    assert hash_elements(store) == before


@pytest.mark.parametrize("folder", ["tables", "", ".histoexpr_staging"])
def test_read_only_folders_refused_before_writing(stores, tmp_path, folder):
    import spatialdata as sd

    store = copy_writable(stores["v2"], tmp_path / "s.zarr")
    with warnings.catch_warnings():
        _quiet()
        sdata = sd.read_zarr(store, selection=("shapes", "tables"))
    target = store / folder
    target.mkdir(exist_ok=True)
    before = hash_elements(store)
    target.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="nothing was written"):
            hx.io.add_table(sdata, make_table(sdata, 2), name=TABLE, region="cell_boundaries",
                            instance_key="cell_id")
    finally:
        target.chmod(0o755)
    assert TABLE not in sdata.tables
    assert hash_elements(store) == before
    assert not (store / "tables" / TABLE).exists()


def test_unwritable_format_refused_before_writing(stores, tmp_path):
    import spatialdata as sd

    store = copy_writable(stores["v2"], tmp_path / "s.zarr")
    with warnings.catch_warnings():
        _quiet()
        sdata = sd.read_zarr(store, selection=("shapes", "tables"))
    attrs = json.loads((store / ".zattrs").read_text())
    attrs["spatialdata_attrs"]["version"] = "0.2"  # v3's container format declared on a zarr v2 store
    (store / ".zattrs").write_text(json.dumps(attrs))
    with pytest.raises(hx.io.StoreFormatError, match="sdata|write"):
        hx.io.add_table(sdata, make_table(sdata, 2), name=TABLE, region="cell_boundaries", instance_key="cell_id")
    assert not (store / "tables" / TABLE).exists() and not (store / _store.STAGING_DIR).exists()


def test_recover_store_on_clean_store_does_nothing(stores, tmp_path):
    store = copy_writable(stores["v2"], tmp_path / "s.zarr")
    before = hash_elements(store)
    report = hx.io.recover_store(store)
    assert report["rolled_forward"] == report["rolled_back"] == report["removed"] == []
    assert hash_elements(store) == before


def test_recover_store_removes_unjournaled_staging(stores, tmp_path):
    """A half-written staging folder (no journal) is discarded; the store is untouched."""
    store = copy_writable(stores["v2"], tmp_path / "s.zarr")
    before = hash_elements(store)
    junk = store / _store.STAGING_DIR / "0123" / "store.zarr" / "tables" / TABLE
    junk.mkdir(parents=True)
    (junk / "partial.bin").write_bytes(b"x")
    report = hx.io.recover_store(store)
    assert report["rolled_back"] == ["0123"]
    assert not (store / _store.STAGING_DIR).exists()
    assert hash_elements(store) == before


def test_tile_into_store_key_added_and_overwrite(stores, tmp_path):
    """pp.tile(sdata) refuses existing names unless overwrite=True, and writes under key_added."""
    import spatialdata as sd

    store = copy_writable(stores["v2"], tmp_path / "s.zarr")
    with warnings.catch_warnings():
        _quiet()
        sdata = sd.read_zarr(store, selection=("images", "shapes", "tables"))
        kw = {"image_key": "he_image", "tile_size": 64, "mpp": 1.0, "filter_low_contrast": False}
        tiles = hx.pp.tile(sdata, **kw)
        before = hash_elements(store)
        with pytest.raises(ValueError, match="overwrite=True"):
            hx.pp.tile(sdata, **kw)
        assert hash_elements(store) == before
        other = hx.pp.tile(sdata, key_added="my_tiles", **kw)
        assert other.uns["histoexpr"]["shapes_key"] == "my_tiles"
        assert other.uns["histoexpr"]["table_key"] == "my_tiles_table"
        hx.pp.tile(sdata, overwrite=True, max_tiles=3, **kw)
        back = sd.read_zarr(store, selection=("shapes", "tables"))
    assert len(back.shapes["he_image_tiles"]) == 3 and back.tables["he_image_tiles_table"].n_obs == 3
    assert len(back.shapes["my_tiles"]) == tiles.n_obs
    assert back.tables["my_tiles_table"].uns["spatialdata_attrs"]["region"] == "my_tiles"
    after = hash_elements(store)
    replaced = ("shapes/he_image_tiles", "tables/he_image_tiles_table")
    assert all(after[k] == v for k, v in before.items() if k not in replaced)
    assert not (store / _store.STAGING_DIR).exists()


def test_new_table_into_store_without_tables_group(stores, tmp_path):
    """The whole ``tables`` group is renamed in when the store has none."""
    import spatialdata as sd

    store = copy_writable(stores["v2"], tmp_path / "s.zarr")
    with warnings.catch_warnings():
        _quiet()
        sdata = sd.read_zarr(store, selection=("shapes", "tables"))
        table = make_table(sdata, 2)
        del sdata.tables["table"]
        shutil.rmtree(store / "tables")
        before = hash_elements(store)
        hx.io.add_table(sdata, table, name=TABLE, region="cell_boundaries", instance_key="cell_id")
        back = sd.read_zarr(store, selection=("tables",))
    assert list(back.tables) == [TABLE]
    assert np.array_equal(back.tables[TABLE].X.toarray(), table.X.toarray())
    assert hash_elements(store, exclude=(f"tables/{TABLE}",)) == before


def test_concurrent_writers_are_serialised(stores, tmp_path):
    """Two writers on one store at once: both elements arrive whole, consolidated metadata lists both."""
    from concurrent.futures import ThreadPoolExecutor

    import spatialdata as sd

    store = tmp_path / "s.zarr"
    shutil.copytree(stores["v3"], store)
    with warnings.catch_warnings():
        _quiet()
        sdatas = [sd.read_zarr(store, selection=("shapes", "tables")) for _ in range(2)]
        tables = [make_table(s, 2) for s in sdatas]

        def go(i):
            hx.io.add_table(sdatas[i], tables[i], name=f"{TABLE}{i}", region="cell_boundaries", instance_key="cell_id")

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(go, range(2)))
        back = sd.read_zarr(store, selection=("tables",))
    assert {f"{TABLE}0", f"{TABLE}1"} <= set(back.tables)
    meta = json.loads((store / "zarr.json").read_text())["consolidated_metadata"]["metadata"]
    assert f"tables/{TABLE}0" in meta and f"tables/{TABLE}1" in meta
    assert not (store / _store.STAGING_DIR).exists()


@pytest.mark.parametrize("fmt", ["v2", "v3"])
def test_unlisted_element_is_skipped_by_readers(stores, tmp_path, fmt):
    """The fallback overwrite first unlists the element from consolidated metadata (v2 .zmetadata too)."""
    import spatialdata as sd
    import zarr

    store = copy_writable(stores[fmt], tmp_path / "s.zarr")
    with warnings.catch_warnings():
        _quiet()
        if fmt == "v2":
            zarr.consolidate_metadata(str(store))  # a consolidated zarr v2 store
        assert _store.store_info(store).consolidated
        _store._unlist_from_consolidated(store, "tables/table")
        shutil.rmtree(store / "tables" / "table")  # what the fallback does next: move it aside
        back = sd.read_zarr(store, selection=("shapes", "tables"))
        assert "table" not in back.tables and len(back.shapes) == 3
        hx.io.recover_store(store)


def test_features_find_the_tiles_table_next_to_predictions(shared_data):
    """A prediction table written into sdata carries the tiling too; extract_features still picks the tiles."""
    import anndata as ad
    import pandas as pd
    import spatialdata as sd
    import torch
    from PIL import Image
    from spatialdata.models import Image2DModel

    from histoexpr.models.encoders import get_encoder

    img = np.asarray(Image.open(shared_data / "slides" / "tcga-lung-rgb.png").convert("RGB"))[:512, :512]
    sdata = sd.SpatialData(images={"he": Image2DModel.parse(img.transpose(2, 0, 1), dims=("c", "y", "x"))})
    tiles = hx.pp.tile(sdata, image_key="he", slide_mpp=0.5, tile_size=128, tissue_threshold=0.0,
                       filter_low_contrast=False)
    pred = ad.AnnData(np.ones((tiles.n_obs, 2), np.float32), obs=tiles.obs.copy(),
                      var=pd.DataFrame(index=["G1", "G2"]))
    pred.uns["histoexpr"] = {**tiles.uns["histoexpr"], "model": "test"}
    hx.io.add_table(sdata, pred, name="predictions", region="he_tiles")
    torch.manual_seed(0)
    enc = get_encoder("test_resnet", weights="random")
    hx.pp.extract_features(sdata, encoder=enc, batch_size=4, num_workers=0, progress=False)
    assert sdata.tables["he_tiles_table"].obsm["X_test_resnet"].shape[0] == tiles.n_obs
    assert "X_test_resnet" not in sdata.tables["predictions"].obsm
