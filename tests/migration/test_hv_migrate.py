"""``hv migrate`` and ``hv qmp --events`` end to end (issue 14 item 1): real hv processes
on Unicorn (runs on any host), real sockets, and a real pty for what a person sees."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import signal
import socket
import struct
import subprocess
import termios
import time

from tests.helpers import Vm, hv_command


def pair(vms, sock_dir: str) -> tuple[Vm, Vm, str]:
    src = vms("src")
    dst = vms("dst", "-incoming", f"unix:{os.path.join(sock_dir, 'dst.mig')}")
    src.wait_lines(2)
    return src, dst, dst.incoming_address()


def run_migrate(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(hv_command("migrate", *args), capture_output=True, text=True, timeout=timeout, check=False,
                          stdin=subprocess.DEVNULL)


def test_plain_lines_when_not_a_tty(vms, sock_dir):
    """(a) stdout a pipe: one plain key=value line per update, exit 0, destination runs."""
    src, dst, uri = pair(vms, sock_dir)
    result = run_migrate("--qmp", src.qmp_path, uri, "--interval", "0.1")
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stdout and "\x1b" not in result.stdout
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("migration completed in "), lines
    progress = [line for line in lines if line.startswith("migrate: status=")]
    assert progress and all(" ram=" in line and "MB/s" in line for line in progress), lines
    assert src.execute("query-status")["return"]["status"] == "postmigrate"
    before = dst.output().count("\n")
    dst.wait_lines(before + 2)  # the guest runs on at the destination
    assert dst.execute("query-status")["return"]["status"] == "running"


def read_pty(master: int, proc: subprocess.Popen, deadline: float) -> bytes:
    """Everything the program writes to its terminal until it exits."""
    out = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the slave side is closed, the program is gone
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    return out


def test_progress_redrawn_in_place_on_a_terminal(vms, sock_dir):
    """(b) stdout a real pty: the progress line (%, MB/s) is redrawn in place with \\r and
    erase-line, and the result stands on a line of its own."""
    src, _dst, uri = pair(vms, sock_dir)
    # A slow link so that several updates are drawn before it completes.
    src.execute("migrate-set-capabilities", capabilities=[{"capability": "auto-converge", "state": False}])
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))  # a 200-column terminal
    proc = subprocess.Popen(hv_command("migrate", "--qmp", src.qmp_path, uri, "--interval", "0.1",
                                       "--max-bandwidth", "4M"),
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE)
    os.close(slave)
    try:
        screen = read_pty(master, proc, time.monotonic() + 120).decode()
        assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
    redraws = screen.count("\r\x1b[K")
    assert redraws >= 2, repr(screen)
    assert "%" in screen and "MB/s" in screen and "ETA" in screen
    # What is left on screen at the end: the last line reports completion.
    last = screen.rstrip("\r\n").rsplit("\n", 1)[-1].split("\r\x1b[K")[-1]
    assert last.startswith("migration completed in "), repr(screen[-400:])


def test_refused_port_fails_with_error_desc(vms, sock_dir):
    """(c) nobody listens: exit 1 and the error-desc on stderr."""
    src = vms("src")
    src.wait_lines(1)  # up, its monitor listening
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # a port nobody listens on
    result = run_migrate("--qmp", src.qmp_path, f"tcp:127.0.0.1:{port}")
    assert result.returncode == 1
    info = src.execute("query-migrate")["return"]
    assert info["status"] == "failed", (info, result.stdout, result.stderr)
    desc = info["error-desc"]
    assert "Connection refused" in desc
    assert result.stderr.strip().splitlines() == [f"hv: error: migration failed: {desc}"]


def test_ctrl_c_cancels(vms, sock_dir):
    """(d) SIGINT during a slow migration: migrate_cancel, the source runs on, exit 130."""
    src, _dst, uri = pair(vms, sock_dir)
    proc = subprocess.Popen(hv_command("migrate", "--qmp", src.qmp_path, uri, "--interval", "0.1",
                                       "--max-bandwidth", "64K"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # it is following the migration
        assert first.startswith("migrate: status="), first
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, (out, err)
    assert "migration canceled by Ctrl-C; the VM runs on at the source" in out
    assert err.strip().splitlines() == ["hv: error: migration canceled (interrupted)"]
    assert src.execute("query-migrate")["return"]["status"] == "canceled"
    assert src.execute("query-status")["return"]["status"] == "running"
    lines = src.output().count("\n")
    src.wait_lines(lines + 2)


def test_qmp_events_follows_stop_and_resume(vms, sock_dir):
    """(e) hv qmp SOCKET --events prints STOP and RESUME as JSON lines when another
    client sends stop and cont; SIGINT ends it with exit 0."""
    vm = vms("vm")
    vm.wait_lines(1)
    proc = subprocess.Popen(hv_command("qmp", vm.qmp_path, "--events"), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None and proc.stdout is not None
        assert "following events" in proc.stderr.readline()  # subscribed from here on
        assert vm.execute("stop") == {"return": {}}
        assert vm.execute("cont") == {"return": {}}
        names = [json.loads(proc.stdout.readline())["event"] for _ in range(2)]
        assert names == ["STOP", "RESUME"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_channels_sets_multifd_channels_and_a_bad_value_is_one_line(vms, sock_dir):
    """--channels N is multifd-channels on the source: 9 is refused in one line before any
    migration starts; with 1 the migration completes and the parameter reads back."""
    src, dst, uri = pair(vms, sock_dir)
    bad = run_migrate("--qmp", src.qmp_path, uri, "--channels", "9")
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "hv: error: migration failed: Parameter 'multifd-channels' expects a value between 1 and 8"], bad.stderr
    assert src.execute("query-migrate")["return"].get("status", "none") == "none"
    assert src.execute("query-status")["return"]["status"] == "running"
    result = run_migrate("--qmp", src.qmp_path, uri, "--interval", "0.1", "--channels", "1")
    assert result.returncode == 0, result.stderr
    assert src.execute("query-migrate-parameters")["return"]["multifd-channels"] == 1
    before = dst.output().count("\n")
    dst.wait_lines(before + 2)  # the guest runs on at the destination
