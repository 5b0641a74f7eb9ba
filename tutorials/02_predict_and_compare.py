# %% [markdown]
# # Predict expression from H&E and compare with measured spatial transcriptomics
#
# The built-in real dataset: a legacy Spatial Transcriptomics section of the mouse olfactory bulb
# (Ståhl et al. 2016, via STUtility, MIT) — H&E plus measured counts for 1,000 genes.
# This is exactly what `python -m histoexpr.demo` (and `nox -s demo`) runs; see
# `histoexpr/demo.py` for the code, which is short and commented.

# %%
import json

from histoexpr.demo import run

summary = run("demo_output", encoder="hed_stats", n_genes=100, epochs=2000, seed=0)
print(json.dumps(summary, indent=2))

# %% [markdown]
# Outputs in `demo_output/`: per-gene metrics (`per_gene_metrics.csv`: Pearson r and p for the
# HistoPrism-style model and a ridge probe on the same features, exact EMD), the predictions
# (`predictions_test.h5ad`), the figures (`spatial_compare.png`, `gene_correlations.png`), and a
# SpatialData zarr (`demo.zarr`: H&E image, tile polygons, prediction table).
#
# The steps, as library calls:
#
# ```python
# spots = hx.datasets.mouse_olfactory_bulb()
# slide = hx.io.open_slide(spots.uns["histoexpr"]["slide_path"], mpp=spots.uns["histoexpr"]["slide_mpp"])
# tiles = hx.pp.tiles_from_centers(slide, spots.obsm["spatial"], tile_size=224, mpp=0.5,
#                                  tile_ids=list(spots.obs_names), allow_partial=True)
# hx.pp.extract_features(tiles, slide, encoder="hed_stats")
# model = hx.tl.train_spatial(spots_with_features, use_rep="X_hed_stats", train=[...], val=[...])
# pred = hx.tl.predict_spatial(test_tiles, model, method="direct", use_rep="X_hed_stats")
# r, p = hx.metrics.pearson(pred.X, measured.X)
# emd = hx.metrics.emd(pred, measured)
# hx.pl.spatial_compare(pred, measured, genes=[...])
# ```
