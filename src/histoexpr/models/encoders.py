"""Tile encoders: a small registry of feature extractors and their weights.

An encoder is a plain :class:`torch.nn.Module` mapping a batch of normalised tiles ``(B, 3, S, S)``
to features ``(B, D)``, plus what it needs to be used correctly: its input size and normalisation,
its output dimension and the precision it runs best in on a GPU.

Built-ins:

* ``"uni"`` – UNI (Chen et al. 2024): timm ``vit_large_patch16_224`` with ``init_values=1e-5``,
  ``num_classes=0``, ``dynamic_img_size=True``; 224 px, ImageNet mean/std, CLS token, 1024-d.
  Weights: ``pytorch_model.bin`` from https://huggingface.co/MahmoodLab/UNI (gated).
* ``"resnet50"`` – ImageNet ResNet-50 (as in SEQUOIA), global average pool, 2048-d.
* any other timm model name (``num_classes=0``; dimension ``model.num_features``);
* a user :class:`torch.nn.Module` with its own transform.

Weights are never fetched behind the user's back: pass a local file or folder, ``"hf-hub:org/name"``
(needs internet), put them in the weights folder (``$HISTOEXPR_WEIGHTS``, default
``~/.cache/histoexpr/weights/<encoder>/``), or ask for ``weights="random"`` explicitly (tests, demos).
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import numpy as np

from ._base import WEIGHT_FILES, CheckpointError, find_weights_file, match_prefixes
from ._base import read_state_dict as _read_state_dict

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_PRECISIONS = ("bf16", "fp16", "fp32")


class EncoderWeightsError(CheckpointError):
    """Pretrained weights are missing, unreachable, or do not fit the encoder."""


# ---------------------------------------------------------------------------- transforms
class TileTransform:
    """Tile ``uint8 (H, W, 3)`` → normalised ``float32 (3, S, S)`` tensor.

    The transform is split in two so that the heavy part can run on the GPU: :meth:`to_uint8`
    (resize only, in DataLoader workers) and :meth:`normalize` (float, scale, mean/std on the device).
    Calling the object does both on the CPU. Picklable (no lambdas), so it can go to workers.
    """

    def __init__(self, size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.size = int(size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._constants: dict = {}  # per-device (shift, scale); not pickled

    def to_uint8(self, tile: np.ndarray) -> torch.Tensor:
        """Resize (if needed, bilinear with antialiasing) and return a ``uint8 (3, S, S)`` tensor."""
        import torch

        tile = np.asarray(tile)
        if tile.ndim != 3 or tile.shape[-1] not in (3, 4):
            raise ValueError(f"expected an RGB tile of shape (H, W, 3), got {tile.shape}")
        tile = tile[..., :3]
        if tile.shape[0] != self.size or tile.shape[1] != self.size:
            from PIL import Image

            tile = np.asarray(Image.fromarray(np.ascontiguousarray(tile)).resize((self.size, self.size),
                                                                                 Image.BILINEAR))
        if not tile.flags.writeable or not tile.flags.c_contiguous:
            tile = np.array(tile, dtype=np.uint8, order="C")  # torch wants writable memory
        return torch.from_numpy(tile).permute(2, 0, 1).contiguous()

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """``uint8 (B, 3, S, S)`` (any device) → ``float32`` normalised, same device."""
        import torch

        consts = self._constants.get(batch.device)
        if consts is None:
            # Made once per device: creating them per batch would be a blocking host→GPU copy that
            # waits for the previous batch's forward pass.
            mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
            inv_std = 1.0 / (torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
            consts = self._constants[batch.device] = (mean.to(batch.device), inv_std.to(batch.device))
        mean, inv_std = consts
        return (batch.float() - mean) * inv_std

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_constants": {}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._constants = {}

    def __call__(self, tile: np.ndarray) -> torch.Tensor:
        return self.normalize(self.to_uint8(tile)[None])[0]

    def __repr__(self) -> str:
        return f"TileTransform(size={self.size}, mean={self.mean}, std={self.std})"


# ---------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class EncoderSpec:
    """A registered encoder: how to build it and how to feed it."""

    name: str
    factory: Callable[[], nn.Module]
    transform: Callable | None = None
    input_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    dim: int | None = None
    precision: str = "bf16"
    hf_hub_id: str | None = None
    download_hint: str | None = None


@dataclass
class Encoder:
    """An encoder ready to use: the module and everything needed to feed it.

    Attributes
    ----------
    name
        Registry name (used for the default feature key ``X_<name>``).
    module
        The :class:`torch.nn.Module`, in eval mode; ``(B, 3, S, S)`` → ``(B, dim)``.
    transform
        Tile ``uint8 (H, W, 3)`` → normalised tensor ``(3, S, S)``. A :class:`TileTransform` for
        built-ins (resize in workers, normalisation on the device).
    dim
        Output feature dimension.
    precision
        Preferred autocast precision on CUDA: ``"bf16"``, ``"fp16"`` or ``"fp32"``.
    input_size
        Tile side ``S`` in pixels the encoder expects.
    weights
        Where the weights came from: a file path, ``"hf-hub:org/name"``, ``"random"`` or ``"user"``.
    """

    name: str
    module: nn.Module
    transform: Callable
    dim: int
    precision: str = "bf16"
    input_size: int = 224
    weights: str = "user"
    extra: dict = field(default_factory=dict)

    def fingerprint(self) -> str:
        """A short hash identifying the encoder and its weights (cheap: samples each parameter)."""
        import torch

        h = hashlib.sha1()
        h.update(f"{self.name}|{self.weights}|{self.dim}|{self.input_size}|{self.transform!r}".encode())
        with torch.no_grad():
            for key, t in self.module.state_dict().items():
                flat = t.detach().reshape(-1)
                sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy()
                h.update(key.encode())
                h.update(str(tuple(t.shape)).encode())
                h.update(np.ascontiguousarray(sample).tobytes())
        return h.hexdigest()[:16]

    def info(self) -> dict[str, Any]:
        """Metadata recorded in ``uns["histoexpr"]``."""
        return {
            "encoder": self.name,
            "encoder_weights": self.weights,
            "encoder_dim": int(self.dim),
            "encoder_input_size": int(self.input_size),
            "encoder_precision": self.precision,
        }


_REGISTRY: dict[str, EncoderSpec] = {}


def register_encoder(
    name: str,
    factory: Callable[[], nn.Module],
    *,
    transform: Callable | None = None,
    input_size: int = 224,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    dim: int | None = None,
    precision: str = "bf16",
    hf_hub_id: str | None = None,
    download_hint: str | None = None,
    overwrite: bool = False,
) -> None:
    """Register an encoder under ``name`` so that ``get_encoder(name)`` and
    ``pp.extract_features(..., encoder=name)`` can use it.

    Parameters
    ----------
    name
        Registry key (lower case); also the default feature key ``X_<name>``.
    factory
        Zero-argument callable building the architecture with **random** weights
        (weights are loaded separately, see :func:`get_encoder`).
    transform
        Tile ``uint8 (H, W, 3)`` → normalised tensor. Default: :class:`TileTransform` with
        ``input_size``, ``mean`` and ``std``.
    input_size, mean, std
        Used for the default transform.
    dim
        Output dimension; inferred from ``module.num_features`` or a dummy forward when ``None``.
    precision
        Preferred autocast precision on CUDA (``"bf16"``, ``"fp16"`` or ``"fp32"``).
    hf_hub_id
        Default Hugging Face repo of the weights (``"org/name"``), used when online.
    download_hint
        Extra sentence for the error shown when no weights are available (e.g. licence/gating).
    overwrite
        Replace an existing entry of the same name.

    Example
    -------
    >>> import timm
    >>> from histoexpr.models import register_encoder
    >>> register_encoder(
    ...     "my_vit",
    ...     lambda: timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0),
    ...     dim=384,
    ... )  # doctest: +SKIP
    """
    key = name.lower()
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"an encoder named {name!r} is already registered; pass overwrite=True to replace it")
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
    _REGISTRY[key] = EncoderSpec(
        name=key, factory=factory, transform=transform, input_size=int(input_size), mean=tuple(mean),
        std=tuple(std), dim=dim, precision=precision, hf_hub_id=hf_hub_id, download_hint=download_hint,
    )


def list_encoders() -> list[str]:
    """Names of the registered encoders (any timm model name works as well)."""
    return sorted(_REGISTRY)


def _uni_factory():
    import timm

    return timm.create_model(
        "vit_large_patch16_224", pretrained=False, init_values=1e-5, num_classes=0, dynamic_img_size=True
    )


def _resnet50_factory():
    import timm

    return timm.create_model("resnet50", pretrained=False, num_classes=0, global_pool="avg")


register_encoder(
    "uni", _uni_factory, input_size=224, dim=1024, precision="bf16", hf_hub_id="MahmoodLab/UNI",
    download_hint=(
        "UNI is gated: accept its licence on https://huggingface.co/MahmoodLab/UNI, then download "
        "pytorch_model.bin (e.g. `huggingface-cli download MahmoodLab/UNI pytorch_model.bin`)."
    ),
)
register_encoder(
    "resnet50", _resnet50_factory, input_size=224, dim=2048, precision="bf16",
    hf_hub_id="timm/resnet50.tv_in1k",
    download_hint=(
        "ImageNet ResNet-50 weights (torchvision V1, as in SEQUOIA): model.safetensors from "
        "https://huggingface.co/timm/resnet50.tv_in1k."
    ),
)


# ---------------------------------------------------------------------------- get_encoder
def get_encoder(
    name_or_module: str | nn.Module | Encoder = "uni",
    *,
    weights: str | os.PathLike | None = None,
    transform: Callable | None = None,
    dim: int | None = None,
    precision: str | None = None,
    name: str | None = None,
) -> Encoder:
    """Build an encoder with its weights, transform, output dimension and preferred precision.

    Parameters
    ----------
    name_or_module
        A registered name (``"uni"``, ``"resnet50"``, see :func:`list_encoders`), any timm model
        name, a :class:`torch.nn.Module` ``(B, 3, S, S) → (B, D)``, or an :class:`Encoder` (returned
        as is, with ``transform``/``precision`` overrides applied).
    weights
        * ``None``: the encoder's default weights, looked up in the weights folder
          ``$HISTOEXPR_WEIGHTS/<name>/`` (default ``~/.cache/histoexpr/weights/<name>/``), then the Hugging
          Face cache, then the Hub when online. For a user module: its current weights.
        * a local file (``.safetensors``, ``.bin``, ``.pth``, ``.pt``) or a folder with
          ``model.safetensors`` / ``pytorch_model.bin`` (timm / Hugging Face layouts); state dicts
          wrapped in ``{"state_dict": ...}`` or ``{"model": ...}`` and ``module.`` prefixes are handled.
        * ``"hf-hub:org/name"``: download from the Hugging Face Hub (needs internet).
        * ``"random"``: random initialisation, **only** for tests and demos (recorded as such).
    transform
        Override the tile transform (tile ``uint8 (H, W, 3)`` → tensor ``(3, S, S)``).
    dim
        Output dimension of a user module (inferred when ``None``).
    precision
        Override the preferred CUDA precision (``"bf16"``, ``"fp16"``, ``"fp32"``).
    name
        Name to record for a user module (default: its class name, lower case).

    Returns
    -------
    An :class:`Encoder` whose module is in eval mode (built-ins on the CPU).

    Raises
    ------
    EncoderWeightsError
        When no weights are given and none can be found offline: the message says what to download
        and where to put it.

    Example
    -------
    >>> from histoexpr.models import get_encoder
    >>> enc = get_encoder("uni", weights="~/models/uni/pytorch_model.bin")  # doctest: +SKIP
    >>> enc.dim, enc.input_size  # doctest: +SKIP
    (1024, 224)
    >>> tiny = get_encoder("resnet18", weights="random")  # random weights: tests and demos only
    >>> tiny.dim
    512
    """
    from torch import nn

    if precision is not None and precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")

    if isinstance(name_or_module, Encoder):
        enc = name_or_module
        source = enc.weights if weights is None else load_weights(enc.module, weights)
        return replace(enc, transform=transform or enc.transform, precision=precision or enc.precision,
                       weights=source)

    if isinstance(name_or_module, nn.Module):
        module = name_or_module
        module_name = (name or type(module).__name__).lower()
        source = "user"
        if weights is not None and weights != "random":
            source = load_weights(module, weights)
        input_size, tf = _transform_for_module(module, transform)
        return Encoder(
            name=module_name, module=module.eval(), transform=tf,
            dim=int(dim or _infer_dim(module, input_size)), precision=precision or "bf16",
            input_size=input_size, weights=source,
        )

    if not isinstance(name_or_module, str):
        raise TypeError(
            f"encoder must be a name (str), a torch.nn.Module or an Encoder, got {type(name_or_module).__name__}"
        )
    key = name_or_module
    if key.startswith("hf-hub:"):
        return _timm_hub_encoder(key, transform=transform, precision=precision)
    spec = _REGISTRY.get(key.lower()) or _timm_spec(key)
    module = None
    try:
        source, path = _resolve_weights(spec, weights)  # before building: a missing file fails fast
    except EncoderWeightsError:
        if weights is not None or spec.hf_hub_id:
            raise
        module = spec.factory()
        if any(True for _ in module.parameters()):
            raise
        source, path = "none (no learnable parameters)", None  # e.g. hand-crafted features
    module = module if module is not None else spec.factory()
    if path is not None:
        _load_file_into(module, path)
    tf = transform or spec.transform or TileTransform(spec.input_size, spec.mean, spec.std)
    input_size = getattr(tf, "size", spec.input_size)
    return Encoder(
        name=spec.name, module=module.eval(), transform=tf,
        dim=int(spec.dim or _infer_dim(module, input_size)), precision=precision or spec.precision,
        input_size=int(input_size), weights=source,
    )


def _timm_spec(name: str) -> EncoderSpec:
    import timm

    if not timm.is_model(name):
        raise ValueError(
            f"unknown encoder {name!r}: not registered ({', '.join(list_encoders())}) and not a timm model "
            "name (see timm.list_models()). Register your own with histoexpr.models.register_encoder, "
            "or pass a torch.nn.Module."
        )

    probe = timm.create_model(name, pretrained=False, num_classes=0)
    built = [probe]

    def factory():
        # The probe built to read the config is handed out once, then fresh models are built.
        return built.pop() if built else timm.create_model(name, pretrained=False, num_classes=0)

    cfg = probe.pretrained_cfg or {}
    input_size = int(cfg.get("input_size", (3, 224, 224))[-1])
    hub = cfg.get("hf_hub_id")
    return EncoderSpec(
        name=name.lower(), factory=factory, input_size=input_size,
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)), std=tuple(cfg.get("std", IMAGENET_STD)),
        dim=int(probe.num_features), precision="bf16", hf_hub_id=hub,
        download_hint=f"timm's default weights for {name!r}: model.safetensors from "
        f"https://huggingface.co/{hub}." if hub else None,
    )


def _timm_hub_encoder(key: str, *, transform, precision) -> Encoder:
    """``"hf-hub:org/name"`` as the encoder itself: timm builds architecture and weights from the Hub."""
    import timm

    repo = key.removeprefix("hf-hub:")
    _require_online(
        f"encoder {key!r} is built from the Hugging Face Hub (config and weights of {repo}), which "
        "cannot be reached. Use a registered encoder name with local weights instead, e.g. "
        "get_encoder('uni', weights='/path/to/pytorch_model.bin')."
    )
    kwargs = {"init_values": 1e-5, "dynamic_img_size": True} if repo.lower() == "mahmoodlab/uni" else {}
    try:
        module = timm.create_model(key, pretrained=True, num_classes=0, **kwargs)
    except Exception as e:  # noqa: BLE001 - turn hub/auth errors into one clear message
        raise EncoderWeightsError(
            f"could not build {key!r} from the Hugging Face Hub: {type(e).__name__}: {e}. Gated repos "
            "need `huggingface-cli login` after accepting the licence on the model page."
        ) from e
    cfg = module.pretrained_cfg or {}
    tf = transform or TileTransform(
        int(cfg.get("input_size", (3, 224, 224))[-1]), cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    )
    return Encoder(
        name=repo.split("/")[-1].lower(), module=module.eval(), transform=tf, dim=int(module.num_features),
        precision=precision or "bf16", input_size=int(getattr(tf, "size", 224)), weights=key,
    )


def _transform_for_module(module, transform) -> tuple[int, Callable]:
    if transform is not None:
        return int(getattr(transform, "size", 224)), transform
    cfg = getattr(module, "pretrained_cfg", None) or {}
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    return size, TileTransform(size, cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))


def _infer_dim(module, input_size: int) -> int:
    import torch

    if isinstance(getattr(module, "num_features", None), int) and getattr(module, "num_classes", 0) == 0:
        return int(module.num_features)
    with torch.inference_mode():
        out = module.eval()(torch.zeros(1, 3, input_size, input_size))
    if out.ndim != 2:
        raise ValueError(
            f"the encoder must return (batch, features); it returned shape {tuple(out.shape)}. "
            "Wrap it so that it pools its output (e.g. timm num_classes=0)."
        )
    return int(out.shape[1])


# ---------------------------------------------------------------------------- weights
def weights_dir() -> Path:
    """Folder searched for default weights: ``$HISTOEXPR_WEIGHTS`` or ``~/.cache/histoexpr/weights``."""
    return Path(os.environ.get("HISTOEXPR_WEIGHTS", Path.home() / ".cache" / "histoexpr" / "weights")).expanduser()


def _resolve_weights(spec: EncoderSpec, weights) -> tuple[str, str | Path | None]:
    """``(source description, local file to load or None for random)``; downloads when asked/online."""
    if weights is not None and str(weights) == "random":
        return "random", None
    if weights is not None:
        return _weights_file(weights)
    local = weights_dir() / spec.name
    if local.is_dir() and _find_weight_file(local, required=False) is not None:
        return _weights_file(local)
    if spec.hf_hub_id:
        cached = _hub_file(spec.hf_hub_id, local_files_only=True)
        if cached is not None:
            return f"hf-hub:{spec.hf_hub_id}", cached
        if _hub_reachable():
            return _weights_file(f"hf-hub:{spec.hf_hub_id}")
    raise EncoderWeightsError(_missing_weights_message(spec, local))


def _missing_weights_message(spec: EncoderSpec, local: Path) -> str:
    what = spec.download_hint or (
        f"weights for {spec.name!r} (a state dict as model.safetensors or pytorch_model.bin)"
    )
    where = f"https://huggingface.co/{spec.hf_hub_id}" if spec.hf_hub_id else "its authors"
    return (
        f"no weights for encoder {spec.name!r}, and the Hugging Face Hub is not reachable (offline). "
        f"Download: {what} Source: {where}. Then either pass weights='/path/to/that/file' (or its "
        f"folder), or put the file in {local}/ (set $HISTOEXPR_WEIGHTS to use another folder). "
        "For tests and demos only, weights='random' uses random initialisation."
    )


def load_weights(module, weights: str | os.PathLike) -> str:
    """Load ``weights`` (file, folder or ``"hf-hub:org/name"``) into ``module``; return the source.

    The state dict is unwrapped (``state_dict`` / ``model`` keys, ``module.`` prefixes) and must
    match the module's keys exactly (classifier-head keys of a headless model are ignored).
    """
    source, path = _weights_file(weights)
    _load_file_into(module, path)
    return source


def _weights_file(weights: str | os.PathLike) -> tuple[str, str | Path]:
    """``(source description, local weights file)`` for a file, folder or ``"hf-hub:org/name"``."""
    w = str(weights)
    if w.startswith("hf-hub:"):
        repo = w.removeprefix("hf-hub:")
        _require_online(
            f"weights {w!r} are on the Hugging Face Hub, which cannot be reached (offline). Download "
            f"model.safetensors or pytorch_model.bin from https://huggingface.co/{repo} on a machine "
            "with internet and pass weights='/path/to/file' (or put it in "
            f"{weights_dir()}/<encoder name>/)."
        )
        path = _hub_file(repo, local_files_only=False)
        if path is None:
            raise EncoderWeightsError(
                f"{repo} on the Hugging Face Hub has none of {WEIGHT_FILES[:2]} (or access was denied: gated "
                "repos need `huggingface-cli login` after accepting the licence on the model page)."
            )
        return w, path
    path = Path(w).expanduser()
    if not path.exists():
        raise EncoderWeightsError(f"weights file or folder not found: {path}")
    if path.is_dir():
        path = _find_weight_file(path, required=True)
    return str(path.resolve()), path


def _find_weight_file(folder: Path, *, required: bool) -> Path | None:
    found = find_weights_file(folder)
    if found is None and required:
        candidates = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pth", ".pt"))
        raise EncoderWeightsError(
            f"no weights file in {folder}: expected one of {WEIGHT_FILES}"
            + (f" (found several candidates: {candidates}; pass the file)" if candidates else "")
        )
    return found


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch pickle, unwrapped and without ``module.``."""
    return _read_state_dict(path, error=EncoderWeightsError)


