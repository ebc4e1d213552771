"""Micro-benchmark: migration stream RAM throughput versus a raw socket loop.

Sends N MiB of guest RAM (a mix of zero and non-zero pages) through StreamWriter /
StreamReader over loopback TCP and over a UNIX socketpair, with the reader in a separate
process applying pages into its own GuestMemory, and compares with a raw loop of 1 MiB
``sendall`` / ``recv_into`` on the same kind of transport. Prints a table; the goal is a
stream wire rate of at least 80% of the raw rate. "raw-fresh" is the same raw loop
receiving into fresh guest-sized memory (page faults included), which a reused 1 MiB
buffer hides; "raw-ram" receives into guest RAM pre-faulted first: the fair raw figure
("vs raw"), and what :func:`raw_loopback_rate` (used by ``hv bench migrate``) measures.
"stream" sends a running guest's pages as a migration's full pass does (RAM_LIVE sections
from the native sender; over the UNIX socket the pages are spliced, not copied, so it can
pass the raw copy loop) and receives into RAM that was pre-faulted in the background before
the source connected, as an hv destination's RAM is (it waits for its source);
"stream-zero-copy" sends them as a paused guest's (RAM sections: slices of RAM by
``sendmsg``, one checksum over each section's data, from Python);
"stream-python" is "stream" without the native code (hv/migration/stream_native.py) on
either end; "stream-cold" has a source that connects at once, while the pre-fault has just
begun: as in hv, it runs on through the (single) pass, ahead of the stream where it can.
Every receiver is set up (and answers one byte) before the clock starts, and the memory it
maps is touched and freed right before it is started (see the README's "Host memory
before each run").

    hv bench stream [--mib 512] [--zero-percent 25] [--runs 3]
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from hv.bench.common import back_host_memory
from hv.memory import GuestMemory, RegionSpec
from hv.migration import stream_native
from hv.migration.pages import prefault_memory
from hv.migration.stream import (
    PAGE_SIZE,
    Fingerprint,
    SocketChannel,
    StreamKind,
    StreamReader,
    StreamWriter,
    announce_live_ram,
    read_reply,
    send_reply,
)
from hv.migration.stream_writer import LIVE_RUN_PAGES, WRITER_RUN_PAGES
from hv.migration.transport import connect, listen
from hv.state import X86CpuState

log = logging.getLogger("bench")
CHUNK = 1 << 20


@dataclass
class _RawBuffers:
    """The fair raw loop's memory: the sender's bytes (touched, filled) and the receiver's
    (pre-faulted with MADV_POPULATE_WRITE, transparent huge pages advised, as an hv
    destination's guest RAM is once its background pre-fault finished). Made once per size
    and reused: neither filling nor faulting is timed, and 1 GiB is far beyond any cache,
    so reuse does not make the bytes cache-hot."""

    source: GuestMemory
    target: GuestMemory


_raw_buffers: dict[int, _RawBuffers] = {}


def _raw_memory(total: int) -> _RawBuffers:
    buffers = _raw_buffers.get(total)
    if buffers is None:
        size = -(-total // CHUNK) * CHUNK
        source, target = GuestMemory([RegionSpec(0, size)]), GuestMemory([RegionSpec(0, size)])
        block = os.urandom(CHUNK)
        for offset in range(0, size, CHUNK):
            source.regions[0].view[offset:offset + CHUNK] = block
        prefault_memory(target).wait(600)
        buffers = _raw_buffers[total] = _RawBuffers(source, target)
    return buffers


def _raw_socket_pair(transport: str, workdir: str) -> tuple[socket.socket, socket.socket]:
    if transport == "tcp":
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        address: tuple[str, int] | str = ("127.0.0.1", 0)
    else:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address = os.path.join(workdir, "raw.sock")
    with listener:
        listener.bind(address)
        listener.listen(1)
        client = socket.socket(listener.family, socket.SOCK_STREAM)
        client.connect(listener.getsockname())
        server, _ = listener.accept()
    return client, server


def raw_loopback_rate(transport: str, total_mib: int) -> float:
    """Bytes/s of a plain sender -> receiver copy of ``total_mib`` MiB over a fresh
    ``transport`` connection: 1 MiB ``sendall`` from consecutive slices of a RAM-sized
    buffer, ``recv_into`` consecutive slices of pre-faulted RAM-sized memory (two threads).

    This is the fair "raw" figure for a migration stream, which reads guest RAM on one end
    and writes (pre-faulted) guest RAM on the other. A loop that sends and receives one
    reused 1 MiB buffer keeps both ends in the CPU cache and never writes fresh memory; it
    measured 1.3-1.6x this rate here (see the README's Benchmarks section)."""
    total = total_mib * CHUNK
    buffers = _raw_memory(total)
    send_view, recv_view = buffers.source.regions[0].view, buffers.target.regions[0].view
    with tempfile.TemporaryDirectory(prefix="hvraw") as tmp:
        sender, receiver = _raw_socket_pair(transport, tmp)
        failure: list[str] = []

        def receive() -> None:
            got = 0
            while got < total:
                n = receiver.recv_into(recv_view[got:got + min(CHUNK, total - got)])
                if not n:
                    failure.append("early EOF")
                    return
                got += n

        with sender, receiver:
            thread = threading.Thread(target=receive, name="raw-recv")
            started = time.monotonic()
            thread.start()
            for offset in range(0, total, CHUNK):
                sender.sendall(send_view[offset:offset + CHUNK])
            thread.join()
            elapsed = time.monotonic() - started
    if failure:
        raise RuntimeError(f"raw {transport} loop: {failure[0]}")
    return total / elapsed


def fill(mem: GuestMemory, zero_percent: int) -> None:
    """Deterministic mix in runs of 16 pages: zero when ((i // 16) * 37) % 100 < zero_percent."""
    block = os.urandom(CHUNK)
    for region in mem.regions:
        region.view[:] = block * (region.size // CHUNK)
    view = mem.regions[0].view
    for page in range(mem.page_count):
        if ((page // 16) * 37) % 100 < zero_percent:
            view[page * PAGE_SIZE:(page + 1) * PAGE_SIZE] = bytes(PAGE_SIZE)


def raw_receiver(conn: socket.socket, total: int, kind: str) -> None:
    """recv_into one reused 1 MiB buffer (raw), or straight into fresh guest RAM
    (raw-fresh), or into guest RAM pre-faulted first (raw-ram: what "stream" receives into)."""
    mem = GuestMemory([RegionSpec(0, -(-total // CHUNK) * CHUNK)]) if kind != "raw" else None
    if mem is not None and kind == "raw-ram":
        prefault_memory(mem).wait(120)
    buf = memoryview(bytearray(CHUNK))
    conn.sendall(b"r")  # set up: the sender's clock starts now
    got = 0
    while got < total:
        view = mem.regions[0].view[got:got + CHUNK] if mem else buf
        n = conn.recv_into(view[:min(CHUNK, total - got)])
        if not n:
            raise RuntimeError("raw receiver: early EOF")
        got += n
    conn.sendall(b"k")  # the process exits next, unmapping mem


def stream_receiver(conn: socket.socket, size: int, fp: Fingerprint, wait_prefault: bool) -> None:
    """Receive into a GuestMemory pre-faulted in the background as an hv destination's is
    (``start_prefault``); ``wait_prefault``: as a destination that waited for its source."""
    mem = GuestMemory([RegionSpec(0, size)])
    prefault = prefault_memory(mem)
    if wait_prefault:
        prefault.wait(120)
    conn.sendall(b"r")  # set up: the sender's clock starts now
    chan = SocketChannel(conn)
    reader = StreamReader(chan, page_count=mem.page_count, ram=mem, kind=StreamKind.MIGRATION, local=fp)
    reader.read_section()
    reader.read_section()
    send_reply(chan, True, "config")
    assert reader.header is not None  # as an hv destination does (format 1.5: RAM_LIVE)
    announce_live_ram(chan, (reader.header.format_major, reader.header.format_minor))
    reader.read_all()
    send_reply(chan, True, "running")
    prefault.stop()


def _python_paths(kind: str) -> contextlib.AbstractContextManager[None]:
    """"stream-python": the stream without its native code on either end (the A/B line)."""
    if kind != "stream-python":
        return contextlib.nullcontext()
    return _without_native()


@contextlib.contextmanager
def _without_native() -> Iterator[None]:
    saved = stream_native._NATIVE
    stream_native._NATIVE = None
    try:
        yield
    finally:
        stream_native._NATIVE = saved


def _serve(kind: str, make_listener_or_sock, size: int, fp: Fingerprint, wire: int) -> None:
    if kind == "stream-python":
        stream_native._NATIVE = None  # this forked receiver only
    conn = make_listener_or_sock()
    if kind.startswith("raw"):
        raw_receiver(conn, wire, kind)
    else:
        stream_receiver(conn, size, fp, kind != "stream-cold")
    conn.close()


def send_stream(sock: socket.socket, kind: str, mem: GuestMemory, fp: Fingerprint, run_pages: int | None) -> None:
    chan = SocketChannel(sock)
    writer = StreamWriter(chan, run_pages=run_pages)
    writer.write_header(fp.arch, fp.machine)
    writer.write_config(fp)
    reply = read_reply(chan)
    assert reply.ok, reply.text
    writer.write_ram(0, mem.regions[0].view, stable=kind == "stream-zero-copy")
    writer.write_round_end(1)
    writer.write_cpu(0, X86CpuState())
    writer.write_end()
    reply = read_reply(chan)
    assert reply.ok, reply.text


def run_once(transport: str, kind: str, mem: GuestMemory, fp: Fingerprint, wire: int,
             run_pages: int | None = None) -> float:
    """Seconds to move everything, from the first byte to the receiver's reply. The memory
    the receiver will map is touched and freed first (:func:`back_host_memory`), so every
    kind starts on memory the host has backed: on a host with free page reporting, memory
    idle for a few seconds costs 3-12 ms per MiB to touch, which would land on whichever
    kind ran after a pause ("raw-fresh" and "stream-cold" fault their RAM while timed)."""
    back_host_memory((mem.size >> 20) + 64)
    ctx = mp.get_context("fork")
    if transport == "tcp":
        listener = listen("tcp:127.0.0.1:0")
        proc = ctx.Process(target=_serve, args=(kind, lambda: listener.accept(30), mem.size, fp, wire))
        proc.start()
        sock = connect(listener.address, 10)
        listener.close()
    else:
        sock, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        proc = ctx.Process(target=_serve, args=(kind, lambda: other, mem.size, fp, wire))
        proc.start()
        other.close()
    try:
        if sock.recv(1) != b"r":
            raise RuntimeError(f"{kind} receiver did not start")
        start = time.perf_counter()
        if kind.startswith("raw"):
            view = mem.regions[0].view
            sent = 0
            while sent < wire:
                n = min(CHUNK, wire - sent)
                sock.sendall(view[sent % mem.size:sent % mem.size + n])
                sent += n
            if sock.recv(1) != b"k":
                raise RuntimeError("raw receiver did not acknowledge")
        else:
            with _python_paths(kind):
                send_stream(sock, kind, mem, fp, run_pages)
        elapsed = time.perf_counter() - start
    finally:
        sock.close()
        proc.join(60)
    if proc.exitcode != 0:
        raise RuntimeError(f"{kind} receiver over {transport} exited with {proc.exitcode}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hv bench stream", description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--zero-percent", type=int, default=25)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--run-pages", type=int, default=None,
                        help=f"pages per RAM section (default: the writer's, {WRITER_RUN_PAGES} when "
                             f"copying, {LIVE_RUN_PAGES} when not)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    size = args.mib << 20
    mem = GuestMemory([RegionSpec(0, size)])
    fill(mem, args.zero_percent)
    fp = Fingerprint("x86_64", "q35", 1, size)
    # The stream's wire size, measured once, so the raw loop moves the same bytes.
    class Counter:
        n = 0

        def write(self, data: object) -> None:
            Counter.n += len(data)  # type: ignore[arg-type]
    probe = StreamWriter(Counter())
    stats = probe.write_ram(0, mem.regions[0].view)
    wire = Counter.n
    log.info("%d MiB guest RAM, %d%% zero pages: %d zero, %d normal pages, %.1f MiB on the wire",
             args.mib, args.zero_percent, stats.zero, stats.normal, wire / (1 << 20))
    kinds = ("raw", "raw-fresh", "raw-ram", "stream", "stream-python", "stream-zero-copy", "stream-cold")
    print(f"median of {args.runs} runs; MB/s of bytes on the wire ({wire / (1 << 20):.1f} MiB); "
          f"'RAM MB/s' counts guest RAM moved ({args.mib} MiB)")
    print(f"{'transport':<10}{'path':<18}{'MB/s':>8}{'RAM MB/s':>10}{'vs raw':>8}{'vs raw reused':>15}"
          f"{'vs raw fresh':>14}")
    for transport in ("tcp", "unix"):
        times = {kind: statistics.median(run_once(transport, kind, mem, fp, wire, args.run_pages)
                                       for _ in range(args.runs))
                 for kind in kinds}
        for kind in kinds:
            t = times[kind]
            print(f"{transport:<10}{kind:<18}{wire / t / 1e6:>8.0f}{size / t / 1e6:>10.0f}"
                  f"{times['raw-ram'] / t:>8.0%}{times['raw'] / t:>15.0%}{times['raw-fresh'] / t:>14.0%}")
    print("vs raw = against raw-ram, the fair raw figure (guest RAM -> pre-faulted RAM); raw reuses one "
          "1 MiB receive buffer (cache-hot), raw-fresh receives into fresh memory (page faults)")
    mem.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
