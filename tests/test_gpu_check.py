"""``benchmarks/gpu_check.py``: the CPU fallback runs end to end and prints one JSON object with
every section (slow tier), so the GPU check cannot rot on machines without CUDA."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _run(*args: str, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one JSON line on stdout, got {len(lines)}:\n{proc.stdout[:2000]}"
    return json.loads(lines[0])


def _check_sections(result: dict) -> None:
    assert result["errors"] == {}, result["errors"]
    assert result["matmul_peak"]["tflops"] > 0
    uni = result["uni_vit_l16"]
    assert uni["compute_tiles_per_s"] > 0 and uni["gflop_per_tile_counted"] > 0
    assert uni["gflop_per_tile_counted"] == pytest.approx(uni["gflop_per_tile_formula"], rel=0.05)
    assert set(uni["time_split_ms_per_batch"]) == {"decode_one_process", "transfer_pinned_uint8", "compute"}
    assert uni["decode"]["tiles_per_s_per_process"] > 0
    assert result["sequoia_sliding_window"]["windows_per_s"] > 0
    assert result["histoprism"]["tiles_per_s"] > 0
    fusion = result["fusion_training"]
    assert fusion["steps_per_s"] > 0 and fusion["loss_finite"]
    for name in ("uni_vit_l16", "sequoia_sliding_window", "histoprism", "fusion_training"):
        agreement = result[name]["agreement"]
        assert {"max_abs_diff_fp32", "max_abs_diff_bf16", "tolerance_fp32", "tolerance_bf16"} <= set(agreement)
        assert agreement["ok"], (name, agreement)
        assert "fraction_of_measured_peak" in result[name]
    assert result["agreement_ok"] == {k: True for k in result["agreement_ok"]}
    assert "peak_gpu_memory_mb" in result and result["total_s"] > 0


def test_vit_l16_flop_count_is_the_uni_number():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.vit_flops(224) / 1e9 == pytest.approx(123.2, abs=0.1)


@pytest.mark.slow
def test_cpu_fallback_prints_one_complete_json():
    result = _run("--cpu", timeout=300)
    assert result["mode"] == "cpu-fallback" and result["throughput_precision"] == "float32"
    assert result["peak_gpu_memory_mb"] is None
    _check_sections(result)


@pytest.mark.gpu
def test_gpu_run_within_budget(tmp_path):
    result = _run("--out", str(tmp_path / "gpu_check.json"), timeout=600)
    assert result["mode"] == "cuda" and result["total_s"] < 480
    assert result["peak_gpu_memory_mb"] > 0
    _check_sections(result)
    assert json.loads((tmp_path / "gpu_check.json").read_text())["mode"] == "cuda"
