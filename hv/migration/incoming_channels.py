"""The destination's data channels (format 1.6): more connections for the full pass.

A source that offers data channels (HEADER ``channels``) is told on the back channel how
many connections this destination takes (``channels M``); it then connects M - 1 more to
the same address. :class:`DataChannels` accepts them on the migration's listener, checks
that each opens as a data channel of this very migration (its CHANNEL section names the
main stream's id and an unused index) and reads each in its own thread, applying its pages
to guest RAM like the main stream's (the same checks, the same map of arrived pages). A
connection that is not such a channel is dropped with a warning and changes nothing; a
data channel whose stream is wrong fails the migration, as the main stream would.

The order rule that makes several connections safe: the main stream's CHANNELS_END (how
many data channels carried pages) comes before its ROUND_END 1, and the destination reads
nothing more of the main stream until that many channels have ended (:meth:`wait_ended`).
Pages sent again in pass 2 therefore always land after their pass-1 copies.
"""
from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
from collections.abc import Callable

from hv.errors import MigrationError
from hv.machine import Machine
from hv.migration.status import MigrationStatus
from hv.migration.stream import ChannelSection, EndSection, RamSection, StreamKind, StreamReader
from hv.migration.transport import Listener
from hv.textsafe import printable

log = logging.getLogger(__name__)

# Connections that are not a data channel of this migration accepted before the destination
# stops accepting more: a stray client cannot keep it busy.
MAX_STRAY_CONNECTIONS = 8


class DataChannelError(MigrationError):
    """A data channel's stream was wrong or broke (the message says which channel and why)."""


