"""Console input: bytes typed on hv's stdin go to the guest's UART (``-serial stdio``).

A reader thread waits on stdin with ``select`` (so it can be stopped, and stdin's file
flags are never changed: a tty's O_NONBLOCK is shared with the shell) and hands what it
reads to ``feed`` — the machine's ``console_input``, which takes the big lock and queues
the bytes in the 16550/PL011. The UART takes what fits in its FIFO and its bounded host
queue; the reader keeps the rest (at most one 4 KiB read) and offers it again every
20 ms, reading nothing more meanwhile, so a fast writer is slowed by the pipe rather
than losing bytes. While the machine cannot take input (an incoming migration has not
arrived yet) ``feed`` returns 0 and the bytes wait the same way; paused machines take
input into the UART, whose receive state is saved and migrated.

When stdin is a terminal (and hv is its foreground process), it is switched to the mode
QEMU's ``-nographic`` console uses: no echo, no line editing, no signal keys, so Ctrl-C,
Ctrl-Z and Ctrl-D reach the guest's shell; output processing stays on. **Ctrl-A x**
quits hv (a clean shutdown, as SIGTERM) and **Ctrl-A Ctrl-A** sends one Ctrl-A; Ctrl-A
followed by any other key sends both. The terminal's settings are restored when hv
ends, on every path out of :func:`hv.cli.run` and at interpreter exit. When stdin is
not a terminal (a pipe, a file, /dev/null) its bytes pass through unchanged, no escape
key is interpreted, and end of file just stops the reader.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import select
import stat
import termios
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from hv.config import SerialConfig

log = logging.getLogger("hv.console")

CTRL_A = 0x01
READ_CHUNK = 4096
RETRY_INTERVAL = 0.02


@dataclass
class EscapeFilter:
    """Ctrl-A handling on a terminal: ``x`` quits, Ctrl-A sends itself, anything else
    sends Ctrl-A and the key. Carries a pending Ctrl-A across reads."""

    armed: bool = False

    def filter(self, data: bytes) -> tuple[bytes, bool]:
        """The bytes for the guest, and whether the user asked to quit (the bytes after
        the quit key are dropped)."""
        out = bytearray()
        for byte in data:
            if self.armed:
                self.armed = False
                if byte in (ord("x"), ord("X")):
                    return bytes(out), True
                out.append(CTRL_A)
                if byte != CTRL_A:
                    out.append(byte)
            elif byte == CTRL_A:
                self.armed = True
            else:
                out.append(byte)
        return bytes(out), False


@dataclass
class TerminalMode:
    """A terminal switched to pass-through mode, and how to put it back."""

    fd: int
    saved: list = field(default_factory=list)

    @classmethod
    def enter(cls, fd: int) -> TerminalMode | None:
        """Switch ``fd`` to pass-through mode; None when it is not a terminal hv owns (not
        a tty, or hv is not in its foreground process group: a background hv must not
        touch the terminal, or read it and be stopped by SIGTTIN)."""
        try:
            if not os.isatty(fd) or os.tcgetpgrp(fd) != os.getpgrp():
                return None
            saved = termios.tcgetattr(fd)
        except OSError:
            return None
        mode = termios.tcgetattr(fd)
        mode[0] &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP | termios.INLCR
                     | termios.IGNCR | termios.ICRNL | termios.IXON)
        mode[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.IEXTEN | termios.ISIG)
        mode[6][termios.VMIN] = 1
        mode[6][termios.VTIME] = 0
        termios.tcsetattr(fd, termios.TCSANOW, mode)
        terminal = cls(fd, saved)
        atexit.register(terminal.restore)
        return terminal

    def restore(self) -> None:
        """Put the terminal back as it was (idempotent; a vanished terminal is ignored)."""
        if not self.saved:
            return
        saved, self.saved = self.saved, []
        with contextlib.suppress(OSError, termios.error):
            termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)
        atexit.unregister(self.restore)


class ConsoleInput:
    """The stdin reader thread; ``feed(data)`` returns how many bytes the UART took,
    ``quit()`` is called on Ctrl-A x."""

    def __init__(self, fd: int, feed: Callable[[bytes], int], quit: Callable[[], None]) -> None:
        self.fd = fd
        self.feed = feed
        self.quit = quit
        self.terminal: TerminalMode | None = None
        self.escape: EscapeFilter | None = None
        self._held = bytearray()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="console-input", daemon=True)

    def start(self) -> None:
        self.terminal = TerminalMode.enter(self.fd)
        if self.terminal is not None:
            self.escape = EscapeFilter()
        self._thread.start()

    def close(self) -> None:
        """Stop the reader and restore the terminal. Bytes the guest never took are dropped."""
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        if self.terminal is not None:
            self.terminal.restore()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self._held:
                    del self._held[:self.feed(bytes(self._held))]
                    if self._held:
                        self._stop.wait(RETRY_INTERVAL)
                    continue
                if not self._read_once():
                    return
        except Exception:   # the console must never take the VMM down
            log.exception("console input stopped")

    def _read_once(self) -> bool:
        """Wait for input and take one chunk; False at end of input or on stop."""
        ready, _, _ = select.select([self.fd, self._wake_r], [], [])
        if self._wake_r in ready:
            return False
        try:
            data = os.read(self.fd, READ_CHUNK)
        except OSError as exc:
            log.warning("console input stopped: %s", exc.strerror)
            return False
        if not data:
            return False
        if self.escape is not None:
            data, quit_now = self.escape.filter(data)
            if quit_now:
                self._held += data
                log.info("Ctrl-A x: quitting")
                self.quit()
                return False
        self._held += data
        return True


def start_console_input(fd: int, feed: Callable[[bytes], int], quit: Callable[[], None]) -> ConsoleInput | None:
    """Start reading console input from ``fd`` (stdin); None when there is nothing to
    read (fd closed, or a directory/odd file type)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return None
    if not (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISREG(mode)):
        return None
    reader = ConsoleInput(fd, feed, quit)
    reader.start()
    return reader


class ConsoleTarget(Protocol):
    """What console input needs of a machine (hv.machine.Machine)."""

    def console_input(self, data: bytes) -> int: ...

    def request_shutdown(self, reason: str) -> None: ...


def attach_stdio_input(config: SerialConfig, machine: ConsoleTarget, fd: int = 0) -> Callable[[], None]:
    """With ``-serial stdio``, feed stdin to ``machine``'s UART; returns the function that
    stops reading and restores the terminal (a no-op for other consoles)."""
    if config.kind != "stdio":
        return lambda: None
    reader = start_console_input(fd, machine.console_input, lambda: machine.request_shutdown("host-ui"))
    return reader.close if reader is not None else (lambda: None)
