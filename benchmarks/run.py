"""make bench: run the benchmark suite (or the parts named) and write the results into docs/.

    python benchmarks/run.py                 # all parts
    python benchmarks/run.py layers recipes  # a subset
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
PARTS = {
    "layers": [sys.executable, str(HERE / "layer_speed.py"), "--device", "cpu", "--out", "docs/layer-speed-cpu"],
    "recipes": [sys.executable, str(HERE / "recipes.py"), "--out", "docs/results.md"],
    "decompose": [sys.executable, str(HERE / "decompose_time.py"), "--out", "docs/decompose-time"],
    # needs MNIST under $TNCOMPRESS_DATA (the Makefile points it at ../shared/data); about 8 minutes
    "mnist": [sys.executable, str(HERE / "mnist_tt.py"), "--augment", "--epochs-ft", "20", "--lr-ft", "0.02",
              "--out", "docs/mnist-tt.md"],
}


def main(argv: list[str]) -> int:
    names = argv or list(PARTS)
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        print(f"error: unknown benchmark part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    for name in names:
        print(f"== {name}", flush=True)
        code = subprocess.call(PARTS[name])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
