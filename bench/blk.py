"""The virtio-blk benchmark, runnable from a checkout: ``python bench/blk.py [options]``.

The code lives in :mod:`hv.bench_blk` (so ``hv bench blk`` works from an installed hv);
this is the same thing with the repository root put on ``sys.path``.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hv.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["blk", *sys.argv[1:]]))
