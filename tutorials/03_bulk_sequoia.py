# %% [markdown]
# # Bulk expression with SEQUOIA, and spatial maps by the sliding window
#
# With a released checkpoint folder (download `gevaertlab/sequoia-brca-0` from the Hugging Face
# Hub once; it holds `config.json` + `model.safetensors`) set `CHECKPOINT` below. Without one this
# tutorial uses a randomly initialised model of the same architecture (numbers are meaningless then;
# the mechanics are the same). Features must come from the encoder the checkpoint was trained on
# (UNI, 1024-d, for the released models).

# %%
import numpy as np

import histoexpr as hx
from histoexpr.models import Sequoia

CHECKPOINT = None  # e.g. "sequoia-brca-0/"

# This small TCGA excerpt has no µm/px in its metadata; we take it as a 20× scan (0.5 µm/px), which
# gives 160 tiles: enough for the 100 k-means clusters SEQUOIA needs.
slide = hx.io.open_slide(hx.datasets.example_slide("tcga-cr-7395-01a-01-ts1.svs"), mpp=0.5)
tiles = hx.pp.tile(slide, tile_size=256, mpp=0.5)
if CHECKPOINT:
    model = Sequoia.from_pretrained(CHECKPOINT)
    hx.pp.extract_features(tiles, slide, encoder="uni", weights="path/to/uni/")
    rep = "X_uni"
else:
    hx.pp.extract_features(tiles, slide, encoder="hed_stats")
    rep = "X_hed_stats"
    d = tiles.obsm[rep].shape[1]
    model = Sequoia({"num_outputs": 50, "input_dim": d, "depth": 2, "nheads": 4, "dimensions_f": 16,
                     "dimensions_s": 16, "dimensions_c": 16, "num_clusters": 100, "device": "cpu"})

# %%
bulk = hx.tl.predict_bulk(tiles, model, use_rep=rep)  # AnnData slides × genes
print(bulk, bulk.uns["histoexpr"]["units"])

# %% [markdown]
# ## Spatial maps with the bulk model (SEQUOIA §3.3, without the upstream bugs)
# 10 × 10 windows with stride 1, windows with > 50 tissue tiles, batched; each tile's value is the
# mean over the windows that contain it.

# %%
maps = hx.tl.predict_spatial(tiles, model, method="sliding_window", use_rep=rep, min_tissue_tiles=20)
print(maps)

# %% [markdown]
# ## Well-predicted genes
# With measured bulk RNA for a cohort, `hx.tl.train_bulk` runs patient-level 5-fold CV with a random
# model baseline, and `hx.metrics.well_predicted_genes` applies every criterion of the paper.

# %%
rng = np.random.default_rng(0)
truth = rng.normal(size=(60, 20))
pred = truth + rng.normal(scale=1.0, size=truth.shape)
random_pred = rng.normal(size=truth.shape)
table = hx.metrics.well_predicted_genes(pred, truth, random_pred)
print(table.head())
