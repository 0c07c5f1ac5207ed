"""Runs the benchmarks: every `tests/bench/bench_*.py` in name order, each through its `main()`.

`make bench` calls this with the local stack up and `.local/env` loaded; `run.py NAME` runs one
benchmark (`bench_ingest`, `ingest` and `bench_ingest.py` all name the same one).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent.parent


def discover() -> list[str]:
    return sorted(path.stem for path in BENCH_DIR.glob("bench_*.py"))


def normalize(name: str) -> str:
    name = Path(name).name.removesuffix(".py")
    return name if name.startswith("bench_") else f"bench_{name}"


def run_one(name: str) -> bool:
    """Run one benchmark; a failure is reported and does not stop the others."""
    print(f"\n=== {name} ===", flush=True)
    started = time.perf_counter()
    try:
        module = importlib.import_module(f"tests.bench.{name}")
        module.main()
    except Exception:
        traceback.print_exc(file=sys.stdout)
        print(f"=== {name}: FAILED after {time.perf_counter() - started:.1f}s ===", flush=True)
        return False
    print(f"=== {name}: {time.perf_counter() - started:.1f}s ===", flush=True)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    args = parser.parse_args()

    available = discover()
    if args.names:
        chosen = [normalize(name) for name in args.names]
        unknown = [name for name in chosen if name not in available]
        if unknown:
            known = ", ".join(available) or "none"
            print(f"unknown benchmark {', '.join(unknown)}; available: {known}", file=sys.stderr)
            return 2
    else:
        chosen = available
    if not chosen:
        print(f"no benchmarks yet: add {BENCH_DIR.relative_to(ROOT)}/bench_<name>.py with a main()")
        return 0

    # Benchmarks import the project and the test factories as `tests.…` from the checkout's root.
    sys.path.insert(0, str(ROOT))
    started = time.perf_counter()
    failed = [name for name in chosen if not run_one(name)]
    total = time.perf_counter() - started
    print(f"\n{len(chosen) - len(failed)} of {len(chosen)} benchmarks finished in {total:.1f}s")
    from tests.bench import figures  # importable once ROOT is on the path (above)

    # The last line: this run's figures and their ratios, for a reader or a script.
    print(figures.bench_line(), flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
