"""The ``hv`` launcher: StratoVirt's command line, one clear line on any error."""
from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
import traceback
from types import FrameType

from hv_backends import choose_backend
from hv_backends.base import BackendError
from hv import __version__
from hv.devconfig import DevConfigError
from hv.config import USAGE, ConfigError, VmConfig, parse_args
from hv.console import open_console
from hv.machine import Machine, RunState
from hv.migration.engine import load_snapshot, receive_migration
from hv.migration.manager import MigrationManager
from hv.migration.transport import listen, parse_migration_uri
from hv.monitor import MachineMonitor
from hv.qmp import CommandTable, QmpServer, QmpServerError

log = logging.getLogger("hv")


class LaunchError(RuntimeError):
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


def run(config: VmConfig) -> int:
    """Build the machine, run it until it ends, clean up; the process exit code."""
    try:
        backend, why = choose_backend(config.arch, config.accel)
    except BackendError as exc:
        raise LaunchError(str(exc)) from None
    image = read_kernel(config) if config.kernel is not None else None
    console = open_console(config.serial)
    try:
        machine = Machine(config, backend, console)
    except (BackendError, DevConfigError) as exc:
        console.close()
        raise LaunchError(str(exc)) from None
    session = Session(config, machine)
    previous = {sig: signal.signal(sig, session.on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if config.incoming is not None:
            machine.kernel_image = image
            log.info("%s", why)  # logged after every check, so a bad option stays one line
            # In 'inmigrate' before QMP answers: nothing may change the device set or run
            # the guest between the first QMP command and the incoming stream.
            machine.set_state(RunState.INMIGRATE)
            session.start_monitor()  # QMP answers while the migration arrives
            session.receive(config.incoming)
        else:
            assert image is not None
            from hv.loader import LoaderError

            try:
                machine.load_kernel(image)
            except LoaderError as exc:
                raise LaunchError(f"-kernel: {config.kernel}: {exc}") from None
            log.info("%s", why)
            # vCPU threads exist before the monitor answers, so 'cont' after -S always works.
            machine.start(paused=config.start_paused, paused_state=RunState.PRELAUNCH)
            session.start_monitor()
        while machine.wait_shutdown(timeout=0.5) is None:
            pass
    finally:
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


class Session:
    """The parts of one hv process around its machine: QMP, migration, signals."""

    def __init__(self, config: VmConfig, machine: Machine) -> None:
        self.config = config
        self.machine = machine
        self.commands = CommandTable()
        self.monitor = MachineMonitor(machine, self.commands, config.name)
        self.migration = MigrationManager(machine, self.commands, self.monitor.on_machine_event)
        self.server: QmpServer | None = None
        self.stop_signal: list[int] = []
        self._incoming_sock: socket.socket | None = None
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
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def receive(self, uri_text: str) -> None:
        """Wait for and receive an incoming migration (or restore a snapshot), then run.

        The guest starts only once everything arrived and validated; on failure hv exits
        non-zero with one line (LaunchError), never running a half-received guest.
        """
        uri = parse_migration_uri(uri_text)
        machine, status = self.machine, self.migration.status
        machine.set_state(RunState.INMIGRATE)
        status.start(machine.memory.size)
        try:
            if uri.scheme == "file":
                load_snapshot(machine, uri.path, status)
                machine.start()
                status.complete(None)
                log.info("restored snapshot %s", uri.path)
                return
            with listen(uri) as listener:
                log.info("waiting for an incoming migration on %s", listener.address)
                conn = None
                while conn is None:
                    if machine.state is RunState.SHUTDOWN:
                        return
                    try:
                        conn = listener.accept(timeout=0.2)
                    except TimeoutError:
                        continue
            self._incoming_sock = conn
            try:
                if machine.state is RunState.SHUTDOWN:
                    return
                receive_migration(machine, conn, status)
            finally:
                self._incoming_sock = None
                conn.close()
            log.info("incoming migration completed; guest running")
        except Exception as exc:
            _release_frames(exc)
            if machine.state is RunState.SHUTDOWN:
                return  # quit or a signal interrupted the wait
            reason = str(exc) or exc.__class__.__name__
            if isinstance(exc, OSError) and exc.strerror:
                reason = exc.strerror
            if status.is_active():
                status.fail(reason)
            raise LaunchError(f"incoming migration failed: {reason}") from None

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


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
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["qmp"]:
        from hv.qmp.client import main as qmp_main

        return qmp_main(args[1:])
    if args[:1] == ["bench"]:
        from hv.bench import main as bench_main

        return bench_main(args[1:])
    try:
        parsed = parse_args(args)
    except ConfigError as exc:
        print(f"hv: error: {exc}", file=sys.stderr)
        return 1
    if parsed.action == "help":
        print(USAGE, end="")
        return 0
    if parsed.action == "version":
        print(f"hv {__version__}")
        return 0
    assert parsed.config is not None
    setup_logging(parsed.config)
    try:
        return run(parsed.config)
    except LaunchError as exc:
        print(f"hv: error: {exc}", file=sys.stderr)
        return 1
