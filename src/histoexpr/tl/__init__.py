"""histoexpr.tl"""

from ._runtime import TrainResult
from ._spatial import map_measured_to_tiles, predict_spatial, train_spatial, window_index

from ._bulk import BulkCVResult, predict_bulk, train_bulk
from ._fusion import (FusionFit, evaluate_fusion, fuse_xenium, fusion_split, predict_fusion, spatial_blocks,
                      train_fusion)
from ._leiden import leiden
from ._genesets import score_gene_sets
