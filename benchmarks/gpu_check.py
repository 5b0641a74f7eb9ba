"""GPU readiness check: one script, one JSON object on stdout.

Run on a machine with CUDA (budget: well under 8 minutes on one GPU)::

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json]

Without CUDA, or with ``--cpu``, it runs the same sections at tiny sizes on the CPU (well under a
minute), so that the script is exercised in CI and cannot rot (``tests/test_gpu_check.py``). The
CPU fallback uses torch's thread setting as it finds it (set ``OMP_NUM_THREADS``) and times fp32,
since bf16 matmuls on CPUs without AMX are far slower; its agreement check still compares bf16.

Sections (each wrapped: a failure is recorded as ``{"error": ...}`` and the others still run):

* ``matmul_peak``: measured dense bf16 matmul rate (8192² GEMMs timed with CUDA events); every
  ``fraction_of_measured_peak`` below is relative to it;
* ``uni_vit_l16``: UNI-size ViT-L/16 (timm ``vit_large_patch16_224``, random weights) in bf16 at
  batch 256, tiles/s against that peak (FLOPs per tile counted with torch's FLOP counter and by
  formula), with the decode / host→device transfer / compute split per batch. Decode reads real
  224 px tiles through ``histoexpr.io.open_slide`` from ``cmu-1-small-region.svs`` when the data
  folder is reachable, else decodes synthetic JPEG tiles; transfer copies a pinned uint8 batch;
* ``sequoia_sliding_window``: ``histoexpr.models.Sequoia`` at the official size (D 1024, 6 blocks ×
  16 heads, 100 slots, 20,820 genes, random weights): windows/s of the model forward on batches of
  gathered windows (what the sliding window computes), against peak;
* ``histoprism``: ``histoexpr.models.HistoPrism`` (D 1024, its default width/depth) on one
  4,096-tile context, tiles/s against peak;
* ``fusion_training``: ``histoexpr.models.FusionViT`` on ``vit_small_patch16_224`` with AdamW in
  bf16 autocast, training steps/s;
* ``agreement`` inside each model section: the same weights on CPU (fp32) and on the device (fp32
  with TF32 off, and bf16 autocast) on a small input; max abs difference relative to the output
  scale, with tolerances;
* ``peak_gpu_memory_mb`` per section and overall.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TIME_BUDGET_S = 420.0  # stop starting new sections after 7 minutes

#: tolerances of the CPU-vs-device agreement check, relative to max |reference output|
TOL_FP32 = 1e-3
TOL_BF16 = 5e-2

SIZES = {
    "cuda": {
        "gemm_n": 8192, "gemm_repeats": 20,
        "vit": {"kwargs": {}, "batch": 256, "iters": 10, "img": 224},
        "decode_tiles": 256,
        "sequoia": {"config": {}, "batch": 256, "iters": 10, "grid": 70},
        "histoprism": {"config": {"num_outputs": 2000, "num_conditions": 4}, "tiles": 4096, "iters": 10},
        "fusion": {"kwargs": {}, "batch": 64, "steps": 20, "img": 224, "n_core": 150, "n_targets": 50},
        "agree": {"vit": 2, "sequoia": 2, "histoprism": 256, "fusion": 2},
    },
    "cpu": {
        "gemm_n": 256, "gemm_repeats": 2,
        "vit": {"kwargs": {"depth": 1, "img_size": 64}, "batch": 4, "iters": 2, "img": 64},
        "decode_tiles": 16,
        "sequoia": {"config": {"depth": 1, "nheads": 2, "num_outputs": 100, "input_dim": 128, "num_clusters": 16},
                    "batch": 4, "iters": 2, "grid": 10},
        "histoprism": {"config": {"num_outputs": 50, "num_conditions": 4, "input_dim": 128, "hidden_dim": 64,
                                  "dim_feedforward": 128}, "tiles": 128, "iters": 2},
        "fusion": {"kwargs": {"depth": 1, "img_size": 32}, "batch": 2, "steps": 2, "img": 32, "n_core": 20,
                   "n_targets": 10},
        "agree": {"vit": 1, "sequoia": 2, "histoprism": 32, "fusion": 2},
    },
}  # fmt: skip


# ------------------------------------------------------------------------------------ helpers
def _log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _amp(device):
    """Autocast dtype for the throughput timings: bf16 on a GPU. On the CPU fallback fp32 (CPU bf16
    without AMX is ~50x slower and would only make the smoke run slow); the agreement check still
    runs bf16 on the CPU."""
    import torch

    return torch.bfloat16 if device.type == "cuda" else None


def _seconds_per_iter(fn, device, iters: int, warmup: int = 2) -> float:
    """Mean seconds per call of ``fn`` after ``warmup`` calls (CUDA events on a GPU)."""
    import torch

    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def _count_flops(fn) -> float | None:
    """FLOPs of one call of ``fn`` counted by torch's FLOP counter (matmuls, convolutions, attention)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            fn()
        return float(counter.get_total_flops())
    except Exception as err:  # noqa: BLE001 - the counter is best effort
        _log(f"FLOP counter failed: {err}")
        return None


