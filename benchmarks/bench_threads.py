"""Thread oversubscription: the demo on a quiet machine vs beside busy-loop processes (issue 11).

Runs ``python -m histoexpr.demo`` in a fresh process

* ``quiet``: nothing else started by the benchmark,
* ``busy``: with 2 busy-loop processes per core running beside it,
* ``busy_all_threads``: busy, with ``HISTOEXPR_N_THREADS=<cores>`` — torch and BLAS use every core
  inside histoexpr calls, which is what the library did before it capped small models (the
  reference the cap is measured against),
* ``busy_omp1``: busy, with ``OMP_NUM_THREADS=1`` for the whole process (the simple workaround).

Target: ``busy`` ≤ 2 × ``quiet``. ``--quick`` trains for at most 100 epochs on 50 genes.
CUDA is hidden so the demo runs on the CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

_BUSY = "while True:\n    pass\n"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def _demo(out: Path, extra_env: dict, args: list[str], timeout: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                              "OPENBLAS_NUM_THREADS", "HISTOEXPR_N_THREADS")}
    env.update({"CUDA_VISIBLE_DEVICES": "", "MPLBACKEND": "Agg",
                "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{env.get('PYTHONPATH', '')}", **extra_env})
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "histoexpr.demo", "--out", str(out), *args], env=env,
                              capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - t0
        ok = proc.returncode == 0
        return {"seconds": round(seconds, 1), "ok": ok, "timed_out": False,
                **({} if ok else {"stderr": proc.stderr[-2000:]})}
    except subprocess.TimeoutExpired:
        return {"seconds": round(time.perf_counter() - t0, 1), "ok": False, "timed_out": True}


def run(quick: bool = False, *, timeout: float = 900.0) -> dict:
    cores = _cores()
    args = ["--epochs", "100", "--genes", "50"] if quick else []
    n_busy = 2 * cores
    results: dict = {"cores": cores, "busy_processes": n_busy, "demo_args": args}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results["quiet"] = _demo(tmp / "quiet", {}, args, timeout)
        busy = [subprocess.Popen([sys.executable, "-c", _BUSY]) for _ in range(n_busy)]
        try:
            time.sleep(1.0)
            results["busy"] = _demo(tmp / "busy", {}, args, timeout)
            results["busy_omp1"] = _demo(tmp / "omp1", {"OMP_NUM_THREADS": "1"}, args, timeout)
            cap = max(60.0, 10 * results["quiet"]["seconds"])  # the old behaviour can take 20× longer
            results["busy_all_threads"] = _demo(tmp / "all", {"HISTOEXPR_N_THREADS": str(cores)}, args, cap)
        finally:
            for p in busy:
                p.kill()
            for p in busy:
                p.wait()
    quiet = results["quiet"]["seconds"]
    results["ratio_busy_vs_quiet"] = round(results["busy"]["seconds"] / quiet, 2)
    results["ratio_busy_omp1_vs_quiet"] = round(results["busy_omp1"]["seconds"] / quiet, 2)
    results["ratio_busy_all_threads_vs_quiet"] = round(results["busy_all_threads"]["seconds"] / quiet, 2)
    results["target_met"] = results["ratio_busy_vs_quiet"] <= 2.0
    return results


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
