"""Run every ``benchmarks/bench_*.py`` and write ``benchmarks/results/<topic>.json``.

Usage: ``python benchmarks/run.py [--quick] [topic ...]``
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _environment() -> dict:
    import torch

    env = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("topics", nargs="*", help="bench_<topic>.py to run (default: all)")
    args = parser.parse_args(argv)
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    modules = sorted(HERE.glob("bench_*.py"))
    if args.topics:
        modules = [m for m in modules if m.stem.removeprefix("bench_") in args.topics]
    failed = []
    for path in modules:
        topic = path.stem.removeprefix("bench_")
        print(f"== {topic}", flush=True)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(HERE))
        try:
            spec.loader.exec_module(module)
            start = time.perf_counter()
            result = module.run(quick=args.quick)
            result = {"topic": topic, "quick": args.quick, "wall_s": round(time.perf_counter() - start, 2),
                      "environment": _environment(), **result}
        except Exception:  # noqa: BLE001 - one failing benchmark must not hide the others
            traceback.print_exc()
            failed.append(topic)
            continue
        finally:
            sys.path.remove(str(HERE))
        suffix = ".quick.json" if args.quick else ".json"
        (out_dir / f"{topic}{suffix}").write_text(json.dumps(result, indent=2, default=float))
        print(json.dumps(result, indent=2, default=float)[:3000], flush=True)
    if failed:
        print(f"failed benchmarks: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