def _load_file_into(module, path: str | os.PathLike) -> None:
    expected = module.state_dict()
    sd = match_prefixes(read_state_dict(path), list(expected))
    head = (getattr(module, "pretrained_cfg", None) or {}).get("classifier")
    heads = [head] if isinstance(head, str) else list(head or [])
    if getattr(module, "num_classes", None) == 0 and heads:
        # A checkpoint of the classification model loaded into the headless feature extractor.
        sd = {k: v for k, v in sd.items() if not (k not in expected and any(k.startswith(h + ".") for h in heads))}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mismatched = sorted(k for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:5]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:5]})")
        if mismatched:
            parts.append(
                f"{len(mismatched)} shape mismatches (e.g. "
                + ", ".join(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}" for k in mismatched[:3])
                + ")"
            )
        raise EncoderWeightsError(
            f"the weights in {path} do not fit this encoder ({type(module).__name__}): "
            + "; ".join(parts)
            + ". Check that the file belongs to this architecture (e.g. UNI weights need encoder='uni')."
        )
    module.load_state_dict(sd, strict=True)


# ---------------------------------------------------------------------------- hub access
def _hub_reachable(timeout: float = 3.0) -> bool:
    """Fast check (no retries) that the Hugging Face endpoint can be reached."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    if getattr(constants, "HF_HUB_OFFLINE", False):
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _require_online(message: str) -> None:
    if not _hub_reachable():
        raise EncoderWeightsError(message)


def _hub_file(repo: str, *, local_files_only: bool) -> str | None:
    """Path to the first of :data:`WEIGHT_FILES` in ``repo`` (local cache only, or downloaded)."""
    from huggingface_hub import hf_hub_download

    for fname in WEIGHT_FILES[:2]:
        try:
            return hf_hub_download(repo, fname, local_files_only=local_files_only)
        except Exception:  # noqa: BLE001 - try the next file name, report once below
            continue
    return None
