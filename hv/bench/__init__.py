"""``hv bench``: figures measured side by side with a reference in one run.

``hv bench migrate`` (:mod:`hv.bench.migrate`) migrates fixture guests between hv
processes and, where installed, QEMU processes; ``hv bench blk`` (:mod:`hv.bench.blk`)
measures virtio-blk against ``dd`` and QEMU on the same image; ``hv bench emulator``
(:mod:`hv.bench.emulator`) runs the same guest ELF on hv and QEMU (Unicorn vs TCG, KVM vs
KVM). ``hv bench stream``
(:mod:`hv.bench.stream`) measures the migration stream alone against a raw socket loop, and
``hv bench profile`` (:mod:`hv.bench.profile`) shows where a migration's time goes, and
``hv bench linux`` (:mod:`hv.bench.linux`) boots and migrates a real Linux guest on hv
and on QEMU. What they share (the QMP client,
guest processes, the KVM probe) is :mod:`hv.bench.common`. Benchmarks measure and print;
nothing here is asserted by the test suite.
"""
from __future__ import annotations

import logging
import sys

from hv.bench.blk import USAGE_BLK, run_blk
from hv.bench.emulator import USAGE_EMULATOR, run_emulator
from hv.bench.linux import USAGE_LINUX
from hv.bench.migrate import USAGE_MIGRATE, run_migrate

USAGE = (f"usage: {USAGE_MIGRATE}\n       {USAGE_BLK}\n       {USAGE_EMULATOR}\n"
         "       hv bench stream [--mib 512] [--zero-percent 25] [--runs 3]\n"
         "       hv bench profile micro | source ACCEL [--spy-destination] [--data-mib 64] [--timeline]\n"
         f"       {USAGE_LINUX}")


def main(argv: list[str] | None = None) -> int:
    """``hv bench <name> [options]``: ``migrate`` (live migration against QEMU), ``blk``
    (virtio-blk throughput against dd and QEMU), ``emulator`` (guest speed against QEMU),
    ``stream``, ``profile`` or ``linux`` (a Linux guest's boot and migration against QEMU)."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if args[:1] not in (["migrate"], ["blk"], ["emulator"], ["stream"], ["profile"], ["linux"]):
        print(USAGE, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="bench: %(message)s", stream=sys.stderr)
    if args[0] == "blk":
        return run_blk(args[1:])
    if args[0] == "emulator":
        return run_emulator(args[1:])
    if args[0] == "stream":
        from hv.bench.stream import main as stream_main
        return stream_main(args[1:])
    if args[0] == "profile":
        from hv.bench.profile import main as profile_main
        return profile_main(args[1:])
    if args[0] == "linux":
        from hv.bench.linux import run_linux
        return run_linux(args[1:])
    return run_migrate(args[1:])
