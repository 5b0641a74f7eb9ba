"""What every histoexpr model shares: the checkpoint layout, one state-dict reader, config handling
and the :class:`ExpressionModel` contract that :mod:`histoexpr.tl` relies on.

A checkpoint directory (the Hugging Face layout of the released SEQUOIA models) holds

* ``config.json`` – the constructor arguments (plus ``model_type`` for non-SEQUOIA models),
* ``model.safetensors`` – the state dict (``pytorch_model.bin``/``model.pt``/``model.pth`` are read too),
* ``gene_list.csv`` – optional output gene order (header ``gene``),
* ``histoexpr.json`` – optional units and training metadata written by histoexpr.
"""

from __future__ import annotations

import gzip
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "ExpressionModel",
    "ExpressionModule",
    "PretrainedMixin",
    "check_genes",
    "find_weights_file",
    "merge_config",
    "read_state_dict",
    "resolve_checkpoint_dir",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: Weight file names looked for, in this order, in a checkpoint or weights folder.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth", "model.pt")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
GENES_NAME = "gene_list.csv"
GENE_FILE_CANDIDATES = ("gene_list.csv", "genes.csv", "gene_list.txt", "genes.txt", "gene_list.csv.gz")
META_NAME = "histoexpr.json"
HUB_PREFIX = "hf-hub:"
#: Wrapper keys some training frameworks put around the state dict.
STATE_DICT_WRAPPERS = ("state_dict", "model", "model_state_dict", "module")
#: Key prefixes of wrapped modules (DistributedDataParallel, Lightning ``self.model``).
STATE_DICT_PREFIXES = ("module.", "model.")


class CheckpointError(RuntimeError):
    """A weights file or checkpoint directory cannot be read or does not fit the model."""


@runtime_checkable
class ExpressionModel(Protocol):
    """What every expression model exposes to :mod:`histoexpr.tl`.

    ``genes`` (output gene names in output order, or ``None`` when unknown), ``units`` (units of
    the outputs, e.g. ``"log1p(counts)"``), ``input_dim`` (width of the per-tile features it reads)
    and ``forward``. Any :class:`torch.nn.Module` with these attributes works with the ``tl`` verbs.

    Example
    -------
    >>> from histoexpr.models import ExpressionModel, HistoPrism
    >>> isinstance(HistoPrism(input_dim=8, num_outputs=3), ExpressionModel)
    True
    """

    genes: list[str] | None
    units: str | None

    @property
    def input_dim(self) -> int | None: ...

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor: ...


# --------------------------------------------------------------------------------------------
# gene lists
# --------------------------------------------------------------------------------------------


