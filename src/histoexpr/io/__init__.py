"""Reading slides and spatial omics data; crash-safe writes into SpatialData stores."""

from ._elements import image_levels, pick_image_key
from ._readers import ReaderError, read_st, read_visium, read_xenium
from ._slide import Slide, SlideError, open_slide
from ._spatialdata import add_table, add_tiles_to_spatialdata, tiles_to_shapes, write_element_safely
from ._store import StoreFormatError, recover_store
