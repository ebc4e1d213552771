"""The destination side of live migration and snapshot restore.

``receive_migration`` reads a stream from a connected source into a machine that has not
run yet, validating everything before the guest may start (see
``docs/migration-stream.md``): the CONFIG fingerprint is compared first, RAM is applied
as it arrives, CPU and device state are restored at END, then the two-phase switch-over
(``ready`` / ``commit`` / ``running``). A CANCEL from the source (format 1.2) ends it as
:class:`IncomingCanceled` with the status ``canceled``; any other problem raises, is
answered to the source as ERROR where that helps it, and the guest never runs.

Reads never block for good: they wait at most ``STOP_POLL`` seconds at a time and give
up once the machine shuts down (QMP ``quit``, SIGTERM), so a stalled source cannot keep hv
alive; and a source that sends nothing for ``stall_timeout`` seconds (x-stall-timeout as
set by ``migrate-set-parameters`` when the source connects, default 30 s) fails the
migration with "the source stalled", the guest never running. After the switch-over
every virtio-net whose driver negotiated GUEST_ANNOUNCE is asked to announce the guest
(gratuitous ARPs from the guest itself). ``load_snapshot`` restores ``file:DIR``, whose files
``open_snapshot`` accepts only as regular files (a FIFO there would block the open for good).
"""
from __future__ import annotations

import logging
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hv.devices.virtio_net import announce_guests
from hv.machine import Machine, MachineError, MachineSnapshot, RunState
from hv.migration.engine import DEFAULT_CHANNELS, REPLY_TIMEOUT, STALL_TIMEOUT, MigrationError
from hv.migration.incoming_channels import DataChannels
from hv.migration.pages import Prefaulter, hold_prefault, prefault_memory, prefault_report, stop_prefault
from hv.migration.status import MigrationStatus
from hv.migration.stream import (
    CHANNELS_MINOR,
    ChannelsEndSection,
    ConfigSection,
    CpuSection,
    DeviceSection,
    EndSection,
    FileChannel,
    Fingerprint,
    HeaderSection,
    PeerCanceled,
    PeerError,
    RamSection,
    RoundEndSection,
    SocketChannel,
    StreamError,
    StreamKind,
    StreamReader,
    announce_channels,
    announce_live_ram,
    compare_fingerprints,
    read_reply,
    send_reply,
)
from hv.migration.tls import has_pending
from hv.migration.transport import Listener, open_snapshot
from hv.textsafe import printable

log = logging.getLogger(__name__)

STOP_POLL = 0.25  # seconds: how often a blocked read checks for quit/SIGTERM


def start_prefault(machine: Machine) -> Prefaulter:
    """The destination was just created: pre-fault its guest RAM in the background while
    it waits for its source, so the stream copies into RAM that is already mapped (see
    :class:`hv.migration.pages.Prefaulter`; it never blocks exit, and stops at the source's
    first ROUND_END, when the full pass is in)."""
    return prefault_memory(machine.memory)


class IncomingCanceled(MigrationError):
    """Destination: the source canceled the migration (it sent CANCEL)."""

    def __init__(self) -> None:
        super().__init__("incoming migration canceled by the source")


def incoming_error(exc: BaseException, reason: str) -> str:
    """The destination's final error line (after ``hv: error: ``) for ``exc``; peer text
    in ``reason`` is escaped again here, the one place every incoming failure passes."""
    if isinstance(exc, IncomingCanceled):
        return str(exc)
    return f"incoming migration failed: {printable(reason)}"



