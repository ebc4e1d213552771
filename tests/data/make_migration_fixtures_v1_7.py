"""Record a format-1.7 stream with RAM_HASHED sections (run once; output committed).

    python tests/data/make_migration_fixtures_v1_7.py

``migration-stream-v1.7-hashed-x86_64.bin``: the reference stream of
tests/migration/test_migration_stream.py (``write_valid``), its full pass and its pass-2
re-send of page 17 sent as RAM_HASHED sections by the native sender over a real socket,
with page 17 torn in the full pass (one byte of its data flipped after it was hashed).
tests/migration/test_stream_hashed.py checks that both readers still accept it, count the
torn page, and end with the reference RAM. Never regenerate it; add a new fixture for a new
version.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from tests.migration.test_stream_hashed import hashed_stream, tear_hashed  # noqa: E402

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    path = HERE / "migration-stream-v1.7-hashed-x86_64.bin"
    path.write_bytes(tear_hashed(hashed_stream(), 17))
    print(f"wrote {path} ({path.stat().st_size} bytes)")
