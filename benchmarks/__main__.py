"""Run a benchmark: ``python -m benchmarks NAME [ARGS]`` (``./dev bench NAME [ARGS]``).

Each ``benchmarks/bench_<name>.py`` module has ``main(argv) -> int``; ``python -m benchmarks`` with
no name lists them. See benchmarks/README.md for what each measures and the figures last taken.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def _names() -> list[str]:
    here = Path(__file__).resolve().parent
    return sorted(
        m.name.removeprefix("bench_")
        for m in pkgutil.iter_modules([str(here)])
        if m.name.startswith("bench_")
    )


def main(argv: list[str]) -> int:
    names = _names()
    if not argv or argv[0] not in names:
        print("usage: python -m benchmarks NAME [ARGS]   (./dev bench NAME [ARGS])")
        print("benchmarks: " + (", ".join(names) or "none yet"))
        return 2
    module = importlib.import_module(f"benchmarks.bench_{argv[0]}")
    result: int = module.main(argv[1:])
    return result


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
