"""Where a 1 GiB idle migration spends its time.

    hv bench profile micro            # full-pass scan micro-benchmarks
    hv bench profile source ACCEL [--spy-destination] [--data-mib 64] [--timeline]
                                                     # cProfile of a real source (kvm|unicorn),
                                                     # py-spy samples of the destination

``micro`` times, on a fresh 1 GiB GuestMemory holding 64 MiB of data (what the idle
benchmark guest leaves), the source's full pass through ``StreamWriter.write_ram`` into a
sink that discards, and its parts (``hv.migration.pages``: pagemap lookups, block-wise
zero detection), then the destination's zeroing of zero runs.

``source`` runs the guest in this process (the idle dirty guest, 1 GiB) and migrates it
to a real ``hv -incoming`` process over a UNIX socket with the engine's own
``OutgoingMigration._run`` on the main thread under cProfile.
"""
from __future__ import annotations

import cProfile
import io
import logging
import os
import pstats
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from hv.memory import GuestMemory, RegionSpec
from hv.migration.pages import never_populated, page_kinds, zero_pages
from hv.migration.stream import DEFAULT_RUN_PAGES, ZERO_PAGE, StreamWriter
from hv_fixtures import guest as fixture_guest

log = logging.getLogger("bench.profile")
MIB = 1 << 20


class NullSink:
    """Discards everything (measures the writer, not the link)."""

    def write(self, data: bytes | memoryview) -> None:
        pass

    def writev(self, buffers: list[bytes | memoryview]) -> None:
        pass


def make_memory(total_mib: int, data_mib: int, data_at_mib: int = 2) -> GuestMemory:
    memory = GuestMemory([RegionSpec(0, total_mib * MIB)])
    block = os.urandom(MIB)
    view = memory.regions[0].view
    for mib in range(data_at_mib, data_at_mib + data_mib):
        view[mib * MIB:(mib + 1) * MIB] = block
    return memory


def full_pass(writer: StreamWriter, memory: GuestMemory, stable: bool) -> None:
    for start in range(0, memory.page_count, DEFAULT_RUN_PAGES):
        count = min(DEFAULT_RUN_PAGES, memory.page_count - start)
        writer.write_ram(start, memory.page_view(start, count), stable=stable)


def timed(label: str, fn: Callable[[], object], results: dict[str, float]) -> None:
    started = time.perf_counter()
    fn()
    results[label] = time.perf_counter() - started
    print(f"  {label:58s} {results[label] * 1000:8.1f} ms", flush=True)


def micro(total_mib: int = 1024, data_mib: int = 64) -> None:
    """Time the shipped full-pass and zero-run paths (hv/migration/pages.py) in isolation."""
    results: dict[str, float] = {}
    print(f"full pass over {total_mib} MiB (of which {data_mib} MiB data), null sink:")
    m = make_memory(total_mib, data_mib)
    timed("write_ram, stable=False, fresh RAM", lambda: full_pass(StreamWriter(NullSink()), m, False), results)
    timed("write_ram, stable=False, second pass", lambda: full_pass(StreamWriter(NullSink()), m, False), results)
    timed("write_ram, stable=True, second pass", lambda: full_pass(StreamWriter(NullSink()), m, True), results)
    timed("page_kinds alone (second pass)",
          lambda: [page_kinds(m.page_view(s, DEFAULT_RUN_PAGES), DEFAULT_RUN_PAGES)
                   for s in range(0, m.page_count, DEFAULT_RUN_PAGES)], results)
    timed("pagemap lookups alone", lambda: [never_populated(m.page_view(s, DEFAULT_RUN_PAGES))
                                            for s in range(0, m.page_count, DEFAULT_RUN_PAGES)], results)
    m.close()
    print(f"destination, zero runs of {total_mib} MiB of RAM:")
    d = GuestMemory([RegionSpec(0, total_mib * MIB)])

    def zero_all() -> None:
        for s in range(0, d.page_count, DEFAULT_RUN_PAGES):
            zero_pages(d.page_view(s, DEFAULT_RUN_PAGES))

    timed("zero_pages per 8 MiB run, fresh RAM", zero_all, results)
    d.regions[0].view[:] = b"\x01" * d.size
    timed("zero_pages per 8 MiB run, all populated", zero_all, results)
    assert ZERO_PAGE.startswith(d.page_view(0, 1)), "zero_pages did not zero the pages"
    d.close()


def summarize_collapsed(path: Path, top: int = 15) -> str:
    """Self time per function (leaf frame) from py-spy's collapsed-stack output."""
    leaves: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        total += int(count)
        leaf = stack.split(";")[-1]
        leaves[leaf] = leaves.get(leaf, 0) + int(count)
    rows = sorted(leaves.items(), key=lambda kv: -kv[1])[:top]
    return "\n".join(f"  {count / max(total, 1) * 100:5.1f}%  {leaf}" for leaf, count in rows)


