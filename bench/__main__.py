"""``python -m bench``: run the benchmark sections in one process, write one report.

All numbers of one report come from one run on one machine; compare ratios, not
absolute times. An unknown section is a usage error and a failing section stops the
run with its error (the previous report is kept): nothing is skipped silently.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import gpu, region, steps  # noqa: F401  (each registers its sections)
from bench.sections import SECTIONS, add_arguments, ordered_sections
from lance_lib.experiments.setup import resolve_device
from lance_lib.io import write_json_atomic
from lance_lib.provenance import environment

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    """The command line: ``--only`` picks sections, the rest sets what they measure."""
    order = [section.name for section in ordered_sections()]
    sections = "\n".join(f"  {s.name:8s} {s.help}" for s in ordered_sections())
    out = argparse.ArgumentParser(
        prog="python -m bench",
        description=f"{__doc__}\nsections (run in this order):\n{sections}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    out.add_argument("--only", nargs="+", choices=order, default=order, metavar="SECTION")
    out.add_argument(
        "--quick", action="store_true", help="2 repeats, 1 warm-up and a 4-layer Fig. 5 sweep"
    )
    add_arguments(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen sections and write the report (atomically, when all succeeded)."""
    args = parser().parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 2)
        args.warmup = min(args.warmup, 1)
        args.fig5_max_layers = min(args.fig5_max_layers, 4)
    report: dict[str, Any] = {
        "machine": environment(resolve_device(args.device)),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": ["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)],
        "sections": [],
        "ratios": {},
    }
    chosen = [s.name for s in ordered_sections() if s.name in args.only]
    for name in chosen:
        print(f"[bench] {name} ...", flush=True)
        start = time.perf_counter()
        part = SECTIONS[name].run(args)
        report["ratios"].update(part.pop("ratios", {}))
        report[name] = part
        report["sections"].append({"name": name, "seconds": time.perf_counter() - start})
    path = write_json_atomic(Path(args.out), report)
    print(f"[bench] wrote {path}")
    ranks = report.get("methods", {}).get("ranks")
    if ranks:
        print(
            f"  median layer4 channel rank at eps {ranks['eps']}: "
            f"{ranks['median_layer4_channel_rank']}"
        )
    for key, value in sorted(report["ratios"].items()):
        print(f"  {key:45s} {value:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
