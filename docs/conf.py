"""Sphinx configuration for histoexpr."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

project = "histoexpr"
author = "histoexpr developers"
copyright = "2026, histoexpr developers"

extensions = [
    "myst_nb",  # MyST markdown + notebooks (includes myst_parser)
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_numpy_docstring = True
napoleon_google_docstring = False
myst_enable_extensions = ["colon_fence"]
exclude_patterns = ["_build", "generated/*.tmp", "**.ipynb_checkpoints"]
html_static_path = ["_static"]

# Tutorials (docs/tutorials/*.md, MyST notebooks; `jupytext --to ipynb` converts them) are executed
# on every build; an error in a cell fails the build. The Xenium tutorial needs the SegTraQ crop in
# the data folder: where it is absent, the page is shown without being run.
nb_execution_mode = "force"
nb_execution_timeout = 900
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
nb_execution_excludepatterns = []
try:
    from histoexpr.datasets import data_root

    if not (data_root() / "xenium_segtraq" / "tests" / "data" / "xenium_sp_subset.zarr").exists():
        nb_execution_excludepatterns.append("tutorials/04_xenium_fusion.md")
except Exception:  # no data folder at all
    nb_execution_excludepatterns.append("tutorials/04_xenium_fusion.md")
html_theme = "furo"
html_title = "histoexpr"
suppress_warnings = ["myst.header", "autosummary", "autodoc.import_object", "mystnb.unknown_mime_type"]
nitpicky = False
