"""Console input (hv/console_input.py): stdin to the guest's UART.

In-process: a real machine's UART fed through a real pipe, read back through the
machine's bus as the guest reads it, with more input than the UART holds (nothing lost,
order kept). As a user runs it: ``hv -serial stdio`` on a real pseudo-terminal (the
terminal is switched to pass-through mode and restored at exit, by Ctrl-A x and by
SIGTERM alike) and on a pipe that reaches end of file (the guest runs on).
Linux guests typing into a shell, across migrations too, are in tests/e2e/test_linux.py.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator

import pytest
from hv_backends import backend_class

from hv.config import parse_args
from hv.console import BufferSink
from hv.console_input import EscapeFilter, start_console_input
from hv.devices.pl011 import FR, FR_RXFE
from hv.machine import Machine
from tests.helpers import FIXTURES, ROOT, hv_command

PL011 = 0x0900_0000


@pytest.fixture
def machine() -> Iterator[Machine]:
    config = parse_args(["-machine", "virt", "-m", "64", "-kernel", str(FIXTURES / "aarch64" / "hello.elf"),
                         "-serial", "stdio"]).config
    vm = Machine(config, backend_class("unicorn")(), BufferSink())
    yield vm
    vm.close()


def guest_reads(vm: Machine, count: int, timeout: float = 10.0) -> bytes:
    """Read the PL011 as a guest does (FR.RXFE, then DR) until ``count`` bytes came."""
    out = bytearray()
    deadline = time.monotonic() + timeout
    while len(out) < count:
        assert time.monotonic() < deadline, f"only {len(out)} of {count} bytes arrived"
        if vm.mmio_read(PL011 + FR, 4) & FR_RXFE:
            time.sleep(0.005)
            continue
        out.append(vm.mmio_read(PL011, 4) & 0xFF)
    return bytes(out)


def test_escape_filter() -> None:
    f = EscapeFilter()
    assert f.filter(b"ls\x03\x04") == (b"ls\x03\x04", False)          # Ctrl-C/D go to the guest
    assert f.filter(b"a\x01\x01b") == (b"a\x01b", False)              # Ctrl-A Ctrl-A: one Ctrl-A
    assert f.filter(b"\x01z") == (b"\x01z", False)                    # other keys: both
    assert f.filter(b"q\x01") == (b"q", False) and f.armed            # split across reads
    assert f.filter(b"xyz") == (b"", True)                            # Ctrl-A x: quit
    assert EscapeFilter().filter(b"ok\x01X") == (b"ok", True)


def test_pipe_input_reaches_the_uart_in_order_with_backpressure(machine: Machine) -> None:
    read_fd, write_fd = os.pipe()
    data = bytes((i * 7 + i // 256) & 0xFF for i in range(20000))     # > FIFO + host queue + a read
    reader = start_console_input(read_fd, machine.console_input, lambda: None)
    assert reader is not None and reader.terminal is None                # a pipe: no terminal mode
    try:
        os.set_blocking(write_fd, False)
        sent = 0
        got = bytearray()
        deadline = time.monotonic() + 60
        while len(got) < len(data):
            assert time.monotonic() < deadline, f"stalled at {len(got)} bytes"
            if sent < len(data):
                try:
                    sent += os.write(write_fd, data[sent:sent + 65536])
                except BlockingIOError:
                    pass
            got += guest_reads(machine, min(512, sent - len(got)))
        assert bytes(got) == data
    finally:
        os.close(write_fd)
        reader.close()
        os.close(read_fd)


def test_inmigrate_machine_holds_input_until_it_can_take_it(machine: Machine) -> None:
    from hv.machine import RunState

    machine.set_state(RunState.INMIGRATE)
    assert machine.console_input(b"abc") == 0
    machine.set_state(RunState.PAUSED)
    assert machine.console_input(b"abc") == 3 and guest_reads(machine, 3) == b"abc"


# -- hv as a user runs it -----------------------------------------------------------------

def start_on_pty(*args: str) -> tuple[subprocess.Popen, int, list]:
    """hv in its own session with a new pseudo-terminal as its controlling terminal and
    stdin/stdout (so it is the terminal's foreground process); the master side and the
    terminal's settings before hv started."""
    master, slave = os.openpty()
    before = termios.tcgetattr(slave)

    # A new session (start_new_session) whose first act is to take the pty as its
    # controlling terminal, then become hv.
    take_terminal = ("import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
                     "os.execv(sys.argv[1], sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, "-c", take_terminal, *hv_command(*args)], cwd=ROOT, stdin=slave,
                            stdout=slave, stderr=subprocess.PIPE, start_new_session=True)
    os.close(slave)
    return proc, master, before


def read_until(master: int, needle: bytes, timeout: float = 60.0) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while needle not in out:
        assert time.monotonic() < deadline, f"no {needle!r} in {out[-500:]!r}"
        if select.select([master], [], [], 0.2)[0]:
            try:
                out += os.read(master, 4096)
            except OSError:
                break
    return out


DIRTY = ("-machine", "virt", "-accel", "unicorn", "-m", "64", "-kernel", str(FIXTURES / "aarch64" / "dirty.elf"),
         "-append", "mib=1", "-serial", "stdio")


@pytest.mark.parametrize("how", ["ctrl-a-x", "sigterm"])
def test_terminal_is_passed_through_and_restored(how: str) -> None:
    proc, master, before = start_on_pty(*DIRTY)
    try:
        read_until(master, b"pass 1 ")
        during = termios.tcgetattr(master)
        assert not during[3] & (termios.ECHO | termios.ICANON | termios.ISIG)   # keys go through
        assert during[1] & termios.OPOST                                         # output as before
        if how == "ctrl-a-x":
            os.write(master, b"\x01x")
        else:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert termios.tcgetattr(master) == before
        if how == "ctrl-a-x":
            assert b"Ctrl-A x: quitting" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stderr.close()
        os.close(master)


def test_end_of_piped_input_leaves_the_guest_running(tmp_path) -> None:
    proc = subprocess.Popen(hv_command(*DIRTY), cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        proc.stdin.write(b"typed, then end of file")
        proc.stdin.close()
        out = b""
        while out.count(b"\n") < 4:       # banner, then passes keep coming after the EOF
            chunk = proc.stdout.read1(4096)
            assert chunk, f"hv stopped: {out!r}"
            out += chunk
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(30)
        proc.stdout.close()