def read_gene_file(path: Path) -> list[str]:
    """Genes of a one-per-line text file or a CSV whose first column is the gene (header optional)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        lines = [line.strip() for line in fh if line.strip()]
    if not lines:
        raise ValueError(f"gene file {path} is empty")
    if lines[0].split(",")[0].lower() in ("gene", "genes", "gene_name", "symbol"):
        lines = lines[1:]
    return [line.split(",")[0] for line in lines]


def write_gene_file(path: Path, genes: Sequence[str]) -> None:
    with open(path, "w") as fh:
        fh.write("gene\n")
        for g in genes:
            fh.write(f"{g}\n")


def find_gene_file(folder: Path) -> Path | None:
    return next((folder / n for n in GENE_FILE_CANDIDATES if (folder / n).is_file()), None)


# --------------------------------------------------------------------------------------------
# checkpoint folders and state dicts
# --------------------------------------------------------------------------------------------


def resolve_checkpoint_dir(path_or_repo: str | os.PathLike, *, local_files_only: bool = False) -> Path:
    """A local directory holding ``config.json`` + weights, downloaded first for ``"hf-hub:owner/repo"``."""
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
        short = repo_id.split("/")[-1]
        raise OSError(
            f"could not get {CONFIG_NAME} and {WEIGHTS_NAME} of 'hf-hub:{repo_id}' "
            f"({type(err).__name__}: {err}). If this machine is offline, download the checkpoint "
            f"on a machine with internet access, e.g.\n"
            f"    huggingface-cli download {repo_id} --local-dir {short}\n"
            f"(the folder must contain {CONFIG_NAME} and {WEIGHTS_NAME}), copy that folder here and "
            f"pass its path instead: from_pretrained('{short}')."
        ) from err
    try:  # the official repos do not carry a gene list; ours do
        hf_hub_download(repo_id, GENES_NAME, local_files_only=local_files_only)
    except Exception:  # noqa: BLE001 - optional file
        pass
    return Path(config).parent


def read_config(folder: Path) -> dict[str, Any]:
    cfg = folder / CONFIG_NAME
    if not cfg.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in checkpoint directory {folder}")
    try:
        with open(cfg) as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{cfg} is not valid JSON ({err}); the checkpoint is damaged") from err


def read_meta(folder: Path) -> dict[str, Any]:
    if not (folder / META_NAME).is_file():
        return {}
    with open(folder / META_NAME) as fh:
        return json.load(fh)


def find_weights_file(folder: Path) -> Path | None:
    """The weights file of a folder: the first of :data:`WEIGHT_FILES`, else its only weights-like file."""
    folder = Path(folder)
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    candidates = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    return candidates[0] if len(candidates) == 1 else None


def read_state_dict(path: str | os.PathLike, *, error: type[Exception] = CheckpointError) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a tensor-only torch file, on the CPU.

    Wrappers (``{"state_dict": ...}``, ``{"model": ...}``, nested) are unwrapped, non-tensor entries
    dropped, and a ``module.`` prefix common to every key (DistributedDataParallel) removed. A file
    that is damaged, not a state dict, or holds pickled Python objects raises ``error`` naming it.

    Example
    -------
    >>> import torch, tempfile, os
    >>> from histoexpr.models import read_state_dict
    >>> path = os.path.join(tempfile.mkdtemp(), "w.pt")
    >>> torch.save({"state_dict": {"module.w": torch.zeros(2)}}, path)
    >>> list(read_state_dict(path))
    ['w']
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors, pickle and zip errors have many types
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise error(
            f"cannot read the weights file {path} ({type(e).__name__}: {reason}). The file is damaged or "
            "not a tensor-only state dict (files with pickled Python objects are refused for safety); "
            "re-download it, or re-save it with safetensors.torch.save_file or "
            "torch.save(model.state_dict(), ...)."
        ) from e
    for _ in range(3):  # nested wrappers, e.g. {"model": {"state_dict": ...}}
        if isinstance(sd, Mapping) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
            key = next((k for k in STATE_DICT_WRAPPERS if k in sd), None)
            if key is None:
                break
            sd = sd[key]
    if not isinstance(sd, Mapping) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise error(f"{path} does not contain a state dict (a mapping of parameter names to tensors)")
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    while all(k.startswith("module.") for k in sd):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return sd


def match_prefixes(state: Mapping[str, torch.Tensor], expected: Sequence[str]) -> dict[str, torch.Tensor]:
    """Strip a wrapper prefix (``module.``, ``model.``) common to all keys when the model has none."""
    state = dict(state)
    expected = set(expected)
    for prefix in STATE_DICT_PREFIXES:
        if state and all(k.startswith(prefix) for k in state) and not all(k.startswith(prefix) for k in expected):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def load_checkpoint_state(folder: Path) -> dict[str, torch.Tensor]:
    weights = find_weights_file(folder)
    if weights is None:
        raise FileNotFoundError(f"no {WEIGHTS_NAME} (or {', '.join(WEIGHT_FILES[1:])}) in checkpoint directory {folder}")
    return read_state_dict(weights)


def short_config(config: Mapping[str, Any]) -> str:
    return "(" + ", ".join(f"{k}={v}" for k, v in config.items() if k != "device") + ")"


def merge_config(
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


def check_genes(genes: Sequence[str] | None, num_outputs: int) -> list[str] | None:
    """``genes`` as a list of str, checked against the number of outputs."""
    if genes is None:
        return None
    genes = [str(g) for g in genes]
    if len(genes) != num_outputs:
        raise ValueError(f"gene list has {len(genes)} genes but the model has num_outputs={num_outputs}")
    return genes


# --------------------------------------------------------------------------------------------
# the pretrained mixin
# --------------------------------------------------------------------------------------------


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` in the checkpoint layout described in this module.

    Subclasses set ``model_type`` and ``config_defaults`` and call :meth:`_configure` then
    :meth:`_set_outputs` in their constructor; models whose constructor is not ``cls(config,
    genes=, units=)`` override :meth:`_from_checkpoint`.
    """

    config: dict[str, Any]
    genes: list[str] | None
    units: str | None
    model_type: str = ""
    config_defaults: dict[str, Any] = {}
    default_units: str | None = None

    # -- constructor helpers ---------------------------------------------------------------
    def _configure(self, config: Mapping[str, Any] | None, kwargs: Mapping[str, Any], *, ints: Sequence[str] = ()) -> dict[str, Any]:
        cfg = merge_config(self.config_defaults, config, kwargs, type(self).__name__)
        for key in ints:
            if cfg[key] is not None:
                cfg[key] = int(cfg[key])
        self.config = cfg
        return cfg

    def _set_outputs(self, genes: Sequence[str] | None, units: str | None, num_outputs: int) -> None:
        self.genes = check_genes(genes, num_outputs)
        self.units = units or self.default_units
        self.checkpoint: str | None = None

    @property
    def input_dim(self) -> int | None:
        return self.config.get("input_dim")

    @property
    def num_outputs(self) -> int | None:
        return self.config.get("num_outputs")

    # -- saving ----------------------------------------------------------------------------
    def _config_to_save(self) -> dict[str, Any]:
        return {**self.config, "model_type": self.model_type}

    def _metadata_to_save(self) -> dict[str, Any]:
        return {}

    def save_pretrained(self, save_directory: str | os.PathLike, *, metadata: Mapping[str, Any] | None = None) -> Path:
        """Write ``config.json``, ``model.safetensors``, the gene list and ``histoexpr.json`` to ``save_directory``.

        Example
        -------
        >>> import tempfile
        >>> from histoexpr.models import HistoPrism
        >>> model = HistoPrism(input_dim=8, num_outputs=2, genes=["A", "B"])
        >>> folder = model.save_pretrained(tempfile.mkdtemp())
        >>> HistoPrism.from_pretrained(folder).genes
        ['A', 'B']
        """
        from safetensors.torch import save_file

        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / CONFIG_NAME, "w") as fh:
            json.dump(self._config_to_save(), fh, indent=2)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}  # type: ignore[attr-defined]
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        if self.genes is not None:
            write_gene_file(folder / GENES_NAME, self.genes)
        meta = {"model_type": self.model_type, "units": self.units, **self._metadata_to_save(), **(metadata or {})}
        with open(folder / META_NAME, "w") as fh:
            json.dump(meta, fh, indent=2, default=str)
        return folder

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def _known_config(cls, config: Mapping[str, Any], folder: Path) -> dict[str, Any]:
        """Drop (with a warning) config keys this class does not know, e.g. hub bookkeeping."""
        known = set(cls.config_defaults) | {"model_type"}
        extra = sorted(k for k in config if k not in known)
        if extra:
            warnings.warn(f"ignoring unknown config keys {extra} in {folder / CONFIG_NAME}", stacklevel=4)
        return {k: v for k, v in config.items() if k in known}

    @classmethod
    def _from_checkpoint(cls, config: dict[str, Any], *, genes, meta: dict[str, Any], folder: Path):
        return cls(cls._known_config(config, folder), genes=genes, units=meta.get("units"))  # type: ignore[call-arg]

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
            Where to put the model; default CPU. A ``device`` stored in the config (the released
            SEQUOIA configs say ``"cuda:0"``) is ignored, so CPU-only machines load them fine.
        local_files_only
            Only use the Hugging Face cache, never the network.
        strict
            Require the checkpoint's parameter names to match exactly.

        Example
        -------
        >>> from histoexpr.models import Sequoia
        >>> model = Sequoia.from_pretrained("hf-hub:gevaertlab/sequoia-brca-0")  # doctest: +SKIP
        """
        from .._utils import get_device

        folder = resolve_checkpoint_dir(path_or_repo, local_files_only=local_files_only)
        config = read_config(folder)
        meta = read_meta(folder)
        gene_file = find_gene_file(folder)
        genes = read_gene_file(gene_file) if gene_file is not None else None
        model = cls._from_checkpoint(config, genes=genes, meta=meta, folder=folder)
        state = match_prefixes(load_checkpoint_state(folder), list(model.state_dict()))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if strict and (missing or unexpected):
            raise ValueError(
                f"checkpoint {folder} does not fit {cls.__name__}{short_config(config)}: "
                f"missing parameters {sorted(missing)[:8]}{'...' if len(missing) > 8 else ''}, "
                f"unexpected parameters {sorted(unexpected)[:8]}{'...' if len(unexpected) > 8 else ''}. "
                "Is it a checkpoint of a different architecture?"
            )
        model.checkpoint = str(path_or_repo)
        model.eval()
        return model.to(get_device(device if device is not None else "cpu"))


class ExpressionModule(PretrainedMixin, nn.Module):
    """Base of the configurable expression models: ``Cls(config=None, *, genes=None, units=None, **kwargs)``.

    The constructor merges ``config_defaults``, ``config`` and keyword arguments (unknown keys are an
    error), casts ``int_keys`` to int, calls :meth:`_build` with the merged config, then checks the
    gene list against ``num_outputs``.
    """

    int_keys: tuple[str, ...] = ()

    def __init__(
        self,
        config: Mapping[str, Any] | None = None,
        *,
        genes: Sequence[str] | None = None,
        units: str | None = None,
        **kwargs: Any,
    ):
        super().__init__()
        cfg = self._configure(config, kwargs, ints=self.int_keys)
        self._build(cfg)
        self._set_outputs(self._default_genes(cfg, genes), units, cfg["num_outputs"])

    def _build(self, cfg: dict[str, Any]) -> None:
        raise NotImplementedError

    def _default_genes(self, cfg: dict[str, Any], genes: Sequence[str] | None) -> Sequence[str] | None:
        return genes
