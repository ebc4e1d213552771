"""Pre-copy live migration and file snapshots, on top of the stream and transports.

Source (``OutgoingMigration``), in its own thread once ``migrate`` has connected:

1. HEADER + CONFIG (the compatibility fingerprint); the destination checks CONFIG before
   touching anything and answers ERROR on a mismatch.
2. Full pass over RAM with dirty logging on (backend log OR the VMM's own writes),
   spread over the data channels the destination takes (format 1.6, :class:`_FullPass`).
3. Dirty rounds until the dirty set can be sent within ``downtime-limit`` at the
   bandwidth measured in the previous round, or ``max-iterations`` rounds have run.
   Auto-converge throttles the vCPUs harder after two rounds in which the guest dirtied
   more than half of what the round sent (QEMU's rule, :func:`dirtied_too_fast`).
4. Pause (STOP), last dirty round, CPU + device state, END.
5. Two-phase switch-over: the destination validates and restores everything, answers OK
   ``ready``; the source answers OK ``commit`` (or ERROR ``canceled``); the destination
   starts the guest and answers OK ``running``. So ``migrate_cancel`` is honoured in every
   phase up to the commit, and the destination never runs a guest the source may resume.

On any error before the commit the source resumes the guest (RESUME) and reports
``failed`` with ``error-desc``; on cancel, ``canceled``, after appending a CANCEL section
at the next record boundary so the destination knows. The destination side is
``hv/migration/incoming.py``. If the connection breaks after the
commit was sent, whether the destination runs is unknown: the source then stays paused
(it never risks running the guest twice) and reports ``failed`` saying so.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from hv.errors import MigrationError
from hv.machine import Machine, MachineError, MachineSnapshot, RunState
from hv.memory import PAGE_SIZE, GuestMemory
from hv.migration.status import MigrationStatus
from hv.migration.stream import (
    Fingerprint,
    PeerError,
    Reply,
    SocketChannel,
    StreamError,
    StreamWriter,
    read_reply,
    send_reply,
)
from hv.migration.transport import SnapshotWriter
from hv.textsafe import printable

log = logging.getLogger(__name__)

CHUNK_PAGES = 2048           # pages per write_ram call in the full pass (8 MiB)
REPLY_TIMEOUT = 60.0         # seconds the destination waits for the source's commit
STALL_TIMEOUT = 30           # default x-stall-timeout: seconds without progress before failing
# After migrate_cancel the source finishes the record it is writing and appends CANCEL. A
# destination that takes in nothing for this long (frozen, or gone) gets the connection
# shut down instead, mid-record; it then reports a truncated stream.
CANCEL_GRACE = 2.0
CANCEL_DRAIN = 1.0           # seconds the source waits for the destination to hang up
# How long the source looks for the destination's ERROR on the main connection after a
# write failed: on the main connection itself the ERROR is already there; after a data
# channel's connection broke it may still be on its way (a destination that refuses a data
# channel says why on the main connection, and a live hv destination always answers there
# once one of its data channels broke). A gone destination's EOF ends the wait at once.
REFUSAL_WAIT = 1.0
REFUSAL_WAIT_AFTER_CHANNEL = 5.0
BANDWIDTH_SAMPLE_BYTES = 4 << 20
# Connections per migration by default. The source of a tcp stream is CPU-bound (the page
# checksums read guest RAM from memory, the copy into the socket runs the loopback receive
# path): on this 2-core host a 512 MiB guest's full pass (3/4 written), interleaved, 16 runs
# each: tcp 70.5% of the raw loopback rate with one connection, 81.5% with two; unix 76%
# and 95% (docs/migration-stream.md, "Data channels"). A max-bandwidth cap offers none.
DEFAULT_CHANNELS = 2
EventSink = Callable[[str, "dict[str, Any] | None"], None]


class MigrationCanceled(MigrationError):
    """The migration was canceled (migrate_cancel)."""


class PeerClosed(MigrationError):
    """The destination closed (or reset) a connection without saying why on it."""


class DataChannelBroken(MigrationError):
    """A data channel's connection or stream failed (its exception is the cause). The
    destination may have refused it: the reason, if any, is on the main connection."""


@dataclass
class MigrationParameters:
    """What ``migrate-set-parameters`` / ``migrate-set-capabilities`` change."""

    downtime_limit: int = 300         # ms the guest may stay paused for the last round
    max_bandwidth: int = 0            # bytes/s; 0 = unlimited (loopback-class links)
    max_iterations: int = 30          # dirty rounds before the switch-over is forced
    auto_converge: bool = True        # throttle vCPUs when rounds stop shrinking
    cpu_throttle_initial: int = 20
    cpu_throttle_increment: int = 10
    max_cpu_throttle: int = 99
    # Seconds the destination may take in nothing (a blocked write) or leave an answer
    # ('ready', 'running') unsent before the migration fails: no silent stall.
    stall_timeout: int = STALL_TIMEOUT
    # Connections for the full pass, the main one included (QEMU's multifd-channels): the
    # source offers them, the destination takes up to its own value; 1 = one connection.
    multifd_channels: int = DEFAULT_CHANNELS

    def to_qmp(self) -> dict[str, Any]:
        return {"downtime-limit": self.downtime_limit, "max-bandwidth": self.max_bandwidth,
                "max-iterations": self.max_iterations, "cpu-throttle-initial": self.cpu_throttle_initial,
                "cpu-throttle-increment": self.cpu_throttle_increment,
                "max-cpu-throttle": self.max_cpu_throttle, "x-stall-timeout": self.stall_timeout,
                "multifd-channels": self.multifd_channels}


# -- dirty bitmaps ---------------------------------------------------------------------------
_NONZERO_SPAN = re.compile(rb"[^\x00]+")


def merge_bitmaps(a: bytes | bytearray, b: bytes | bytearray) -> bytes:
    if len(a) != len(b):
        raise ValueError("dirty bitmaps of different sizes")
    return (int.from_bytes(a, "little") | int.from_bytes(b, "little")).to_bytes(len(a), "little")


def count_pages(bitmap: bytes) -> int:
    return int.from_bytes(bitmap, "little").bit_count()


def dirty_runs(bitmap: bytes, memory: GuestMemory) -> Iterator[tuple[int, int]]:
    """(first page, count) runs of set bits, never spanning a RAM region boundary."""
    boundaries = {r.offset // PAGE_SIZE for r in memory.regions}
    for match in _NONZERO_SPAN.finditer(bitmap):
        run_start = -1
        page = match.start() * 8
        for byte in match.group():
            if byte == 0xFF and run_start >= 0 and not any(page < b < page + 8 for b in boundaries):
                page += 8
                continue
            for bit in range(8):
                if run_start >= 0 and page in boundaries:
                    yield run_start, page - run_start
                    run_start = -1
                if byte >> bit & 1:
                    if run_start < 0:
                        run_start = page
                elif run_start >= 0:
                    yield run_start, page - run_start
                    run_start = -1
                page += 1
        if run_start >= 0:
            yield run_start, page - run_start


def peer_refusal(sock: socket.socket, channel: SocketChannel, wait: float) -> str | None:
    """The destination's ERROR message if one is waiting on the back channel, else None."""
    try:
        ready, _, _ = select.select([sock], [], [], wait)
        if not ready:
            return None
        sock.settimeout(max(wait, 1.0))
        reply = read_reply(channel)
    except (OSError, ValueError, StreamError):
        return None
    return None if reply.ok else reply.text


