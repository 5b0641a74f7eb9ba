"""The torch runtime every ``tl`` verb shares: models from objects or checkpoints, the device policy,
eval-mode inference with device restore, mixed precision, and one fit loop with early stopping.

Device policy (:func:`resolve_device`): ``device=None`` means CUDA when available, else CPU; a device
that was asked for but is not there (``"cuda"`` without CUDA, ``"mps"`` without MPS) is an error
naming the fix, never a silent fallback.

Precision policy (:func:`autocast`): inference runs in bf16 autocast on CUDA devices that support
bf16 (matmuls in bf16, reductions and outputs in fp32) and in fp32 on the CPU unless bf16 is asked for
explicitly. Outputs are always returned as float32.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd

from .._settings import progress_bar
from .._utils import get_device

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["TrainResult", "autocast", "batched_inference", "eval_on", "fit", "inference", "load_models",
           "resolve_device"]

Precision = Literal["auto", "bf16", "fp32"]


def resolve_device(device: Any = None) -> torch.device:
    """The device to run on: ``device`` when given (checked to exist), else ``histoexpr.settings.device``
    (default ``"auto"``: CUDA when available, else CPU).

    Example
    -------
    >>> from histoexpr.tl._runtime import resolve_device
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    return get_device(device)


def autocast(device: torch.device | str, precision: Precision = "auto") -> contextlib.AbstractContextManager:
    """Mixed-precision context for inference on ``device``.

    ``"auto"``: bf16 on CUDA devices that support it, fp32 (no autocast) elsewhere. ``"bf16"``: bf16
    autocast on CUDA or CPU. ``"fp32"``: no autocast.

    Example
    -------
    >>> import torch
    >>> from histoexpr.tl._runtime import autocast
    >>> with autocast("cpu", "bf16"):
    ...     y = torch.nn.Linear(4, 2)(torch.ones(1, 4))
    >>> y.dtype
    torch.bfloat16
    """
    import torch

    device = torch.device(device)
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32'; got {precision!r}")
    if precision == "fp32" or device.type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    if device.type == "cuda" and (precision == "bf16" or torch.cuda.is_bf16_supported()):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def eval_on(models: Sequence[Any], device: torch.device) -> Iterator[None]:
    """``models`` in eval mode on ``device`` inside the block; each model's mode and device restored after.

    Objects without parameters (or that are not ``nn.Module``) are left alone.
    """
    saved = []
    for m in models:
        if not hasattr(m, "parameters"):
            continue
        param = next(m.parameters(), None)
        saved.append((m, m.training, param.device if param is not None else None))
    try:
        for m, _, _ in saved:
            m.eval().to(device)
        yield
    finally:
        for m, training, dev in saved:
            if dev is not None:
                m.to(dev)
            m.train(training)


@contextlib.contextmanager
def inference(models: Sequence[Any], device: torch.device, precision: Precision = "auto") -> Iterator[None]:
    """:func:`eval_on` + ``torch.inference_mode`` + :func:`autocast`: the context of every prediction."""
    import torch

    with eval_on(models, device), torch.inference_mode(), autocast(device, precision):
        yield