def vit_flops(img: int = 224, patch: int = 16, dim: int = 1024, depth: int = 24, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs (2 × multiply-adds) of a ViT with a CLS token: ViT-L/16 at 224 px ≈ 123.2 GFLOP."""
    n_patches = (img // patch) ** 2
    t = n_patches + 1
    per_block = t * dim * 3 * dim + 2 * t * t * dim + t * dim * dim + 2 * t * dim * int(mlp_ratio * dim)
    return 2.0 * (depth * per_block + n_patches * 3 * patch * patch * dim)


def _memory_mb(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def _reset_memory(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _agreement(model, make_inputs, device, *, forward=None) -> dict:
    """Same weights on CPU (fp32) vs ``device`` (fp32 with TF32 off, bf16 autocast), small input.

    ``model`` must be on the CPU; it is left on ``device`` afterwards.
    """
    import torch

    forward = forward or (lambda m, inputs: m(*inputs))
    model = model.eval()
    inputs = make_inputs()
    with torch.inference_mode():
        ref = forward(model, inputs).float()
    model.to(device)
    dev_inputs = [t.to(device) if torch.is_tensor(t) else t for t in inputs]
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            out32 = forward(model, dev_inputs).float().cpu()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out16 = forward(model, dev_inputs).float().cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    scale = float(ref.abs().max()) or 1.0
    d32, d16 = float((out32 - ref).abs().max()), float((out16 - ref).abs().max())
    return {
        "reference": "cpu fp32",
        "compared": f"{device.type} fp32 (TF32 off) and {device.type} bf16 autocast",
        "output_scale": scale,
        "max_abs_diff_fp32": d32,
        "max_abs_diff_bf16": d16,
        "rel_diff_fp32": d32 / scale,
        "rel_diff_bf16": d16 / scale,
        "tolerance_fp32": TOL_FP32,
        "tolerance_bf16": TOL_BF16,
        "ok": bool(d32 / scale <= TOL_FP32 and d16 / scale <= TOL_BF16 and np.isfinite([d32, d16]).all()),
    }


def _against_peak(items_per_s: float, flops_per_item: float | None, peak: float | None) -> dict:
    if not flops_per_item:
        return {}
    out = {"achieved_tflops": round(items_per_s * flops_per_item / 1e12, 3)}
    if peak:
        out["fraction_of_measured_peak"] = round(items_per_s * flops_per_item / peak, 4)
        out["bound_items_per_s_at_peak"] = round(peak / flops_per_item, 1)
    return out


# ------------------------------------------------------------------------------------ sections
def section_device(device) -> dict:
    import torch

    out = {"torch": torch.__version__, "python": platform.python_version(), "device_type": device.type,
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update({"name": props.name, "total_memory_gb": round(props.total_memory / 2**30, 1),
                    "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
                    "bf16_supported": torch.cuda.is_bf16_supported()})  # fmt: skip
    else:
        out["name"] = platform.processor() or platform.machine()
    return out


def section_matmul_peak(device, sz) -> dict:
    import torch

    n, reps = sz["gemm_n"], sz["gemm_repeats"]
    dtype = _amp(device) or torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)

    def gemm():
        for _ in range(reps):
            torch.mm(a, b, out=c)

    t = _seconds_per_iter(gemm, device, iters=3, warmup=1)
    flops = 2.0 * n**3 * reps / t
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "tflops": round(flops / 1e12, 3), "_flops": flops}


def _synthetic_jpegs(n: int, size: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for i in range(min(n, 16)):  # textured, tissue-like colours; JPEG quality as in SVS files
        base = np.stack([200 - 60 * np.sin(xx / (7 + i)), 150 + 50 * np.cos(yy / 9), 200 + 30 * np.sin((xx + yy) / 11)], -1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=80)
        out.append(buf.getvalue())
    return [out[i % len(out)] for i in range(n)]


def _find_slide() -> Path | None:
    env = os.environ.get("HISTOEXPR_SHARED_DATA")
    roots = ([Path(env)] if env else []) + [REPO.parent / "shared" / "data", REPO / "shared" / "data"]
    for root in roots:
        p = root / "slides" / "cmu-1-small-region.svs"
        if p.is_file():
            return p
    return None


def _decode_rate(n: int, size: int) -> dict:
    """Tiles/s one CPU process decodes: real slide tiles when reachable, else synthetic JPEGs."""
    slide_path = _find_slide()
    if slide_path is not None:
        try:
            import histoexpr as hx

            slide = hx.io.open_slide(slide_path)
            w, h = slide.dimensions
            rng = np.random.default_rng(0)
            xs, ys = rng.integers(0, max(1, w - size), n), rng.integers(0, max(1, h - size), n)
            slide.read_region((int(xs[0]), int(ys[0])), 0, (size, size))  # open handles
            t0 = time.perf_counter()
            for x, y in zip(xs, ys):
                slide.read_region((int(x), int(y)), 0, (size, size))
            dt = time.perf_counter() - t0
            return {"source": f"histoexpr Slide reader, {slide_path.name}, level 0, {size} px",
                    "tiles_per_s_per_process": round(n / dt, 1)}  # fmt: skip
        except Exception as err:  # noqa: BLE001
            _log(f"slide decode failed ({err}); using synthetic JPEG tiles")
    from PIL import Image

    blobs = _synthetic_jpegs(n, size)
    t0 = time.perf_counter()
    for b in blobs:
        np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
    dt = time.perf_counter() - t0
    return {"source": f"synthetic JPEG tiles ({size} px, quality 80) decoded with PIL",
            "tiles_per_s_per_process": round(n / dt, 1)}  # fmt: skip


def section_uni(device, sz, peak) -> dict:
    import timm
    import torch

    amp = _amp(device)

    cfg = sz["vit"]
    img, batch = cfg["img"], cfg["batch"]
    torch.manual_seed(0)
    # UNI's architecture: ViT-L/16, 224 px, layer-scale init 1e-5, no classifier head
    model = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0, init_values=1e-5,
                              **cfg["kwargs"])  # fmt: skip
    out: dict = {"model": "timm vit_large_patch16_224 (UNI size), random weights", "overrides": cfg["kwargs"],
                 "batch": batch, "img": img}  # fmt: skip
    out["agreement"] = _agreement(model, lambda: [torch.randn(sz["agree"]["vit"], 3, img, img)], device)
    model = model.to(device).eval()
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 255
    x_uint8 = torch.randint(0, 256, (batch, 3, img, img), dtype=torch.uint8)
    x_dev = x_uint8.to(device)

    def compute():
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            model((x_dev.float() - mean) / std)

    with torch.inference_mode():
        flops = _count_flops(lambda: model(torch.zeros(1, 3, img, img, device=device)))
    formula = vit_flops(img=img, depth=len(model.blocks))
    _reset_memory(device)
    t_compute = _seconds_per_iter(compute, device, iters=cfg["iters"])
    out["peak_gpu_memory_mb"] = _memory_mb(device)
    pinned = x_uint8.pin_memory() if device.type == "cuda" else x_uint8
    if device.type == "cuda":
        buf = torch.empty_like(x_uint8, device=device)
        t_transfer = _seconds_per_iter(lambda: buf.copy_(pinned, non_blocking=True), device, iters=cfg["iters"])
    else:
        t_transfer = 0.0
    decode = _decode_rate(sz["decode_tiles"], img)
    tps = batch / t_compute
    dec = decode["tiles_per_s_per_process"]
    out.update({
        "gflop_per_tile_counted": round(flops / 1e9, 2) if flops else None,
        "gflop_per_tile_formula": round(formula / 1e9, 2),
        "compute_tiles_per_s": round(tps, 1),
        **_against_peak(tps, flops or formula, peak),
        "decode": decode,
        "transfer_gb_per_s": round(x_uint8.numel() / t_transfer / 1e9, 2) if t_transfer else None,
        "time_split_ms_per_batch": {
            "decode_one_process": round(1000 * batch / dec, 1),
            "transfer_pinned_uint8": round(1000 * t_transfer, 3),
            "compute": round(1000 * t_compute, 2),
        },
        "decode_processes_to_keep_up": int(np.ceil(tps / dec)),
    })  # fmt: skip
    return out


def section_sequoia(device, sz, peak) -> dict:
    import torch

    amp = _amp(device)

    from histoexpr.models import Sequoia

    cfg = sz["sequoia"]
    torch.manual_seed(0)
    model = Sequoia(cfg["config"]).eval()
    k, d = model.config["num_clusters"], model.config["input_dim"]
    out: dict = {"model": "histoexpr.models.Sequoia, random weights", "config": dict(model.config),
                 "batch_windows": cfg["batch"]}  # fmt: skip
    out["config"].pop("device", None)
    out["agreement"] = _agreement(model, lambda: [torch.randn(sz["agree"]["sequoia"], k, d)], device)
    model = model.to(device).eval()
    side = cfg["grid"]
    n_tiles = side * side
    feats = torch.randn(n_tiles, d, device=device)
    # windows of k slots gathered from the tile features, as the sliding window feeds the model
    gen = torch.Generator(device="cpu").manual_seed(0)
    index = torch.randint(0, n_tiles, (cfg["batch"] * cfg["iters"], k), generator=gen).to(device)
    state = {"i": 0}

    def step():
        i = state["i"] % cfg["iters"]
        state["i"] += 1
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            model(feats[index[i * cfg["batch"] : (i + 1) * cfg["batch"]]])

    with torch.inference_mode():
        flops = _count_flops(lambda: model(torch.zeros(1, k, d, device=device)))
    _reset_memory(device)
    t = _seconds_per_iter(step, device, iters=cfg["iters"])
    wps = cfg["batch"] / t
    out.update({"gflop_per_window_counted": round(flops / 1e9, 3) if flops else None,
                "windows_per_s": round(wps, 1), **_against_peak(wps, flops, peak),
                "peak_gpu_memory_mb": _memory_mb(device)})  # fmt: skip
    return out


def section_histoprism(device, sz, peak) -> dict:
    import torch

    amp = _amp(device)

    from histoexpr.models import HistoPrism

    cfg = sz["histoprism"]
    torch.manual_seed(0)
    model = HistoPrism(cfg["config"]).eval()
    d = model.config["input_dim"]
    n_cond = model.config["num_conditions"]
    cond = torch.tensor([1 % max(n_cond, 1)]) if n_cond else None
    out: dict = {"model": "histoexpr.models.HistoPrism, random weights", "config": dict(model.config),
                 "tiles_per_context": cfg["tiles"]}  # fmt: skip

    def fwd(m, inputs):
        x, c = inputs
        return m(x, c)

    out["agreement"] = _agreement(model, lambda: [torch.randn(1, sz["agree"]["histoprism"], d), cond], device,
                                  forward=fwd)  # fmt: skip
    model = model.to(device).eval()
    x = torch.randn(1, cfg["tiles"], d, device=device)
    c = cond.to(device) if cond is not None else None

    def step():
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            model(x, c)

    with torch.inference_mode():
        flops = _count_flops(lambda: model(x, c))
    _reset_memory(device)
    t = _seconds_per_iter(step, device, iters=cfg["iters"])
    tps = cfg["tiles"] / t
    out.update({"gflop_per_context_counted": round(flops / 1e9, 3) if flops else None,
                "tiles_per_s": round(tps, 1), **_against_peak(tps, flops / cfg["tiles"] if flops else None, peak),
                "peak_gpu_memory_mb": _memory_mb(device)})  # fmt: skip
    return out


def section_fusion(device, sz, peak) -> dict:
    import torch

    amp = _amp(device)

    from histoexpr.models import FusionViT

    cfg = sz["fusion"]
    img, batch = cfg["img"], cfg["batch"]
    torch.manual_seed(0)
    model = FusionViT("vit_small_patch16_224", n_core_genes=cfg["n_core"], n_targets=cfg["n_targets"],
                      **cfg["kwargs"])  # fmt: skip
    n_patches = model.n_patches

    def inputs(b):
        return [torch.randn(b, 3, img, img), torch.rand(b, n_patches, cfg["n_core"]) * 5]

    out: dict = {"model": "histoexpr.models.FusionViT(vit_small_patch16_224, fusion='add'), random weights",
                 "overrides": cfg["kwargs"], "batch": batch, "optimizer": "AdamW(lr=1e-4)",
                 "precision": "bf16 autocast (fp32 on the CPU fallback), fp32 master weights"}  # fmt: skip
    out["agreement"] = _agreement(model, lambda: inputs(sz["agree"]["fusion"]), device)
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images, tokens = (t.to(device) for t in inputs(batch))
    target = torch.randn(batch, cfg["n_targets"], device=device)
    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = torch.nn.functional.mse_loss(model(images, tokens).float(), target)
        loss.backward()
        opt.step()
        losses.append(loss.detach())

    def one_step_for_count():
        loss = model(images[:1], tokens[:1]).float().pow(2).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    flops = _count_flops(one_step_for_count)
    _reset_memory(device)
    t = _seconds_per_iter(step, device, iters=cfg["steps"])
    sps = 1.0 / t
    losses_f = [float(v) for v in losses]
    out.update({
        "gflop_per_sample_train_counted": round(flops / 1e9, 3) if flops else None,
        "steps_per_s": round(sps, 2),
        "samples_per_s": round(sps * batch, 1),
        **_against_peak(sps * batch, flops, peak),
        "loss_first_last": [round(losses_f[0], 4), round(losses_f[-1], 4)],
        "loss_finite": bool(np.isfinite(losses_f).all()),
        "peak_gpu_memory_mb": _memory_mb(device),
    })  # fmt: skip
    return out


# ------------------------------------------------------------------------------------ driver
def run(force_cpu: bool = False) -> dict:
    import torch

    started = time.perf_counter()
    cuda = torch.cuda.is_available() and not force_cpu
    device = torch.device("cuda" if cuda else "cpu")
    mode = "cuda" if cuda else "cpu-fallback"
    sz = SIZES["cuda" if cuda else "cpu"]
    result: dict = {"check": "histoexpr gpu_check", "mode": mode,
                    "throughput_precision": "bfloat16 autocast" if cuda else "float32",
                    "note": None if cuda else "no CUDA device (or --cpu): tiny sizes on the CPU; "
                    "throughputs are not GPU numbers, the run only proves the script works"}  # fmt: skip

    def guarded(name, fn):
        if time.perf_counter() - started > TIME_BUDGET_S:
            result[name] = {"error": f"skipped: time budget of {TIME_BUDGET_S:.0f} s used up"}
            return None
        _log(f"{name} ...")
        t0 = time.perf_counter()
        try:
            value = fn()
        except Exception as err:  # noqa: BLE001 - record and carry on with the other sections
            value = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=3)}
        value["section_s"] = round(time.perf_counter() - t0, 2)
        result[name] = value
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return value

    guarded("device", lambda: section_device(device))
    peak_section = guarded("matmul_peak", lambda: section_matmul_peak(device, sz)) or {}
    peak = peak_section.pop("_flops", None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    guarded("uni_vit_l16", lambda: section_uni(device, sz, peak))
    guarded("sequoia_sliding_window", lambda: section_sequoia(device, sz, peak))
    guarded("histoprism", lambda: section_histoprism(device, sz, peak))
    guarded("fusion_training", lambda: section_fusion(device, sz, peak))
    per_section = [v.get("peak_gpu_memory_mb") for v in result.values() if isinstance(v, dict)]
    per_section = [v for v in per_section if v is not None]
    result["peak_gpu_memory_mb"] = max(per_section) if per_section else None
    models = ("uni_vit_l16", "sequoia_sliding_window", "histoprism", "fusion_training")
    result["agreement_ok"] = {m: result.get(m, {}).get("agreement", {}).get("ok") for m in models}
    result["errors"] = {k: v["error"] for k, v in result.items() if isinstance(v, dict) and "error" in v}
    result["total_s"] = round(time.perf_counter() - started, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="force the tiny CPU fallback even when CUDA exists")
    parser.add_argument("--out", type=Path, help="also write the JSON to this file")
    args = parser.parse_args(argv)
    result = run(force_cpu=args.cpu)
    text = json.dumps(result, default=float)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
