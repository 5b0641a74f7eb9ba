"""Pre-processing: tissue detection, tiling, features."""

from ._tiling import tile, tiles_from_centers
from ._tissue import TissueMask, detect_tissue, has_background
from ._features import TileDataset, extract_features, extract_features_cohort
from ._cluster import cluster_features, kmeans_means
from ._measured import map_measured_to_tiles
from ._xenium import XeniumCropError, core_counts, core_tokens_dense, open_crop_slide, xenium_crop_images, xenium_crops
