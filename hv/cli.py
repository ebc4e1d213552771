"""The ``hv`` launcher: StratoVirt's command line, one clear line on any error."""
from __future__ import annotations

import contextlib
import gc
import logging
import queue
import signal
import socket
import sys
import threading
import traceback
from types import FrameType

from hv import __version__
from hv.config import INCOMING_DEFER, USAGE, Incoming, VmConfig, parse_args
from hv.console import open_console
from hv.console_input import attach_stdio_input
from hv.devices.virtio_net import VirtioNetPciDevice
from hv.errors import HvError
from hv.machine import Machine, RunState
from hv.migration.incoming import incoming_error, load_snapshot, receive_migration, start_prefault
from hv.migration.manager import MigrationManager
from hv.migration.tls import TlsConfigError, TlsHandshakeError, wrap_server
from hv.migration.transport import Listener, MigrationConnectError, MigrationUri, SnapshotError, listen, open_snapshot
from hv.monitor import MachineMonitor
from hv.net import NetBackend, announce_self
from hv.qmp import CommandTable, QmpServer, QmpServerError
from hv_backends import choose_backend

log = logging.getLogger("hv")


class LaunchError(HvError, RuntimeError):
    """hv cannot start the VM as configured; the message says why."""


def setup_logging(config: VmConfig) -> None:
    handler: logging.Handler
    if config.logfile is not None:
        handler = logging.FileHandler(config.logfile)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("hv: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def read_kernel(config: VmConfig) -> bytes:
    assert config.kernel is not None
    try:
        return config.kernel.read_bytes()
    except OSError as exc:
        raise LaunchError(f"-kernel: {config.kernel}: {exc.strerror}") from None


def read_initrd(config: VmConfig) -> bytes | None:
    """The -initrd file; one larger than guest RAM is refused before it is read."""
    if config.initrd is None:
        return None
    try:
        size = config.initrd.stat().st_size
        if size > config.memory_bytes:
            raise LaunchError(f"-initrd: {config.initrd}: {size} bytes do not fit in "
                              f"{config.memory_bytes >> 20} MiB of guest RAM")
        return config.initrd.read_bytes()
    except OSError as exc:
        raise LaunchError(f"-initrd: {config.initrd}: {exc.strerror}") from None


def run(config: VmConfig) -> int:
    """Build the machine, run it until it ends, clean up; the process exit code."""
    backend, why = choose_backend(config.arch, config.accel)   # BackendError: main's one line
    image = read_kernel(config) if config.kernel is not None else None
    initrd = read_initrd(config)
    console = open_console(config.serial)
    try:
        machine = Machine(config, backend, console)
    except BaseException:
        console.close()   # then main prints an HvError's one line, or the traceback of a bug
        raise
    session = Session(config, machine)
    stop_console_input = attach_stdio_input(config.serial, machine)
    previous = {sig: signal.signal(sig, session.on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if config.incoming is not None:
            machine.kernel_image = image
            machine.initrd_image = initrd
            log.info("%s", why)  # logged after every check, so a bad option stays one line
            # In 'inmigrate' before QMP answers: nothing may change the device set or run
            # the guest between the first QMP command and the incoming stream.
            machine.set_state(RunState.INMIGRATE)
            settle_heap()
            session.start_monitor()  # QMP answers while the migration arrives
            session.receive(config.incoming)
        else:
            assert image is not None
            from hv.boot import LoaderError

            try:
                machine.load_kernel(image, initrd)
            except LoaderError as exc:
                raise LaunchError(f"-kernel: {config.kernel}: {exc}") from None
            log.info("%s", why)
            # vCPU threads exist before the monitor answers, so 'cont' after -S always works.
            machine.start(paused=config.start_paused, paused_state=RunState.PRELAUNCH)
            settle_heap()
            session.start_monitor()
        while machine.wait_shutdown(timeout=0.5) is None:
            pass
    finally:
        stop_console_input()   # first: the terminal is restored before anything else is printed
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        session.close()
        machine.close()
        console.close()
    if session.stop_signal:
        log.info("terminating on signal %d", session.stop_signal[0])
    if machine.exit_error is not None:
        raise LaunchError(f"guest stopped: {machine.exit_error}")
    return 0


def settle_heap() -> None:
    """Once the machine is built: collect, then freeze everything left (gc.freeze) so the
    cyclic GC never scans hv's startup objects again. Until then every hv had its first
    full collection still pending (gen 2 count 6 of 10 when a migration connected), ~25 ms
    over the ~40k startup objects whenever enough allocations trigger it, which can be
    inside a migration's stream or switch-over; after the freeze a full collection scans
    only what was allocated since."""
    gc.collect()
    gc.freeze()


class Session:
    """The parts of one hv process around its machine: QMP, migration, signals."""

    def __init__(self, config: VmConfig, machine: Machine) -> None:
        self.config = config
        self.machine = machine
        self.commands = CommandTable()
        self.monitor = MachineMonitor(machine, self.commands, config.name)
        self.migration = MigrationManager(machine, self.commands, self.monitor.on_machine_event, config.objects)
        self.server: QmpServer | None = None
        self.stop_signal: list[int] = []
        self._incoming_sock: socket.socket | None = None
        # -incoming defer: what migrate-incoming opened, for the main thread to receive on
        self._deferred: queue.Queue[tuple[MigrationUri, Listener | None]] = queue.Queue()
        self.migration.register_incoming(self.commands, self._defer_start,
                                         started=isinstance(config.incoming, MigrationUri))
        machine.add_listener(self._on_machine_event)

    def start_monitor(self) -> None:
        if not self.config.qmp:
            return
        self.server = QmpServer(list(self.config.qmp), self.commands)
        try:
            self.server.start()
        except QmpServerError as exc:
            self.server = None
            raise LaunchError(str(exc)) from None
        self.monitor.attach(self.server)

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop_signal.append(signum)
        self._abort_incoming()
        threading.Thread(target=self.machine.request_shutdown, args=("host-signal",), daemon=True).start()

    def _on_machine_event(self, event: str, data: dict | None) -> None:
        if event == "SHUTDOWN":  # quit while waiting for a migration: stop waiting
            self._abort_incoming()

    def _abort_incoming(self) -> None:
        sock = self._incoming_sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _open_incoming(self, uri: MigrationUri) -> Listener | None:
        """Listen on a tcp:/unix: URI (logging the bound address: the real port for port 0),
        or check that a file: snapshot can be read (None)."""
        if uri.scheme == "file":
            for f in open_snapshot(uri.path):  # SnapshotError now, not after the QMP reply
                f.close()
            return None
        listener = listen(uri)
        log.info("waiting for an incoming migration on %s", listener.address)
        return listener

    def _defer_start(self, uri: MigrationUri) -> None:
        """migrate-incoming (QMP thread): open the URI now and hand it to the main thread."""
        self._deferred.put((uri, self._open_incoming(uri)))

    def _wait_deferred(self) -> tuple[MigrationUri, Listener | None] | None:
        """-incoming defer: wait for migrate-incoming; None when quit or a signal came first."""
        log.info("-incoming defer: waiting for the QMP command migrate-incoming")
        while True:
            try:
                item = self._deferred.get(timeout=0.2)
            except queue.Empty:
                if self.machine.state is RunState.SHUTDOWN:
                    return None
                continue
            if self.machine.state is RunState.SHUTDOWN:
                if item[1] is not None:
                    item[1].close()
                return None
            return item

    def receive(self, incoming: Incoming) -> None:
        """Wait for and receive an incoming migration (or restore a snapshot), then run.

        ``defer`` waits for the QMP command migrate-incoming to name the URI first. The
        guest starts only once everything arrived and validated; on failure hv exits
        non-zero with one line (LaunchError), never running a half-received guest.
        """
        start_prefault(self.machine)  # in the background, while waiting for the source
        if incoming is INCOMING_DEFER:
            item = self._wait_deferred()
            if item is None:
                return
            uri, listener = item
        else:
            assert isinstance(incoming, MigrationUri)
            uri = incoming
            try:
                listener = self._open_incoming(uri)
            except (MigrationConnectError, SnapshotError) as exc:
                raise LaunchError(f"incoming migration failed: {exc}") from None
        if listener is None:
            self._receive_snapshot(uri)
        else:
            with listener:
                self._receive_stream(listener)

    def _receive_snapshot(self, uri: MigrationUri) -> None:
        machine, status = self.machine, self.migration.status
        status.start(machine.memory.size)
        try:
            load_snapshot(machine, uri.path, status)
        except Exception as exc:
            self._incoming_failed(exc)
            return
        machine.start()
        status.complete(None)
        log.info("restored snapshot %s", uri.path)

    def _receive_stream(self, listener: Listener) -> None:
        machine, status = self.machine, self.migration.status
        status.start(machine.memory.size)
        try:
            conn = None
            while conn is None:
                if machine.state is RunState.SHUTDOWN:
                    return
                try:
                    conn = self._accept_source(listener)
                except TimeoutError:
                    continue
            self._incoming_sock = conn
            try:
                if machine.state is RunState.SHUTDOWN:
                    return
                # Data channels (format 1.6) connect to the same listener; not over TLS (the
                # source opens none there), so the listener is closed right away then.
                if self.migration.tls_creds:
                    listener.close()
                receive_migration(machine, conn, status, self.migration.params.stall_timeout,
                                  listener=None if self.migration.tls_creds else listener,
                                  channels=self.migration.params.multifd_channels)
            finally:
                self._incoming_sock = None
                conn.close()
            log.info("incoming migration completed; guest running")
            announce_self(_nics(machine))   # the network learns where the guest is now
        except Exception as exc:
            self._incoming_failed(exc)

    def _accept_source(self, listener: Listener) -> socket.socket | None:
        """One source connection, TLS-wrapped when tls-creds is set. As QEMU does, a source
        that fails the TLS handshake (plain, or a certificate the CA did not sign) is
        reported in one line and dropped, and hv keeps listening for a proper one; the
        guest state is untouched and query-migrate stays 'setup'."""
        conn = listener.accept(timeout=0.2)
        creds_id = self.migration.tls_creds
        if not creds_id:
            return conn
        self._incoming_sock = conn
        try:
            return wrap_server(conn, self.migration.tls.get(creds_id))
        except (TlsHandshakeError, TlsConfigError) as exc:
            log.error("incoming migration: %s; still waiting for a source", exc)
            return None
        finally:
            self._incoming_sock = None

    def _incoming_failed(self, exc: Exception) -> None:
        """Record why an incoming migration failed and end hv with one line (unless quit
        or a signal interrupted it, which ends hv normally). Only a refusal (HvError) or
        an OS error is a failure of the input; any other exception is a bug in hv and
        ends hv with its traceback."""
        _release_frames(exc)
        if self.machine.state is RunState.SHUTDOWN:
            return  # quit or a signal interrupted the wait
        if not isinstance(exc, (HvError, OSError)):
            if self.migration.status.is_active():
                self.migration.status.fail(f"internal error: {exc!r}")
            raise exc
        reason = str(exc) or exc.__class__.__name__
        if isinstance(exc, OSError) and exc.strerror:
            reason = exc.strerror
        if self.migration.status.is_active():
            self.migration.status.fail(reason)
        raise LaunchError(incoming_error(exc, reason)) from None

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        while not self._deferred.empty():  # migrate-incoming raced with quit
            _uri, listener = self._deferred.get_nowait()
            if listener is not None:
                listener.close()


def _nics(machine: Machine) -> list[tuple[NetBackend, bytes]]:
    """Every plugged virtio-net's backend and MAC (for the post-migration announce)."""
    return [(slot.device.net.backend, slot.device.net.mac) for slot in list(machine.pci.slots)
            if isinstance(slot.device, VirtioNetPciDevice) and not slot.device.detached]


def _release_frames(exc: BaseException) -> None:
    """Drop the locals of every frame in ``exc``'s traceback chain.

    A read that failed mid-RAM-section leaves memoryviews into guest RAM in those frames
    (the stream applies pages in place); while they live, ``Machine.close`` cannot unmap
    the RAM (BufferError), so hv would die with a traceback instead of its one error line.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if current.__traceback__ is not None:
            traceback.clear_frames(current.__traceback__)
        current = current.__cause__ or current.__context__


def main(argv: list[str] | None = None) -> int:
    """The launcher (``hv -machine ...``); ``hv.command.main`` dispatches the subcommands first."""
    args = sys.argv[1:] if argv is None else argv
    try:
        parsed = parse_args(args)
        if parsed.action == "help":
            print(USAGE, end="")
            return 0
        if parsed.action == "version":
            print(f"hv {__version__}")
            return 0
        assert parsed.config is not None
        setup_logging(parsed.config)
        return run(parsed.config)
    except HvError as exc:   # bad input or an unusable host: one line; any other exception is a bug
        print(f"hv: error: {exc}", file=sys.stderr)
        return 1