def batched_inference(
    n: int,
    batch_size: int,
    step: Callable[[slice], Any],
    *,
    models: Sequence[Any],
    device: torch.device,
    precision: Precision = "auto",
    progress: bool | None = False,
    desc: str = "batches",
) -> list[Any]:
    """Call ``step(slice)`` for consecutive batches of ``range(n)`` inside :func:`inference`.

    Returns the list of what ``step`` returned (e.g. float32 numpy arrays to concatenate).

    Example
    -------
    >>> import numpy as np, torch
    >>> from histoexpr.tl._runtime import batched_inference
    >>> net, x = torch.nn.Linear(3, 2), np.ones((5, 3), np.float32)
    >>> out = batched_inference(5, 2, lambda s: net(torch.from_numpy(x[s])).float().numpy(),
    ...                         models=[net], device=torch.device("cpu"))
    >>> np.concatenate(out).shape
    (5, 2)
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size}")
    starts: Any = range(0, n, batch_size)
    if progress is not False:
        starts = progress_bar(starts, enabled=progress, desc=desc, unit="batch")
    with inference(models, device, precision):
        return [step(slice(s, min(s + batch_size, n))) for s in starts]


def load_models(model: Any, *, loader: Callable[[str | os.PathLike], Any] | None = None) -> list[Any]:
    """A model, a checkpoint directory / ``"hf-hub:owner/repo"``, or a list of those → a list of models.

    Paths are loaded with :func:`histoexpr.models.load_model` (or ``loader``), in eval mode on the CPU;
    model objects are returned as they are (they are moved to the device only while predicting).
    """
    items = list(model) if isinstance(model, (list, tuple)) else [model]
    # a training result stands for its model(s): the fold models of train_bulk
    items = [m for item in items for m in ((item.models or [item.model]) if isinstance(item, TrainResult) else [item])]
    if not items:
        raise ValueError("`model` is an empty list; pass a model, a checkpoint directory or a list of them")
    if loader is None:
        from ..models import load_model as loader
    out = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            out.append(loader(item).eval())
        elif callable(getattr(item, "forward", None)) or hasattr(item, "predict"):
            out.append(item)
        else:
            raise TypeError(
                "`model` must be a model (torch.nn.Module), a checkpoint directory or 'hf-hub:owner/repo' "
                f"id, or a list of those; got {type(item).__name__}"
            )
    return out


def model_info(model: Any, name: str) -> Any:
    """An attribute of the model contract (``genes``, ``units``, ``input_dim``, ``num_outputs``,
    ``num_clusters``, ``num_conditions``, ``conditions``): the attribute, else its ``config`` entry."""
    value = getattr(model, name, None)
    if value is None:
        cfg = getattr(model, "config", None)
        value = cfg.get(name) if isinstance(cfg, dict) else None
    return value


def model_id(model: Any) -> str:
    """The checkpoint a model was loaded from, else its class name."""
    return str(getattr(model, "checkpoint", None) or type(model).__name__)


def accepts_coords(model: Any) -> bool:
    """Whether the model's ``forward`` takes tile coordinates (``coords=``), as HistoPrism does."""
    import inspect

    try:
        return "coords" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------------------------
