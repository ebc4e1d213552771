"""Record the format-1.6 streams of a migration with one data channel (run once; output committed).

    python tests/data/make_migration_fixtures_v1_6.py

Two files: ``migration-stream-v1.6-channels-x86_64.main.bin`` (HEADER offering two
connections, CONFIG, pages 0-15, CHANNELS_END 1, ROUND_END 1, a pass 2 re-sending page 21,
which the channel carried in pass 1, CPU, END) and ``...channel1.bin`` (CHANNEL 1 of that
stream, pages 16-31, END).
tests/migration/test_data_channels.py checks that the reader still accepts them and finds
the RAM its own formula gives. Never regenerate them; add a new fixture for a new version.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from hv.migration.stream import PAGE_SIZE, Fingerprint, StreamWriter  # noqa: E402
from hv.state import X86CpuState  # noqa: E402

HERE = Path(__file__).resolve().parent
PAGES = 32
STREAM_ID = "recorded-v1.6-channels"


class Collect:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, chunk: bytes | memoryview) -> None:
        self.data += chunk


def page(number: int, generation: int = 0) -> bytes:
    """Page ``number``'s bytes; every fifth page is zero (sent as a zero page)."""
    if number % 5 == 4:
        return bytes(PAGE_SIZE)
    return bytes([(number * 7 + generation) % 251 + 1]) * PAGE_SIZE


def main() -> None:
    main_out, channel_out = Collect(), Collect()
    writer = StreamWriter(main_out)
    writer.write_header("x86_64", "q35", stream_id=STREAM_ID, hv_version="0.2.0", channels=2)
    writer.write_config(Fingerprint(arch="x86_64", machine="q35", vcpus=1, memory=PAGES * PAGE_SIZE))
    writer.write_ram(0, b"".join(page(n) for n in range(16)), stable=True)
    channel = StreamWriter(channel_out)
    channel.write_channel(STREAM_ID, 1)
    channel.write_ram(16, b"".join(page(n) for n in range(16, PAGES)), stable=True)
    channel.write_end()
    writer.write_channels_end(1)
    writer.write_round_end(1)
    writer.write_ram(21, page(21, generation=1), stable=True)
    writer.write_round_end(2)
    writer.write_cpu(0, X86CpuState())
    writer.write_end()
    (HERE / "migration-stream-v1.6-channels-x86_64.main.bin").write_bytes(main_out.data)
    (HERE / "migration-stream-v1.6-channels-x86_64.channel1.bin").write_bytes(channel_out.data)


if __name__ == "__main__":
    main()