@runtime_checkable
class DeferredDirtyLog(Protocol):
    """A VM whose dirty log can write-protect each range right before the sender reads it
    (:class:`hv_backends.kvm.KvmVm`; see :mod:`hv_backends.kvm_dirty`)."""

    def start_dirty_log_deferred(self) -> None: ...
    def take_dirty_deferred(self) -> bytearray: ...
    def arm_dirty(self, first_page: int, count: int) -> None: ...


class _Sender:
    """Sends RAM runs, counts them in the status, honours cancel and the bandwidth cap,
    and notices a destination that gave up (an ERROR on the back channel)."""

    def __init__(self, writer: StreamWriter, memory: GuestMemory, status: MigrationStatus,
                 params: MigrationParameters, canceled: threading.Event,
                 sock: socket.socket, channel: SocketChannel) -> None:
        self.sock = sock
        self.channel = channel
        self.writer = writer
        self.memory = memory
        self.status = status
        self.params = params
        self.canceled = canceled
        self._next_send = 0.0  # monotonic time before which the cap forbids sending more
        # KVM's deferred dirty log: write-protect a range right before reading it (see
        # hv_backends.kvm_dirty), so the guest does not fault on pages not sent yet.
        self.arm: Callable[[int, int], None] | None = None

    def check_cancel(self) -> None:
        if self.canceled.is_set():
            raise MigrationCanceled("canceled")
        ready, _, _ = select.select([self.sock], [], [], 0)
        # Before END the destination speaks only to give up, or (format 1.5) to say it reads
        # RAM_LIVE sections, a notice the writer takes.
        if ready and self.writer.peer_waiting():
            refusal = peer_refusal(self.sock, self.channel, 0)
            if refusal is None:
                raise PeerClosed("the destination closed the connection")
            raise MigrationError(f"destination refused: {refusal}")

    def send(self, start: int, count: int, stable: bool) -> int:
        done = 0
        while done < count:
            self.check_cancel()
            n = min(CHUNK_PAGES, count - done)
            before = self.writer.bytes_written
            started = time.monotonic()
            if self.arm is not None:
                self.arm(start + done, n)
            stats = self.writer.write_ram(start + done, self.memory.page_view(start + done, n), stable=stable)
            wire = self.writer.bytes_written - before
            self.status.record_ram(zero=stats.zero, normal=stats.normal, wire_bytes=wire)
            self._limit(wire, started)
            done += n
        return count

    def _limit(self, wire: int, started: float) -> None:
        """Hold the average rate at ``max-bandwidth``. Time spent not sending (scanning
        for zero pages, between rounds) is not banked as credit for a later burst: a burst
        would make a round's measured bandwidth exceed the cap, and the switch-over would
        then be chosen on an expected downtime the real link cannot meet."""
        if not self.params.max_bandwidth:
            return
        self._next_send = max(self._next_send, started) + wire / self.params.max_bandwidth
        delay = self._next_send - time.monotonic()
        if delay > 0:
            self.canceled.wait(delay)

    def send_bitmap(self, bitmap: bytes, stable: bool) -> int:
        pages = 0
        for start, count in dirty_runs(bitmap, self.memory):
            pages += self.send(start, count, stable)
        return pages


