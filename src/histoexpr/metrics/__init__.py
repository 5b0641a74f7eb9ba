"""histoexpr.metrics"""

from ._correlation import SEQUOIA_COLUMNS, nrmse, pearson, rmse, spearman, steiger_test, well_predicted_genes
from ._survival import cox_risk_score, fit_cox_signature, logrank, median_split
from ._clustering import cluster_agreement
from ._emd import emd, median_filter_grid, percentile_scores
from ._genesets import filter_redundant_gene_sets, load_gene_sets, read_gmt, write_gmt
from ._gpc import pathway_coherence
from ._modules import ModuleCoexpression, module_coexpression, score_gene_sets