class IncomingState:
    """What the destination collected from a stream before the switch-over."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.cpus: dict[int, Any] = {}
        self.devices: dict[str, dict[str, Any]] = {}
        self.source_fingerprint: Fingerprint | None = None

    def snapshot(self) -> MachineSnapshot:
        cpus = [self.cpus[i] for i in range(len(self.machine.vcpus))]
        return MachineSnapshot(self.machine.fingerprint(), cpus, self.devices)


def _read_stream(reader: StreamReader, collected: IncomingState, status: MigrationStatus,
                 on_config: Callable[[Fingerprint], None] | None = None,
                 on_round_end: Callable[[], None] | None = None,
                 on_channels_end: Callable[[int], None] | None = None) -> None:
    machine = collected.machine
    while True:
        section = reader.read_section()
        if isinstance(section, HeaderSection):
            if section.arch != machine.arch.value or section.machine != machine.config.machine:
                raise MigrationError(f"stream is for a {printable(section.machine)} "
                                     f"({printable(section.arch)}) machine, "
                                     f"this is {machine.config.machine} ({machine.arch.value})")
        elif isinstance(section, ConfigSection):
            collected.source_fingerprint = section.fingerprint
            if on_config is not None:
                on_config(section.fingerprint)
        elif isinstance(section, RamSection):
            status.record_ram(zero=section.zero, normal=section.normal, wire_bytes=section.bytes)
        elif isinstance(section, RoundEndSection):
            status.end_round(0, 0.0)
            if on_round_end is not None:
                on_round_end()
        elif isinstance(section, CpuSection):
            collected.cpus[section.index] = section.state
        elif isinstance(section, DeviceSection):
            if not isinstance(section.state, dict):
                raise MigrationError(f"device {section.name}: unsupported binary state")
            collected.devices[section.name] = {"version": section.version, "state": section.state}
        elif isinstance(section, ChannelsEndSection):
            if on_channels_end is None:
                raise MigrationError("CHANNELS_END in a stream that has no data channels")
            on_channels_end(section.count)
        elif isinstance(section, EndSection):
            return


def config_checker(machine: Machine) -> Callable[[Fingerprint], None]:
    """A CONFIG-section check: raises MigrationError listing every difference between
    the stream's configuration and this machine's (legacy devices that an older source
    lacks are not differences: they keep their reset state, see Machine.fingerprint),
    then runs the guest's TSC at the source's rate or raises why it cannot
    (Machine.adopt_tsc_hz), before any guest state is loaded."""

    def check(remote: Fingerprint) -> None:
        local = Fingerprint.from_dict(machine.fingerprint(source=remote.to_dict()))
        mismatches = compare_fingerprints(remote, local)
        if mismatches:
            raise MigrationError("; ".join(mismatches))
        try:   # the guest's TSC rate is not compared: the destination adopts it, or refuses
            machine.adopt_tsc_hz(remote.tsc_hz)
        except MachineError as exc:
            raise MigrationError(str(exc)) from None

    return check


class SourceStalled(MigrationError):
    """Destination: the source sent nothing for x-stall-timeout seconds."""


class _WatchedChannel(SocketChannel):
    """The destination's end of the connection: reads wait at most ``STOP_POLL`` at a
    time and give up once ``stopped()`` (quit or SIGTERM made the machine shut down), so
    a source that stalls mid-stream can never keep hv from exiting; a read that waits
    ``stall_timeout`` seconds without a byte fails with :class:`SourceStalled`."""

    def __init__(self, sock: socket.socket, stopped: Callable[[], bool],
                 stall_timeout: float = STALL_TIMEOUT, check: Callable[[], None] | None = None) -> None:
        """``check``, if given, runs while a read waits and may raise to end it (the main
        stream's reads end so when one of its data channels failed)."""
        super().__init__(sock)
        self._stopped = stopped
        self._check = check
        self.stall_timeout = stall_timeout

    def _wait_readable(self) -> None:
        if has_pending(self.sock):  # TLS: decrypted bytes wait inside the SSL object
            return
        deadline = time.monotonic() + self.stall_timeout
        while not select.select([self.sock], [], [], STOP_POLL)[0]:
            if self._check is not None:
                self._check()
            if self._stopped():
                raise ConnectionAbortedError("hv is shutting down")
            if time.monotonic() >= deadline:
                raise SourceStalled(f"the source stalled: nothing received for {self.stall_timeout:g} s "
                                    "(x-stall-timeout)")

    # The native RAM receiver (hv.migration.stream_native) waits at most this long per
    # call, then asks check_idle whether to give up: the same rules as _wait_readable.
    poll_seconds = STOP_POLL

    def check_idle(self, idle: float) -> None:
        """Give up like :meth:`_wait_readable` once hv shuts down or ``idle`` seconds
        passed without a byte."""
        if self._check is not None:
            self._check()
        if self._stopped():
            raise ConnectionAbortedError("hv is shutting down")
        if idle >= self.stall_timeout:
            raise SourceStalled(f"the source stalled: nothing received for {self.stall_timeout:g} s "
                                "(x-stall-timeout)")

    def readinto(self, buf: memoryview) -> int:
        self._wait_readable()
        return super().readinto(buf)

    def readv(self, buffers: list[memoryview]) -> int:
        self._wait_readable()
        return super().readv(buffers)


@dataclass
class _Steps:
    """Monotonic times of the destination's steps from END on (logged at debug level: where
    a switch-over's downtime goes on this side)."""

    marks: list[tuple[str, float]] = field(default_factory=list)

    def mark(self, name: str) -> None:
        self.marks.append((name, time.monotonic()))

    def __str__(self) -> str:
        if not self.marks:
            return "-"
        first = self.marks[0][1]
        return ", ".join(f"{name} +{(at - first) * 1000:.1f} ms" for name, at in self.marks)


@dataclass
class _IncomingClock:
    """Destination-side times for query-migrate, all from the moment the source connected
    (not from when hv started waiting for it)."""

    _round_ends: tuple[float, ...] = ()  # the last two ROUND_END arrival times

    def round_end(self) -> None:
        self._round_ends = (*self._round_ends[-1:], time.monotonic())

    def downtime_ms(self) -> int | None:
        """From the close of the next-to-last pass (the source pauses the guest right then
        for the last one) to now, the guest running here; None with a single pass."""
        if len(self._round_ends) < 2:
            return None
        return int((time.monotonic() - self._round_ends[0]) * 1000)


def receive_migration(machine: Machine, sock: socket.socket, status: MigrationStatus,
                      stall_timeout: float = STALL_TIMEOUT, listener: Listener | None = None,
                      channels: int = DEFAULT_CHANNELS) -> None:
    """Receive a live migration into the (not yet started) ``machine`` and start it.

    ``listener``: where ``sock`` was accepted. A source that offers data channels (format
    1.6) may then connect up to ``channels`` - 1 more there for the full pass
    (:mod:`hv.migration.incoming_channels`); the listener is closed once no more are
    taken. Without it, or with ``channels`` 1, the source uses ``sock`` alone.

    Raises MigrationError/StreamError/OSError when anything is wrong; the guest is then
    never started. A configuration mismatch is answered to the source as ERROR first; a
    CANCEL from the source ends it as IncomingCanceled with the status ``canceled``.
    query-migrate's clock starts now (``setup`` until CONFIG is accepted). Any read,
    the switch-over's commit included, that waits ``stall_timeout`` seconds for a byte
    fails with SourceStalled.
    """
    status.connected()
    data_channels: DataChannels | None = None

    def check_channels() -> None:
        if data_channels is not None:
            data_channels.check()

    def shutting_down() -> bool:
        return machine.state is RunState.SHUTDOWN

    channel = _WatchedChannel(sock, shutting_down, stall_timeout, check_channels)
    check_config = config_checker(machine)
    collected = IncomingState(machine)
    clock = _IncomingClock()

    def on_config(remote: Fingerprint) -> None:
        nonlocal data_channels
        check_config(remote)
        status.activate()
        header = reader.header
        if header is not None:  # a 1.5+ source may then send pages without copying them
            live = announce_live_ram(channel, (header.format_major, header.format_minor))
            count = min(header.channels, channels)
            if live and listener is not None and count > 1 and header.format_minor >= CHANNELS_MINOR:
                data_channels = DataChannels(
                    listener, machine, status, reader, header.stream_id, count, stall_timeout,
                    lambda conn, stopped: _WatchedChannel(conn, lambda: shutting_down() or stopped(),
                                                          stall_timeout))
                data_channels.start()
                announce_channels(channel, count)
        if data_channels is None and listener is not None:
            listener.close()  # no more connections: a second source is refused at once
        release_prefault()
        # vCPU threads, parked, now rather than at the commit, where creating them cost up
        # to ~100 ms of downtime on a loaded host. For a receiver whose machine was not
        # marked inmigrate (in-process); hv -incoming made them then, and this does nothing.
        machine.prepare_vcpus()

    def on_channels_end(count: int) -> None:
        if data_channels is None:
            raise MigrationError("CHANNELS_END from a source that was given no data channels")
        data_channels.wait_ended(count, shutting_down)

    def on_round_end() -> None:
        if data_channels is not None and reader.rounds == 1:  # pass 1 is in
            data_channels.finish()
        clock.round_end()
        # The pre-fault runs on through the full pass (pages it faults in ahead of the
        # stream cost the reader nothing; 2 GiB, 3/4 written: total 1037 -> 718 ms over
        # unix, 1631 -> 1141 over tcp, medians of 4) and stops once that pass is in, so it
        # never runs into the switch-over; what it had not reached is RAM the source never used.
        stop_prefault(machine.memory)

    # Until CONFIG is answered the pre-fault pauses: the reader's setup maps memory, and
    # each mapping waited for a pre-fault chunk to end (it holds the mmap lock, see
    # pages.PREFAULT_CHUNK): connect -> CONFIG took 31-70 ms in 4 of 16 runs with the
    # pre-fault still going (512M, migrate as soon as the destination answered QMP), all
    # the while the source copied every page it sent. Held, it costs one chunk at most.
    release_prefault = hold_prefault(machine.memory)
    try:
        reader = StreamReader(channel, page_count=machine.memory.page_count, ram=machine.memory,
                              kind=StreamKind.MIGRATION, arch=machine.arch.value)
    except BaseException:
        release_prefault()
        raise
    steps = _Steps()
    try:
        _read_stream(reader, collected, status, on_config, on_round_end, on_channels_end)
        steps.mark("stream read")
        machine.restore(collected.snapshot())
        steps.mark("state restored")
    except PeerCanceled:
        status.cancel()
        raise IncomingCanceled() from None
    except PeerError:
        raise
    except Exception as exc:
        refuse(sock, str(exc))
        raise
    finally:
        release_prefault()
        if data_channels is not None:
            data_channels.close()
        if listener is not None:
            listener.close()
    send_reply(channel, True, "ready")
    sock.settimeout(REPLY_TIMEOUT)
    try:
        reply = read_reply(channel)
        steps.mark("commit received")
    except (OSError, StreamError, SourceStalled) as exc:  # the source died, gave up or stalled
        raise MigrationError(f"source did not commit the switch-over: {exc}") from exc
    if reply.canceled:
        status.cancel()
        raise IncomingCanceled()
    if not reply.ok or reply.text != "commit":
        raise MigrationError(f"source did not commit the switch-over: {reply.text}")
    take_image_locks(machine)
    _announce_guests(machine)
    machine.start()
    steps.mark("guest started")
    status.complete(clock.downtime_ms())
    _try_send(channel, True, "running")
    steps.mark("running sent")
    torn = reader.torn_pages + (data_channels.torn_pages if data_channels is not None else 0)
    log.debug("incoming switch-over: %s; %d torn pages (sent again)", steps, torn)
    # One line per migration: how long faulting in fresh guest RAM took says whether the host
    # was slow to back memory (2 GiB: 0.19 s to 13 s on a host with free page reporting).
    log.info("guest RAM pre-fault %s", prefault_report(machine.memory))


def _announce_guests(machine: Machine) -> None:
    """Ask each virtio-net's driver to announce the guest (VIRTIO_NET_S_ANNOUNCE and a
    config interrupt, pending until the vCPUs first run), as QEMU does after a migration."""
    with machine.device_manager.run.lock:
        count = announce_guests(slot.device for slot in list(machine.pci.slots))
    if count:
        log.info("asked %d virtio-net driver(s) to announce the guest", count)


def take_image_locks(machine: Machine, timeout: float = 5.0) -> None:
    """Lock the disk images the source has just released (retrying briefly)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            machine.pci.acquire_locks()
            return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise MigrationError(f"cannot lock the disk images: {exc.strerror or exc}") from None
            time.sleep(0.02)


def _try_send(channel: SocketChannel, ok: bool, text: str) -> None:
    try:
        send_reply(channel, ok, text)
    except (OSError, StreamError):
        log.debug("could not answer the source", exc_info=True)


def refuse(sock: socket.socket, message: str) -> None:
    """Tell the source why the destination gives up, so its error-desc says so.

    The answer is followed by a half-close and a short bounded drain of what the source
    is still sending: closing with unread data would reset the connection and could
    destroy the answer before the source reads it.
    """
    _try_send(SocketChannel(sock), False, message)
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(0.2)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and sock.recv(1 << 20):
            pass
    except OSError:
        pass


def load_snapshot(machine: Machine, directory: str, status: MigrationStatus) -> None:
    """Restore DIR/state + DIR/memory into the (not yet started) ``machine``."""
    state_file, memory_file = open_snapshot(directory)
    check_config = config_checker(machine)
    collected = IncomingState(machine)

    with state_file, memory_file:
        status.activate()
        state_reader = StreamReader(FileChannel(state_file), page_count=machine.memory.page_count,
                                    kind=StreamKind.STATE, arch=machine.arch.value)
        _read_stream(state_reader, collected, status, check_config)
        memory_reader = StreamReader(FileChannel(memory_file), page_count=machine.memory.page_count,
                                     ram=machine.memory, kind=StreamKind.MEMORY, arch=machine.arch.value)
        _read_stream(memory_reader, IncomingState(machine), status, check_config)
        assert state_reader.header is not None and memory_reader.header is not None
        if state_reader.header.stream_id != memory_reader.header.stream_id:
            raise MigrationError(f"{directory}: state and memory files are from different snapshots")
        machine.restore(collected.snapshot())
