"""The main job, end to end, on the built-in real demo dataset.

``python -m histoexpr.demo --out demo_output`` (what ``nox -s demo`` runs):

1. load the bundled legacy-ST mouse olfactory bulb section (H&E + measured counts, STUtility, MIT),
2. open the H&E with its physical scale, detect tissue, cut tiles centred on the measured spots,
3. extract features with the offline, weight-free ``hed_stats`` encoder (no model hub is reachable
   here; with UNI weights pass ``--encoder uni --weights <dir>``),
4. split the section into three spatial stripes (train / validation / test), train the
   HistoPrism-style direct model on the training stripe, predict the held-out stripe,
5. compare predicted with measured expression on the held-out spots: per-gene Pearson r against a
   ridge probe on the same features (StandardScaler → PCA → Ridge), exact EMD, Leiden clusters
   (AMI / ARI), and plots,
6. write everything as files and as a SpatialData zarr (image, tile polygons, prediction table).

The numbers are whatever they are: one small section, low-resolution H&E (~4.4 µm/px), a
hand-crafted encoder. They show the workflow, not the accuracy of a foundation model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

import histoexpr as hx

#: Tiles at SEQUOIA's physical scale would be 256 px at 0.5 µm/px; ST spots are 100 µm across.
TILE_SIZE, TILE_MPP = 224, 0.5


def _stripes(x: np.ndarray, names=("train", "val", "test")) -> np.ndarray:
    """Three vertical stripes of equal spot count: left = train, middle = val, right = test."""
    edges = np.quantile(x, [1 / 3, 2 / 3])
    return np.asarray(names)[np.searchsorted(edges, x, side="right")]


def _ridge_probe(x_train, y_train, x_test, *, seed: int = 0) -> np.ndarray:
    """HEST-benchmark linear probe: StandardScaler → PCA (≤ 256) → Ridge."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_comp = min(256, x_train.shape[0] - 1, x_train.shape[1])
    probe = make_pipeline(StandardScaler(), PCA(n_components=n_comp, random_state=seed), Ridge(alpha=1.0))
    return probe.fit(x_train, y_train).predict(x_test)


def _write_spatialdata(path: Path, slide, tiles, predictions) -> None:
    import spatialdata as sd
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    w, h = slide.dimensions
    image = np.moveaxis(slide.read_region((0, 0), 0, (w, h)), -1, 0)
    element = Image2DModel.parse(
        image, dims=("c", "y", "x"), scale_factors=[2, 2],
        transformations={"global": Scale([slide.mpp, slide.mpp], axes=("y", "x"))},  # global in µm
    )
    sdata = sd.SpatialData(images={"he": element})
    sdata.write(path, overwrite=True)
    shapes_key, _ = hx.io.add_tiles_to_spatialdata(sdata, tiles, image_key="he")
    hx.io.add_table(sdata, predictions, name="histoprism_predictions", region=shapes_key)


def comparison_figure(pred, truth, per_gene: pd.DataFrame, *, n: int = 3, model: str = "histoprism"):
    """The demo's ``spatial_compare.png``: the ``n`` best-predicted genes, metrics taken from ``per_gene``."""
    best = list(per_gene[f"r_{model}"].sort_values(ascending=False).index[:n])
    metrics = per_gene.rename(columns={f"r_{model}": "r", f"emd_{model}": "emd"})
    symbols = "symbol" if "symbol" in pred.var.columns else None
    return hx.pl.spatial_compare(pred, truth, best, emd=metrics, r=metrics, gene_symbols=symbols)


