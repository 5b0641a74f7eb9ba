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
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

from .._utils import get_device

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["autocast", "batched_inference", "eval_on", "inference", "load_models", "resolve_device"]

Precision = Literal["auto", "bf16", "fp32"]


def resolve_device(device: Any = None) -> torch.device:
    """The device to run on: ``device`` when given (checked to exist), else CUDA when available, else CPU.

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
    progress: bool = False,
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
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch")
    with inference(models, device, precision):
        return [step(slice(s, min(s + batch_size, n))) for s in starts]


def load_models(model: Any, *, loader: Callable[[str | os.PathLike], Any] | None = None) -> list[Any]:
    """A model, a checkpoint directory / ``"hf-hub:owner/repo"``, or a list of those → a list of models.

    Paths are loaded with :func:`histoexpr.models.load_model` (or ``loader``), in eval mode on the CPU;
    model objects are returned as they are (they are moved to the device only while predicting).
    """
    items = list(model) if isinstance(model, (list, tuple)) else [model]
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
