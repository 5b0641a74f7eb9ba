"""histoexpr.models"""

from ._base import CheckpointError, ExpressionModel, ExpressionModule, PretrainedMixin, read_state_dict
from ._load import load_model
from .aggregators import HE2RNA, TransformerAggregator
from .sequoia import Sequoia, load_bulk_model, sequoia_genes
from .encoders import Encoder, TileTransform, get_encoder, list_encoders, register_encoder
from .histoprism import HistoPrism
from .handcrafted import HEDStats, hed_stats_encoder  # registers the offline encoder "hed_stats"
from .fusion import ExpressionMLP, FusionViT, LateFusion, MinMAEBaseline, MorphologyOnly, create_vit
