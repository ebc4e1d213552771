"""The ``hv`` launcher: StratoVirt's command line, one clear line on any error."""
from __future__ import annotations

import logging
import signal
import sys
import threading
from types import FrameType

from backends import choose_backend
from backends.base import BackendError
from hv import __version__
from hv.config import USAGE, ConfigError, VmConfig, parse_args
from hv.console import open_console
from hv.machine import Machine, RunState
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
    log.info("%s", why)
    image = read_kernel(config) if config.kernel is not None else None
    console = open_console(config.serial)
    try:
        machine = Machine(config, backend, console)
    except BackendError as exc:
        console.close()
        raise LaunchError(str(exc)) from None
    stop_signal: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop_signal.append(signum)
        threading.Thread(target=machine.request_shutdown, args=("host-signal",), daemon=True).start()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    server: QmpServer | None = None
    try:
        if image is not None:
            from hv.loader import LoaderError

            try:
                machine.load_kernel(image)
            except LoaderError as exc:
                raise LaunchError(f"-kernel: {config.kernel}: {exc}") from None
        if config.incoming is not None:
            raise LaunchError("-incoming: migration is not available in this build yet")
        commands = CommandTable()
        monitor = MachineMonitor(machine, commands, config.name)
        if config.qmp:
            server = QmpServer(list(config.qmp), commands)
            try:
                server.start()
            except QmpServerError as exc:
                raise LaunchError(str(exc)) from None
            monitor.attach(server)
        machine.start(paused=config.start_paused, paused_state=RunState.PRELAUNCH)
        while machine.wait_shutdown(timeout=0.5) is None:
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if server is not None:
            server.close()
        machine.close()
        console.close()
    if stop_signal:
        log.info("terminating on signal %d", stop_signal[0])
    if machine.exit_error is not None:
        raise LaunchError(f"guest stopped: {machine.exit_error}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["qmp"]:
        from hv.qmp.client import main as qmp_main

        return qmp_main(args[1:])
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