# training: one fit loop, one result
# --------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What every ``tl.train_*`` returns.

    Attributes
    ----------
    model
        The trained model (weights of the best epoch, eval mode); ``None`` for cross-validation, where
        ``models`` holds one model per fold.
    history
        One row per epoch (and fold): ``epoch``, ``train_loss``, the validation metrics, ...
    best_epoch
        Epoch whose weights were kept (``-1`` when no epoch was kept).
    best_score
        Validation loss of that epoch (training loss when there was no validation data).
    epochs_run
        Epochs trained (per fold for cross-validation: see ``folds``).
    models
        Trained models: one per fold (``train_bulk``), else ``[model]``.
    predictions
        ``train_bulk``: pooled held-out predictions (AnnData slides × genes, layers ``random`` and ``truth``).
    folds
        ``train_bulk``: one row per fold (sizes, best epoch, checkpoint).
    split
        ``train_fusion``: the train/val/test label of each crop.
    test_loss
        ``train_spatial``: mean loss on the test slides (``None`` without them).
    seconds, device
        Wall time and the device trained on.

    For one release the old result shapes keep working: ``BulkCVResult`` and ``FusionFit`` are this
    class, ``best_val_mse`` is ``best_score``, and attributes of ``model`` (``train_spatial`` used to
    return the model itself) are reachable on the result with a ``DeprecationWarning``.
    """

    model: Any = None
    history: pd.DataFrame = field(default_factory=pd.DataFrame)
    best_epoch: int | None = None
    best_score: float | None = None
    epochs_run: int | None = None
    models: list = field(default_factory=list)
    predictions: Any = None
    folds: pd.DataFrame | None = None
    split: pd.Series | None = None
    test_loss: float | None = None
    seconds: float = 0.0
    device: str = "cpu"

    @property
    def best_val_mse(self) -> float | None:
        """Old name (``FusionFit``) of :attr:`best_score`."""
        return self.best_score

    def well_predicted_genes(self, **kwargs: Any) -> pd.DataFrame:
        """:func:`histoexpr.metrics.well_predicted_genes` on the pooled held-out predictions (``train_bulk``)."""
        from histoexpr.metrics import well_predicted_genes

        p = self.predictions
        if p is None or "random" not in getattr(p, "layers", {}):
            raise ValueError("well_predicted_genes needs the cross-validated predictions of train_bulk")
        return well_predicted_genes(p.X, p.layers["truth"], p.layers["random"], genes=list(p.var_names), **kwargs)

    def __getattr__(self, name: str) -> Any:
        # compatibility: train_spatial used to return the model itself
        model = self.__dict__.get("model")
        if name.startswith("__") or model is None or not hasattr(model, name):
            raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")
        warnings.warn(f"TrainResult.{name} is deprecated: use TrainResult.model.{name}", DeprecationWarning,
                      stacklevel=2)
        return getattr(model, name)


class Patience:
    """Keep the epoch with the lowest ``monitor``; stop after ``patience`` epochs without improvement
    (``patience=None``: never stop early)."""

    def __init__(self, patience: int | None, monitor: str):
        self.patience, self.monitor = patience, monitor
        self.best = math.inf
        self.stale = 0

    def update(self, row: Mapping[str, Any]) -> tuple[bool, bool]:
        """Record one epoch's metrics; return ``(save, stop)``."""
        score = row[self.monitor]
        if score < self.best:
            self.best, self.stale = score, 0
            return True, False
        self.stale += 1
        return False, self.patience is not None and self.stale >= self.patience


@dataclass
class FitLog:
    rows: list[dict]
    best_epoch: int
    best_row: dict | None


def _snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fit(
    model,
    train_epoch: Callable[[int], Mapping[str, Any]],
    *,
    max_epochs: int,
    validate: Callable[[], Mapping[str, Any]] | None = None,
    stopper: Any = None,
    on_save: Callable[[int, dict], None] | None = None,
    timed: bool = False,
    progress: bool | None = False,
    desc: str = "epochs",
    leave: bool = True,
) -> FitLog:
    """The fit loop of every trainer.

    Each epoch: ``model.train()``, ``train_epoch(epoch)`` (returns e.g. ``{"train_loss": ...}``), then
    ``validate()`` (returns the validation metrics). ``stopper.update(row)`` says whether to keep these
    weights and whether to stop (``None``: keep every epoch, i.e. the last). Kept weights are copied;
    ``on_save(epoch, row)`` runs after each (e.g. writes a checkpoint). At the end the kept weights are
    loaded (the initial ones when no epoch was kept) and the model is put in eval mode.
    """
    import time

    if int(max_epochs) < 1:
        raise ValueError(f"max_epochs must be ≥ 1, got {max_epochs}.")
    best_state, best_epoch, best_row = _snapshot(model), -1, None
    rows: list[dict] = []
    bar = progress_bar(range(int(max_epochs)), enabled=progress, desc=desc, leave=leave)
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        row: dict[str, Any] = {"epoch": epoch, **train_epoch(epoch)}
        if validate is not None:
            row.update(validate())
        if timed:
            row["seconds"] = time.perf_counter() - t0
        save, stop = stopper.update(row) if stopper is not None else (True, False)
        row["saved"] = save
        rows.append(row)
        if save:
            best_state, best_epoch, best_row = _snapshot(model), epoch, row
            if on_save is not None:
                on_save(epoch, row)
        bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if isinstance(v, float)})
        if stop:
            break
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    return FitLog(rows, best_epoch, best_row)
