"""The ``histoexpr`` command line, run for real in subprocesses on real data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import copy_writable

SRC = Path(__file__).resolve().parents[1] / "src"
XENIUM = "xenium_segtraq/tests/data/xenium_sp_subset.zarr"


def hx_cli(*args, cwd, check=True, timeout=600):
    """Run ``histoexpr ARGS`` (as ``python -m histoexpr.cli``, the entry point's target)."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-m", "histoexpr.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"histoexpr {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def run_json(*args, cwd):
    proc = hx_cli(*args, "--json", "-", cwd=cwd)
    return json.loads(proc.stdout)


def statuses(summary) -> list[str]:
    return [s["status"] for s in summary["steps"]]


@pytest.fixture(scope="module")
def xenium_pipeline(tmp_path_factory, shared_data):
    """tile → features → predict-spatial → compare on a copy of the real Xenium store."""
    import histoexpr as hx

    work = tmp_path_factory.mktemp("cli_xenium")
    store = copy_writable(shared_data / XENIUM, work / "xenium.zarr")
    # a tiny HistoPrism checkpoint made with the library's own save_pretrained
    import torch

    sdata = hx.io.read_xenium(store)
    genes = list(sdata.tables["table"].var_names[:12])
    torch.manual_seed(0)
    model = hx.models.HistoPrism(input_dim=103, num_outputs=len(genes), hidden_dim=16, depth=1, nheads=2,
                                 dim_feedforward=32)
    model.genes = genes
    model.save_pretrained(work / "ckpt")
    steps = [
        ("tile", store, "--tile-size", 32, "--mpp", 0.5, "--tissue-threshold", 0, "--no-contrast-filter"),
        ("features", store, "--encoder", "hed_stats"),
        ("predict-spatial", store, "--model", work / "ckpt"),
        ("compare", store, "--out", work / "results", "--no-figures"),
    ]
    first = [run_json(*s, cwd=work) for s in steps]
    again = [run_json(*s, cwd=work) for s in steps]
    return {"work": work, "store": store, "first": first, "again": again, "genes": genes}


def test_pipeline_runs_and_store_reads_back(xenium_pipeline):
    import spatialdata as sd

    first = xenium_pipeline["first"]
    assert [statuses(s) for s in first] == [["done"]] * 4
    sdata = sd.read_zarr(xenium_pipeline["store"])
    tiles = sdata.tables["he_image_tiles_table"]
    assert tiles.obsm["X_hed_stats"].shape == (tiles.n_obs, 103)
    pred = sdata.tables["predictions"]
    attrs = pred.uns["spatialdata_attrs"]
    assert attrs["region"] == "he_image_tiles"  # predictions annotate the tile polygons
    assert set(pred.obs["tile_id"].astype(str)) <= set(sdata.shapes["he_image_tiles"].index.astype(str))
    assert pred.n_obs == tiles.n_obs and list(pred.var_names) == xenium_pipeline["genes"]
    # the original Xenium elements are untouched
    assert {"table", "transcripts", "cell_circles"} <= set(sdata.tables) | set(sdata.points) | set(sdata.shapes)
    measured = sdata.tables["predictions_measured"]
    # cells were placed on the H&E: every tile has a cell within a couple of tiles' width
    assert float(measured.obs["nearest_spot_distance"].max()) < 3 * tiles.uns["histoexpr"]["tile_size_level0"]


def test_compare_outputs(xenium_pipeline):
    import pandas as pd

    res = xenium_pipeline["work"] / "results"
    table = pd.read_csv(res / "per_gene_metrics.csv", index_col=0)
    assert list(table.index) == xenium_pipeline["genes"]
    assert {"pearson_r", "spearman_rho", "rmse", "emd"} <= set(table.columns)
    assert table["pearson_r"].dropna().between(-1, 1).all() and table["pearson_r"].notna().sum() >= 8
    assert json.loads((res / "per_gene_metrics.json").read_text())[0]["gene"] == xenium_pipeline["genes"][0]
    assert (res / "gpc.csv").is_file()
    headline = xenium_pipeline["first"][3]["steps"][0]
    assert headline["n_genes"] == len(xenium_pipeline["genes"]) and headline["n_tiles"] > 50


def test_rerun_skips_every_finished_step(xenium_pipeline):
    assert [statuses(s) for s in xenium_pipeline["again"]] == [["skipped"]] * 4


def test_changed_parameters_need_overwrite(xenium_pipeline):
    work, store = xenium_pipeline["work"], xenium_pipeline["store"]
    proc = hx_cli("tile", store, "--tile-size", 48, cwd=work, check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--overwrite" in lines[0]


def test_info_reports_the_store(xenium_pipeline):
    summary = run_json("info", xenium_pipeline["store"], cwd=xenium_pipeline["work"])
    assert summary["images"]["he_image"]["mpp"] == pytest.approx(0.3639, abs=1e-3)
    tiles = summary["tiles"]["he_image_tiles_table"]
    assert tiles["features"] == {"X_hed_stats": [tiles["n_obs"], 103]}
    assert tiles["steps"] == ["features", "tile"]
    assert summary["predictions"]["predictions"]["method"] == "direct"


@pytest.mark.parametrize(
    "args, needle",
    [
        (("compare", "missing.zarr", "--out", "r"), "does not exist"),
        (("predict-spatial", "STORE", "--model", "no_such_ckpt", "--key-added", "p2"), "no_such_ckpt"),
        (("features", "STORE", "--encoder", "no_such_encoder", "--overwrite"), "no_such_encoder"),
        (("cohort", "missing.csv", "--out", "o"), "manifest"),
    ],
)
def test_errors_are_one_line_and_nonzero(xenium_pipeline, args, needle):
    args = [xenium_pipeline["store"] if a == "STORE" else a for a in args]
    proc = hx_cli(*args, cwd=xenium_pipeline["work"], check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and needle in lines[0]
    assert "Traceback" not in proc.stderr


def test_debug_shows_traceback(tmp_path):
    proc = hx_cli("compare", "missing.zarr", "--out", "r", "--debug", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" in proc.stderr


def test_help_lists_subcommands_and_examples(tmp_path):
    proc = hx_cli("--help", cwd=tmp_path)
    for cmd in ("info", "tile", "features", "predict-bulk", "predict-spatial", "fuse-xenium", "compare", "cohort"):
        assert cmd in proc.stdout
        sub = hx_cli(cmd, "--help", cwd=tmp_path)
        assert "Example" in sub.stdout and "--json" in sub.stdout and "--threads" in sub.stdout


def test_help_does_not_import_heavy_libraries(tmp_path):
    code = ("import sys; from histoexpr import cli; "
            "print(sorted(m for m in ('torch', 'spatialdata', 'scanpy', 'anndata') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_slide_file_to_store_and_bulk(shared_data, tmp_path):
    """A real slide file: tile into a new store, features read from the slide, bulk prediction."""
    import anndata as ad
    import spatialdata as sd
    import torch

    import histoexpr as hx

    slide = shared_data / "slides" / "cmu-1-small-region.svs"
    store = tmp_path / "cmu.zarr"
    s1 = run_json("tile", slide, "--out", store, "--tile-size", 256, "--mpp", 1.0, cwd=tmp_path)
    s2 = run_json("features", store, "--num-workers", 0, cwd=tmp_path)
    assert statuses(s1) == ["done"] and statuses(s2) == ["done"]
    torch.manual_seed(0)
    model = hx.models.Sequoia(input_dim=103, num_clusters=4, num_outputs=5, depth=1, nheads=2,
                              dimensions_f=8, dimensions_s=8, dimensions_c=8)
    model.genes = [f"G{i}" for i in range(5)]
    model.save_pretrained(tmp_path / "bulk")
    s3 = run_json("predict-bulk", store, "--model", tmp_path / "bulk", "--out", tmp_path / "bulk.csv", cwd=tmp_path)
    assert statuses(s3) == ["done"] and s3["steps"][0]["n_genes"] == 5
    sdata = sd.read_zarr(store)
    tiles = sdata.tables["cmu-1-small-region_tiles_table"]
    assert tiles.obsm["X_hed_stats"].shape[1] == 103
    assert sdata.tables["bulk_predictions"].shape == (1, 5)
    assert (tmp_path / "bulk.csv").is_file()
    # the same features as the library computes directly
    direct = ad.AnnData(obs=tiles.obs[["x0", "y0"]].copy(), uns={"histoexpr": dict(tiles.uns["histoexpr"])})
    hx.pp.extract_features(direct, str(slide), encoder="hed_stats", num_workers=0, progress=False)
    import numpy as np

    np.testing.assert_allclose(tiles.obsm["X_hed_stats"], direct.obsm["X_hed_stats"], rtol=1e-5, atol=1e-6)
    again = run_json("predict-bulk", store, "--model", tmp_path / "bulk", cwd=tmp_path)
    assert statuses(again) == ["skipped"]


def test_cohort_is_resumable(shared_data, tmp_path):
    import anndata as ad

    slides = shared_data / "slides"
    manifest = tmp_path / "slides.csv"
    manifest.write_text(f"slide,slide_id\n{slides / 'cmu-1-small-region.svs'},cmu\n{tmp_path / 'missing.svs'},gone\n")
    proc = hx_cli("cohort", manifest, "--out", tmp_path / "feat", "--tile-size", 256, "--mpp", 1.0,
                  "--num-workers", 0, "--json", tmp_path / "c1.json", cwd=tmp_path, check=False)
    assert proc.returncode == 1  # one slide failed: recorded, the others done
    s1 = json.loads((tmp_path / "c1.json").read_text())
    assert [s["status"] for s in s1["steps"]] == ["done", "failed"]
    assert ad.read_h5ad(tmp_path / "feat" / "cmu.h5ad").obsm["X_hed_stats"].shape[1] == 103
    manifest.write_text(f"slide,slide_id\n{slides / 'cmu-1-small-region.svs'},cmu\n")
    s2 = run_json("cohort", manifest, "--out", tmp_path / "feat", "--tile-size", 256, "--mpp", 1.0, cwd=tmp_path)
    assert [s["status"] for s in s2["steps"]] == ["skipped"]


def test_fuse_xenium(shared_data, tmp_path):
    """fuse-xenium with a (tiny, untrained) expression-only fusion model saved with torch.save."""
    import spatialdata as sd
    import torch

    import histoexpr as hx
    from histoexpr.pp._xenium import _panel_genes

    store = copy_writable(shared_data / XENIUM, tmp_path / "xenium.zarr")
    genes = _panel_genes(hx.io.read_xenium(store).points["transcripts"], "feature_name")
    core, addon = genes[:20], genes[20:25]
    torch.manual_seed(0)
    model = hx.models.ExpressionMLP(n_core_genes=len(core), n_targets=len(addon))
    model.core_genes, model.target_genes = core, addon
    torch.save(model, tmp_path / "fusion.pt")
    s1 = run_json("fuse-xenium", store, "--model", tmp_path / "fusion.pt", "--crop-size", 64, cwd=tmp_path)
    assert statuses(s1) == ["done"] and s1["steps"][0]["n_genes"] == 5 and s1["steps"][0]["n_crops"] > 4
    table = sd.read_zarr(store).tables["fusion_table"]
    assert list(table.var_names) == addon and "X_fusion" in table.obsm
    assert table.uns["spatialdata_attrs"]["region"] == "fusion_crops"
    s2 = run_json("fuse-xenium", store, "--model", tmp_path / "fusion.pt", "--crop-size", 64, cwd=tmp_path)
    assert statuses(s2) == ["skipped"]