def run(out: str | Path = "demo_output", *, encoder: str = "hed_stats", weights: str | None = None,
        n_genes: int = 100, epochs: int = 2000, seed: int = 0) -> dict:
    """Run the demo and return its summary (also written to ``<out>/summary.json``).

    The figures are drawn with whatever matplotlib backend is active (``nox -s demo`` sets
    ``MPLBACKEND=Agg``); the demo never selects one.
    """
    import anndata as ad
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    # 1–2. data, slide, tissue, tiles on the measured spots
    spots = hx.datasets.mouse_olfactory_bulb()
    info = spots.uns["histoexpr"]
    slide = hx.io.open_slide(info["slide_path"], mpp=info["slide_mpp"])
    tissue = hx.pp.detect_tissue(slide)
    tiles = hx.pp.tiles_from_centers(slide, spots.obsm["spatial"], tile_size=TILE_SIZE, mpp=TILE_MPP,
                                     tile_ids=list(spots.obs_names), tissue=tissue, allow_partial=True)
    # 3. features
    hx.pp.extract_features(tiles, slide, encoder=encoder, weights=weights, progress=False, num_workers=0)
    rep = tiles.uns["histoexpr"]["feature_key"]  # e.g. "X_hed_stats"; names like "hf-hub:org/x" are sanitised

    # 4. split, gene panel, training
    split = _stripes(tiles.obsm["spatial"][:, 0])
    spots = spots.copy()
    spots.obsm[rep] = tiles.obsm[rep]
    spots.obs["slide_id"] = pd.Categorical(["MOB1_" + s for s in split])
    train_mask, test_mask = split == "train", split == "test"
    counts = spots.X.toarray() if hasattr(spots.X, "toarray") else np.asarray(spots.X)
    log_counts = np.log1p(counts)
    # stated rule: the n_genes genes with the highest mean log1p count on the training spots
    panel = list(spots.var_names[np.argsort(-log_counts[train_mask].mean(0), kind="stable")[:n_genes]])
    fit = hx.tl.train_spatial(spots, use_rep=rep, genes=panel, train=["MOB1_train"], val=["MOB1_val"],
                              test=["MOB1_test"], max_epochs=epochs, patience=30, random_state=seed,
                              model_kwargs={"dropout": 0.1})
    model = fit.model

    # 5. predict the held-out stripe and compare with the measurements
    test_tiles = tiles[test_mask].copy()
    test_tiles.obs["slide_id"] = "MOB1_test"
    pred = hx.tl.predict_spatial(test_tiles, model, method="direct", use_rep=rep)
    gene_idx = spots.var_names.get_indexer(panel)
    truth = ad.AnnData(X=log_counts[test_mask][:, gene_idx].astype(np.float32), obs=pred.obs.copy(),
                       var=pd.DataFrame(index=panel), uns={"spatial": pred.uns.get("spatial", {})})
    truth.obsm["spatial"] = pred.obsm["spatial"]
    ridge = _ridge_probe(spots.obsm[rep][train_mask], log_counts[train_mask][:, gene_idx],
                         spots.obsm[rep][test_mask], seed=seed)
    r_model, p_model = hx.metrics.pearson(pred[:, panel].X, truth.X)
    r_ridge, p_ridge = hx.metrics.pearson(ridge, truth.X)
    per_gene = pd.DataFrame({"r_histoprism": r_model, "p_histoprism": p_model, "r_ridge": r_ridge,
                             "p_ridge": p_ridge}, index=panel)
    emd = hx.metrics.emd(pred[:, panel], truth)
    per_gene = per_gene.join(emd[["emd"]].rename(columns={"emd": "emd_histoprism"}))
    per_gene.to_csv(out / "per_gene_metrics.csv")

    hx.tl.leiden(truth, resolution=0.5, method="gauss", key_added="leiden_measured")
    pred_panel = pred[:, panel].copy()
    hx.tl.leiden(pred_panel, resolution=0.5, method="gauss", key_added="leiden_predicted")
    agreement = hx.metrics.cluster_agreement(truth.obs["leiden_measured"], pred_panel.obs["leiden_predicted"])

    # plots
    fig = comparison_figure(pred_panel, truth, per_gene)
    fig.savefig(out / "spatial_compare.png", dpi=100)
    plt.close(fig)
    explorer_metrics = per_gene.rename(columns={"r_histoprism": "r", "emd_histoprism": "emd"})
    explorer_metrics = explorer_metrics[["r", "p_histoprism", "emd", "r_ridge"]].sort_values("r", ascending=False)
    hx.pl.explore(pred_panel, truth, metrics=explorer_metrics, path=out / "explorer.html",
                  title="histoexpr demo: mouse olfactory bulb, held-out stripe")
    ax = hx.pl.gene_correlations({"HistoPrism": (r_model, p_model), "ridge probe": (r_ridge, p_ridge)})
    ax.figure.savefig(out / "gene_correlations.png", dpi=100, bbox_inches="tight")
    plt.close(ax.figure)

    # 6. outputs
    pred.write_h5ad(out / "predictions_test.h5ad")
    _write_spatialdata(out / "demo.zarr", slide, test_tiles, pred)
    summary = {
        "dataset": "mouse olfactory bulb, legacy ST (STUtility MOB1, MIT), built in",
        "slide_mpp": slide.mpp,
        "n_spots": int(spots.n_obs),
        "split_spots": {k: int((split == k).sum()) for k in ("train", "val", "test")},
        "split_rule": "three vertical stripes of equal spot count: left train, middle val, right test",
        "gene_panel_rule": f"top {n_genes} genes by mean log1p count on the training spots",
        "encoder": encoder,
        "encoder_weights": tiles.uns["histoexpr"].get("encoder_weights"),
        "epochs_run": fit.epochs_run,
        "best_epoch": fit.best_epoch,
        "median_r_histoprism": float(np.nanmedian(r_model)),
        "median_r_ridge": float(np.nanmedian(r_ridge)),
        "mean_r_histoprism": float(np.nanmean(r_model)),
        "mean_r_ridge": float(np.nanmean(r_ridge)),
        "n_genes_p_lt_0.05_histoprism": int(np.sum(p_model < 0.05)),
        "n_genes_p_lt_0.05_ridge": int(np.sum(p_ridge < 0.05)),
        "median_emd_histoprism": float(np.nanmedian(per_gene["emd_histoprism"])),
        "leiden_ami": float(agreement["ami"]),
        "leiden_ari": float(agreement["ari"]),
        "runtime_s": round(time.perf_counter() - start, 1),
        "outputs": sorted(p.name for p in out.iterdir()),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m histoexpr.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_output", help="output folder")
    parser.add_argument("--encoder", default="hed_stats", help="encoder name (default: offline hed_stats)")
    parser.add_argument("--weights", default=None, help="encoder weights (file/folder/hf-hub:)")
    parser.add_argument("--genes", type=int, default=100, help="size of the gene panel")
    parser.add_argument("--epochs", type=int, default=2000, help="cap; early stopping on the validation stripe (patience 30) decides")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = run(args.out, encoder=args.encoder, weights=args.weights, n_genes=args.genes,
                  epochs=args.epochs, seed=args.seed)
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