class _DataChannel:
    """One data channel of the full pass (format 1.6): its own connection and writer, in
    its own thread, taking chunks from the pass like the main connection does. It ends
    with END when the pass has no chunk left; ``error`` says why it stopped otherwise."""

    def __init__(self, index: int, full_pass: _FullPass, connect: Callable[[], socket.socket]) -> None:
        self.index = index
        self.full_pass = full_pass
        self.connect = connect
        self.sock: socket.socket | None = None
        self.writer: StreamWriter | None = None
        self.ended = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"migration-data-{index}", daemon=True)

    def _run(self) -> None:
        full_pass, main = self.full_pass, self.full_pass.main
        try:
            self.sock = self.connect()
        except (OSError, MigrationError) as exc:  # the others carry its share
            log.warning("data channel %d: %s; the other connections carry its pages", self.index, exc)
            return
        try:
            if full_pass.closed:
                self.sock.close()
                return
            self.sock.settimeout(main.params.stall_timeout)
            channel = SocketChannel(self.sock)
            writer = self.writer = StreamWriter(channel)
            writer.live_ram = main.writer.live_ram
            writer.hashed = main.writer.hashed
            writer.write_channel(full_pass.stream_id, self.index)
            sender = _Sender(writer, main.memory, main.status, main.params, main.canceled, self.sock, channel)
            sender.arm = main.arm
            while not full_pass.stopped() and (chunk := full_pass.take()) is not None:
                sender.send(*chunk, stable=full_pass.stable)
            if not full_pass.stopped():
                writer.write_end()
                self.ended = True
        except BaseException as exc:  # noqa: BLE001 - the main thread reports it
            log.debug("data channel %d failed", self.index, exc_info=exc)
            self.error = _without_frames(exc)