def _timeline(events: list[tuple[str, float, float]]) -> Callable[[object, str], None]:
    """Wrap obj.name so every call appends (name, start, end) to ``events``."""
    def wrap(owner: object, name: str) -> None:
        original = getattr(owner, name)

        def timed_call(*args: object, **kwargs: object) -> object:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                events.append((name, started, time.perf_counter()))
        setattr(owner, name, timed_call)
    return wrap


def profile_source(accel: str, total_mib: int = 1024, top: int = 30, spy_destination: bool = False,
                   data_mib: int = 64, timeline: bool = False) -> None:
    """cProfile the source side of a real migration of the idle guest (in this process);
    with ``spy_destination``, sample the destination process with py-spy meanwhile."""
    from hv.config import parse_args
    from hv.console import BufferSink
    from hv.machine import Machine
    from hv.migration.engine import MigrationParameters, OutgoingMigration
    from hv.migration.status import MigrationStatus
    from hv_backends import backend_class

    kernel = fixture_guest("x86_64", "dirty")
    argv = ["-machine", "q35", "-accel", accel, "-m", str(total_mib), "-kernel", str(kernel),
            "-append", f"mib={data_mib} idle=1"]
    with tempfile.TemporaryDirectory(prefix="hvp") as tmp:
        path = os.path.join(tmp, "mig.sock")
        launcher = [sys.executable, "-m", "hv"]
        dst = subprocess.Popen([*launcher, *argv, "-serial", f"file,path={tmp}/dst.serial",
                                "-incoming", f"unix:{path}"], stderr=subprocess.DEVNULL)
        config = parse_args(argv).config
        assert config is not None   # argv describes a VM (None is for -help / -version)
        console = BufferSink()
        machine = Machine(config, backend_class(accel)(), console)
        try:
            machine.load_kernel(kernel.read_bytes())
            machine.start()
            deadline = time.monotonic() + 120
            while b"pass 1 " not in console.getvalue():
                assert time.monotonic() < deadline, "guest never finished its first pass"
                time.sleep(0.02)
            while not os.path.exists(path):
                time.sleep(0.02)
            spy = None
            if spy_destination:
                spy = subprocess.Popen(["py-spy", "record", "-p", str(dst.pid), "-f", "raw", "-r", "1000",
                                        "-o", f"{tmp}/dst.txt", "--duration", "3"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.5)  # py-spy attaches
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(path)
            status = MigrationStatus()
            status.start(machine.memory.size)
            outgoing = OutgoingMigration(machine, status, MigrationParameters(), sock, lambda *a: None)
            events: list[tuple[str, float, float]] = []
            if timeline:  # where the downtime goes: every step between pause and 'running'
                from hv.migration import engine
                wrap = _timeline(events)
                for name in ("pause", "save"):
                    wrap(machine, name)
                for name in ("take_dirty",):
                    wrap(machine.vm, name)
                for name in ("write_machine_state", "_switch_over_reply", "send_reply", "merge_bitmaps"):
                    wrap(engine, name)
                wrap(engine._Sender, "send_bitmap")
                wrap(engine.StreamWriter, "write_end")
                wrap(engine.StreamWriter, "write_round_end")
            profiler = cProfile.Profile()
            started = time.perf_counter()
            profiler.enable()
            outgoing._run()
            profiler.disable()
            elapsed = time.perf_counter() - started
            info = status.to_qmp()
            print(f"{accel} source, {total_mib} MiB idle ({data_mib} MiB data): "
                  f"{info['status']} in {elapsed * 1000:.0f} ms "
                  f"(status total {info.get('total-time')} ms, downtime {info.get('downtime')} ms), "
                  f"{info['ram']['transferred'] / MIB:.1f} MiB sent")
            if events:
                paused = next(start for name, start, _ in events if name == "pause")
                print("after the pause (ms from pause start: step start .. end):")
                for name, start, end in events:
                    if start >= paused:
                        print(f"  {name:22s} {(start - paused) * 1000:7.2f} .. {(end - paused) * 1000:7.2f}")
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
            print(out.getvalue())
            if spy is not None:
                spy.wait(30)
                print("destination (py-spy, self time by function, includes idle waiting):")
                print(summarize_collapsed(Path(tmp) / "dst.txt"))
        finally:
            machine.close()
            if dst.poll() is None:
                dst.terminate()
            try:
                dst.wait(10)
            except subprocess.TimeoutExpired:
                dst.kill()
                dst.wait(10)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING)
    if argv[:1] == ["micro"]:
        micro()
        return 0
    if argv[:1] == ["source"] and len(argv) >= 2 and argv[1] in ("kvm", "unicorn"):
        import argparse
        p = argparse.ArgumentParser(prog="profile_migrate.py source ACCEL")
        p.add_argument("--spy-destination", action="store_true")
        p.add_argument("--data-mib", type=int, default=64)
        p.add_argument("--timeline", action="store_true", help="time each step after the pause")
        opts = p.parse_args(argv[2:])
        profile_source(argv[1], top=12, spy_destination=opts.spy_destination, data_mib=opts.data_mib,
                       timeline=opts.timeline)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
