"""Keys and defaults shared across the package."""

#: ``adata.uns`` key holding histoexpr metadata (tile size, mpp, encoder, model, units, panel).
UNS_KEY = "histoexpr"
#: ``adata.obsm`` key with tile centres in level-0 pixels.
SPATIAL_KEY = "spatial"
#: Required tile ``obs`` columns of the data model.
TILE_OBS_COLUMNS = ("slide_id", "tile_id", "row", "col", "x0", "y0", "tissue_fraction")

#: SEQUOIA tiling defaults: 256 px at 0.5 µm/px (128 µm).
DEFAULT_TILE_SIZE = 256
DEFAULT_MPP = 0.5
DEFAULT_TISSUE_THRESHOLD = 0.2
DEFAULT_MAX_TILES = 4000

#: Prefix of feature keys in ``obsm``: ``X_<encoder>``.
FEATURE_KEY_PREFIX = "X_"