def _without_frames(exc: BaseException) -> BaseException:
    """``exc`` and the exceptions it was raised from, without their tracebacks. A data
    channel's error outlives its thread (the migration keeps it), and its frames hold views
    of guest RAM: kept, they would stop the machine from unmapping its memory."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        link = pending.pop()
        if link is None or id(link) in seen:
            continue
        seen.add(id(link))
        link.__traceback__ = None
        pending += [link.__cause__, link.__context__]
    return exc


class _FullPass:
    """The full pass, chunk by chunk, over the main connection and the data channels the
    destination takes (format 1.6; it says how many on the back channel, read between
    chunks). Every connection's sender takes the next chunk when it is free, so a slower
    connection carries less. Data channels open as soon as the destination says so and
    carry pages of this pass only: the main stream says how many ended (CHANNELS_END)
    before its ROUND_END 1, and the destination applies nothing of pass 2 before them."""

    def __init__(self, main: _Sender, stable: bool, stream_id: str, offer: int,
                 open_channel: Callable[[], socket.socket] | None) -> None:
        """``offer``: the connections offered in HEADER (never more are opened, whatever
        the destination answers)."""
        self.main = main
        self.offer = offer
        self.stable = stable
        self.stream_id = stream_id
        self.open_channel = open_channel
        self.channels: list[_DataChannel] = []
        self.ended = 0  # data channels that carried their share and ended
        self.closed = False
        self._next = 0
        self._lock = threading.Lock()
        if main.arm is not None:   # KVM's deferred dirty log: one range armed at a time
            arm_one = main.arm
            arm_lock = threading.Lock()

            def arm(first_page: int, count: int) -> None:
                with arm_lock:
                    arm_one(first_page, count)
            main.arm = arm

    def take(self) -> tuple[int, int] | None:
        with self._lock:
            start = self._next
            count = min(CHUNK_PAGES, self.main.memory.page_count - start)
            if count <= 0:
                return None
            self._next += count
            return start, count

    def stopped(self) -> bool:
        return self.closed or self.main.canceled.is_set() or any(c.error is not None for c in self.channels)

    def run(self) -> int:
        """Send every page; the bytes the data channels carried (the main writer counts its own)."""
        main = self.main
        while (chunk := self.take()) is not None:
            self._check_channels()
            main.send(*chunk, stable=self.stable)
            granted = min(main.writer.granted_channels, self.offer)
            if not self.channels and granted > 1 and self.open_channel is not None:
                self.channels = [_DataChannel(i, self, self.open_channel) for i in range(1, granted)]
                for channel in self.channels:
                    channel.thread.start()
        for channel in self.channels:
            while channel.thread.is_alive():
                main.check_cancel()
                self._check_channels()
                channel.thread.join(0.05)
        self._check_channels()
        ended = self.ended = sum(channel.ended for channel in self.channels)
        if ended:
            main.writer.write_channels_end(ended)
            log.info("migration: full pass over %d connections", ended + 1)
        return sum(c.writer.bytes_written for c in self.channels if c.writer is not None)

    def _check_channels(self) -> None:
        for channel in self.channels:
            if channel.error is not None:
                if isinstance(channel.error, MigrationCanceled):
                    raise MigrationCanceled("canceled")
                reason = f"data channel {channel.index}: " \
                         f"{failure_reason(channel.error, self.main.params.stall_timeout)}"
                if isinstance(channel.error, (OSError, StreamError, PeerClosed)) and not timed_out(channel.error):
                    raise DataChannelBroken(reason) from channel.error
                raise MigrationError(reason)

    def shutdown(self) -> None:
        """Cut every data channel's connection (a frozen destination, the cancel grace)."""
        for channel in self.channels:
            if channel.sock is not None:
                with contextlib.suppress(OSError):
                    channel.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop the data channels and close their connections (the migration ended)."""
        self.closed = True
        self.shutdown()
        for channel in self.channels:
            channel.thread.join(timeout=CANCEL_DRAIN)
            if channel.sock is not None:
                channel.sock.close()


def failure_reason(exc: BaseException, stall_timeout: float) -> str:
    """Why a migration (or one of its data channels) failed, in one line for error-desc."""
    if isinstance(exc, PeerError):
        return f"destination refused: {exc}"
    if isinstance(exc, (OSError, StreamError)) and timed_out(exc):
        return f"the destination stopped reading: nothing sent for {stall_timeout:g} s (x-stall-timeout)"
    if isinstance(exc, (StreamError, MigrationError, MachineError)):
        return str(exc)
    if isinstance(exc, OSError):
        return f"connection to the destination failed: {exc.strerror or exc}"
    log.error("unexpected migration error", exc_info=exc)
    return f"internal error: {exc!r}"


def worth_another_round(expected_ms: int, dirty_pages: int, previous_dirty: int | None,
                        params: MigrationParameters) -> bool:
    """Within the downtime limit already, is one more live round still worth it? Yes while
    the pause would cost more than an eighth of the limit and the dirty set is still
    shrinking fast (the first round after the full pass, or halved by the last round). A
    guest that runs at full speed during the migration (KVM's deferred dirty log) leaves
    more dirty pages after the full pass than one slowed by write faults; a round more
    (its own pages armed just before they are sent) brings the pause down to QEMU's."""
    if expected_ms <= params.downtime_limit // 8:
        return False
    return previous_dirty is None or dirty_pages * 2 <= previous_dirty


THROTTLE_TRIGGER_PERCENT = 50   # QEMU's throttle-trigger-threshold default
HIGH_DIRTY_STRIKES = 2          # QEMU: throttle at the second such period (dirty_rate_high_cnt)


def dirtied_too_fast(dirty_pages: int, sent_bytes: int) -> bool:
    """Did the guest dirty more during a round than THROTTLE_TRIGGER_PERCENT of what the
    round sent? QEMU's auto-converge trigger. hv used to throttle after every round that
    did not halve the dirty set, which also throttled a guest the link was about to
    outrun: its guest made 0.62 of QEMU's progress during a migration capped at 30 MB/s."""
    return dirty_pages * PAGE_SIZE * 100 > sent_bytes * THROTTLE_TRIGGER_PERCENT


def timed_out(exc: BaseException | None) -> bool:
    """True if ``exc`` or an exception it was raised from is a socket timeout (the
    x-stall-timeout set on the migration socket ran out)."""
    while exc is not None:
        if isinstance(exc, TimeoutError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _switch_over_reply(channel: SocketChannel, what: str, timeout: float) -> Reply:
    """One back-channel answer; a broken, closed or silent connection says which answer is missing."""
    try:
        return read_reply(channel)
    except (StreamError, OSError) as exc:
        if timed_out(exc):
            raise MigrationError(f"{what} within {timeout:g} s (x-stall-timeout)") from exc
        if isinstance(exc, StreamError):
            raise MigrationError(f"{what}: {exc}") from exc
        raise MigrationError(f"{what}: {exc.strerror or exc}") from exc


def write_machine_state(writer: StreamWriter, snapshot: MachineSnapshot) -> None:
    for index, cpu in enumerate(snapshot.cpus):
        writer.write_cpu(index, cpu)
    for name, record in snapshot.devices.items():
        writer.write_device(name, name, record["version"], record["state"])


class OutgoingMigration:
    """One outgoing live migration over a connected socket, run in its own thread."""

    def __init__(self, machine: Machine, status: MigrationStatus, params: MigrationParameters,
                 sock: socket.socket, emit: EventSink,
                 open_channel: Callable[[], socket.socket] | None = None) -> None:
        """``open_channel``: connects one more connection to the destination, for data
        channels (format 1.6); None: this migration uses ``sock`` alone."""
        self.machine = machine
        self.open_channel = open_channel
        self._full_pass: _FullPass | None = None
        self.status = status
        self.params = params
        self.sock = sock
        self.emit = emit
        self.canceled = threading.Event()
        self.thread = threading.Thread(target=self._run, name="migration-out", daemon=True)
        self._paused_by_us = False
        self._committed = False
        self._released = False
        self._writer: StreamWriter | None = None
        self._grace: threading.Timer | None = None

    def start(self) -> None:
        self.thread.start()

    def cancel(self) -> None:
        """Abort as soon as possible; a commit already sent cannot be taken back.

        The migration thread notices at the next record boundary (it checks before every
        RAM run, between rounds, and polls while it waits for an answer), appends a CANCEL
        section and hangs up. A send the destination does not take in within
        ``CANCEL_GRACE`` (a frozen peer) is cut by shutting the socket down.
        """
        self.canceled.set()
        if self._grace is None and not self._committed:
            self._grace = threading.Timer(CANCEL_GRACE, self._cut)
            self._grace.daemon = True
            self._grace.start()

    def _cut(self) -> None:
        if not self._committed and not self._released:
            log.info("migration cancel: the destination takes in nothing; closing the connection")
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            if self._full_pass is not None:
                self._full_pass.shutdown()

    def _send_cancel(self) -> None:
        """Tell the destination the migration is canceled (CANCEL, format 1.2) if the
        stream is at a record boundary, half-close, and give it a moment to hang up: closing
        at once could reset the connection and destroy the CANCEL before it is read."""
        writer = self._writer
        if writer is None or not writer.at_boundary:
            return
        try:
            self.sock.settimeout(CANCEL_DRAIN)
            writer.write_cancel()
            self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + CANCEL_DRAIN
            while time.monotonic() < deadline and self.sock.recv(1 << 16):
                pass
        except (OSError, StreamError) as exc:
            log.debug("could not tell the destination about the cancel: %s", exc)

    # -- the migration thread --------------------------------------------------------------
    def _run(self) -> None:
        # The terminal status is set only after the cleanup: once query-migrate says
        # completed/failed/canceled a new migrate may start at once, and this thread's
        # stop_dirty_log() must not switch off the dirty log of that next migration.
        outcome: Callable[[], None]
        try:
            self.status.activate()
            self._precopy()
            # total-time ends here, when the destination runs the guest, not after the
            # cleanup below (QEMU's ends before its cleanup too)
            ended_at = self.status.now()
            self.machine.set_state(RunState.POSTMIGRATE)
            outcome = functools.partial(self.status.complete, self._downtime_ms, ended_at=ended_at)
            log.info("migration completed: downtime %d ms", self._downtime_ms)
        except Exception as exc:  # every failure ends as 'failed' (or 'canceled') with a reason
            outcome = self._end_after(exc)
        finally:
            self._release()
        outcome()

    def _end_after(self, exc: Exception) -> Callable[[], None]:
        """Resume the guest if that is safe; the status change to make once released."""
        if self.canceled.is_set() and not self._committed:
            self._send_cancel()
            self._give_up()
            log.info("migration canceled")
            return self.status.cancel
        reason = self._reason(exc)
        if isinstance(exc, (OSError, StreamError, DataChannelBroken)) and not self._committed \
                and not self.canceled.is_set():
            wait = REFUSAL_WAIT_AFTER_CHANNEL if isinstance(exc, DataChannelBroken) else REFUSAL_WAIT
            refusal = peer_refusal(self.sock, SocketChannel(self.sock), wait)
            if refusal is not None:  # a write failed because the destination gave up: say why
                reason = f"destination refused: {refusal}"
        if self._committed:
            reason = (f"{reason}; the destination may already be running the guest, "
                      "so the source stays paused")
        else:
            self._give_up()
        log.error("migration failed: %s", printable(reason))
        return functools.partial(self.status.fail, reason)

    def _release(self) -> None:
        self._released = True
        if self._grace is not None:
            self._grace.cancel()
        if self._full_pass is not None:
            self._full_pass.close()
        self.machine.set_throttle(0)
        self.status.set_throttle(None)
        try:
            self.machine.vm.stop_dirty_log()
        except Exception:  # the VM may be closing
            log.debug("stop_dirty_log failed", exc_info=True)
        self.sock.close()

    def _reason(self, exc: Exception) -> str:
        if self.canceled.is_set():
            return "canceled"
        return failure_reason(exc, self._stall_timeout)

    def _give_up(self) -> None:
        if self._paused_by_us and not self._committed:
            self.machine.resume()

    def _precopy(self) -> None:
        machine, memory, vm, params = self.machine, self.machine.memory, self.machine.vm, self.params
        channel = SocketChannel(self.sock)
        writer = self._writer = StreamWriter(channel)
        # Every send (sendmsg) and every read of an answer now fails after this many
        # seconds without progress, instead of blocking for good on a frozen peer.
        self._stall_timeout = params.stall_timeout
        self.sock.settimeout(self._stall_timeout)
        sender = _Sender(writer, memory, self.status, params, self.canceled, self.sock, channel)
        offer = params.multifd_channels if self.open_channel is not None and not params.max_bandwidth else 1
        stream_id = writer.write_header(machine.arch.value, machine.config.machine, channels=offer)
        writer.write_config(Fingerprint.from_dict(machine.fingerprint()))
        take_dirty = vm.take_dirty
        if isinstance(vm, DeferredDirtyLog):   # KVM: protection deferred until each range is sent
            vm.start_dirty_log_deferred()
            sender.arm, take_dirty = vm.arm_dirty, vm.take_dirty_deferred
        else:
            vm.start_dirty_log()
        memory.take_vmm_dirty()

        # Full pass.
        round_start = time.monotonic()
        bytes_before = writer.bytes_written
        full_pass = self._full_pass = _FullPass(sender, not machine.running, stream_id, offer, self.open_channel)
        channel_bytes = full_pass.run()
        writer.write_round_end(1)
        elapsed = max(time.monotonic() - round_start, 1e-6)
        round_sent = writer.bytes_written - bytes_before + channel_bytes
        bandwidth = round_sent / elapsed
        dirty = merge_bitmaps(take_dirty(), memory.take_vmm_dirty())
        dirty_pages = count_pages(dirty)
        self.status.end_round(dirty_pages, elapsed)
        self.emit("MIGRATION_PASS", {"pass": 1})

        # Dirty rounds.
        pass_number = 1
        previous_dirty = None
        high_dirty_rounds = 0
        while True:
            sender.check_cancel()
            remaining = dirty_pages * PAGE_SIZE
            self.status.set_remaining(remaining)
            expected_ms = int(remaining / max(bandwidth, 1) * 1000)
            self.status.set_expected_downtime(expected_ms)
            if pass_number > params.max_iterations or (expected_ms <= params.downtime_limit
                                                       and not worth_another_round(expected_ms, dirty_pages,
                                                                                   previous_dirty, params)):
                break
            if previous_dirty is not None:
                self._report_convergence(pass_number, dirty_pages, previous_dirty, bandwidth)
            if params.auto_converge and dirtied_too_fast(dirty_pages, round_sent):
                high_dirty_rounds += 1
                if high_dirty_rounds >= HIGH_DIRTY_STRIKES:
                    self._throttle_up()
                    high_dirty_rounds = 0
            previous_dirty = dirty_pages
            pass_number += 1
            round_start = time.monotonic()
            bytes_before = writer.bytes_written
            sender.send_bitmap(dirty, stable=False)
            writer.write_round_end(pass_number)
            elapsed = max(time.monotonic() - round_start, 1e-6)
            sent = round_sent = writer.bytes_written - bytes_before
            if sent >= BANDWIDTH_SAMPLE_BYTES:  # small rounds measure latency, not bandwidth
                bandwidth = sent / elapsed
            dirty = merge_bitmaps(take_dirty(), memory.take_vmm_dirty())
            dirty_pages = count_pages(dirty)
            self.status.end_round(dirty_pages, elapsed)
            self.emit("MIGRATION_PASS", {"pass": pass_number})

        # Stop and copy.
        sender.check_cancel()
        self._paused_by_us = machine.pause()
        paused_at = time.monotonic()
        self.status.guest_paused()
        dirty = merge_bitmaps(merge_bitmaps(dirty, take_dirty()), memory.take_vmm_dirty())
        sender.arm = None   # the guest is paused: protecting what is sent now would only add downtime
        sender.send_bitmap(dirty, stable=True)
        pass_number += 1
        writer.write_round_end(pass_number)
        self.status.set_remaining(0)
        self.emit("MIGRATION_PASS", {"pass": pass_number})
        with writer.gathered():
            write_machine_state(writer, machine.save())
            writer.write_end()

        # Two-phase switch-over.
        self._await_answer()
        reply = _switch_over_reply(channel, "the destination did not confirm it is ready", self._stall_timeout)
        if not reply.ok:
            raise MigrationError(f"destination refused: {reply.text}")
        if reply.text != "ready":
            raise MigrationError(f"unexpected answer from the destination: {reply.text!r}")
        sender.check_cancel()
        self._committed = True
        machine.pci.release_locks()  # the destination takes the disk image locks over
        try:
            send_reply(channel, True, "commit")
        except StreamError as exc:
            # Not queued (the peer is gone), so it cannot have been read: the destination
            # cannot start the guest and resuming here is safe.
            self._committed = False
            machine.pci.acquire_locks()
            raise MigrationError(f"the destination went away before the commit: {exc}") from exc
        reply = _switch_over_reply(channel, "the destination did not confirm it runs the guest",
                                   self._stall_timeout)
        if not reply.ok or reply.text != "running":
            raise MigrationError(f"destination failed to start the guest: {reply.text}")
        self._downtime_ms = int((time.monotonic() - paused_at) * 1000)

    @property
    def data_channels(self) -> int:
        """How many data channels carried pages of the full pass (0: the main connection alone)."""
        return self._full_pass.ended if self._full_pass is not None else 0

    def _await_answer(self) -> None:
        """Wait (up to x-stall-timeout) until the destination's answer starts to arrive,
        honouring migrate_cancel meanwhile: a cancel here still sends CANCEL."""
        deadline = time.monotonic() + self._stall_timeout
        while not select.select([self.sock], [], [], 0.05)[0]:
            if self.canceled.is_set():
                raise MigrationCanceled("canceled")
            if time.monotonic() >= deadline:
                raise MigrationError("the destination did not answer 'ready' within "
                                     f"{self._stall_timeout:g} s (x-stall-timeout)")

    def _report_convergence(self, pass_number: int, dirty_pages: int, previous_dirty: int,
                            bandwidth: float) -> None:
        """A dirty round that leaves 90% or more of the pages it started with dirty did
        not converge: the guest dirties memory about as fast as the link sends it (the
        10% margin keeps a few stack pages of noise from flipping the verdict). The change
        (and only the change) is announced as MIGRATION_NOT_CONVERGING / _CONVERGING, so an
        operator sees it without reading the log; query-migrate shows ``converging``."""
        converging = dirty_pages * 10 < previous_dirty * 9
        if not self.status.set_converging(converging):
            return
        if converging:
            log.info("migration converging again at pass %d", pass_number)
            self.emit("MIGRATION_CONVERGING", {"pass": pass_number})
            return
        dirty_rate = self.status.ram.dirty_pages_rate * PAGE_SIZE
        log.warning("migration not converging at pass %d: %d pages still dirty, guest dirties %.1f MB/s, "
                    "link sends %.1f MB/s", pass_number, dirty_pages, dirty_rate / 1e6, bandwidth / 1e6)
        self.emit("MIGRATION_NOT_CONVERGING", {
            "pass": pass_number, "dirty-pages": dirty_pages, "dirty-bytes-rate": int(dirty_rate),
            "bandwidth": int(bandwidth), "cpu-throttle-percentage": self.machine.throttle_percent})

    def _throttle_up(self) -> None:
        current = self.machine.throttle_percent
        step = self.params.cpu_throttle_initial if current == 0 else self.params.cpu_throttle_increment
        new = min(self.params.max_cpu_throttle, current + step)
        if new != current:
            log.info("migration not converging: throttling vCPUs to %d%%", new)
            self.machine.set_throttle(new)
            self.status.set_throttle(new)

    _downtime_ms = 0
    _stall_timeout: float = STALL_TIMEOUT


# -- snapshots ---------------------------------------------------------------------------------
def save_snapshot(machine: Machine, directory: str, status: MigrationStatus) -> None:
    """Pause the machine (if running) and write DIR/state and DIR/memory atomically.

    The machine stays paused afterwards. Errors leave any earlier snapshot in DIR intact.
    """
    machine.pause()
    status.activate()
    status.guest_paused()
    with SnapshotWriter(directory) as snapshot:
        state_writer = StreamWriter(snapshot.state)
        stream_id = state_writer.write_header(machine.arch.value, machine.config.machine)
        fingerprint = Fingerprint.from_dict(machine.fingerprint())
        state_writer.write_config(fingerprint)
        write_machine_state(state_writer, machine.save())
        state_writer.write_end()
        memory_writer = StreamWriter(snapshot.memory)
        memory_writer.write_header(machine.arch.value, machine.config.machine, stream_id=stream_id)
        memory_writer.write_config(fingerprint)
        memory = machine.memory
        for start in range(0, memory.page_count, CHUNK_PAGES):
            count = min(CHUNK_PAGES, memory.page_count - start)
            stats = memory_writer.write_ram(start, memory.page_view(start, count), stable=True)
            status.record_ram(zero=stats.zero, normal=stats.normal, wire_bytes=0)
        memory_writer.write_round_end(1)
        memory_writer.write_end()
        status.record_bytes(state_writer.bytes_written + memory_writer.bytes_written)
        snapshot.commit()
