"""histoexpr.pl"""

from ._survival import kaplan_meier
from ._compare import spatial_compare
from ._metrics import gene_correlations, module_correlation, pathway_coherence
