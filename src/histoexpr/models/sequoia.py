"""SEQUOIA: the linearized-transformer aggregator of Pizurica et al. (Nat Commun 2024), SPEC §3.1.

The module tree and parameter names match the released checkpoints
(``gevaertlab/sequoia-{cancer}-{fold}`` on the Hugging Face Hub: ``config.json`` +
``model.safetensors``), so those load unchanged with :meth:`Sequoia.from_pretrained`.

Outputs are log2(FPKM-UQ + 1) for the official checkpoints. There is no output activation, so a
prediction can be (slightly) negative; this is how the published model behaves and is kept as is.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["Sequoia", "sequoia_genes", "PretrainedMixin", "load_bulk_model"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LEGACY_WEIGHTS_NAMES = ("pytorch_model.bin", "model.pt", "model.pth")
GENES_NAME = "gene_list.csv"
GENE_FILE_CANDIDATES = ("gene_list.csv", "genes.csv", "gene_list.txt", "genes.txt", "gene_list.csv.gz")
META_NAME = "histoexpr.json"
HUB_PREFIX = "hf-hub:"
OFFICIAL_UNITS = "log2(FPKM-UQ+1)"
_BUNDLED_GENES = Path(__file__).parent / "data" / "sequoia_genes.csv.gz"


def sequoia_genes() -> list[str]:
    """The 20,820 genes, in output order, of the released SEQUOIA checkpoints.

    The list is bundled with histoexpr (``models/data/sequoia_genes.csv.gz``, copied from
    github.com/gevaertlab/sequoia-pub ``examples/gene_list.csv``, MIT licence).

    Example
    -------
    >>> from histoexpr.models import sequoia_genes
    >>> genes = sequoia_genes()
    >>> len(genes), genes[0]
    (20820, 'A1BG')
    """
    return _read_gene_file(_BUNDLED_GENES)


def _read_gene_file(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        lines = [line.strip() for line in fh if line.strip()]
    if not lines:
        raise ValueError(f"gene file {path} is empty")
    # CSV with a header "gene" (the official layout) or a plain one-gene-per-line text file.
    if lines[0].split(",")[0].lower() in ("gene", "genes", "gene_name", "symbol"):
        lines = lines[1:]
    return [line.split(",")[0] for line in lines]


def _write_gene_file(path: Path, genes: Sequence[str]) -> None:
    with open(path, "w") as fh:
        fh.write("gene\n")
        for g in genes:
            fh.write(f"{g}\n")


# --------------------------------------------------------------------------------------------
# Hugging Face layout (config.json + model.safetensors), shared by all bulk aggregators
# --------------------------------------------------------------------------------------------


def _resolve_checkpoint_dir(path_or_repo: str | os.PathLike, *, local_files_only: bool = False) -> Path:
    """Return a local directory holding ``config.json`` + weights, downloading from the Hub if asked."""
    text = str(path_or_repo)
    if text.startswith(HUB_PREFIX):
        return _download_from_hub(text[len(HUB_PREFIX) :], local_files_only=local_files_only)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.name == CONFIG_NAME:
        return path.parent
    hint = ""
    if "/" in text and not text.startswith((".", "/", "~")) and text.count("/") == 1:
        hint = f" To load from the Hugging Face Hub, write 'hf-hub:{text}'."
    raise FileNotFoundError(f"checkpoint directory {text!r} does not exist.{hint}")


def _download_from_hub(repo_id: str, *, local_files_only: bool = False) -> Path:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as err:  # pragma: no cover - huggingface_hub is a dependency
        raise ImportError("loading 'hf-hub:' checkpoints needs `pip install huggingface_hub`") from err
    try:
        config = hf_hub_download(repo_id, CONFIG_NAME, local_files_only=local_files_only)
        hf_hub_download(repo_id, WEIGHTS_NAME, local_files_only=local_files_only)
    except Exception as err:  # offline, repo missing, gated, ...
        raise OSError(
            f"could not get {CONFIG_NAME} and {WEIGHTS_NAME} of 'hf-hub:{repo_id}' "
            f"({type(err).__name__}: {err}). If this machine is offline, download the checkpoint "
            f"on a machine with internet access, e.g.\n"
            f"    huggingface-cli download {repo_id} --local-dir {repo_id.split('/')[-1]}\n"
            f"(the folder must contain {CONFIG_NAME} and {WEIGHTS_NAME}), copy that folder here and "
            f"pass its path instead: from_pretrained('{repo_id.split('/')[-1]}')."
        ) from err
    folder = Path(config).parent
    for name in GENE_FILE_CANDIDATES[:1]:
        try:  # the official repos do not carry a gene list; ours do
            hf_hub_download(repo_id, name, local_files_only=local_files_only)
        except Exception:  # noqa: BLE001 - optional file
            pass
    return folder


def _load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    weights = folder / WEIGHTS_NAME
    if weights.is_file():
        from safetensors.torch import load_file

        return load_file(str(weights), device="cpu")
    for name in LEGACY_WEIGHTS_NAMES:
        if (folder / name).is_file():
            state = torch.load(folder / name, map_location="cpu", weights_only=True)
            if isinstance(state, Mapping) and "state_dict" in state:
                state = state["state_dict"]
            return dict(state)
    raise FileNotFoundError(f"no {WEIGHTS_NAME} (or {', '.join(LEGACY_WEIGHTS_NAMES)}) in checkpoint directory {folder}")


def _find_gene_file(folder: Path) -> Path | None:
    for name in GENE_FILE_CANDIDATES:
        if (folder / name).is_file():
            return folder / name
    return None


def _read_config(folder: Path) -> dict[str, Any]:
    cfg = folder / CONFIG_NAME
    if not cfg.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in checkpoint directory {folder}")
    with open(cfg) as fh:
        return json.load(fh)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> CPU; a CUDA device that is not there falls back to CPU (the released configs say cuda:0)."""
    if device is None:
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return torch.device("cpu")
    return device


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` in the Hugging Face layout used by the SEQUOIA releases.

    A checkpoint directory holds ``config.json`` (the constructor arguments), ``model.safetensors``
    (the state dict), and optionally ``gene_list.csv`` (output gene order, header ``gene``) and
    ``histoexpr.json`` (units and training metadata written by histoexpr).
    """

    config: dict[str, Any]
    genes: list[str] | None
    units: str | None
    model_type: str = ""

    def _config_to_save(self) -> dict[str, Any]:
        return dict(self.config)

    @classmethod
    def _known_config(cls, config: Mapping[str, Any], folder: Path) -> dict[str, Any]:
        """Drop (with a warning) config keys this class does not know, e.g. hub bookkeeping."""
        import warnings

        known = set(cls.config_defaults) | {"model_type"}  # type: ignore[attr-defined]
        extra = sorted(k for k in config if k not in known)
        if extra:
            warnings.warn(f"ignoring unknown config keys {extra} in {folder / CONFIG_NAME}", stacklevel=3)
        return {k: v for k, v in config.items() if k in known}

    def save_pretrained(self, save_directory: str | os.PathLike, *, metadata: Mapping[str, Any] | None = None) -> Path:
        """Write ``config.json``, ``model.safetensors`` and the gene list to ``save_directory``.

        Example
        -------
        >>> model.save_pretrained("my_checkpoint")  # doctest: +SKIP
        >>> Sequoia.from_pretrained("my_checkpoint")  # doctest: +SKIP
        """
        from safetensors.torch import save_file

        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / CONFIG_NAME, "w") as fh:
            json.dump(self._config_to_save(), fh, indent=2)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}  # type: ignore[attr-defined]
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        if self.genes is not None:
            _write_gene_file(folder / GENES_NAME, self.genes)
        meta = {"model_type": self.model_type, "units": self.units, **(metadata or {})}
        with open(folder / META_NAME, "w") as fh:
            json.dump(meta, fh, indent=2, default=str)
        return folder

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        local_files_only: bool = False,
        strict: bool = True,
    ):
        """Load a checkpoint directory (``config.json`` + ``model.safetensors``) or ``"hf-hub:owner/repo"``.

        Parameters
        ----------
        path_or_repo
            A local directory, or ``"hf-hub:gevaertlab/sequoia-brca-0"`` (downloaded into the
            Hugging Face cache; needs internet the first time).
        device
            Where to put the model; default CPU. The ``device`` stored in the released configs
            (``"cuda:0"``) is ignored, so CPU-only machines load them fine.
        local_files_only
            Only use the Hugging Face cache, never the network.
        strict
            Require the checkpoint's parameter names to match exactly.

        Example
        -------
        >>> from histoexpr.models import Sequoia
        >>> model = Sequoia.from_pretrained("hf-hub:gevaertlab/sequoia-brca-0")  # doctest: +SKIP
        >>> model = Sequoia.from_pretrained("sequoia-brca-0/")  # doctest: +SKIP
        """
        folder = _resolve_checkpoint_dir(path_or_repo, local_files_only=local_files_only)
        config = _read_config(folder)
        meta = {}
        if (folder / META_NAME).is_file():
            with open(folder / META_NAME) as fh:
                meta = json.load(fh)
        gene_file = _find_gene_file(folder)
        genes = _read_gene_file(gene_file) if gene_file is not None else None
        config = cls._known_config(config, folder)
        model = cls(config, genes=genes, units=meta.get("units"))  # type: ignore[call-arg]
        state = _load_state_dict(folder)
        missing, unexpected = model.load_state_dict(state, strict=False)  # type: ignore[attr-defined]
        if strict and (missing or unexpected):
            raise ValueError(
                f"checkpoint {folder} does not fit {cls.__name__}{_short_config(config)}: "
                f"missing parameters {sorted(missing)[:8]}{'...' if len(missing) > 8 else ''}, "
                f"unexpected parameters {sorted(unexpected)[:8]}{'...' if len(unexpected) > 8 else ''}. "
                "Is it a checkpoint of a different architecture?"
            )
        model.checkpoint = str(path_or_repo)
        model.eval()  # type: ignore[attr-defined]
        return model.to(_resolve_device(device))  # type: ignore[attr-defined]


def _short_config(config: Mapping[str, Any]) -> str:
    return "(" + ", ".join(f"{k}={v}" for k, v in config.items() if k != "device") + ")"


def _merge_config(
    defaults: Mapping[str, Any], config: Mapping[str, Any] | None, kwargs: Mapping[str, Any], name: str
) -> dict[str, Any]:
    """Defaults updated by ``config`` then keyword arguments; unknown keys are a clear error."""
    cfg = dict(defaults)
    cfg.update(config or {})
    cfg.update(kwargs)
    cfg.pop("model_type", None)
    unknown = set(cfg) - set(defaults)
    if unknown:
        raise TypeError(f"unknown {name} config keys {sorted(unknown)}; allowed: {sorted(defaults)}")
    return cfg


def _check_genes(genes: Sequence[str] | None, num_outputs: int) -> list[str] | None:
    if genes is None:
        return None
    genes = [str(g) for g in genes]
    if len(genes) != num_outputs:
        raise ValueError(f"gene list has {len(genes)} genes but the model has num_outputs={num_outputs}")
    return genes


# --------------------------------------------------------------------------------------------
# The architecture
# --------------------------------------------------------------------------------------------


class SummaryMixingHead(nn.Module):
    """One head of the linearized attention: local branch, mean summary broadcast to all tokens, combiner."""

    def __init__(self, dim: int, dim_f: int, dim_s: int, dim_c: int):
        super().__init__()
        self.f = nn.Linear(dim, dim_f)
        self.local_norm = nn.LayerNorm(dim_f)
        self.s = nn.Linear(dim, dim_s)
        self.summary_norm = nn.LayerNorm(dim_s)
        self.c = nn.Linear(dim_f + dim_s, dim_c)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.act(self.local_norm(self.f(x)))
        summary = self.act(self.summary_norm(self.s(x).mean(dim=1, keepdim=True)))
        summary = summary.expand(-1, x.shape[1], -1)
        return self.act(self.c(torch.cat([local, summary], dim=-1)))


class LinearizedMixer(nn.Module):
    """``nheads`` summary-mixing heads, concatenated and projected back to the token width."""

    def __init__(self, dim: int, nheads: int, dim_f: int, dim_s: int, dim_c: int):
        super().__init__()
        self.mixers = nn.ModuleList([SummaryMixingHead(dim, dim_f, dim_s, dim_c) for _ in range(nheads)])
        self.projection = nn.Linear(nheads * dim_c, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # All heads at once (same result as ``cat([head(x) for head in self.mixers])``): one matmul
        # for the local branches, the summary from the token mean (mean_t s(x_t) = s(mean_t x_t),
        # s being affine), and the per-head combiners as a batched einsum.
        import torch.nn.functional as F

        heads = list(self.mixers)
        n_heads = len(heads)
        b, t, _ = x.shape
        dim_f = heads[0].f.out_features
        dim_s = heads[0].s.out_features

        def stacked(get) -> torch.Tensor:
            return torch.stack([get(h) for h in heads])

        w_f = torch.cat([h.f.weight for h in heads])
        b_f = torch.cat([h.f.bias for h in heads])
        local = F.linear(x, w_f, b_f).view(b, t, n_heads, dim_f)
        local = F.layer_norm(local, (dim_f,), eps=heads[0].local_norm.eps)
        local = F.gelu(local * stacked(lambda h: h.local_norm.weight) + stacked(lambda h: h.local_norm.bias))

        w_s = torch.cat([h.s.weight for h in heads])
        b_s = torch.cat([h.s.bias for h in heads])
        summary = F.linear(x.mean(dim=1), w_s, b_s).view(b, n_heads, dim_s)
        summary = F.layer_norm(summary, (dim_s,), eps=heads[0].summary_norm.eps)
        summary = F.gelu(summary * stacked(lambda h: h.summary_norm.weight) + stacked(lambda h: h.summary_norm.bias))

        w_c = stacked(lambda h: h.c.weight)  # (H, d_c, d_f + d_s)
        out = torch.einsum("bthf,hcf->bthc", local, w_c[:, :, :dim_f])
        out = out + (torch.einsum("bhs,hcs->bhc", summary, w_c[:, :, dim_f:]) + stacked(lambda h: h.c.bias)).unsqueeze(1)
        return self.projection(F.gelu(out).reshape(b, t, -1))


class FeedForward(nn.Module):
    """``LayerNorm(D) -> Linear(D, H) -> GELU -> Linear(H, D)`` (``net.{0,1,3}``)."""

    def __init__(self, dim: int, hidden_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        hidden_dim = hidden_dim or dim
        layers: list[nn.Module] = [nn.LayerNorm(dim), nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, dim)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LinearizedTransformer(nn.Module):
    """``depth`` blocks of ``x = mixer(x) + x; x = ff(x) + x`` (no norm before the mixer, no dropout)."""

    def __init__(self, dim: int, depth: int, nheads: int, dim_f: int, dim_s: int, dim_c: int):
        super().__init__()
        self.layers = nn.ModuleList(
            [
                nn.ModuleList([LinearizedMixer(dim, nheads, dim_f, dim_s, dim_c), FeedForward(dim)])
                for _ in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for mixer, ff in self.layers:
            x = mixer(x) + x
            x = ff(x) + x
        return x


SEQUOIA_DEFAULTS: dict[str, Any] = {
    "num_outputs": 20820,
    "input_dim": 1024,
    "depth": 6,
    "nheads": 16,
    "dimensions_f": 64,
    "dimensions_s": 64,
    "dimensions_c": 64,
    "num_clusters": 100,
    "device": "cpu",
}


class Sequoia(PretrainedMixin, nn.Module):
    """SEQUOIA linearized transformer: (B, K, D) cluster-mean tile features -> (B, G) bulk expression.

    Parameters
    ----------
    config
        Dict with any of ``num_outputs`` (G, default 20,820), ``input_dim`` (D, 1024 for UNI,
        2048 for ResNet-50), ``depth`` (6), ``nheads`` (16), ``dimensions_f``/``_s``/``_c`` (64),
        ``num_clusters`` (K, 100) and ``device`` (kept in the config for compatibility with the
        released files; it does not decide where the model lives). Keyword arguments override it.
    genes
        Output gene names (length G). ``None`` and G = 20,820 -> the official SEQUOIA gene list.
    units
        Units of the outputs; default ``"log2(FPKM-UQ+1)"`` (the released models).

    Notes
    -----
    ``pos_emb1D`` (K, D) is added to the K input tokens, so slot order matters. There is no output
    activation: predictions may be negative.

    Example
    -------
    >>> import torch
    >>> from histoexpr.models import Sequoia
    >>> model = Sequoia({"num_outputs": 50, "input_dim": 32, "depth": 1, "nheads": 2, "num_clusters": 10})
    >>> model(torch.randn(4, 10, 32)).shape
    torch.Size([4, 50])
    """

    model_type = "sequoia"
    config_defaults = SEQUOIA_DEFAULTS

    def __init__(
        self,
        config: Mapping[str, Any] | None = None,
        *,
        genes: Sequence[str] | None = None,
        units: str | None = None,
        **kwargs: Any,
    ):
        super().__init__()
        cfg = _merge_config(SEQUOIA_DEFAULTS, config, kwargs, "Sequoia")
        for key in SEQUOIA_DEFAULTS:
            if key != "device":
                cfg[key] = int(cfg[key])
        self.config = cfg
        dim = cfg["input_dim"]
        self.pos_emb1D = nn.Parameter(torch.randn(cfg["num_clusters"], dim))
        self.transformer = LinearizedTransformer(
            dim, cfg["depth"], cfg["nheads"], cfg["dimensions_f"], cfg["dimensions_s"], cfg["dimensions_c"]
        )
        self.linear_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, cfg["num_outputs"]))
        if genes is None and cfg["num_outputs"] == SEQUOIA_DEFAULTS["num_outputs"]:
            genes = sequoia_genes()
        self.genes = _check_genes(genes, cfg["num_outputs"])
        self.units = units or OFFICIAL_UNITS
        self.checkpoint: str | None = None

    @property
    def input_dim(self) -> int:
        return self.config["input_dim"]

    @property
    def num_clusters(self) -> int:
        return self.config["num_clusters"]

    @property
    def num_outputs(self) -> int:
        return self.config["num_outputs"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, K, D) -> (B, G). A single (K, D) slide is also accepted and returns (1, G)."""
        if x.dim() == 2:  # the upstream spatial code forgot the batch axis; never silently mis-batch
            x = x.unsqueeze(0)
        if x.dim() != 3 or x.shape[1] != self.num_clusters or x.shape[2] != self.input_dim:
            raise ValueError(
                f"Sequoia expects input of shape (batch, {self.num_clusters}, {self.input_dim}); got {tuple(x.shape)}"
            )
        x = x + self.pos_emb1D
        x = self.transformer(x)
        return self.linear_head(x.mean(dim=1))


def load_bulk_model(path_or_repo: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """Load any bulk aggregator checkpoint written by histoexpr (or an official SEQUOIA one).

    The architecture comes from ``histoexpr.json``/``config.json`` ``model_type`` (``"sequoia"``,
    ``"he2rna"`` or ``"transformer"``); checkpoints without it are SEQUOIA checkpoints.
    """
    from .aggregators import HE2RNA, TransformerAggregator

    folder = _resolve_checkpoint_dir(path_or_repo, local_files_only=kwargs.get("local_files_only", False))
    model_type = _read_config(folder).get("model_type")
    if model_type is None and (folder / META_NAME).is_file():
        with open(folder / META_NAME) as fh:
            model_type = json.load(fh).get("model_type")
    classes = {"sequoia": Sequoia, "he2rna": HE2RNA, "transformer": TransformerAggregator}
    cls = classes.get(model_type or "sequoia")
    if cls is None:
        raise ValueError(f"unknown model_type {model_type!r} in {folder}; expected one of {sorted(classes)}")
    return cls.from_pretrained(folder, **kwargs)
