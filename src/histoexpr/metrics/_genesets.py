"""Gene sets: GMT / JSON reading, the built-in curated collections, and the GO redundancy filter."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

GeneSets = dict[str, list[str]]

_BUILTIN_FILES = {
    "hallmark": "h.all.v7.0.symbols.gmt",
    "hallmark_2025": "h.all.v2025.1.Hs.symbols.gmt",
    "go_bp": "go_bp_2021.50-100.jaccard0.1.gmt",
    "neftel": "neftel.cytograph-shoji.json",
    "cellcycle": "cellcycle.cytograph-shoji.json",
}
BUILTIN_GENE_SETS = ("hallmark", "hallmark_2025", "go_bp", "neftel", "neftel_meta", "cellcycle")
#: Gene sets that may not ship with histoexpr (HistoPrism's curated subsets are CC BY-NC 4.0): loaded
#: from a GMT file given by path, or found in the folder named by :data:`HISTOPRISM_GENESETS_ENV`.
PATH_ONLY_GENE_SETS = {
    "histoprism_hallmark": "histoprism_final_hallmark.gmt",
    "histoprism_go": "histoprism_final_go.gmt",
}
HISTOPRISM_GENESETS_ENV = "HISTOEXPR_HISTOPRISM_GENESETS"


def _builtin_path(name: str) -> Path:
    return Path(str(resources.files("histoexpr.datasets").joinpath("genesets", _BUILTIN_FILES[name])))


def read_gmt(path: str | Path) -> GeneSets:
    """Read a GMT file (``name<TAB>description<TAB>gene1<TAB>gene2...``) into ``{name: [genes]}``.

    Empty gene fields are ignored and the gene order of the file is kept (duplicates removed).

    Example
    -------
    >>> import histoexpr as hx
    >>> from importlib.resources import files
    >>> sets = hx.metrics.read_gmt(files("histoexpr.datasets") / "genesets" / "h.all.v7.0.symbols.gmt")
    >>> len(sets["HALLMARK_HYPOXIA"])
    200
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GMT file {str(path)!r} does not exist.")
    sets: GeneSets = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            fields = line.rstrip("\r\n").split("\t")
            if not fields[0].strip():
                continue
            if len(fields) < 3:
                raise ValueError(
                    f"{path}:{lineno}: a GMT line needs 'name<TAB>description<TAB>genes...', got {len(fields)} field(s)."
                )
            sets[fields[0]] = list(dict.fromkeys(g.strip() for g in fields[2:] if g.strip()))
    return sets


def read_gene_set_json(path: str | Path) -> GeneSets:
    """Read gene sets from JSON: ``{name: [genes]}`` or the MSigDB/cytograph form ``{name: {"geneSymbols": [...]}}``."""
    with open(path, encoding="utf-8") as fh:
        raw = json.load(fh)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object mapping set names to gene lists.")
    out: GeneSets = {}
    for name, value in raw.items():
        genes = value.get("geneSymbols") if isinstance(value, dict) else value
        if not isinstance(genes, list):
            raise ValueError(f"{path}: set {name!r} has no gene list (expected a list or {{'geneSymbols': [...]}}).")
        out[str(name)] = list(dict.fromkeys(str(g) for g in genes))
    return out


def _neftel_meta() -> GeneSets:
    """The four GBM meta-modules of SEQUOIA Fig. 5d, built from Neftel et al. 2019 and Tirosh et al. 2016."""
    neftel = read_gene_set_json(_builtin_path("neftel"))
    cc = read_gene_set_json(_builtin_path("cellcycle"))

    def union(*lists: list[str]) -> list[str]:
        return list(dict.fromkeys(g for lst in lists for g in lst))

    return {
        "AC-like": neftel["NEFTEL_AC"],
        "MES-like": union(neftel["NEFTEL_MES1"], neftel["NEFTEL_MES2"]),
        "lineage development": union(neftel["NEFTEL_NPC1"], neftel["NEFTEL_NPC2"], neftel["NEFTEL_OPC"]),
        "cell cycle": union(cc["TIROSH_G1"], cc["TIROSH_S"], cc["TIROSH_G2M"]),
    }


