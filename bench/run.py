"""`make bench`: run every benchmark section in one process and write bench/latest.json.

Sections: ``core`` (BP vs LANCE, bench/core.py), then, when present, ``methods``
(every baseline, bench/methods.py) and ``lean`` (whole-region memory, bench/lean.py).
All numbers in one file come from one run on one machine; compare ratios, not
absolute times.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lance_lib.results import write_json_atomic  # noqa: E402

SECTIONS = ["core", "methods", "lean"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench/latest.json")
    parser.add_argument("--only", nargs="*", choices=SECTIONS, default=SECTIONS)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and sweeps")
    modules = {}
    for name in SECTIONS:
        try:
            modules[name] = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
    modules["core"].add_arguments(parser)
    for name, module in modules.items():
        if name != "core" and hasattr(module, "add_arguments"):
            module.add_arguments(parser)
    args = parser.parse_args()
    if args.quick:
        args.repeats = min(args.repeats, 2)
    report: dict = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "sections": [],
    }
    for name in args.only:
        if name not in modules:
            print(f"[bench] section {name!r} not available, skipped")
            continue
        t0 = time.perf_counter()
        print(f"[bench] {name} ...", flush=True)
        modules[name].run(report, args)
        report["sections"].append({"name": name, "seconds": time.perf_counter() - t0})
    path = write_json_atomic(args.out, report)
    print(f"[bench] wrote {path}")
    for key, value in sorted(report.get("ratios", {}).items()):
        print(f"  {key:45s} {value:.3f}")


if __name__ == "__main__":
    main()
