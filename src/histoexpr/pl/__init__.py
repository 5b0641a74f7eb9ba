"""histoexpr.pl: figures (matplotlib) and the interactive explorer (one self-contained HTML file).

As in scanpy, single-panel plots return a :class:`matplotlib.axes.Axes` and multi-panel plots a
:class:`matplotlib.figure.Figure`; :func:`explore` returns the path of the HTML file it wrote.
"""

from ._survival import kaplan_meier
from ._compare import spatial_compare
from ._explore import explore
from ._metrics import gene_correlations, module_correlation, pathway_coherence