class _Channel:
    """One accepted connection, read by its own thread."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.index = 0  # set once its CHANNEL section is accepted
        self.ended = False
        self.thread: threading.Thread | None = None


class DataChannels:
    """Accepts and reads the ``count`` - 1 data channels of one incoming migration.

    ``watch(conn)`` wraps a connection so that its reads give up on hv's shutdown, on
    :meth:`close`, and after x-stall-timeout without a byte (the incoming module's
    ``_WatchedChannel``). The listener is closed once no more connections are taken.
    """

    def __init__(self, listener: Listener, machine: Machine, status: MigrationStatus, main: StreamReader,
                 stream_id: str, count: int, stall_timeout: float,
                 watch: Callable[[socket.socket, Callable[[], bool]], object]) -> None:
        self.listener = listener
        self.machine = machine
        self.status = status
        self.main = main
        self.stream_id = stream_id
        self.count = count
        self.stall_timeout = stall_timeout
        self._watch = watch
        self._channels: list[_Channel] = []
        self._stray = 0
        self._announced = 0  # data channels the main stream's CHANNELS_END counted
        self.torn_pages = 0  # RAM_LIVE pages that arrived torn on the data channels
        self._closed = False
        self._failure: DataChannelError | None = None
        self._changed = threading.Condition()
        self._wake_r, self._wake_w = socket.socketpair()
        self._acceptor = threading.Thread(target=self._accept_all, name="incoming-channels", daemon=True)

    def start(self) -> None:
        self._acceptor.start()

    # -- accepting ------------------------------------------------------------------------
    def _accept_all(self) -> None:
        try:
            while not self._closed and self._registered() < self.count - 1 \
                    and self._stray < MAX_STRAY_CONNECTIONS:
                ready, _, _ = select.select([self.listener.sock, self._wake_r], [], [])
                if self._closed or self._wake_r in ready:
                    break
                try:
                    conn = self.listener.accept(timeout=0)
                except (TimeoutError, BlockingIOError, InterruptedError):
                    continue
                channel = _Channel(conn)
                channel.thread = threading.Thread(target=self._serve, args=(channel,),
                                                  name="incoming-data", daemon=True)
                with self._changed:
                    self._channels.append(channel)
                channel.thread.start()
        except OSError as exc:
            if not self._closed:
                log.warning("incoming migration: no more data channels accepted: %s", exc.strerror or exc)
        finally:
            self.listener.close()

    def _registered(self) -> int:
        with self._changed:
            return sum(1 for c in self._channels if c.index)

    # -- reading one channel ------------------------------------------------------------
    def _serve(self, channel: _Channel) -> None:
        source = self._watch(channel.conn, lambda: self._closed)
        covered, pristine = self.main.page_maps()
        try:
            reader = StreamReader(source, page_count=self.main.page_count, ram=self.machine.memory,  # type: ignore[arg-type]
                                  kind=StreamKind.CHANNEL, arch=self.machine.arch.value,
                                  shared=(covered, pristine))
            first = reader.read_section()
        except Exception as exc:  # noqa: BLE001 - a stray connection: dropped, nothing changed
            self._drop(channel, str(exc))
            return
        assert isinstance(first, ChannelSection)
        with self._changed:
            taken = {c.index for c in self._channels}
            if first.stream_id != self.stream_id:
                reason = f"it belongs to another migration (stream {printable(first.stream_id)})"
            elif first.index >= self.count or first.index in taken:
                reason = f"channel {first.index} is not one this destination waits for"
            else:
                reason = ""
                channel.index = first.index
                self._changed.notify_all()
        if reason:
            self._drop(channel, reason)
            return
        try:
            while True:
                section = reader.read_section()
                if isinstance(section, RamSection):
                    self.status.record_ram(zero=section.zero, normal=section.normal, wire_bytes=section.bytes)
                elif isinstance(section, EndSection):
                    break
            with self._changed:
                channel.ended = True
                self._changed.notify_all()
                self.torn_pages += reader.torn_pages
        except Exception as exc:  # noqa: BLE001 - reported by the main stream's reader
            with self._changed:
                if self._failure is None and not self._closed:
                    self._failure = DataChannelError(f"data channel {channel.index}: {exc}")
                self._changed.notify_all()
        finally:
            with contextlib.suppress(OSError):
                channel.conn.close()

    def _drop(self, channel: _Channel, reason: str) -> None:
        log.warning("incoming migration: dropped a connection that is not a data channel of this migration: %s",
                    printable(reason))
        with contextlib.suppress(OSError):
            channel.conn.close()
        with self._changed:
            self._channels.remove(channel)
            self._stray += 1

    # -- what the main stream's reader asks ----------------------------------------------
    def check(self) -> None:
        """Raise the first data channel's failure, if one failed."""
        if self._failure is not None:
            raise self._failure

    def wait_ended(self, count: int, stopped: Callable[[], bool]) -> None:
        """CHANNELS_END: return once ``count`` data channels have ended; raise if one
        failed, if more were announced than taken, if hv shuts down, or if the channels
        still missing send nothing and none connects for x-stall-timeout seconds (a
        connected channel's own reads time out the same way)."""
        if count > self.count - 1:
            raise MigrationError(f"CHANNELS_END: {count} data channels, this destination took {self.count - 1}")
        self._announced = count
        progress, since = (-1, -1), time.monotonic()
        with self._changed:
            while True:
                self.check()
                ended = sum(c.ended for c in self._channels)
                if ended >= count:
                    return
                if stopped():
                    raise ConnectionAbortedError("hv is shutting down")
                state = (len(self._channels), ended)
                if state != progress:
                    progress, since = state, time.monotonic()
                elif time.monotonic() - since >= self.stall_timeout:
                    raise MigrationError(f"the source stalled: {count - ended} data channels did not end "
                                         f"within {self.stall_timeout:g} s (x-stall-timeout)")
                self._changed.wait(0.25)

    def finish(self) -> None:
        """ROUND_END 1: take no more connections; every data channel must have ended and
        been counted in CHANNELS_END (none without one)."""
        self._stop_accepting()
        self.check()
        with self._changed:
            registered = [c for c in self._channels if c.index]
            if any(not c.ended for c in registered) or len(registered) != self._announced:
                raise MigrationError(f"pass 1 ended with {len(registered)} data channels connected, "
                                     f"{sum(c.ended for c in registered)} of them ended, "
                                     f"{self._announced} announced")

    def _stop_accepting(self) -> None:
        if self._acceptor.is_alive():
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
            self._acceptor.join()

    def close(self) -> None:
        """Stop everything: no more connections, every channel's reads given up."""
        self._closed = True
        self._stop_accepting()
        with self._changed:
            channels = list(self._channels)
        for channel in channels:
            with contextlib.suppress(OSError):
                channel.conn.shutdown(socket.SHUT_RDWR)
        for channel in channels:
            if channel.thread is not None:
                channel.thread.join(timeout=2.0)
        self._wake_r.close()
        self._wake_w.close()
        self.listener.close()