def load_gene_sets(
    gene_sets: str | Path | Mapping[str, Iterable[str]] | pd.DataFrame, *, path: str | Path | None = None
) -> GeneSets:
    """Resolve ``gene_sets`` to a ``{name: [genes]}`` dictionary.

    Parameters
    ----------
    gene_sets
        * ``"hallmark"`` – the 50 MSigDB Hallmark sets (v7.0, CC BY 4.0);
        * ``"hallmark_2025"`` – the 50 MSigDB Hallmark sets of release 2025.1 (CC BY 4.0), the
          release HistoPrism's GPC benchmark cut its Hallmark sets from;
        * ``"histoprism_hallmark"``, ``"histoprism_go"`` – HistoPrism's own curated sets (Hallmark
          restricted to its gene panel; 87 GO BP/CC/MF sets of 50–100 genes after its Jaccard
          filter). They are CC BY-NC 4.0 and do not ship with histoexpr: pass the GMT file as
          ``path=`` or set ``$HISTOEXPR_HISTOPRISM_GENESETS`` to a folder holding
          ``histoprism_final_hallmark.gmt`` / ``histoprism_final_go.gmt``;
        * ``"go_bp"`` – GO Biological Process 2021 (Enrichr) sets of 50–100 genes after the
          redundancy filter of :func:`filter_redundant_gene_sets` (Jaccard > 0.1: drop the larger);
        * ``"neftel"`` – the six Neftel et al. 2019 GBM cell-state modules (AC, MES1, MES2, NPC1,
          NPC2, OPC);
        * ``"neftel_meta"`` – the four meta-modules of SEQUOIA Fig. 5d (AC-like, MES-like, lineage
          development = NPC1 ∪ NPC2 ∪ OPC, cell cycle = Tirosh G1/S ∪ S ∪ G2/M);
        * ``"cellcycle"`` – the Tirosh et al. 2016 cell-cycle sets;
        * a path to a ``.gmt`` or ``.json`` file;
        * a dict ``{name: genes}``;
        * a decoupler-style network DataFrame with ``source`` and ``target`` columns.

    Example
    -------
    >>> import histoexpr as hx
    >>> sets = hx.metrics.load_gene_sets("hallmark")
    >>> len(sets)
    50
    """
    if isinstance(gene_sets, pd.DataFrame):
        if not {"source", "target"} <= set(gene_sets.columns):
            raise ValueError("A gene-set DataFrame needs 'source' (set name) and 'target' (gene) columns.")
        grouped = gene_sets.groupby("source", sort=False, observed=True)["target"]
        return {str(k): list(dict.fromkeys(map(str, v))) for k, v in grouped}
    if isinstance(gene_sets, Mapping):
        out: GeneSets = {}
        for name, genes in gene_sets.items():
            if isinstance(genes, str):
                raise ValueError(f"Gene set {name!r} is a single string; pass a list of gene names.")
            out[str(name)] = list(dict.fromkeys(str(g) for g in genes))
        return out
    if isinstance(gene_sets, str) and gene_sets.lower() in PATH_ONLY_GENE_SETS:
        return read_gmt(_path_only_file(gene_sets.lower(), path))
    if isinstance(gene_sets, str) and gene_sets.lower() in BUILTIN_GENE_SETS:
        key = gene_sets.lower()
        if key == "neftel":
            full = read_gene_set_json(_builtin_path("neftel"))
            return {k: v for k, v in full.items() if k not in ("NEFTEL_MES", "NEFTEL_NPC")}
        if key == "neftel_meta":
            return _neftel_meta()
        if key == "cellcycle":
            return read_gene_set_json(_builtin_path("cellcycle"))
        return read_gmt(_builtin_path(key))
    file = Path(gene_sets)
    if file.suffix.lower() == ".json":
        return read_gene_set_json(file)
    if file.suffix.lower() == ".gmt" or file.is_file():
        return read_gmt(file)
    raise ValueError(
        f"Unknown gene sets {str(gene_sets)!r}: use one of {BUILTIN_GENE_SETS + tuple(PATH_ONLY_GENE_SETS)}, "
        "a .gmt/.json path, a dict {name: genes} or a DataFrame with 'source'/'target' columns."
    )


def _path_only_file(name: str, path: str | Path | None) -> Path:
    """The GMT file of a gene-set collection histoexpr may not redistribute."""
    import os

    if path is not None:
        file = Path(path)
        if file.is_dir():
            file = file / PATH_ONLY_GENE_SETS[name]
    elif os.environ.get(HISTOPRISM_GENESETS_ENV):
        file = Path(os.environ[HISTOPRISM_GENESETS_ENV]) / PATH_ONLY_GENE_SETS[name]
    else:
        raise ValueError(
            f"gene_sets={name!r} are HistoPrism's curated sets (CC BY-NC 4.0), which histoexpr does not ship. "
            f"Write them as GMT (one line per set: name, description, genes) and pass the file as "
            f"gene_sets_path= (or path=), or set ${HISTOPRISM_GENESETS_ENV} to the folder holding "
            f"{PATH_ONLY_GENE_SETS[name]!r}. The MSigDB sets they were cut from ship as 'hallmark_2025'."
        )
    if not file.is_file():
        raise FileNotFoundError(f"gene_sets={name!r}: GMT file {str(file)!r} does not exist.")
    return file


def filter_redundant_gene_sets(
    gene_sets: Mapping[str, Iterable[str]],
    *,
    min_size: int = 50,
    max_size: int = 100,
    max_jaccard: float = 0.1,
) -> GeneSets:
    """Keep sets of ``min_size``–``max_size`` genes with no pair overlapping by Jaccard > ``max_jaccard``.

    For every pair with Jaccard index above the threshold the larger set is dropped. Sets
    are visited from smallest to largest (ties by name) and a set is kept when it does not overlap
    any already kept set; this removes the larger member of every offending pair and never removes
    a set because of a set that was itself removed.

    Example
    -------
    >>> import histoexpr as hx
    >>> sets = {"A": ["g1", "g2", "g3"], "B": ["g1", "g2", "g3", "g4"], "C": ["g7", "g8"]}
    >>> sorted(hx.metrics.filter_redundant_gene_sets(sets, min_size=2, max_size=10))
    ['A', 'C']
    """
    sized = {name: set(genes) for name, genes in gene_sets.items() if min_size <= len(set(genes)) <= max_size}
    names = sorted(sized, key=lambda n: (len(sized[n]), n))
    if not names:
        return {}
    genes = sorted(set().union(*sized.values()))
    index = {g: i for i, g in enumerate(genes)}
    member = np.zeros((len(names), len(genes)), dtype=np.float32)
    for i, n in enumerate(names):
        member[i, [index[g] for g in sized[n]]] = 1.0
    inter = member @ member.T
    sizes = member.sum(1)
    jaccard = inter / (sizes[:, None] + sizes[None, :] - inter)
    kept: list[int] = []
    for i in range(len(names)):
        if not kept or jaccard[i, kept].max() <= max_jaccard:
            kept.append(i)
    original = {n: list(dict.fromkeys(gene_sets[n])) for n in names}
    return {names[i]: original[names[i]] for i in kept}


def write_gmt(gene_sets: Mapping[str, Iterable[str]], path: str | Path, *, description: str = "") -> None:
    """Write ``{name: genes}`` as a GMT file."""
    with open(path, "w", encoding="utf-8") as fh:
        for name, genes in gene_sets.items():
            fh.write("\t".join([name, description, *genes]) + "\n")


def membership_matrix(gene_sets: Mapping[str, Iterable[str]], genes: Iterable[str]):
    """Sparse (sets × genes) 0/1 matrix of ``gene_sets`` over ``genes``; genes absent from ``genes`` are ignored."""
    from scipy import sparse

    genes = list(genes)
    index = {g: i for i, g in enumerate(genes)}
    rows, cols = [], []
    for r, members in enumerate(gene_sets.values()):
        hit = sorted({index[g] for g in members if g in index})
        rows.extend([r] * len(hit))
        cols.extend(hit)
    data = np.ones(len(rows), dtype=np.float64)
    return sparse.csr_matrix((data, (rows, cols)), shape=(len(gene_sets), len(genes)))
